from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest
import redis as redis_sync

from adapter.app import create_app
from adapter.doubles.crm import CrmDouble
from adapter.doubles.gateway import GatewayDouble
from adapter.settings import Settings
from tests.helpers import RedisProcess, asgi_client, make_settings, redis_answers, running


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


# --- Redis: the configured one, the machine's, or one started here ---------------------------

@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    configured = os.environ.get("TEST_REDIS_URL")
    if configured:
        yield configured
        return
    if redis_answers("redis://127.0.0.1:6379/0"):
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
