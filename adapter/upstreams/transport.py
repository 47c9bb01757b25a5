"""httpx's API over aiohttp's connection pool, for the CRM lookups.

httpx's own stack (httpcore, anyio, h11) costs a cache hit more than its Redis GET:
every request polls each idle pooled connection, opens anyio cancel scopes and parses
with pure-Python h11. The `httpx-aiohttp` transport keeps the httpx API the code and the
tests use and sends over aiohttp's C-accelerated parser instead (see bench/cpu.py).

Its failures must mean what httpx's mean, because the retry and problem mapping read
them (a stale keep-alive connection is retried once; a refused connect is "unavailable",
a slow read a 504). The package maps every broken connection to `ConnectTimeout`, so
failures are mapped again here, from the aiohttp exception it chained.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


def _httpx_error(exc: httpx.TransportError) -> httpx.TransportError:
    cause = exc.__cause__
    if not isinstance(cause, aiohttp.ClientError):
        return exc
    message = str(cause) or type(cause).__name__
    if isinstance(cause, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(cause, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(cause, aiohttp.ServerTimeoutError):
        return httpx.TimeoutException(message)  # type: ignore[call-arg]
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        # Closed before any response byte: what httpcore reports for a dead keep-alive connection.
        return httpx.RemoteProtocolError(message)
    if isinstance(cause, (aiohttp.ClientOSError, aiohttp.ClientPayloadError, aiohttp.ServerConnectionError)):
        return httpx.ReadError(message)
    return exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.TransportError as exc:
            raise _httpx_error(exc) from exc.__cause__

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        except httpx.TransportError as exc:
            raise _httpx_error(exc) from exc.__cause__


class Transport(AiohttpTransport):
    """`AiohttpTransport` whose failures are the httpx exceptions httpcore would raise."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.TransportError as exc:
            raise _httpx_error(exc) from exc.__cause__
        response.stream = _Body(response.stream)  # type: ignore[arg-type]
        return response


def client(*, base_url: str, timeout: httpx.Timeout, limits: httpx.Limits, **kwargs: object) -> httpx.AsyncClient:
    """An httpx client sending over aiohttp; closing it closes aiohttp's session."""
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=Transport(limits=limits), **kwargs)  # type: ignore[arg-type]
