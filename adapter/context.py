"""Per-request context: the request id, which follows the request to both upstreams."""

from __future__ import annotations

import re
import time
import uuid
from contextvars import ContextVar

from litestar.types import Message, Scope

from .errors import HeadersTooLarge

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch: `$` would also match before a final newline
_ID_KEY, _T0_KEY = "adapter.request_id", "adapter.t0"

current_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def request_id(scope: Scope) -> str:
    """The caller's X-Request-ID when it is sane, else a new one; stable for the request."""
    rid = scope.get(_ID_KEY)  # type: ignore[misc]
    if rid is None:
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"").decode("latin-1")
        # A header we did not mint goes into our logs and two upstreams: accept only a tame shape.
        rid = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
        scope[_ID_KEY] = rid  # type: ignore[literal-required]
        scope[_T0_KEY] = time.perf_counter()  # type: ignore[literal-required]
    return rid


def check_header_size(scope: Scope, limit: int) -> None:
    size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
    if size > limit:
        raise HeadersTooLarge(f"the request headers take {size} bytes, more than the {limit}-byte limit (MAX_HEADER_BYTES)")


def elapsed_ms(scope: Scope) -> float:
    return round((time.perf_counter() - scope.get(_T0_KEY, time.perf_counter())) * 1000, 2)  # type: ignore[misc]


def outbound_headers() -> dict[str, str]:
    rid = current_request_id.get()
    return {"X-Request-ID": rid} if rid else {}


def add_request_id_header(message: Message, scope: Scope) -> None:
    if message["type"] == "http.response.start":
        headers = list(message.get("headers", ()))
        headers.append((b"x-request-id", request_id(scope).encode()))
        message["headers"] = headers  # type: ignore[typeddict-item]
