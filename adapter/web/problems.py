"""The one mapping from exceptions to RFC 9457 problem responses."""

from __future__ import annotations

import re
from http import HTTPStatus

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from ..context import request_id
from ..errors import AdapterError, BadRequest
from ..models import FieldError, Problem
from ..storage.event_log import Log

TYPE_BASE = "urn:problem:crm-ai:"
MEDIA_TYPE = "application/problem+json"
_NAMED_FIELD = re.compile(r"field `([^`]+)`")
log = structlog.get_logger("adapter.problems")
_encode = msgspec.json.Encoder().encode

_WHERE = {"query": "query parameter", "path": "path parameter", "header": "header", "cookie": "cookie"}
_HTTP_SLUGS = {
    400: "invalid-request", 401: "unauthenticated", 403: "forbidden", 404: "not-found",
    405: "method-not-allowed", 413: "payload-too-large", 415: "unsupported-media-type",
    429: "rate-limited", 431: "headers-too-large",
}


def problem_of(exc: Exception, method: str, path: str, max_body: int | None = None) -> tuple[Problem, dict[str, str]]:
    """Pure: what an exception says to the caller, and the headers that go with it."""
    if isinstance(exc, AdapterError):
        errors = [FieldError(message=e) for e in exc.errors] or None
        if isinstance(exc, BadRequest):  # every 400 lists what was wrong in errors[], field or not
            errors = errors or [FieldError(field=exc.field, message=exc.detail.removeprefix("invalid request body: "))]
        return Problem(type=TYPE_BASE + exc.slug, title=exc.title, status=exc.status, detail=exc.detail, errors=errors), exc.headers
    if isinstance(exc, ValidationException):
        items = [item for item in (exc.extra or []) if isinstance(item, dict)]
        errors = [_field_error(item) for item in items]
        # Say where: a query or path parameter is not the body.
        parts = [f"{_WHERE.get(item.get('source'), 'request body')}: " + (f"`{e.field}`: {e.message}" if e.field else e.message)
                 for item, e in zip(items, errors, strict=True)]
        detail = "; ".join(parts) or f"request body: {exc.detail}"
        return Problem(type=TYPE_BASE + "invalid-request", title="Invalid request", status=400,
                       detail=f"invalid {detail}", errors=errors or None), {}
    if isinstance(exc, HTTPException):
        status = exc.status_code
        detail = exc.detail
        if status == 404 and detail == "Not Found":
            detail = f"no route for {method} {path}"
        elif status == 405:
            detail = f"{method} is not allowed on {path}"
        elif status == 413 and max_body:
            detail = f"the request body is larger than the {max_body}-byte limit (MAX_BODY_BYTES)"
        title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        return Problem(type=TYPE_BASE + _HTTP_SLUGS.get(status, f"http-{status}"), title=title, status=status,
                       detail=detail), dict(exc.headers or {})
    return Problem(type=TYPE_BASE + "internal-error", title="Internal error", status=500,
                   detail="the sidecar failed unexpectedly; the request id locates the log entry"), {}


def _field_error(item: dict) -> FieldError:
    key = item.get("key")
    message = str(item.get("message", "invalid value"))
    # msgspec's messages end with " - at `$.field`"; the field is reported on its own.
    message = message.split(" - at `", 1)[0]
    if key in (None, "data"):
        # Errors about the body as a whole ("unknown field `x`", "missing required field `y`") name it inline.
        named = _NAMED_FIELD.search(message)
        key = named.group(1) if named else None
    return FieldError(field=str(key) if key else None, message=message)


# Where each kind of log is read: the `instance` of a problem about one (URLs are built here, never below web).
LOG_PATHS = {"job": "/api/v1/ai/jobs/", "batch": "/api/v1/ai/batches/"}


def problem_json(exc: Exception, log: Log) -> bytes:
    """A log's `error` event (a job's, a batch item's): the problem an exception is, as JSON, about that log."""
    instance = LOG_PATHS[log.kind] + log.id
    problem, _ = problem_of(exc, "GET", instance)
    problem.instance = instance
    return _encode(problem)


def handle(request: Request, exc: Exception) -> Response:
    settings = getattr(request.app.state, "settings", None)
    problem, headers = problem_of(exc, request.method, request.url.path, settings.max_body_bytes if settings else None)
    problem.request_id = request_id(request.scope)
    problem.instance = request.url.path
    if problem.status >= 500 and not isinstance(exc, (AdapterError, HTTPException)):
        log.error("request.unhandled", exc_info=exc)
    elif problem.status >= 500 or isinstance(exc, AdapterError):
        log.info("request.problem", status=problem.status, type=problem.type, detail=problem.detail)
    return Response(_encode(problem), status_code=problem.status, media_type=MEDIA_TYPE, headers=headers)
