"""Running ASGI apps with uvicorn: one server per app, several in one event loop."""

from __future__ import annotations

import contextlib
import socket

import uvicorn
from litestar.types import ASGIApp


class DrainingServer(uvicorn.Server):
    """On SIGTERM (or Ctrl+C) the app's jobs drain before uvicorn stops listening.

    uvicorn's own graceful shutdown closes the listener, then waits for open connections; an
    SSE response stays open for minutes, so the drain must come first: `/readyz` turns 503
    and new jobs are refused while running ones finish (for up to the grace), the rest are
    handed over, and the app's SSE readers are closed, so the connections end by themselves.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(self.config.app, "state", None)
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


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; connections queue in its backlog until the server accepts them."""
    sock = socket.create_server((host, port), reuse_port=False)
    sock.setblocking(False)
    return sock


def server(app: ASGIApp, *, quiet: bool = False, lifespan: str = "on", graceful: float = 10.0, keepalive: float = 75.0) -> uvicorn.Server:
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from loopback peers;
    # the sidecar appends the real peer to the chain itself and trusts none of it.
    config = uvicorn.Config(app, lifespan=lifespan, access_log=False, log_config=None, loop="asyncio", proxy_headers=False,
                            timeout_graceful_shutdown=graceful, log_level="warning" if quiet else "info",
                            timeout_keep_alive=int(keepalive))
    return (QuietServer if quiet else DrainingServer)(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"
