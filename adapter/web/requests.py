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
    if connection.scope.get("method") not in ("POST", "PUT", "PATCH") or not isinstance(connection, Request):
        return
    media_type = connection.headers.get("content-type", "").partition(";")[0].strip().lower()
    # No Content-Type at all is taken as JSON (raw clients); a declared other type is refused.
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"the request body must be `application/json`, not `{media_type}`",
                                   headers={"Accept-Post": "application/json"})
    if not (await connection.body()).strip():
        raise BadRequest("invalid request body: the body is empty; send a JSON object")
    try:
        await connection.json()
    except SerializationException as exc:
        raise BadRequest(f"invalid request body: not valid JSON: {_json_error(str(exc), len(await connection.body()))}") from None


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
