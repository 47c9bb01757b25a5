"""What a failed exchange with an upstream means to our caller: shared by every client."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from ..errors import AdapterError, UpstreamTimeout


class _Detail(msgspec.Struct):
    detail: Any = None


_decode_detail = msgspec.json.Decoder(_Detail).decode
# What decoding an upstream's (hostile) JSON raises when it is not JSON we can read: msgspec decodes
# nesting recursively and raises RecursionError, not DecodeError, past Python's recursion limit
# (about 1,000 levels, reached in linear time). Caught as a broken answer, never a 500.
UNREADABLE = (msgspec.DecodeError, RecursionError)
_encode = msgspec.json.Encoder().encode


def detail_of(response: httpx.Response | Any) -> str:
    """A FastAPI-style `detail`, or the start of the body, as one string (of an httpx Response or a transport.Answer)."""
    try:
        detail = _decode_detail(response.content).detail
    except (*UNREADABLE, msgspec.ValidationError):
        detail = None
    if detail is None:
        detail = response.text[:300] or response.reason_phrase
    return detail if isinstance(detail, str) else _encode(detail).decode()[:300]


def what_happened(exc: Exception, upstream: str) -> str:
    """A broken exchange in words a CRM developer reads: what the upstream did, not our exception's name.

    A closed connection means the upstream was reached (it accepted, then hung up): "cannot reach"
    would send an operator to check the network instead of the upstream's own logs.
    """
    if isinstance(exc, httpx.ConnectTimeout):
        return f"cannot connect to the {upstream}: connect timed out"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to the {upstream} (connection refused or its address does not resolve)"
    if isinstance(exc, httpx.RemoteProtocolError):
        if "disconnect" in str(exc).lower():  # httpcore's and aiohttp's words for "closed before any response byte"
            return f"the {upstream} closed the connection before answering"
        return f"the {upstream} answered with something that is not valid HTTP"
    if isinstance(exc, httpx.ReadError):
        return f"the connection to the {upstream} broke while its answer was being read"
    if isinstance(exc, httpx.WriteError):
        return f"the connection to the {upstream} broke while the request was being sent"
    return f"the exchange with the {upstream} failed at the network level"


def transport_error(exc: Exception, *, upstream: str, unavailable: type[AdapterError], slug: str,
                    read_timeout: float | None, call_timeout: float | None = None) -> AdapterError:
    """A connect failure means unavailable; a read or whole-call timeout means 504; a broken exchange, unavailable."""
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)) and not isinstance(exc, httpx.ConnectTimeout):
        whole_call = call_timeout is not None and not isinstance(exc, httpx.TimeoutException)
        return UpstreamTimeout(upstream, call_timeout if whole_call else read_timeout, slug)
    return unavailable(what_happened(exc, upstream))
