"""Jobs across real `adapter serve` replicas sharing a redis-server of the test's own.

The gateway and CRM doubles are served over TCP in the test's event loop, so the test
counts the model calls and holds or releases the model (`gateway.gate`). Replicas are
killed (`kill -9`), terminated (SIGTERM) and the Redis is killed and restarted under
running jobs; readers behave as the browser's EventSource does (reconnect, with
Last-Event-ID, to the next replica) and must see one gapless log ending in `done`.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest
import redis as redis_sync

from tests.helpers import DEAL_AGENT, LEAD_AGENT, Reader, Replica, Restartable, metric, replica_cluster, serving

pytestmark = pytest.mark.redis

LEASE = 1.5


@pytest.fixture
def cluster(gateway, crm, seed, redis_process):
    """Start `n` replicas (env overrides per call) against the doubles and the test's Redis."""

    @asynccontextmanager
    async def start(n: int = 2, *, gateway_server: Restartable | None = None, **overrides: object):
        async with AsyncExitStack() as stack:
            gw_url = gateway_server.url if gateway_server else await stack.enter_async_context(serving(gateway.app))
            crm_url = await stack.enter_async_context(serving(crm.app))
            yield await stack.enter_async_context(replica_cluster(
                n, gateway_url=gw_url, crm_url=crm_url, redis_url=redis_process.url, lease=LEASE, prefix="replicas",
                logged=("job.", "shutdown.", "cache."), **overrides))

    return start


async def create_job(client: httpx.AsyncClient, replica: Replica, seed: dict, task: str = "lead.qualify",
                     record: str | None = None, **headers: str) -> dict:
    key = "deal_id" if task == "deal.predict" else "lead_id"
    record = record or (seed["deals"][0] if task == "deal.predict" else seed["leads"][0])
    r = await client.post(replica.url + "/api/v1/ai/jobs", json={"task": task, "input": {key: record}},
                          headers={"Authorization": f"Bearer {seed['token']}", **headers})
    assert r.status_code == 202, r.text
    return r.json()


def reader_of(job: dict, replicas: list[Replica], first: int) -> Reader:
    return Reader([r.url for r in replicas], job["events_url"], first=first)


def statuses(reader: Reader) -> list[dict]:
    return [e.json for e in reader.events if e.event == "status"]


async def kill_runner_mid_job(client: httpx.AsyncClient, reader: Reader, runner: Replica, gateway) -> list:
    """Read the job until the model holds it, `kill -9` its runner, then let the model answer; the events read."""
    reading = asyncio.create_task(reader.run(client, timeout=40))
    # queued, starting, and the gateway's two (task_started, status_update); then it waits for the model
    await reader.until(lambda: len(reader.events) >= 4, 20, "the gateway's status events")
    runner.kill()
    await runner.exited()
    gateway.gate.set()
    return await reading


async def test_kill_9_of_the_runner_mid_job(cluster, gateway, seed):
    gateway.default, gateway.token_interval = "tokens", 0.01
    gateway.gate = asyncio.Event()  # the model thinks until released
    async with cluster(2) as ([a, b], client):
        job = await create_job(client, a, seed)
        reader = reader_of(job, [a, b], first=1)  # reads on the other replica
        events = await kill_runner_mid_job(client, reader, a, gateway)
        scraped = (await client.get(b.url + "/metrics")).text
    reader.check_sequence()
    # What the fleet's dashboard and alerts read: one takeover, and b's lag behind a's writes while it followed.
    assert metric(scraped, "crm_ai_job_takeovers_total", reason="lease_lapsed") == 1
    assert metric(scraped, "crm_ai_job_takeovers_total", reason="handed_over") == 0
    assert 1 <= metric(scraped, "crm_ai_job_follower_lag_seconds_count") <= len(events)
    assert metric(scraped, "crm_ai_job_follower_lag_seconds_sum") < 5
    assert events[-2].event == "result" and events[-1].json == {"status": "succeeded", "cached": False}
    resumed = [s for s in statuses(reader) if s.get("resumed")]
    assert len(resumed) == 1 and events.index(next(e for e in events if e.event == "status" and e.json.get("resumed"))) == 4
    assert gateway.calls[LEAD_AGENT] == 2  # the dead runner's call, and the takeover's
    assert b.logged("job.taken_over", job_id=job["job_id"]) and b.logged("job.done", job_id=job["job_id"], status="succeeded")
    assert not b.logged("cache.redis_unavailable")


async def test_a_job_logged_by_the_release_before_cache_key_is_taken_over(cluster, gateway, seed, redis_process):
    """The release before `CacheKey` kept a job's cache key rendered only (no "digest" beside it). A replica of
    this release that takes such a job over derives the key again, which renders to the signed one: the answer
    lands in the entry every replica reads, and the run ends as any takeover does."""
    gateway.gate = asyncio.Event()
    async with cluster(2) as ([a, b], client):
        job = await create_job(client, a, seed)
        meta = f"{a.env['CACHE_PREFIX']}:job:{{{job['job_id']}}}"
        with redis_sync.Redis.from_url(redis_process.url) as r:
            assert r.hdel(meta, "digest") == 1  # as the older release wrote it
            rendered = r.hget(meta, "key")
            reader = reader_of(job, [a, b], first=0)  # on a; b loads the job only once a is gone
            events = await kill_runner_mid_job(client, reader, a, gateway)
            kept = r.exists(rendered)
    reader.check_sequence()
    assert events[-2].event == "result" and events[-1].json == {"status": "succeeded", "cached": False}
    assert len([s for s in statuses(reader) if s.get("resumed")]) == 1 and gateway.calls[LEAD_AGENT] == 2
    assert kept == 1 and b.logged("job.taken_over", job_id=job["job_id"]) and not b.logged("cache.tampered")


async def test_sigterm_hands_over_what_does_not_fit_and_finishes_what_does(cluster, gateway, seed):
    gateway.default, gateway.token_interval = "tokens", 0.03  # a deal prediction streams for about 2 s
    gateway.push(LEAD_AGENT, "never_ends")  # the first qualification cannot finish within the grace
    async with cluster(2, shutdown_grace_seconds=4) as ([a, b], client):
        stuck = await create_job(client, a, seed)
        fits = await create_job(client, a, seed, task="deal.predict")
        stuck_on_b, fits_on_b = reader_of(stuck, [a, b], first=1), reader_of(fits, [a, b], first=1)
        stuck_on_a = reader_of(stuck, [a, b], first=0)  # a reader connected to the replica going away
        readers = [stuck_on_b, fits_on_b, stuck_on_a]
        tasks = [asyncio.create_task(r.run(client, timeout=40)) for r in readers]
        await fits_on_b.until(lambda: any(e.event == "delta" for e in fits_on_b.events), 20, "the deal's first token")
        await stuck_on_a.until(lambda: len(stuck_on_a.events) >= 3, 20, "the stuck job's third event")
        a.terminate()
        await a.saw("shutdown.draining")
        ready = await client.get(a.url + "/readyz")
        refused = await client.post(a.url + "/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][1]}},
                                    headers={"Authorization": f"Bearer {seed['token']}"})
        await asyncio.gather(*tasks)
        await a.exited()
        scraped = (await client.get(b.url + "/metrics")).text
    assert metric(scraped, "crm_ai_job_takeovers_total", reason="handed_over") == 1  # planned: no alert
    assert metric(scraped, "crm_ai_job_takeovers_total", reason="lease_lapsed") == 0
    assert ready.status_code == 503 and ready.json()["type"].endswith("not-ready") and "shutting down" in ready.json()["detail"]
    assert refused.status_code == 503 and refused.json()["type"].endswith("shutting-down") and refused.headers["retry-after"]
    for r in readers:
        r.check_sequence()
        assert r.events[-1].json["status"] == "succeeded"
    # The job that fitted finished where it started: one model call, no resumption.
    assert gateway.calls[DEAL_AGENT] == 1 and not any(s.get("resumed") for s in statuses(fits_on_b))
    assert a.logged("job.done", job_id=fits["job_id"], status="succeeded")
    # The other was handed over at the end of the grace and taken over by b.
    assert gateway.calls[LEAD_AGENT] == 2 and sum(bool(s.get("resumed")) for s in statuses(stuck_on_b)) == 1
    assert a.logged("job.handed_over", job_id=stuck["job_id"]) and b.logged("job.taken_over", job_id=stuck["job_id"])
    # The reader on `a` was closed cleanly and resumed on `b` with Last-Event-ID: the same log.
    assert [(e.id, e.data) for e in stuck_on_a.events] == [(e.id, e.data) for e in stuck_on_b.events]
    assert stuck_on_a.connections[0] == (a.url, 200) and (b.url, 200) in stuck_on_a.connections[1:]


async def test_redis_killed_and_restarted_mid_job(cluster, gateway, seed, redis_process):
    gateway.default, gateway.token_interval = "tokens", 0.15
    gateway.gate = asyncio.Event()
    async with cluster(2) as ([a, b], client):
        job = await create_job(client, a, seed)
        readers = [reader_of(job, [a, b], first=0), reader_of(job, [a, b], first=1), reader_of(job, [a, b], first=1)]
        tasks = [asyncio.create_task(r.run(client, timeout=45)) for r in readers]
        for r in readers:
            await r.until(lambda r=r: len(r.events) >= 3, 20, "three events")
        redis_process.stop()
        gateway.gate.set()  # the model streams while Redis is gone
        await a.saw("cache.redis_unavailable")
        await readers[0].until(lambda: any(e.event == "delta" for e in readers[0].events), 20, "a token while Redis is down")
        redis_process.start()  # empty, on the same port
        await asyncio.gather(*tasks)
        late = reader_of(job, [a, b], first=1)  # a fresh reader on the other replica, after the repair
        await late.run(client, timeout=20)
    for r in [*readers, late]:
        r.check_sequence()
        assert r.events[-1].json == {"status": "succeeded", "cached": False}
        assert [(e.id, e.data) for e in r.events] == [(e.id, e.data) for e in readers[0].events]
    assert gateway.calls[LEAD_AGENT] == 1  # repaired, not run again
    assert a.logged("job.log_repair", job_id=job["job_id"]) and a.logged("job.log_repaired", job_id=job["job_id"])


async def test_a_model_silent_for_longer_than_every_timeout(cluster, gateway, seed):
    # Silent for 6 s: longer than the old 1 s socket timeout, the old 5 s XREAD block and the lease.
    gateway.default, gateway.delay = "json", 6.0
    async with cluster(2) as ([a, b], client):
        job = await create_job(client, a, seed)
        reader = reader_of(job, [a, b], first=1)
        events = await reader.run(client, timeout=40)
    reader.check_sequence()
    assert events[-2].event == "result" and events[-1].json["status"] == "succeeded"
    gaps = [later.at - earlier.at for earlier, later in zip(events, events[1:])]
    assert max(gaps) > 5 and reader.pings >= 8  # heartbeats every 0.5 s through the silence
    assert reader.connections == [(b.url, 200)]  # one connection, never dropped
    assert gateway.calls[LEAD_AGENT] == 1 and not b.logged("job.taken_over") and not b.logged("cache.redis_unavailable")


async def test_a_cache_hit_job_is_readable_at_once_on_the_other_replica(cluster, gateway, seed):
    async with cluster(2) as ([a, b], client):
        first = await create_job(client, a, seed)
        await reader_of(first, [a, b], first=0).run(client, timeout=20)
        for _ in range(20):
            hit = await create_job(client, a, seed)
            assert hit["status"] == "succeeded"
            polled = await client.get(b.url + f"/api/v1/ai/jobs/{hit['job_id']}", headers={"Authorization": f"Bearer {seed['token']}"})
            assert polled.status_code == 200 and polled.json()["status"] == "succeeded"
            events = await client.get(b.url + hit["events_url"])
            assert events.status_code == 200 and events.text.rstrip().endswith('data: {"status":"succeeded","cached":true}')
    assert gateway.calls[LEAD_AGENT] == 1


async def test_a_stream_serves_the_stale_answer_while_the_gateway_is_down(cluster, gateway, seed):
    server = Restartable(gateway.app)
    await server.start()
    ttl = 1.0
    try:
        async with cluster(2, gateway_server=server, cache_ttl_lead_qualify=ttl) as ([a, b], client):
            auth = {"Authorization": f"Bearer {seed['token']}"}
            fresh = await client.post(a.url + "/api/v1/ai/lead/qualify/stream", json={"lead_id": seed["leads"][0]}, headers=auth)
            stored = time.monotonic()
            await server.stop()
            await asyncio.sleep(max(0.0, ttl + 0.1 - (time.monotonic() - stored)))  # the answer's age passes its TTL
            stale = await client.post(b.url + "/api/v1/ai/lead/qualify/stream", json={"lead_id": seed["leads"][0]}, headers=auth)
            sync = await client.post(b.url + "/api/v1/ai/lead/qualify", json={"lead_id": seed["leads"][0]}, headers=auth)
    finally:
        await server.stop()
    result = [line for line in fresh.text.splitlines() if line.startswith("data: {") and '"score"' in line][0]
    lines = [line for line in stale.text.splitlines() if line]
    assert stale.status_code == 200 and result in lines
    assert lines[-1] == 'data: {"status":"succeeded","cached":true,"stale":true}'
    assert sync.headers["x-cache"] == "STALE" and f"data: {sync.text}" == result  # one stale rule for both


@pytest.mark.timeout(180)
async def test_200_jobs_over_three_replicas_while_one_is_killed(cluster, gateway, seed):
    gateway.default, gateway.token_interval = "tokens", 0.1  # each job streams for about 2 s
    async with cluster(3, job_lease_seconds=2) as (replicas, client):
        jobs = await asyncio.gather(*(create_job(client, replicas[i % 3], seed, **{"Cache-Control": "no-store"})
                                      for i in range(200)))
        readers = [reader_of(job, replicas, first=i + 1) for i, job in enumerate(jobs)]  # never on the job's runner
        tasks = [asyncio.create_task(r.run(client, timeout=90)) for r in readers]
        await asyncio.wait_for(gateway.calls.reach(200), 60)  # every job is asking the model
        replicas[0].kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    hung = [r for r in results if isinstance(r, BaseException)]
    assert not hung, hung[:3]
    for r in readers:
        r.check_sequence()
    assert all(r.events[-1].json["status"] == "succeeded" for r in readers)
    taken_over = sum(bool(replica.logged("job.taken_over")) for replica in replicas[1:])
    assert taken_over  # some of the dead replica's jobs were still running: others finished them
    assert not any(r.logged("job.expired") for r in replicas[1:])  # no job was given up


async def test_a_job_lost_with_its_runner_and_redis_ends_its_readers(cluster, gateway, seed, redis_process):
    gateway.gate = asyncio.Event()
    async with cluster(2) as ([a, b], client):
        job = await create_job(client, a, seed)
        reader = reader_of(job, [a, b], first=1)
        reading = asyncio.create_task(reader.run(client, timeout=40))
        await reader.until(lambda: len(reader.events) >= 3, 20, "three events")
        a.kill()
        redis_process.stop()
        redis_process.start()  # empty: nobody is left to restore the job
        try:
            events = await reading
        finally:
            gateway.gate.set()
    reader.check_sequence()
    assert [e.event for e in events[-2:]] == ["error", "done"] and events[-1].json["status"] == "failed"
    assert events[-2].json["type"].endswith("job-expired") and "gone from Redis" in events[-2].json["detail"]
    assert b.logged("job.expired", job_id=job["job_id"]) and gateway.calls[LEAD_AGENT] == 1
