"""Pass-through to the CRM backend for every path the sidecar does not serve itself.

Litestar's router does not fall back from `/api/v1/<anything>` to a catch-all
route (the prefix is shared with the AI routes), so the pass-through hangs off
the "no route" exception instead: `problems.handle` answers it with
`Forward`, a response whose ASGI app does the forwarding.

Bodies stream both ways (a 50 MB upload never sits in memory). The upstream URL
is the configured backend's scheme, host and port plus the request's raw path
and query: no Host header, absolute-form target or `//host/` path can point it
anywhere else.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import httpx
from litestar import Litestar, Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.types import ASGIApp, Receive, Scope, Send
from litestar.response.streaming import ASGIStreamingResponse

from ..context import check_header_size, request_id
from ..upstreams.crm import IDEMPOTENT, STALE_CONNECTION
from ..errors import BadRequest, ClientGone, CrmBusy, CrmUnavailable
from ..settings import Settings
from ..upstreams import transport
from ..upstreams.http import transport_error
from . import problems
from .forwarding import Forwarding

# RFC 9110 §7.6.1, plus the names a Connection header lists. Names as ASGI and aiohttp's raw headers hold them: bytes.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
# The sidecar's own server writes these; two of each would confuse clients.
OWN = frozenset({b"host", b"date", b"server", b"x-request-id"})
# An answer this small (its Content-Length says so) is read whole and sent in one body message:
# no streaming response, no task listening for the client's disconnect, one write.
WHOLE = 64 * 1024
# Litestar's streaming response, which the proxy used for every answer, added this to an answer
# with a body and no Content-Type; the whole-answer path keeps that.
_DEFAULT_TYPE = (b"content-type", b"application/json")
# A target httpx would send exactly as it came (no character it would percent-encode, no escape it
# could rewrite): only such a one goes by the direct path, which sends it as it is. Anything else
# goes through httpx as before. (`bytes.translate` deleting these leaves nothing: linear, no regex.)
_PLAIN_TARGET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?"


def _strip(items: list[tuple[bytes, bytes]], extra: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """Header lines less the hop-by-hop ones, names lower-cased."""
    named = {t.strip().lower() for k, v in items if k.lower() == b"connection" for t in v.split(b",")}
    drop = HOP_BY_HOP | named | extra
    return [(lk, v) for k, v in items if (lk := k.lower()) not in drop and not lk.startswith(b"proxy-")]


class Proxy:
    def __init__(self, http: httpx.AsyncClient, forwarding: Forwarding) -> None:
        self.http = http
        self.forwarding = forwarding
        self.base = http.base_url
        # How the backend names itself in absolute redirects: scheme://host[:port], as httpx sends Host.
        self.origin = f"{self.base.scheme}://{self.base.netloc.decode('ascii')}"
        self.origins = tuple(f"{scheme}://{self.base.netloc.decode('ascii')}" for scheme in ("http", "https"))
        # The direct path (bodiless requests on our own client, untraced): what httpx would add to each
        # request, computed once: Host first, then the client's default lines the request does not name.
        self.direct = None if getattr(http, "_is_instrumented_by_opentelemetry", False) else getattr(http, "direct", None)
        self._host = ("Host", self.base.netloc.decode("ascii"))
        self._defaults = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in http.headers.raw]

    @staticmethod
    def client(settings: Settings, *, pool: float = 5.0) -> httpx.AsyncClient:
        """The pass-through's own client, as the app builds it: httpx's API over aiohttp's pool.

        httpcore, anyio and h11 were about two thirds of a pass-through's CPU (bench.cpu);
        `transport.PassThrough` keeps the pool wait, retry and header behaviour the proxy relies on.
        """
        return transport.passthrough_client(
            base_url=settings.crm_backend_url,
            timeout=httpx.Timeout(settings.crm_connect_timeout, read=settings.proxy_read_timeout, write=settings.proxy_read_timeout,
                                  pool=pool),
            limits=httpx.Limits(max_connections=settings.proxy_max_connections, max_keepalive_connections=100,
                                keepalive_expiry=settings.upstream_keepalive_expiry))

    def target(self, raw_path: bytes, query: bytes) -> httpx.URL:
        self.check_target(raw_path)
        return self.base.copy_with(raw_path=raw_path + (b"?" + query if query else b""))

    def check_target(self, raw_path: bytes) -> None:
        if not raw_path.startswith(b"/"):
            raise BadRequest("only origin-form request targets (a path starting with `/`) are accepted")
        # httpx resolves `.`/`..` segments: `/x/../api/v1/ai/...` would reach a path the sidecar chose
        # to serve itself, past its validation and rate limits. Such paths are refused, not resolved.
        # Percent-encoded dots and slashes count: a server behind may decode before it resolves.
        # (A path with neither `.` nor `%` cannot have such a segment: the common case skips the decoding.)
        if (b"." in raw_path or b"%" in raw_path) and \
                any(segment in (".", "..") for segment in re.split(r"[/\\]", unquote(raw_path.decode("latin-1")))):
            raise BadRequest("the path has `.` or `..` segments; send the path they resolve to")

    def request_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        # Forwarding headers: a trusted peer's go on (its chain appended to), anyone else's never reach the backend.
        headers = self.forwarding.upstream_headers(scope, _strip(scope["headers"], OWN))
        headers.append((b"X-Request-ID", request_id(scope).encode("latin-1")))  # middleware does not run for unrouted paths
        return headers

    def public_location(self, location: str, scope: Scope) -> str:
        """A redirect to the backend's own address, pointed at the sidecar's public origin instead.

        The backend builds absolute `Location`s from the Host it was sent (its internal name).
        As nginx's `proxy_redirect default`: the public origin is the caller's, from
        `X-Forwarded-Proto`/`-Host` when a trusted ingress set them (FORWARDED_ALLOW_IPS), else
        the request's scheme and Host: nobody else can point a redirect at a host of their choosing.
        """
        # Either scheme: a backend that believes the X-Forwarded-Proto we send (uvicorn does, from a
        # trusted peer) names its own host with the public scheme (`https://crm-backend:8000/...`).
        origin = next((o for o in self.origins if location.startswith(o)), None)
        if origin is None or location[len(origin):][:1] not in ("/", "?", ""):
            return location
        proto, host = self.forwarding.origin(scope)
        if not host:
            return location[len(origin):] or "/"  # no usable origin: a relative reference works as well
        return f"{proto}://{host}{location[len(origin):] or '/'}"

    async def forward(self, request: Request) -> ASGIApp:
        scope = request.scope
        check_header_size(scope, request.app.state.settings.max_header_bytes)
        raw_path, query = scope.get("raw_path") or scope["path"].encode(), scope.get("query_string", b"")
        has_body = any(k == b"transfer-encoding" or k == b"content-length" and v != b"0" for k, v in scope["headers"])
        method = scope["method"]
        headers = self.request_headers(scope)
        target = raw_path + (b"?" + query if query else b"")
        try:
            if self.direct is not None and not has_body and not target.translate(None, _PLAIN_TARGET):
                self.check_target(raw_path)
                answer = await self._direct(method, self.origin + target.decode("ascii"), headers)
            else:
                answer = await self._via_httpx(method, self.target(raw_path, query), headers, request if has_body else None)
        except httpx.PoolTimeout:
            pool = self.http.timeout.pool
            raise CrmBusy(f"all pass-through connections to the CRM backend (PROXY_MAX_CONNECTIONS) stayed busy "
                          f"for {pool:g} s; the backend was not asked") from None
        except httpx.TransportError as exc:
            raise transport_error(exc, upstream="CRM backend", unavailable=CrmUnavailable, slug="crm-timeout",
                                  read_timeout=self.http.timeout.read) from None
        status, raw_headers, chunks, close = answer
        # The backend's own answer, errors included, goes back as it came: raw bytes, same status,
        # every header line kept (several Set-Cookie lines stay several).
        # With CORS on, the sidecar answers for it: a second Access-Control-Allow-Origin makes browsers refuse.
        cors = request.app.state.settings.cors_origins
        headers = [(k, self.public_location(v.decode("latin-1"), scope).encode("latin-1") if k == b"location" else v)
                   for k, v in _strip(raw_headers, OWN) if not (cors and k.startswith(b"access-control-"))]
        head = method == "HEAD"
        length = next((v for k, v in headers if k == b"content-length"), None)
        if not head and not (length is not None and length.isdigit() and int(length) <= WHOLE):
            return ASGIStreamingResponse(iterator=_relay(chunks, close), status_code=status, headers=_text(headers),
                                         background=BackgroundTask(close))
        body: list[bytes] = []
        try:
            if not head:
                async for chunk in chunks:
                    body.append(chunk)
        except httpx.TransportError:
            # The backend broke off mid-body: the client gets the same short body, as it would directly.
            return ASGIStreamingResponse(iterator=_replay(body), status_code=status, headers=_text(headers))
        finally:
            await close()
        if not head and status not in (204, 304) and status >= 200 and not any(k == b"content-type" for k, _ in headers):
            headers.append(_DEFAULT_TYPE)
        return _whole(status, headers, b"".join(body))

    async def _via_httpx(self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], request: Request | None) -> _Answer:
        upstream = self.http.build_request(method, url, headers=headers, content=_body(request) if request is not None else None)
        try:
            response = await self.http.send(upstream, stream=True)
        except STALE_CONNECTION:
            # The backend drops a keep-alive connection after an unhandled 500 without saying so.
            # A bodiless idempotent request that died before any response byte goes once more,
            # as nginx's `proxy_next_upstream error` does; the pool discarded the dead connection.
            if request is not None or method not in IDEMPOTENT:
                raise
            retry = self.http.build_request(method, url, headers=headers)
            response = await self.http.send(retry, stream=True)
        return response.status_code, response.headers.raw, response.aiter_raw(), response.aclose

    async def _direct(self, method: str, url: str, headers: list[tuple[bytes, bytes]]) -> _Answer:
        """A bodiless request on our own aiohttp transport, without httpx's request and response models
        (a third of a pass-through's CPU, issue 28): the same lines go out as httpx would send, the
        same pool slot, retry and exceptions apply (transport.PassThrough.open)."""
        assert self.direct is not None
        named = {k.lower() for k, _ in headers}
        lines = [self._host, *((k, v) for k, v in self._defaults if k.lower().encode("latin-1") not in named),
                 *((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k.lower() != b"transfer-encoding")]
        timeouts = self.http.timeouts  # type: ignore[attr-defined]
        try:
            response, release = await self.direct.open(method, url, lines, timeouts)
        except STALE_CONNECTION:
            if method not in IDEMPOTENT:  # as _via_httpx: once more, for an idempotent request only
                raise
            response, release = await self.direct.open(method, url, lines, timeouts)
        slot = transport.Slot(response, release)
        return response.status, list(response.raw_headers), slot.__aiter__(), slot.aclose


# An upstream answer as the proxy relays it: status, raw header lines, the body's raw chunks (they
# raise httpx's exceptions), and what closes it and gives its pool slot back.
_Answer = tuple[int, "list[tuple[bytes, bytes]]", AsyncIterator[bytes], Callable[[], Awaitable[None]]]


def _text(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def _whole(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> ASGIApp:
    async def send_whole(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return send_whole


async def _replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _body(request: Request) -> AsyncIterator[bytes]:
    # Straight from ASGI: chunks go upstream as they arrive, none is kept.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client hung up before its request body was complete")
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return


async def _relay(chunks: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except httpx.TransportError:
        return  # the backend broke off mid-body; the client sees a short body, as it would directly
    finally:
        await close()


class Forward(Response):
    """The answer to a request no route of ours matched: the backend's own answer."""

    def __init__(self, proxy: Proxy, request: Request, on_error: Callable[[Request, Exception], Response]) -> None:
        super().__init__(content=None)
        self._proxy, self._request, self._on_error = proxy, request, on_error

    def to_asgi_response(self, app: Any, request: Request, **kwargs: Any) -> ASGIApp:  # type: ignore[override]
        async def forward(scope: Scope, receive: Receive, send: Send) -> None:
            scope["adapter.proxied"] = True  # type: ignore[typeddict-unknown-key]
            try:
                upstream = await self._proxy.forward(self._request)
            except Exception as exc:  # mapped like any other error: 400, 502, 504 problems
                await self._on_error(self._request, exc).to_asgi_response(app, request, **kwargs)(scope, receive, send)
                return
            await upstream(scope, receive, send)

        return forward


def proxy_first(app: Litestar) -> None:
    """Send a request that no route of the app can match straight to the pass-through, before routing.

    Routing such a path walks the route trie, raises `NotFoundException` and goes through the
    exception middleware before `fall_through` answers with `Forward` (about 5 % of a pass-through's
    CPU, bench/ANALYSIS.md §9). A path that starts with no route's static prefix (the part before its
    first `{param}`) cannot match one, so it is forwarded here, the same way: `Forward` inside
    Litestar's send (the `before_send` hooks: request id header, metrics, the log line). Any other path
    is routed as before, so what is ours, and a near miss of it, is decided by the router alone.

    Only for an app whose CORS and tracing are off (create_app decides): their middleware wraps the
    router and must see every request (the pass-through then hangs off the "no route" exception, as before).
    """
    ours = tuple(sorted({route.path.partition("{")[0] for route in app.routes}))
    if any(prefix in ("", "/") for prefix in ours):
        return  # a route at the root: any path might be ours
    routed = app.asgi_handler
    state = app.state

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(ours):
            proxy: Proxy | None = getattr(state, "proxy", None)  # None: CRM_PROXY_FALLTHROUGH off
            if proxy is not None:
                request: Request = app.request_class(scope, receive, send)
                await Forward(proxy, request, problems.handle).to_asgi_response(None, request)(scope, receive, send)
                return
        await routed(scope, receive, send)

    app.asgi_handler = handler
