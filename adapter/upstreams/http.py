"""What a failed exchange with an upstream means to our caller: shared by every client."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from ..errors import AdapterError, UpstreamTimeout


class _Detail(msgspec.Struct):
    detail: Any = None


_decode_detail = msgspec.json.Decoder(_Detail).decode
_encode = msgspec.json.Encoder().encode


def detail_of(response: httpx.Response) -> str:
    """A FastAPI-style `detail`, or the start of the body, as one string."""
    try:
        detail = _decode_detail(response.content).detail
    except (msgspec.DecodeError, msgspec.ValidationError):
        detail = None
    if detail is None:
        detail = response.text[:300] or response.reason_phrase
    return detail if isinstance(detail, str) else _encode(detail).decode()[:300]


def transport_error(exc: Exception, *, upstream: str, unavailable: type[AdapterError], slug: str,
                    read_timeout: float | None, call_timeout: float | None = None) -> AdapterError:
    """A connect failure means unavailable; a read or whole-call timeout means 504; a broken exchange, unavailable."""
    if isinstance(exc, httpx.ConnectTimeout):
        return unavailable(f"cannot connect to the {upstream}: connect timed out")
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        whole_call = call_timeout is not None and not isinstance(exc, httpx.TimeoutException)
        return UpstreamTimeout(upstream, call_timeout if whole_call else read_timeout, slug)
    return unavailable(f"cannot reach the {upstream}: {type(exc).__name__}")
