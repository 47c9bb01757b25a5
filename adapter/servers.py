"""Running ASGI apps with uvicorn: one server per app, several in one event loop.

The sidecar's server bounds what a slow or hostile client can hold:

- the request line and headers must arrive within HEADER_TIMEOUT_SECONDS of the connection
  (or of the request's first byte on a kept-alive one), else 408 and the connection closes;
- they may not exceed MAX_HEADER_BYTES: counted read by read as they arrive, so the 431 goes
  out while parsing and nothing beyond one read buffer is held (uvicorn itself has no limit);
- the body must arrive within BODY_TIMEOUT_SECONDS of the headers, else 408 (from the app, so it
  is the usual problem document; a proxied upload gives its pool connection back then).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import msgspec
import structlog
import uvicorn
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import AdapterError, HeadersTooLarge, RequestTimeout
from .web.problems import problem_of

log = structlog.get_logger("adapter.servers")
_encode = msgspec.json.Encoder().encode
LINGER_SECONDS = 2.0


class DrainingServer(uvicorn.Server):
    """On SIGTERM (or Ctrl+C) the app's jobs drain before uvicorn stops listening.

    uvicorn's own graceful shutdown closes the listener, then waits for open connections; an
    SSE response stays open for minutes, so the drain must come first: `/readyz` turns 503
    and new jobs are refused while running ones finish (for up to the grace), the rest are
    handed over, and the app's SSE readers are closed, so the connections end by themselves.
    """

    def __init__(self, config: uvicorn.Config, *, drains: Any = None) -> None:
        super().__init__(config)
        self._drains = drains if drains is not None else config.app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(self._drains, "state", None)
        jobs = getattr(state, "jobs", None) if state is not None else None
        if jobs is not None:
            settings = getattr(state, "settings", None)
            grace = getattr(settings, "shutdown_grace_seconds", self.config.timeout_graceful_shutdown or 10.0)
            await jobs.drain(grace, lambda: self.force_exit)
        await super().shutdown(sockets)


class QuietServer(uvicorn.Server):
    """A server that leaves signal handling to the one main server of the process."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class CannotListen(Exception):
    """The address is taken or not ours; the message is the one line a person needs."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; connections queue in its backlog until the server accepts them."""
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CannotListen(f"port {port} on {host} is already in use; choose another with --port or ADAPTER_PORT "
                               f"(make demo PORT=...)") from None
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    body_timeout: float
    max_header_bytes: int

    @classmethod
    def of(cls, app: Any) -> Limits | None:
        """The sidecar's limits from its settings; None for an app without them (the doubles)."""
        settings = getattr(getattr(app, "state", None), "settings", None)
        if settings is None:
            return None
        return cls(settings.header_timeout_seconds, settings.body_timeout_seconds, settings.max_header_bytes)


def _problem(exc: AdapterError) -> bytes:
    """A whole HTTP response for a refusal made below the app (no request has reached it): the problem
    says what web/problems.py says for the same error, with the reason phrase HTTP has for its status."""
    rid = uuid.uuid4().hex
    problem, _ = problem_of(exc, "", "")
    problem.request_id = rid
    body = _encode(problem)
    head = (f"HTTP/1.1 {problem.status} {HTTPStatus(problem.status).phrase}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nx-request-id: {rid}\r\nconnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class LingeringClose:
    """The client's transport as the sidecar's protocol sees it: writes coalesced, close lingering.

    Writes made in one turn of the event loop go out as one: uvicorn writes a response's head
    and its body separately, and for a small answer (a cache hit, a pass-through GET) the second
    system call was a measurable share of the request's CPU. They are flushed at the end of the
    turn (`call_soon`), and before a close or half-close, so nothing is reordered or lost.

    Close lingers, as nginx's `lingering_close` does: closing a socket with unread input makes
    the kernel answer the next bytes with a reset, which can destroy a 408 or 431 before the
    client reads it (a body still trickling in when BODY_TIMEOUT_SECONDS ends, say). So close()
    half-closes, the protocol drops what still arrives, and the socket closes for good
    LINGER_SECONDS later or when the client closes.
    """

    def __init__(self, transport: asyncio.Transport, on_close: Any) -> None:
        self._transport = transport
        self._on_close = on_close
        self._closing = False
        self._pending: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._flush()
        self._closing = True
        self._on_close()
        transport = self._transport
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()


def bounded_protocol(limits: Limits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header deadline, and a header size bound enforced while they arrive.

    The size is counted per read, not per header: a parser callback of our own on every header
    cost more than the rest of the bound. Reads while a request's headers are incomplete add up;
    past MAX_HEADER_BYTES the 431 goes out, so at most one read beyond the limit is ever held.
    (The app's own check, context.check_header_size, still applies the exact per-header measure.)
    """

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _header_bytes = 0
        _in_headers = True
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(LingeringClose(transport, self._stop_reading))  # type: ignore[arg-type]
            self._timer = self.loop.call_later(limits.header_timeout, self._headers_too_slow)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _stop_reading(self) -> None:
            self._refused = True  # the connection is closing: what still arrives is read and dropped
            self._disarm()

        def _refuse(self, response: bytes) -> None:
            self._stop_reading()
            if self.transport.is_closing():
                return
            self.transport.write(response)
            self.transport.close()  # lingering (LingeringClose)

        def _headers_too_slow(self) -> None:
            self._timer = None
            self._refuse(_problem(RequestTimeout(
                f"the request headers did not arrive within {limits.header_timeout:g} s (HEADER_TIMEOUT_SECONDS)")))

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # lingering: read and dropped
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._in_headers and self._header_bytes > limits.max_header_bytes and not self._refused:
                self._refuse(_problem(HeadersTooLarge(
                    f"the request headers take more than the {limits.max_header_bytes}-byte limit (MAX_HEADER_BYTES)")))

        # Parser callbacks: a request's headers start with its first byte and end here.
        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._timer is None:  # a kept-alive connection's next request
                self._timer = self.loop.call_later(limits.header_timeout, self._headers_too_slow)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_headers, self._header_bytes = True, 0
            super().on_message_complete()

    return BoundedHttpToolsProtocol


def bounded_body(app: ASGIApp, seconds: float) -> ASGIApp:
    """The whole body must arrive within `seconds` of the headers; then receive() is left alone
    (streams wait on it for the client's disconnect)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        done = False

        async def bounded_receive() -> Message:
            nonlocal done
            if done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {seconds:g} s (BODY_TIMEOUT_SECONDS)") from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await app(scope, bounded_receive, send)

    return wrapped


def server(app: ASGIApp, *, quiet: bool = False, lifespan: str = "on", graceful: float = 10.0, keepalive: float = 75.0,
           loop: str = "asyncio", limits: Limits | None = None) -> uvicorn.Server:
    """A server for `app`; the sidecar's (an app with settings) gets its client limits by default."""
    limits = limits or Limits.of(app)
    owner = app  # the app whose jobs drain on SIGTERM, before any wrapping below
    extra: dict[str, Any] = {}
    if limits is not None:
        extra["http"] = bounded_protocol(limits)
        app = bounded_body(app, limits.body_timeout)
    # proxy_headers off: uvicorn would otherwise rewrite the scope's client and scheme from
    # X-Forwarded-* by its own reading; which peers are believed is decided in one place,
    # web/forwarding.py (FORWARDED_ALLOW_IPS), and the scope keeps the real peer.
    config = uvicorn.Config(app, lifespan=lifespan, access_log=False, log_config=None, loop=loop, proxy_headers=False,
                            timeout_graceful_shutdown=graceful, log_level="warning" if quiet else "info",
                            timeout_keep_alive=int(keepalive), **extra)
    if quiet:
        return QuietServer(config)
    return DrainingServer(config, drains=owner)


def serve_workers(make_app: Any, sock: socket.socket, workers: int, **options: Any) -> int:
    """`workers` processes sharing one listening socket, each with its own app, loop, limits and drain.

    Forked after the socket is bound and before any app or event loop exists, so each worker
    builds its own clients. SIGTERM and SIGINT go to every worker, which drains as a single
    server does. A worker that dies on its own takes the others down with it (exit 1), so the
    orchestrator restarts the whole container rather than leaving it short of a worker.
    """
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker
            code = 1
            try:
                server(make_app(), **options).run(sockets=[sock])
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    # Two reasons to stop, kept apart: asked (a signal to this process) ends with 0; a worker that
    # died unasked ends with 1 even though the parent then stops the rest itself, or the
    # orchestrator would read a crash as a clean exit and might not restart the container.
    asked = False
    died_unasked = False

    def stop_all(signum: int) -> None:
        for child in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    def forward(signum: int, _frame: Any) -> None:
        nonlocal asked
        asked = True
        stop_all(signum)

    alive = set(children)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while alive:
        pid, status = os.wait()
        alive.discard(pid)
        if not asked and not died_unasked:  # the first to die unasked, whatever its code: stop the rest
            died_unasked = True
            log.error("workers.worker_died", pid=pid, exit_code=os.waitstatus_to_exitcode(status),
                      effect="stopping the other workers; exiting 1 so that the container is restarted whole")
            stop_all(signal.SIGTERM)
    return 1 if died_unasked else 0


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"
