"""Every user's work is bounded, and the limits say so (issue 22, finding 4).

Per user: open event streams (MAX_STREAMS_PER_USER, counting readers with a job or batch token
as their creator), running batches (MAX_BATCHES_PER_USER, across replicas through Redis) and
CRM record reads (CRM_READS_PER_USER: interactive requests get 429, batches wait). Per replica:
open streams (MAX_STREAMS, 503). Beyond a limit: a problem naming the setting, with Retry-After.
An ended batch and its token last JOB_RETENTION_SECONDS, not until its BATCH_MAX_SECONDS deadline.

Streams are served over TCP (an in-process ASGI transport buffers whole bodies); the model is
held with `gateway.gate` so that streams and batches stay open as long as a test needs them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest

from adapter.app import create_app
from adapter.pipeline.batches import READ_CONCURRENCY
from adapter.web import streams as streams_module
from adapter.web.auth import user_key
from tests.helpers import QUALIFY, QUALIFY_STREAM, Clock, asgi_client, assert_problem, job_done, make_settings, metric, running, serving

BATCHES = "/api/v1/ai/batches"
NO_LIMITS = {"rate_limit_lead_qualify": "off", "rate_limit_email_generate": "off", "rate_limit_deal_predict": "off"}


@pytest.fixture
def sidecar(gateway, crm):
    """The sidecar with the doubles in process: yields (client, app); `tcp=True` serves it over a socket."""

    @asynccontextmanager
    async def start(*, tcp: bool = False, **kwargs: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
        overrides = {k: v for k, v in kwargs.items() if k not in ("clock", "sleep")}
        extra = {k: v for k, v in kwargs.items() if k in ("clock", "sleep")}
        settings = make_settings(**{**NO_LIMITS, **overrides})
        async with asgi_client(gateway.app, "http://gateway.test") as gw, asgi_client(crm.app, "http://crm.test") as backend:
            app = create_app(settings, gateway_http=gw, crm_http=backend, **extra)
            if tcp:
                async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
                    yield client, app
            else:
                async with running(app) as client:
                    yield client, app

    return start


@pytest.fixture
def held(gateway):
    """The model answers nothing until the test ends: jobs, streams and batches stay open."""
    gateway.gate = asyncio.Event()
    yield gateway.gate
    gateway.gate.set()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def open_stream(stack: AsyncExitStack, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """A stream held open until `stack` closes; a refusal's body is read (nothing else is)."""
    response = await stack.enter_async_context(client.stream(method, url, **kwargs))
    if response.status_code != 200:
        await response.aread()
    return response


async def until(condition: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    """Poll a condition another task changes (a count the server keeps), under a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.01)


def limited(response: httpx.Response, status: int, slug: str, setting: str) -> dict:
    assert response.status_code == status, f"{response.status_code}, not {status} naming {setting}"
    problem = assert_problem(response, status, slug)
    assert setting in problem["detail"], problem
    assert int(response.headers["retry-after"]) >= 1
    return problem


# --- open event streams -------------------------------------------------------------------------


async def test_a_users_21st_stream_is_429_naming_the_limit_while_another_user_streams(sidecar, held, crm, seed, auth):
    leads = [crm.add_lead(seed["alice"], name=f"Stream lead {i}") for i in range(20)]
    async with sidecar(tcp=True) as (client, app), AsyncExitStack() as streams:
        # Twenty task streams of one user, each on a job of its own, held open by the model.
        opened = [await open_stream(streams, client, "POST", QUALIFY_STREAM, json={"lead_id": lead}, headers=auth)
                  for lead in leads]
        assert [r.status_code for r in opened] == [200] * 20
        # The 21st: a job's EventSource, reading with the job token (no bearer), counts as the same user.
        job = (await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][0]}},
                                 headers=auth)).json()
        async with AsyncExitStack() as more:
            refused = await open_stream(more, client, "GET", job["events_url"])
            limited(refused, 429, "too-many-at-once", "MAX_STREAMS_PER_USER")
            batch = await client.post(BATCHES, json={"task": "lead.qualify", "ids": [seed["leads"][1]]}, headers=auth)
            assert batch.status_code == 202, batch.text
            limited(await open_stream(more, client, "GET", batch.json()["events_url"]), 429, "too-many-at-once",
                    "MAX_STREAMS_PER_USER")
            # Another user is not affected.
            bob = await open_stream(more, client, "POST", QUALIFY_STREAM, json={"lead_id": seed["bobs_lead"]},
                                    headers=bearer(seed["bob_token"]))
            assert bob.status_code == 200
        # A stream the client leaves gives its place back.
        alice = user_key(seed["token"], None)
        assert app.state.streams.held_by(alice) == 20
        await opened[0].aclose()
        await until(lambda: app.state.streams.held_by(alice) == 19, what="the closed stream's place back")
        again = await open_stream(streams, client, "GET", job["events_url"])
        assert again.status_code == 200
    assert metric(app.state.metrics.render().decode(), "crm_ai_limit_refusals_total", limit="MAX_STREAMS_PER_USER") == 2


async def test_one_job_token_opens_at_most_twenty_streams(sidecar, held, seed, auth):
    # The reproduction: 500 concurrent event streams on one job token were all accepted.
    async with sidecar(tcp=True) as (client, _), AsyncExitStack() as streams:
        job = (await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][0]}},
                                 headers=auth)).json()
        opened = [await open_stream(streams, client, "GET", job["events_url"]) for _ in range(20)]
        assert [r.status_code for r in opened] == [200] * 20
        limited(await open_stream(streams, client, "GET", job["events_url"]), 429, "too-many-at-once", "MAX_STREAMS_PER_USER")
        bobs = (await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": seed["bobs_lead"]}},
                                  headers=bearer(seed["bob_token"]))).json()
        assert (await open_stream(streams, client, "GET", bobs["events_url"])).status_code == 200


async def test_a_replica_with_max_streams_open_answers_503_with_retry_after(sidecar, held, seed, auth):
    async with sidecar(tcp=True, max_streams=3) as (client, app), AsyncExitStack() as streams:
        job = (await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][0]}},
                                 headers=auth)).json()
        assert [(await open_stream(streams, client, "GET", job["events_url"])).status_code for _ in range(3)] == [200] * 3
        # Another user, well under their own limit: the replica is full.
        refused = await open_stream(streams, client, "POST", QUALIFY_STREAM, json={"lead_id": seed["bobs_lead"]},
                                    headers=bearer(seed["bob_token"]))
        limited(refused, 503, "streams-full", "MAX_STREAMS")
        assert app.state.streams.open_streams == 3


async def test_a_stream_that_fails_or_ends_gives_its_place_back(sidecar, seed, auth):
    async with sidecar(tcp=True, max_streams_per_user=1) as (client, app), AsyncExitStack() as streams:
        missing = await open_stream(streams, client, "POST", QUALIFY_STREAM, json={"lead_id": "65f1c0ffee00000000000bad"},
                                    headers=auth)
        assert_problem(missing, 404, "not-found")  # the place was taken before the CRM said no
        for _ in range(2):  # each runs to `done`, one after the other
            async with client.stream("POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth) as r:
                assert r.status_code == 200 and b"event: done" in await r.aread()
            await until(lambda: app.state.streams.open_streams == 0, what="the ended stream's place back")


def test_max_streams_is_lowered_to_what_the_descriptor_limit_leaves(monkeypatch):
    import resource

    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: asked.append(limits))
    settings = make_settings()  # the pools may hold 2,000 + 16 + 512 descriptors, the process 256 more
    reserve = 2_000 + 16 + 512 + streams_module.OTHER_FDS
    # The soft limit is raised as far as the hard one allows; what is left is a quarter of it at least.
    assert streams_module.stream_limit(settings) == (max(4096 - reserve, 4096 // 4), 4096)
    assert asked == [(4096, 4096)]
    # Room enough: MAX_STREAMS as set, and the limit raised no further than it needs.
    asked.clear()
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1_000_000))
    assert streams_module.stream_limit(settings) == (10_000, 10_000 + reserve)
    assert asked == [(10_000 + reserve, 1_000_000)]


# --- running batches ----------------------------------------------------------------------------


async def test_a_third_running_batch_is_429_naming_the_limit(sidecar, held, seed, auth):
    async with sidecar() as (client, app):
        started = [await client.post(BATCHES, json={"task": "lead.qualify", "ids": [lead]}, headers=auth)
                   for lead in seed["leads"][:2]]
        assert [r.status_code for r in started] == [202, 202]
        third = await client.post(BATCHES, json={"task": "lead.qualify", "ids": [seed["leads"][2]]}, headers=auth)
        problem = limited(third, 429, "too-many-at-once", "MAX_BATCHES_PER_USER")
        assert "2 of this user's batches are running" in problem["detail"]
        bob = await client.post(BATCHES, json={"task": "lead.qualify", "ids": [seed["bobs_lead"]]}, headers=bearer(seed["bob_token"]))
        assert bob.status_code == 202
        # Once one has ended, another may start.
        held.set()
        await job_done(app, started[0].json()["batch_id"], timeout=20)
        again = await client.post(BATCHES, json={"task": "lead.qualify", "ids": [seed["leads"][2]]}, headers=auth)
        assert again.status_code == 202, again.text
        for r in (started[1], bob, again):
            await job_done(app, r.json()["batch_id"], timeout=20)


@pytest.mark.redis
@pytest.mark.redis_topologies
async def test_running_batches_are_counted_across_replicas_through_redis(gateway, crm, seed, auth, held, redis_url, cache_prefix):
    settings = make_settings(**NO_LIMITS, redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="b" * 40)
    async with asgi_client(gateway.app, "http://gateway.test") as gw, asgi_client(crm.app, "http://crm.test") as backend:
        a, b = (create_app(settings, gateway_http=gw, crm_http=backend) for _ in range(2))
        async with running(a) as on_a, running(b) as on_b:
            first = [await on_a.post(BATCHES, json={"task": "lead.qualify", "ids": [lead]}, headers=auth) for lead in seed["leads"][:2]]
            assert [r.status_code for r in first] == [202, 202]
            third = await on_b.post(BATCHES, json={"task": "lead.qualify", "ids": [seed["leads"][2]]}, headers=auth)
            limited(third, 429, "too-many-at-once", "MAX_BATCHES_PER_USER")
            held.set()
            for r in first:
                await job_done(a, r.json()["batch_id"], timeout=20)
            # Both ended on replica a: replica b sees their places free.
            again = await on_b.post(BATCHES, json={"task": "lead.qualify", "ids": [seed["leads"][2]]}, headers=auth)
            assert again.status_code == 202, again.text
            await job_done(b, again.json()["batch_id"], timeout=20)
            await b.state.jobs.mirror.flush_all(timeout=5)  # its `done` is in Redis before the apps stop


# --- CRM record reads ---------------------------------------------------------------------------


async def test_a_batch_waits_on_the_crm_read_bucket(sidecar, crm, seed, auth):
    """12 records, a bucket of 4 reads a second: a quarter (1) stays for the user's interactive
    requests, so 3 reads go at once and the rest wait for the bucket on the test's own clock."""
    leads = [crm.add_lead(seed["alice"], name=f"Paced lead {i}") for i in range(12)]
    clock = Clock()
    start = clock.now
    waits: list[tuple[float, int]] = []  # (clock when the batch waited, CRM reads by then)

    async def sleep(seconds: float) -> None:
        waits.append((clock.now, crm.calls["GET lead"]))
        clock.now += seconds  # time passes for the bucket only when the batch waits for it
        await asyncio.sleep(0)

    async with sidecar(crm_reads_per_user="4/1", clock=clock, sleep=sleep) as (client, app):
        created = await client.post(BATCHES, json={"task": "lead.qualify", "ids": leads}, headers=auth)
        assert created.status_code == 202, created.text
        job = await job_done(app, created.json()["batch_id"], timeout=30)
    assert job.status == "completed" and crm.calls["GET lead"] == 12
    assert waits, "the batch never waited for the CRM read bucket"
    assert waits[0] == (start, 3)  # the burst, less the quarter kept for interactive requests
    # Never more reads than the bucket held and earned by then: 4 at the start, 4 a second after.
    assert all(reads <= 4 + 4 * (at - start) for at, reads in waits)
    assert clock.now - start >= (12 - 4) / 4
    assert metric(app.state.metrics.render().decode(), "crm_ai_rate_limited_total", task="crm.read") == len(waits)


async def test_an_interactive_request_over_the_crm_read_bucket_is_429_naming_it(sidecar, seed, auth, crm):
    async with sidecar(crm_reads_per_user="2/60") as (client, _):
        ok = [await client.post(QUALIFY, json={"lead_id": lead}, headers=auth) for lead in seed["leads"][:2]]
        over = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)  # a cache hit reads the record too
        bob = await client.post(QUALIFY, json={"lead_id": seed["bobs_lead"]}, headers=bearer(seed["bob_token"]))
    assert [r.status_code for r in ok] == [200, 200] and bob.status_code == 200
    problem = limited(over, 429, "rate-limited", "CRM_READS_PER_USER")
    assert "at most 2 CRM record reads per 60 s per user" in problem["detail"]
    assert over.headers["ratelimit-policy"] == "2;w=60" and over.headers["ratelimit-remaining"] == "0"
    assert crm.calls["GET lead"] == 3  # the refused request never reached the backend


@pytest.mark.redis
async def test_the_crm_read_bucket_is_kept_by_each_process_not_in_redis(sidecar, seed, auth, redis_url, cache_prefix):
    """Every request spends a CRM read token, cache hits included: a Redis round trip for it cost ~9 % of a
    hit. Each replica keeps its own (N replicas bound a user to N times the rate); model calls stay shared."""
    import redis as redis_sync

    async with sidecar(crm_reads_per_user="2/60", rate_limit_lead_qualify="50/60", redis_url=redis_url,
                       cache_prefix=cache_prefix) as (client, _):
        answers = [await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    with redis_sync.Redis.from_url(redis_url) as r:
        buckets = {key.decode().split(":rl:", 1)[1].split(":", 1)[0] for key in r.scan_iter(f"{cache_prefix}:rl:*")}
    assert buckets == {"lead.qualify"}, buckets


# --- a batch's token ----------------------------------------------------------------------------


async def test_a_batch_and_its_token_are_gone_retention_after_it_ended(sidecar, seed, auth):
    clock = Clock()
    async with sidecar(clock=clock, job_retention_seconds=5) as (client, app):
        created = (await client.post(BATCHES, json={"task": "lead.qualify", "ids": seed["leads"][:2]}, headers=auth)).json()
        job = await job_done(app, created["batch_id"])
        ended = job.events[-1]
        assert ended.event == "done"
        state = await client.get(created["events_url"].replace("/events", ""))
        assert state.status_code == 200 and state.json()["status"] == "completed"
        # Its view says until when: retention after it ended, no longer its BATCH_MAX_SECONDS deadline.
        assert state.json()["expires_at"] < created["expires_at"]
        clock.now += 4
        assert (await client.get(created["events_url"])).status_code == 200  # within the retention
        clock.now += 2
        for response in (await client.get(created["events_url"]),
                         await client.get(created["events_url"].replace("/events", "")),
                         await client.get(f"{BATCHES}/{created['batch_id']}", headers=auth)):
            assert "expired" in assert_problem(response, 404, "not-found")["detail"]


@pytest.mark.redis
async def test_another_replica_refuses_the_token_too_once_retention_has_passed(gateway, crm, seed, auth, redis_url, cache_prefix):
    # The replica that ran the batch forgets it; another one loads it from Redis, where it lasts
    # longer: what its `done` says decides.
    clock = Clock()
    settings = make_settings(**NO_LIMITS, redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="b" * 40,
                             job_retention_seconds=5)
    async with asgi_client(gateway.app, "http://gateway.test") as gw, asgi_client(crm.app, "http://crm.test") as backend:
        a, b = (create_app(settings, gateway_http=gw, crm_http=backend, clock=clock) for _ in range(2))
        async with running(a) as on_a, running(b) as on_b:
            created = (await on_a.post(BATCHES, json={"task": "lead.qualify", "ids": seed["leads"][:1]}, headers=auth)).json()
            await job_done(a, created["batch_id"])
            await a.state.jobs.mirror.flush_all(timeout=5)  # `done` is in Redis
            state = created["events_url"].replace("/events", "")
            assert (await on_b.get(state)).json()["status"] == "completed"
            clock.now += 6
            for client in (on_b, on_a):
                assert_problem(await client.get(state), 404, "not-found")
                assert_problem(await client.get(created["events_url"]), 404, "not-found")


async def test_a_batch_stops_reading_once_the_crm_refuses_its_token(sidecar, crm, seed):
    # Without CRM_JWT_SECRET a batch is accepted before the CRM sees the token: a refused one must
    # not cost the CRM a read per id (each new junk token is a new user, with budgets of its own).
    leads = [crm.add_lead(seed["alice"], name=f"Unread lead {i}") for i in range(40)]
    async with sidecar() as (client, app):
        created = await client.post(BATCHES, json={"task": "lead.qualify", "ids": leads}, headers=bearer("not-a-token-the-crm-knows"))
        assert created.status_code == 202, created.text
        job = await job_done(app, created.json()["batch_id"])
    items = [msgspec.json.decode(ev.data) for ev in job.events if ev.event == "item"]
    assert len(items) == 40 and {item["status"] for item in items} == {"failed"}
    assert {item["error"]["status"] for item in items} == {401}
    assert crm.calls["GET lead"] <= READ_CONCURRENCY  # the reads already under way when the first 401 came
