"""Shutdown leaves no connection to Redis behind, even when a background task loses its cancel.

The suite runs with warnings as errors, and an unclosed socket is a ResourceWarning raised in
whichever later test the garbage collector runs: a batch's runner and its job-log writer, cancelled
at shutdown, lost the cancel inside redis-py (Python 3.11's `asyncio.wait_for`, see
adapter/stopping.py), went on with their next Redis command after the lifespan had closed the pool,
and redis-py opened a connection that nobody closed.
"""

from __future__ import annotations

import asyncio
import sys
import time
import types
import uuid

import pytest
import redis as redis_sync

from adapter.app import create_app
from adapter.stopping import cancel_and_wait
from adapter.storage.redis_store import FAULTS
from tests.helpers import asgi_client, make_settings, running


def connections_named(redis_url: str, name: str) -> int:
    with redis_sync.Redis.from_url(redis_url) as r:
        return sum(1 for client in r.client_list() if client.get("name") == name)


async def until_no_connection(redis_url: str, name: str, timeout: float = 5.0) -> int:
    """The server's count of connections by that client name, once it is 0 or at the deadline."""
    deadline = time.monotonic() + timeout
    while (count := connections_named(redis_url, name)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the server notices a closed socket on its next event-loop turn
    return count


async def loses_one_cancel(write, tasks: list[asyncio.Task], attempted: asyncio.Event) -> None:
    """What a job-log writer did when its cancel was lost: it carried on with its loop of Redis commands,
    backing off after a failure (the pool closed under it) and trying again."""
    tasks.append(asyncio.current_task())
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass
    while True:
        try:
            await write()
        except FAULTS:
            pass
        attempted.set()
        await asyncio.sleep(0.05)


async def test_a_cancel_lost_in_wait_for_still_ends_the_task():
    sent = 0
    worker: asyncio.Task | None = None

    async def write() -> None:
        # The cancel lands in the turn the write completes, as shutdown's cancel can on a busy loop.
        if sent == 0:
            worker.cancel()

    async def writer() -> None:
        nonlocal sent
        while True:
            await asyncio.wait_for(write(), 1.0)  # as redis-py sends every command (its socket timeout)
            sent += 1
            await asyncio.sleep(0.01)

    worker = asyncio.create_task(writer())
    if sys.version_info < (3, 12):  # CPython gh-86296: 3.11's wait_for returns instead of raising
        async with asyncio.timeout(5):
            while sent < 2:
                await asyncio.sleep(0.01)
        assert not worker.done(), "the cancel was not lost: this test no longer shows the hazard"
    assert await cancel_and_wait(lambda: [worker], timeout=5) == []
    assert worker.cancelled()


async def test_cancel_and_wait_asks_again_for_tasks_started_while_stopping():
    started: list[asyncio.Task] = []

    async def spawner() -> None:
        try:
            await asyncio.Event().wait()
        finally:  # a runner's last event starts a job-log writer as it ends
            started.append(asyncio.create_task(asyncio.Event().wait()))

    first = asyncio.create_task(spawner())
    await asyncio.sleep(0)
    assert await cancel_and_wait(lambda: [first, *started], timeout=5) == []
    assert first.cancelled() and len(started) == 1 and started[0].cancelled()


@pytest.mark.redis
async def test_a_stopped_app_leaves_no_connection_to_redis_even_if_a_task_lost_its_cancel(gateway, crm, redis_url, cache_prefix):
    name = f"leak-{uuid.uuid4().hex[:12]}"
    settings = make_settings(redis_url=f"{redis_url}?client_name={name}", cache_prefix=cache_prefix)
    async with asgi_client(gateway.app, "http://gateway.test") as gw, asgi_client(crm.app, "http://crm.test") as backend:
        app = create_app(settings, gateway_http=gw, crm_http=backend)
        async with running(app) as client:
            assert (await client.get("/api/v1/ai/health")).status_code == 200
            store = app.state.service.cache.store
            # A background task of the app's own kind (a job runner), in the state the lost cancel leaves.
            stubborn: list[asyncio.Task] = []
            attempted = asyncio.Event()
            app.state.jobs.run_owned(types.SimpleNamespace(id="job_lost_cancel"),
                                     loses_one_cancel(lambda: store.redis.set(f"{cache_prefix}:after-cancel", b"1"), stubborn, attempted))
            await asyncio.sleep(0)
            assert connections_named(redis_url, name) >= 1  # the name reaches the server: the count below means something
        # Stopped: the task has ended, or (had shutdown not waited for it) it tries Redis once more.
        attempted.clear()
        tried_again = asyncio.create_task(attempted.wait())
        await asyncio.wait([stubborn[0], tried_again], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        tried_again.cancel()
        left = await until_no_connection(redis_url, name)
        pools = [store.redis.connection_pool, app.state.jobs.mirror.follower.blocking.connection_pool]
        connected = [c for pool in pools for c in [*pool._available_connections, *pool._in_use_connections] if c.is_connected]
        # So that a failure here is this test's, not a ResourceWarning in a later one.
        await cancel_and_wait(lambda: stubborn, timeout=5)
        for conn in connected:
            await conn.disconnect()
    assert left == 0, f"{left} connection(s) to Redis still open after the app stopped"
    assert not connected
    with redis_sync.Redis.from_url(redis_url) as r:
        assert r.get(f"{cache_prefix}:after-cancel") == b"1"  # the task's write happened, before Redis was closed
