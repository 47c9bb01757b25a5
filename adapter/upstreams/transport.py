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

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeGuard

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import map_aiohttp_exceptions
from multidict import CIMultiDictProxy
from yarl import URL


def _httpx_error(exc: httpx.TransportError) -> httpx.TransportError:
    cause = exc.__cause__
    if not isinstance(cause, aiohttp.ClientError):
        return exc
    return _mapped(cause) or exc


def _mapped(cause: aiohttp.ClientError) -> httpx.TransportError | None:
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
    return None


def _from_aiohttp(cause: aiohttp.ClientError) -> httpx.TransportError:
    """What httpcore raises for the same fault, for the pass-through's direct aiohttp calls."""
    if mapped := _mapped(cause):
        return mapped
    message = str(cause) or type(cause).__name__
    if isinstance(cause, aiohttp.ClientResponseError):  # a response aiohttp could not parse
        return httpx.RemoteProtocolError(message)
    if isinstance(cause, aiohttp.ClientConnectionError):
        return httpx.ReadError(message)
    return httpx.TransportError(message)


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


def _session(transport: AiohttpTransport, *, limit: int, **kwargs: Any) -> aiohttp.ClientSession:
    """The aiohttp session under one of our transports: its pool, and no cookie jar.

    aiohttp's default `CookieJar` keeps every Set-Cookie an answer carries and sends it with
    later requests to the same host, whoever they are for. It skips IP addresses, so it went
    unseen on 127.0.0.1, but it keeps them for host names (`localhost:8001`, `crm-backend:8000`):
    one user's CRM session went out with the next user's lookups. Each session here acts for
    every caller in turn, so it keeps none (`DummyCookieJar`); a caller's own Cookie header is
    a header like any other and still goes through.
    """
    connector = aiohttp.TCPConnector(keepalive_timeout=transport.limits.keepalive_expiry, ssl=transport.ssl_context,
                                     limit=limit)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), **kwargs)


class Transport(AiohttpTransport):
    """`AiohttpTransport` whose failures are the httpx exceptions httpcore would raise."""

    def get_client(self) -> aiohttp.ClientSession:
        # As the package builds it (its default of 100 connections when none is set), without the jar.
        limit = self.limits.max_connections
        return _session(self, limit=100 if limit is None else limit)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.TransportError as exc:
            raise _httpx_error(exc) from exc.__cause__
        response.stream = _Body(response.stream)  # type: ignore[arg-type]
        return response


def client(*, base_url: str, timeout: httpx.Timeout, limits: httpx.Limits, **kwargs: object) -> Upstream:
    """An httpx client sending over aiohttp, without a cookie jar; closing it closes aiohttp's session.

    No jar: the CRM lookups and write-backs go with each caller's own token, so a cookie one
    caller's answer set must never go with the next caller's request: neither httpx's jar
    (see `_Jarless`) nor aiohttp's underneath it (see `_session`). Its `exchange` is the hot path's.
    """
    return Upstream(base_url=base_url, timeout=timeout, transport=Transport(limits=limits), **kwargs)  # type: ignore[arg-type]


class _Upload:
    """A streamed request body as aiohttp pulls it, with what httpcore gave the pass-through kept.

    What the body's own source raised (the client hung up mid-upload) comes out of the request
    as itself, not as a broken connection. And a write to a backend that stopped reading is
    bounded as httpx's write timeout bounds it: the clock runs only while aiohttp holds a chunk,
    never while the source waits for the client's next one.
    """

    def __init__(self, source: httpx.AsyncByteStream, write: float | None) -> None:
        self._source, self._write = source, write
        self.error: BaseException | None = None
        self.deadline: asyncio.Timeout | None = None  # set while the request waits for its answer

    def _arm(self, seconds: float | None) -> None:
        if self.deadline is not None and self._write is not None:
            self.deadline.reschedule(None if seconds is None else asyncio.get_running_loop().time() + seconds)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._source:
                self._arm(self._write)
                yield chunk
                self._arm(None)
        except Exception as exc:
            self.error = exc
            raise


class Slot(httpx.AsyncByteStream):
    """The response body; the pool slot it holds goes back when it is closed, as httpcore's does."""

    def __init__(self, response: aiohttp.ClientResponse, release: Callable[[], None]) -> None:
        self._response, self._release = response, release
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():  # as it arrives, as httpcore reads
                yield chunk
        except aiohttp.ClientError as exc:
            raise _from_aiohttp(exc) from exc

    async def aclose(self) -> None:
        if self._closed:  # the slot goes back once, however often the proxy's relay and its background task close
            return
        self._closed = True
        try:
            self._response.release()
        finally:
            self._release()


class _Request(aiohttp.ClientRequest):
    """aiohttp's request, less the `Content-Length: 0` it adds to a bodiless DELETE (or any
    method but GET, HEAD, OPTIONS, CONNECT, TRACE): the backend gets the request as httpx built it."""

    def update_body_from_data(self, body: object, *args: object, **kwargs: object) -> None:
        given = "Content-Length" in self.headers
        super().update_body_from_data(body, *args, **kwargs)  # type: ignore[arg-type]
        if body is None and not given:
            self.headers.pop("Content-Length", None)


class PassThrough(AiohttpTransport):
    """The pass-through's transport: aiohttp's pool and parser under httpcore's pool semantics.

    The proxy reads httpcore's behaviour: a request waits at most the pool timeout for one of
    `max_connections` slots (`PoolTimeout`, a 503 `crm-busy`), held until the response is closed;
    a stale keep-alive connection is its to retry (aiohttp's own retry is off, or an idempotent
    request could go three times); every request header line goes as it came, repeated ones too.
    """

    def __init__(self, *, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        self._slots = asyncio.Semaphore(limits.max_connections) if limits.max_connections else None
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}  # one per (connect, read) asked

    def get_client(self) -> aiohttp.ClientSession:
        session = _session(self, limit=self.limits.max_connections or 0, request_class=_Request)
        session._retry_connection = False  # type: ignore[attr-defined]  # no public switch; a test holds it to this
        return session

    async def _slot(self, timeout: dict[str, float | None]) -> Callable[[], None]:
        """One of the `max_connections` slots (waiting at most the pool timeout); what gives it back."""
        if self._slots is not None:
            if self._slots.locked():  # the wait, and its bound, only when there is one
                try:
                    async with asyncio.timeout(timeout.get("pool")):
                        await self._slots.acquire()
                except TimeoutError:
                    raise httpx.PoolTimeout(f"no connection free within {timeout.get('pool')} s") from None
            else:
                await self._slots.acquire()
        return self._slots.release if self._slots is not None else _nothing

    def _timeout(self, timeout: dict[str, float | None]) -> aiohttp.ClientTimeout:
        key = (timeout.get("connect"), timeout.get("read"))
        if (limits := self._timeouts.get(key)) is None:
            limits = self._timeouts[key] = aiohttp.ClientTimeout(sock_connect=key[0], connect=key[0], sock_read=key[1])
        return limits

    async def open(self, method: str, url: str, headers: list[tuple[str, str]],
                   timeout: dict[str, float | None]) -> tuple[aiohttp.ClientResponse, Callable[[], None]]:
        """A bodiless request as `handle_async_request` sends it, without httpx's models (the proxy's hot path).

        `url` is sent as given (encoded); `headers` are every line that goes, Host first. The answer's
        pool slot is held until the returned release is called (after the response is released).
        """
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        release = await self._slot(timeout)
        try:
            return await self.client.request(
                method, URL(url, encoded=True), headers=headers, allow_redirects=False, auto_decompress=False, compress=False,
                skip_auto_headers=_NO_AUTO_HEADERS, timeout=self._timeout(timeout)), release
        except aiohttp.ClientError as exc:
            release()
            raise _from_aiohttp(exc) from exc
        except BaseException:
            release()
            raise

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        timeout = request.extensions.get("timeout", {})
        release = await self._slot(timeout)
        try:
            try:
                data: bytes | _Upload | None = request.content or None
            except httpx.RequestNotRead:
                data = _Upload(request.stream, timeout.get("write"))  # type: ignore[arg-type]
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                       if k.lower() != b"transfer-encoding"]  # aiohttp frames the body itself
            limits = self._timeout(timeout)
            # encoded: the target goes byte for byte as httpx holds it, never re-quoted or resolved
            sending = self.client.request(
                request.method, URL(str(request.url), encoded=True), headers=headers, data=data, allow_redirects=False,
                auto_decompress=False, compress=False, skip_auto_headers=_NO_AUTO_HEADERS, timeout=limits)
            if not isinstance(data, _Upload):
                try:
                    response = await sending
                except aiohttp.ClientError as exc:
                    raise _from_aiohttp(exc) from exc
            else:
                try:
                    async with asyncio.timeout(None) as deadline:
                        data.deadline = deadline
                        try:
                            response = await sending
                        finally:
                            data.deadline = None
                except (aiohttp.ClientError, TimeoutError) as exc:  # aiohttp's own timeouts are both
                    if deadline.expired():
                        raise httpx.WriteTimeout(f"the request body could not be written within {timeout.get('write')} s") from None
                    if data.error is not None:
                        raise data.error from None
                    if not isinstance(exc, aiohttp.ClientError):
                        raise
                    raise _from_aiohttp(exc) from exc
        except BaseException:
            release()
            raise
        return httpx.Response(status_code=response.status, headers=response.raw_headers, stream=Slot(response, release),
                              request=request, extensions={"http_version": b"HTTP/1.1",
                                                           **({"reason_phrase": response.reason.encode()} if response.reason else {})})


def _nothing() -> None:
    return None


# httpx has already written the headers it means to send; aiohttp adds none of its own.
_NO_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


class _NoJar(httpx.Cookies):
    """A cookie jar that keeps nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class _Jarless(httpx.AsyncClient):
    """An httpx client with no cookie jar of its own.

    httpx's client keeps every Set-Cookie an answer carries and sends it with later requests
    that have no Cookie header: through a proxy shared by every caller, one caller's session
    cookie went to the backend on the next caller's requests. A proxy passes cookies, it keeps none.
    """

    @property  # type: ignore[override]
    def cookies(self) -> httpx.Cookies:
        return _NO_JAR

    @cookies.setter
    def cookies(self, value: object) -> None:
        return None  # httpx's constructor sets one; there is none to set


_NO_JAR = _NoJar()


def passthrough_client(*, base_url: str, timeout: httpx.Timeout, limits: httpx.Limits) -> PassThroughClient:
    """The pass-through's httpx client over aiohttp (`PassThrough`), without a cookie jar; closing it closes aiohttp's session."""
    return PassThroughClient(base_url=base_url, timeout=timeout, transport=PassThrough(limits=limits), follow_redirects=False)


class PassThroughClient(_Jarless):
    """The pass-through's client: `direct` is its transport, for the bodiless requests the proxy sends without httpx's models."""

    def __init__(self, *, transport: PassThrough, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        self.direct = transport
        self.timeouts = self.timeout.as_dict()


class Answer:
    """An upstream's answer, read whole: what the clients read of one (as an `httpx.Response` has them).

    `exchange` hands back this, not httpx's request and response models: building those, merging
    URLs and headers, and reading the body through httpx's stream layers was most of a CRM lookup's
    CPU, and a lookup was about 40 % of a cache hit's (bench/ANALYSIS.md §8; issue 28).
    """

    __slots__ = ("status_code", "headers", "content", "reason_phrase")

    def __init__(self, status_code: int, headers: CIMultiDictProxy[str], content: bytes, reason_phrase: str) -> None:
        self.status_code, self.headers, self.content, self.reason_phrase = status_code, headers, content, reason_phrase

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class TooLarge(Exception):
    """The answer's body (decoded) passed the `limit` its caller set; read no further."""

    def __init__(self, status_code: int, limit: int) -> None:
        super().__init__(f"{status_code}: more than {limit} bytes")
        self.status_code, self.limit = status_code, limit


Reply = Answer | httpx.Response  # what `exchange` answers: an Answer, or an httpx client's own Response (the tests' doubles)


def direct(http: httpx.AsyncClient) -> TypeGuard[Upstream]:
    """Whether `http` is our own client, untraced: its calls may go over aiohttp without httpx's models."""
    return type(http) is Upstream and not getattr(http, "_is_instrumented_by_opentelemetry", False)


async def exchange(http: httpx.AsyncClient, method: str, path: str, *, headers: dict[str, str], content: bytes | None = None,
                   timeout: float | None = None, limit: int | None = None) -> Reply:
    """One request and its whole answer. `path` is relative to the client's base URL; `timeout` (seconds)
    overrides every phase's, as an httpx float timeout does; past `limit` bytes of body, `TooLarge`.

    Over aiohttp directly when `http` is one of ours (`Upstream`); through httpx's own models for any
    other client (the tests hand in httpx clients over their doubles) and for one that tracing
    instruments (its spans and `traceparent` live in httpx's send).
    """
    if direct(http):
        return await http.exchange(method, path, headers=headers, content=content, timeout=timeout, limit=limit)
    request = http.build_request(method, path, content=content, headers=headers,
                                 **({"timeout": timeout} if timeout is not None else {}))  # type: ignore[arg-type]
    response = await http.send(request, stream=True)
    chunks, size = [], 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if limit is not None and size > limit:
                raise TooLarge(response.status_code, limit)
            chunks.append(chunk)
    finally:
        await response.aclose()
    response._content = b"".join(chunks)  # what `aread` sets: `.content` and `.text` read it from here
    return response


class Upstream(_Jarless):
    """The CRM's and the gateway's client: httpx's API for the rare calls (health, discovery, the
    streams), `exchange` for the hot path's (lookups, write-backs, runs, instance clean-ups).

    `exchange` sends on the same aiohttp session (one pool, one connection limit) with the same
    timeouts, and fails with the httpx exceptions `Transport` raises, so the retries and the
    problem mapping read both alike.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._prefix = str(self.base_url).rstrip("/")
        self._aio_timeouts: dict[float | None, aiohttp.ClientTimeout] = {}  # one per timeout asked (None: the client's)

    def _aio_timeout(self, seconds: float | None) -> aiohttp.ClientTimeout:
        if (limits := self._aio_timeouts.get(seconds)) is None:
            t = self.timeout if seconds is None else httpx.Timeout(seconds)
            # As AiohttpTransport maps httpx's four: the pool wait bounds getting a connection at all.
            limits = self._aio_timeouts[seconds] = aiohttp.ClientTimeout(sock_connect=t.connect, sock_read=t.read, connect=t.pool)
        return limits

    @asynccontextmanager
    async def stream(self, path: str, *, headers: dict[str, str], timeout: httpx.Timeout) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET whose answer is read as it comes (the gateway's SSE stream), over aiohttp directly:
        httpx's models and httpx-sse's layers were about 8 % of a stream's CPU (bench/ANALYSIS.md §9).
        Faults while it opens or is read raise httpx's exceptions, as `exchange`'s do."""
        transport: Transport = self._transport  # type: ignore[assignment]
        if not isinstance(transport.client, aiohttp.ClientSession):
            transport.client = transport.get_client()
        limits = aiohttp.ClientTimeout(sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool)
        try:
            with map_aiohttp_exceptions():
                async with transport.client.request("GET", self._prefix + path, headers=headers, allow_redirects=False,
                                                    timeout=limits) as response:
                    yield response
        except httpx.TransportError as exc:
            raise _httpx_error(exc) from exc.__cause__

    async def exchange(self, method: str, path: str, *, headers: dict[str, str], content: bytes | None = None,
                       timeout: float | None = None, limit: int | None = None) -> Answer:
        transport: Transport = self._transport  # type: ignore[assignment]
        if not isinstance(transport.client, aiohttp.ClientSession):
            transport.client = transport.get_client()
        try:
            with map_aiohttp_exceptions():  # the package's mapping first, then ours (as Transport does)
                async with transport.client.request(method, self._prefix + path, headers=headers, data=content,
                                                    allow_redirects=False, timeout=self._aio_timeout(timeout)) as response:
                    if limit is None:
                        body = await response.read()
                    else:
                        chunks, size = [], 0
                        async for chunk in response.content.iter_any():  # decoded: a compressed answer counts as it inflates
                            size += len(chunk)
                            if size > limit:
                                raise TooLarge(response.status, limit)
                            chunks.append(chunk)
                        body = b"".join(chunks)
                    return Answer(response.status, response.headers, body, response.reason or "")
        except httpx.TransportError as exc:
            raise _httpx_error(exc) from exc.__cause__

