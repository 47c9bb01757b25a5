"""What a request to an AI route must be: a JSON body (said plainly when it is not), and its cache directives."""

from __future__ import annotations

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import SerializationException
from litestar.handlers.base import BaseRouteHandler

from ..errors import BadRequest, UnsupportedMediaType
from ..pipeline.cache import Mode


async def require_json(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """A body route takes a JSON object: say so (415) for another media type, and say what is wrong
    with an empty or malformed body before Litestar's own parser words it in its internal terms.

    The decoded body is cached on the request, so the handler's `data` is not decoded twice.
    """
    if connection.scope.get("method") in ("POST", "PUT", "PATCH") and isinstance(connection, Request):
        await json_body(connection)


async def json_body(connection: Request) -> None:
    """`require_json` as a layer's `before_request` hook, for the AI task routes (POST only).

    A guard is called with a copy of the route handler per request (Litestar's `authorize_connection`),
    about 3 % of a cache hit's CPU (bench/ANALYSIS.md §9); the hook runs at the same point for the handler (before
    its `data` and dependencies are read) without the copy. Returns None: the handler runs.
    """
    media_type = connection.headers.get("content-type", "").partition(";")[0].strip().lower()
    # No Content-Type at all is taken as JSON (raw clients); a declared other type is refused.
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"the request body must be `application/json`, not `{media_type}`",
                                   headers={"Accept-Post": "application/json"})
    body = await connection.body()
    if not body.strip():
        raise BadRequest("invalid request body: the body is empty; send a JSON object")
    try:
        value = await connection.json()
    except SerializationException as exc:
        raise BadRequest(f"invalid request body: not valid JSON: {_json_error(str(exc), len(body))}") from None
    except RecursionError:
        # msgspec decodes nesting recursively and gives up at Python's recursion limit (about 1,000
        # levels, reached in linear time): deeper than that is deeper than MAX_JSON_DEPTH too.
        raise BadRequest(_too_deep()) from None
    if too_deep(body, value, MAX_JSON_DEPTH):
        raise BadRequest(_too_deep())


# How deep a request body may nest arrays and objects: the sidecar's bodies need three levels; deeper
# values (in `options`, a job's `input`) would only reach code that walks them recursively.
MAX_JSON_DEPTH = 64


def _too_deep() -> str:
    return f"invalid request body: arrays and objects nest more than {MAX_JSON_DEPTH} levels deep"


def too_deep(body: bytes, value: object, limit: int) -> bool:
    """Whether the decoded `value` of `body` nests more than `limit` arrays and objects, in linear time.

    A body with at most `limit` brackets cannot (a C-speed count: every ordinary request stops
    there); otherwise the decoded value is walked level by level, without recursion, each value
    once (one comprehension per level: a 64 KiB body of 21,000 empty arrays takes about 1 ms).
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [child for node in level for child in (node.values() if type(node) is dict else node)  # type: ignore[union-attr]
                 if type(child) is dict or type(child) is list]
    return False


def _json_error(message: str, size: int) -> str:
    # msgspec says "Input data was truncated" or "JSON is malformed: invalid character (byte 0)".
    return f"it ends at byte {size} before the JSON value is complete" if "truncated" in message else message


def cache_mode(request: Request) -> Mode:
    """The synchronous routes' result-cache mode, from the request's Cache-Control."""
    header = request.headers.get("cache-control", "")
    directives = {d.strip().split("=", 1)[0].lower() for d in header.split(",")}
    if "no-store" in directives:
        return "no-store"
    if "no-cache" in directives or "max-age=0" in header.replace(" ", ""):
        return "no-cache"
    return "default"
