from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import msgspec
import pytest
import redis as redis_sync

from adapter import servers
from adapter.app import create_app
from adapter.doubles.crm import CrmDouble
from adapter.doubles.gateway import GatewayDouble
from adapter.settings import Settings
from litestar import Litestar


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayDouble]:
    double = GatewayDouble()
    yield double
    double.stop()


@pytest.fixture
def crm() -> CrmDouble:
    return CrmDouble()


@pytest.fixture
def seed(crm: CrmDouble) -> dict:
    data = crm.seed()
    data["token"] = crm.token(data["alice"])
    data["bob_token"] = crm.token(data["bob"])
    return data


@pytest.fixture
def auth(seed: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {seed['token']}"}


def make_settings(**overrides: object) -> Settings:
    env = {"GATEWAY_CALL_TIMEOUT": "5", "CRM_CALL_TIMEOUT": "5", "RETRY_BASE_DELAY": "0.005", "RETRY_MAX_DELAY": "0.01"}
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return Settings.from_env(env)


def asgi_client(app: Litestar, base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


@asynccontextmanager
async def running(app: Litestar, base_url: str = "http://sidecar.test") -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and an in-process client of it, in this event loop.

    The lifespan is held by a task of its own: fixtures are set up and torn down in
    different tasks, and the lifespan's cancel scope must be left where it was entered.
    """
    started, stop = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with app.lifespan():
            started.set()
            await stop.wait()

    holder = asyncio.create_task(hold())
    ready = asyncio.create_task(started.wait())
    await asyncio.wait({holder, ready}, return_when=asyncio.FIRST_COMPLETED)
    if holder.done():
        ready.cancel()
        holder.result()  # start-up failed: raise its error here
    try:
        async with asgi_client(app, base_url) as client:
            yield client
    finally:
        stop.set()
        await holder


@pytest.fixture
def make_client(gateway: GatewayDouble, crm: CrmDouble):
    """An in-process client of a sidecar whose upstreams are the doubles (or given clients)."""

    @asynccontextmanager
    async def factory(*, settings: Settings | None = None, gateway_http: httpx.AsyncClient | None = None,
                      crm_http: httpx.AsyncClient | None = None, **kwargs) -> AsyncIterator[httpx.AsyncClient]:
        async with AsyncExitStack() as stack:
            # Clients handed in belong to the test; the ones made here are closed here.
            gw = gateway_http or await stack.enter_async_context(asgi_client(gateway.app, "http://gateway.test"))
            backend = crm_http or await stack.enter_async_context(asgi_client(crm.app, "http://crm.test"))
            app = create_app(settings or make_settings(), gateway_http=gw, crm_http=backend, **kwargs)
            yield await stack.enter_async_context(running(app))

    return factory


@pytest.fixture
async def client(make_client) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as c:
        yield c


@asynccontextmanager
async def serving(app: Litestar) -> AsyncIterator[str]:
    """Serve an ASGI app over real TCP in this event loop; yields its base URL."""
    sock = servers.bind("127.0.0.1", 0)
    server = servers.server(app, quiet=True, graceful=1.0)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield servers.url_of(sock)
    finally:
        server.should_exit = True
        await task
        sock.close()


def closed_port_url() -> str:
    """A loopback URL on which nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def decode(response: httpx.Response) -> dict:
    return msgspec.json.decode(response.content)


# --- Redis: the configured one, the machine's, or one started here ---------------------------

class RedisProcess:
    """A redis-server the suite owns: it can be stopped and restarted on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Redis prints this line once it accepts connections: read until it appears, no polling.
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if "Ready to accept connections" in line:
                return
        raise RuntimeError(f"redis-server exited with {self.proc.wait()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()  # type: ignore[union-attr]
            self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with redis_sync.Redis.from_url(url, socket_connect_timeout=0.5) as r:
            return bool(r.ping())
    except redis_sync.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    configured = os.environ.get("TEST_REDIS_URL")
    if configured:
        yield configured
        return
    if _answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    own = RedisProcess()
    own.start()
    try:
        yield own.url
    finally:
        own.stop()


@pytest.fixture
def cache_prefix(redis_url: str) -> Iterator[str]:
    """A namespace of this test's own in the shared Redis, removed afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    with redis_sync.Redis.from_url(redis_url) as r:
        keys = list(r.scan_iter(f"{prefix}:*"))
        if keys:
            r.delete(*keys)


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    own = RedisProcess()
    own.start()
    yield own
    own.stop()


class Restartable:
    """An upstream on a fixed port that a test can take down and bring back."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._task = None
        self._sock = None

    async def start(self) -> None:
        self._sock = servers.bind("127.0.0.1", self.port)
        self._server = servers.server(self.app, quiet=True, graceful=0.5)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._task
            self._sock.close()
            self._server = None
