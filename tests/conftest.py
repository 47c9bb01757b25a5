from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest

from adapter.app import create_app
from adapter.doubles.crm import CrmDouble
from adapter.doubles.gateway import GatewayDouble
from adapter.settings import Settings
from tests.helpers import ClusterSet, RedisProcess, SentinelSet, asgi_client, make_settings, redis_answers, running, sync_client


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
def machine_redis_url() -> Iterator[str]:
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


TOPOLOGIES = ("single", "sentinel", "cluster")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Issue 24: a test marked `redis_topologies` runs against one Redis, a Sentinel set-up and a Cluster.
    # `@pytest.mark.redis_topologies("single", "sentinel")` names fewer.
    if (marker := metafunc.definition.get_closest_marker("redis_topologies")) and "redis_url" in metafunc.fixturenames:
        metafunc.parametrize("redis_url", marker.args or TOPOLOGIES, indirect=True)


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """The Redis a test uses: the machine's (or the configured, or one started here); with the
    `redis_topologies` marker, in turn that one, a Sentinel-watched master and a Cluster."""
    topology = getattr(request, "param", "single")
    if topology == "sentinel":
        return request.getfixturevalue("sentinel_set").url
    if topology == "cluster":
        return request.getfixturevalue("redis_cluster").url
    return request.getfixturevalue("machine_redis_url")


@pytest.fixture
def cache_prefix(redis_url: str) -> Iterator[str]:
    """A namespace of this test's own in the shared Redis, removed afterwards (on every master of a Cluster)."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = sync_client(redis_url)
    try:
        for key in list(client.scan_iter(f"{prefix}:*")):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    own = RedisProcess()
    own.start()
    yield own
    own.stop()


# --- highly available Redis (issue 24): started once per session, on loopback ports -----------

@pytest.fixture(scope="session")
def sentinel_set(tmp_path_factory) -> Iterator[SentinelSet]:
    """A master, a replica and three sentinels; tests that fail the master over start their own."""
    own = SentinelSet(tmp_path_factory.mktemp("sentinel"))
    try:
        own.start()
        yield own
    finally:
        own.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[ClusterSet]:
    """Three masters in one Redis Cluster; tests that reshard it start their own."""
    own = ClusterSet(tmp_path_factory.mktemp("cluster"))
    try:
        own.start()
        yield own
    finally:
        own.stop()
