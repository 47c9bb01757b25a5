"""Batch runs (POST /api/v1/ai/batches): outcomes per item, cancel, resume, takeover, priority, input, access.

The sidecar is served over TCP (an ASGI in-process transport buffers whole SSE bodies) with the
doubles in process, so the test counts CRM reads and model calls and holds the model with
`gateway.gate`. Waits are on the batch's own log, the double's call tally or a replica's log
lines, each under a deadline; the multi-process test kills a real `adapter serve` replica by pid.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest

from adapter.app import create_app
from tests.helpers import (EMAIL_AGENT, LEAD_AGENT, QUALIFY, RECORD_ID, Reader, Replica, asgi_client, assert_problem,
                           job_done, make_settings, replica_cluster, serving)

BATCHES = "/api/v1/ai/batches"
NO_LIMITS = {"rate_limit_lead_qualify": "off", "rate_limit_email_generate": "off", "rate_limit_deal_predict": "off",
             "crm_reads_per_user": "off"}


@pytest.fixture
def rig(gateway, crm):
    """A sidecar over TCP (doubles in process): yields (client, app)."""

    @asynccontextmanager
    async def start(**overrides: object):
        settings = make_settings(**{**NO_LIMITS, **overrides})
        async with asgi_client(gateway.app, "http://gateway.test") as gw, asgi_client(crm.app, "http://crm.test") as backend:
            app = create_app(settings, gateway_http=gw, crm_http=backend)
            async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
                yield client, app

    return start


def tag(i: int) -> str:
    # A lead's name, unique in every prompt that mentions it (no name is a prefix of another).
    return f"Batch-lead-{i:03d}-end"


def add_leads(crm, owner: str, n: int, start: int = 0) -> list[str]:
    return [crm.add_lead(owner, name=tag(i), company=f"Company {i}", job_title="Head of Operations")
            for i in range(start, start + n)]


def asked(gateway, agent: str = LEAD_AGENT) -> Counter[str]:
    """Model calls (repairs included) per lead name, read from the prompts the double received."""
    counts: Counter[str] = Counter()
    for who, prompt in gateway.prompts:
        if who == agent and "Batch-lead-" in prompt:
            start = prompt.index("Batch-lead-")
            counts[prompt[start:prompt.index("-end", start) + 4]] += 1
    return counts


async def create(client: httpx.AsyncClient, auth: dict, ids: list[str], task: str = "lead.qualify",
                 options: dict | None = None) -> dict:
    body: dict[str, Any] = {"task": task, "ids": ids}
    if options is not None:
        body["options"] = options
    r = await client.post(BATCHES, json=body, headers=auth)
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["status"] == "queued" and created["total"] == len(ids) and created["batch_id"].startswith("aibatch_")
    assert r.headers["location"] == f"{BATCHES}/{created['batch_id']}"
    assert created["events_url"].startswith(f"{BATCHES}/{created['batch_id']}/events?token=")
    return created


def done_of(data: str | dict) -> dict:
    """A `done` event's data without its `ended_at` (checked to be a UTC timestamp)."""
    done = json.loads(data) if isinstance(data, str) else dict(data)
    assert dt.datetime.fromisoformat(done.pop("ended_at")).tzinfo is not None, done
    return done


def item_events(job) -> list[dict]:
    return [json.loads(ev.data) for ev in job.events if ev.event == "item"]


async def until_log(app, batch_id: str, condition: Callable[[Any], Any], timeout: float = 10, what: str = "") -> None:
    """Wait, on the batch's own events, until `condition(job)` holds."""
    job = app.state.jobs.get(batch_id)
    try:
        async with asyncio.timeout(timeout):
            while not condition(job):
                await job.after(len(job.events), timeout)
    except TimeoutError:
        raise AssertionError(f"{what or 'condition'} not reached within {timeout} s; log: "
                             f"{[(e.id, e.event, e.data[:120]) for e in job.events]}") from None


def running_ids(job) -> set[str]:
    latest = {item["id"]: item["status"] for item in item_events(job)}
    return {i for i, status in latest.items() if status == "running"}


async def sse(client: httpx.AsyncClient, url: str, *, headers: dict | None = None, timeout: float = 15,
              stop: Callable[[list[dict]], bool] | None = None) -> list[dict]:
    """One SSE connection's events ({id, event, data}) until `done`, or until `stop(events)` (then hang up)."""
    events: list[dict] = []
    block: dict[str, str] = {}
    async with asyncio.timeout(timeout):
        async with client.stream("GET", url, headers={"Accept": "text/event-stream", **(headers or {})}) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line == "":
                    if "id" in block:
                        events.append({"id": int(block["id"]), "event": block["event"], "data": block["data"]})
                        if block["event"] == "done" or (stop is not None and stop(events)):
                            return events
                    block = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    block[name] = value[1:] if value.startswith(" ") else value
    raise AssertionError(f"the stream ended without `done`: {[e['id'] for e in events]}")


# --- 1. a 50-item batch with every outcome --------------------------------------------------


async def test_fifty_items_cached_fresh_forbidden_missing_and_invalid(rig, gateway, crm, seed, auth):
    leads = add_leads(crm, seed["alice"], 48)
    cached, bad, fresh = leads[:5], leads[5], leads[6:]
    forbidden, missing = seed["bobs_lead"], RECORD_ID
    assert RECORD_ID not in crm.leads
    # The scripted invalid answers land on the first item asked: one at a time, in the order of `ids`,
    # and the cached items ahead of it ask nothing.
    ids = [cached[0], cached[1], bad, forbidden, *fresh[:20], cached[2], missing, *fresh[20:], cached[3], cached[4]]
    assert len(ids) == 50 and len(set(ids)) == 50
    async with rig(batch_concurrency=1) as (client, app):
        warm = {}
        for lead in cached:
            r = await client.post(QUALIFY, json={"lead_id": lead}, headers=auth)
            assert r.status_code == 200 and r.headers["x-cache"] == "MISS", r.text
            warm[lead] = r.json()
        calls_before, reads_before, patched_before = gateway.calls[LEAD_AGENT], crm.calls["GET lead"], len(crm.patches)
        assert calls_before == 5 and reads_before == 5
        gateway.push(LEAD_AGENT, "wrong_shape", "wrong_shape")  # the answer and its repair
        created = await create(client, auth, ids)
        batch_id = created["batch_id"]
        job = await job_done(app, batch_id, timeout=30)
        view = (await client.get(f"{BATCHES}/{batch_id}", headers=auth)).json()
        failed = (await client.get(f"{BATCHES}/{batch_id}", params={"status": "failed"}, headers=auth)).json()
        by_token = await client.get(f"{BATCHES}/{batch_id}", params={"token": created["events_url"].split("token=")[1]})
        events = await sse(client, created["events_url"])

    counts = {"queued": 0, "running": 0, "succeeded": 47, "failed": 3, "cancelled": 0, "cached": 5}
    assert view["status"] == "completed" and view["total"] == 50 and view["counts"] == counts
    assert view["task"] == "lead.qualify" and view["cancel_requested"] is False
    assert by_token.status_code == 200 and by_token.json() == view
    items = {item["id"]: item for item in view["items"]}
    assert [item["id"] for item in view["items"]] == ids  # in the order asked
    for lead in cached:  # the sync route's answer, as it was cached
        assert items[lead] == {"id": lead, "status": "succeeded", "cached": True, "result": warm[lead]}
    for lead in fresh:
        item = items[lead]
        assert set(item) == {"id", "status", "cached", "result"}, item
        assert item["status"] == "succeeded" and item["cached"] is False
        assert item["result"]["lead_id"] == lead and item["result"]["agent"] == LEAD_AGENT
        assert 0 <= item["result"]["score"] <= 100 and item["result"]["classification"] in ("Hot", "Warm", "Cold")
    problems = {lead: items[lead]["error"] for lead in (bad, forbidden, missing)}
    assert all(items[lead]["status"] == "failed" and "result" not in items[lead] for lead in problems)
    assert problems[forbidden]["status"] == 403 and problems[forbidden]["type"].endswith(":forbidden")
    assert problems[forbidden]["detail"] == "Not authorized to access this lead"
    assert problems[missing]["status"] == 404 and problems[missing]["type"].endswith(":not-found")
    assert problems[missing]["detail"] == "Lead not found"
    assert problems[bad]["status"] == 502 and problems[bad]["type"].endswith(":invalid-agent-output")
    assert "invalid output 2 time(s)" in problems[bad]["detail"] and problems[bad]["errors"]
    assert all(p["instance"] == f"{BATCHES}/{batch_id}" for p in problems.values())
    assert [item["id"] for item in failed["items"]] == [bad, forbidden, missing] and failed["counts"] == counts

    # One model call per uncached item that got as far as the model; two for the invalid one (its repair).
    per_lead = asked(gateway)
    assert gateway.calls[LEAD_AGENT] - calls_before == len(fresh) + 2
    assert all(per_lead[tag(leads.index(lead))] == 1 for lead in cached)  # the pre-warming calls, none since
    assert all(per_lead[tag(leads.index(lead))] == 1 for lead in fresh)
    assert per_lead[tag(leads.index(bad))] == 2
    assert sum(per_lead.values()) == len(gateway.prompts)  # no call for the forbidden or missing records
    # Each record read once with the creator's token; fresh answers written back, cached ones not.
    assert crm.calls["GET lead"] - reads_before == 50
    assert sorted(lead for lead, _ in crm.patches[patched_before:]) == sorted(fresh)

    # The log: consecutive ids, item events for every id, progress ending at the counts, one `done`.
    assert [e["id"] for e in events] == list(range(1, len(events) + 1)) == [ev.id for ev in job.events]
    assert done_of(events[-1]["data"]) == {"status": "completed", "counts": counts}
    progress = [json.loads(e["data"]) for e in events if e["event"] == "progress"]
    assert len(progress) == 50 and progress[-1] == counts
    assert [p["succeeded"] + p["failed"] for p in progress] == list(range(1, 51))  # one step per item, never back
    status: dict[str, str] = {}
    hits: set[str] = set()
    for e in events:  # each progress event: the counts of the item events before it
        data = json.loads(e["data"])
        if e["event"] == "item":
            status[data["id"]] = data["status"]
            hits |= {data["id"]} if data["cached"] else set()
        elif e["event"] == "progress":
            expected = Counter({"queued": 50 - len(status), **Counter(status.values()), "cached": len(hits)})
            assert data == {k: expected[k] for k in counts}, (e["id"], data)
    finals = [json.loads(e["data"]) for e in events if e["event"] == "item" and json.loads(e["data"])["status"] != "running"]
    assert sorted(f["id"] for f in finals) == sorted(ids)


# --- 2. cancel ------------------------------------------------------------------------------


async def test_cancel_lets_running_items_finish_and_never_starts_queued_ones(rig, gateway, crm, seed, auth):
    leads = add_leads(crm, seed["alice"], 8)
    gateway.gate = asyncio.Event()  # the model thinks until released
    async with rig(batch_concurrency=2) as (client, app):
        created = await create(client, auth, leads)
        batch_id = created["batch_id"]
        await asyncio.wait_for(gateway.calls.reach(2), 10)
        job = app.state.jobs.get(batch_id)
        in_flight = running_ids(job)
        assert len(in_flight) == 2 and gateway.calls[LEAD_AGENT] == 2
        cancelled = await client.delete(f"{BATCHES}/{batch_id}", headers=auth)
        assert cancelled.status_code == 202, cancelled.text
        assert cancelled.json()["cancel_requested"] is True and cancelled.json()["status"] == "running"
        gateway.gate.set()
        await job_done(app, batch_id, timeout=15)
        view = (await client.get(f"{BATCHES}/{batch_id}", headers=auth)).json()
        again = await client.delete(f"{BATCHES}/{batch_id}", headers=auth)  # a finished batch: nothing changes
        events = await sse(client, created["events_url"])

    assert view["status"] == "cancelled" and view["cancel_requested"] is True
    assert view["counts"] == {"queued": 0, "running": 0, "succeeded": 2, "failed": 0, "cancelled": 6, "cached": 0}
    items = {item["id"]: item for item in view["items"]}
    assert {i for i, item in items.items() if item["status"] == "succeeded"} == in_flight
    assert all(items[i]["status"] == "cancelled" and set(items[i]) == {"id", "status", "cached"}
               for i in set(leads) - in_flight)
    # The queued items were never asked, and never even marked running.
    assert gateway.calls[LEAD_AGENT] == 2
    assert set(asked(gateway)) == {tag(leads.index(i)) for i in in_flight}
    started = {item["id"] for item in item_events(job) if item["status"] == "running"}
    assert started == in_flight
    assert again.status_code == 202 and again.json()["counts"] == view["counts"]
    done = done_of(events[-1]["data"])
    assert done == {"status": "cancelled", "counts": view["counts"]}


async def test_a_batch_cut_short_by_shutdown_without_redis_ends_as_a_batch_does(rig, gateway, crm, seed, auth):
    """Without Redis nobody can take a batch over: one still running when the shutdown grace ends gets a
    batch's `done` (failed, the counts so far, and why), never a job's `error` and `done` {cached}."""
    leads = add_leads(crm, seed["alice"], 3)
    gateway.gate = asyncio.Event()  # the model thinks until released
    async with rig(batch_concurrency=1) as (client, app):
        created = await create(client, auth, leads)
        await asyncio.wait_for(gateway.calls.reach(1), 10)
        await app.state.jobs.drain(0)
        view = (await client.get(f"{BATCHES}/{created['batch_id']}", headers=auth)).json()
        job = app.state.jobs.get(created["batch_id"])
        gateway.gate.set()
    assert job.finished and job.status == "failed" and "error" not in [e.event for e in job.events]
    done = done_of(job.events[-1].data.decode())
    counts = {"queued": 2, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0, "cached": 0}
    assert done["status"] == "failed" and done["counts"] == counts and "shut down" in done["message"], done
    assert view["status"] == "failed" and view["counts"] == counts


@pytest.mark.redis
async def test_cancel_requested_on_another_replica_reaches_the_runner(gateway, crm, seed, auth, redis_url, cache_prefix):
    """Two sidecars sharing Redis: the DELETE lands on the one not running the batch."""
    leads = add_leads(crm, seed["alice"], 6)
    gateway.gate = asyncio.Event()
    settings = make_settings(**NO_LIMITS, redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="b" * 40,
                             batch_concurrency=1, job_lease_seconds=2)
    async with AsyncExitStack() as stack:
        gw = await stack.enter_async_context(asgi_client(gateway.app, "http://gateway.test"))
        backend = await stack.enter_async_context(asgi_client(crm.app, "http://crm.test"))
        apps, clients = [], []
        for _ in range(2):
            app = create_app(settings, gateway_http=gw, crm_http=backend)
            url = await stack.enter_async_context(serving(app))
            apps.append(app)
            clients.append(await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30)))
        (a, b), (client_a, client_b) = apps, clients
        created = await create(client_a, auth, leads)
        batch_id = created["batch_id"]
        await asyncio.wait_for(gateway.calls.reach(1), 10)
        other = await client_b.delete(f"{BATCHES}/{batch_id}", headers=auth)
        assert other.status_code == 202, other.text
        assert other.json()["cancel_requested"] is True
        gateway.gate.set()
        await job_done(a, batch_id, timeout=15)
        seen_on_b = await sse(client_b, created["events_url"])
    assert gateway.calls[LEAD_AGENT] == 1
    assert done_of(seen_on_b[-1]["data"]) == {
        "status": "cancelled", "counts": {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 5, "cached": 0}}
    assert b.state.jobs.get(batch_id) is not None and not b.state.jobs.mirror.owns(batch_id)  # b followed, never ran it


# --- 3. resume with Last-Event-ID ------------------------------------------------------------


async def test_events_resume_after_last_event_id(rig, gateway, crm, seed, auth):
    leads = add_leads(crm, seed["alice"], 4)
    gateway.gate = asyncio.Event()
    async with rig(batch_concurrency=1) as (client, app):
        created = await create(client, auth, leads)
        url = created["events_url"]
        # First connection: until the first item is running (the model is held), then hang up.
        first = await sse(client, url, stop=lambda evs: any(e["event"] == "item" for e in evs))
        n = first[-1]["id"]
        assert not app.state.jobs.get(created["batch_id"]).finished
        # Reconnect live with Last-Event-ID, then let the model answer.
        resuming = asyncio.create_task(sse(client, url, headers={"Last-Event-ID": str(n)}))
        await asyncio.wait_for(gateway.calls.reach(1), 10)
        gateway.gate.set()
        resumed = await resuming
        whole = await sse(client, url)  # a fresh reader after the end: the whole log
        by_query = await sse(client, url + f"&lastEventId={n + 2}")  # EventSource polyfills send it as a query
    assert [e["id"] for e in whole] == list(range(1, len(whole) + 1)) and whole[-1]["event"] == "done"
    assert first == whole[:n]
    assert resumed == whole[n:] and resumed[0]["id"] == n + 1  # exactly the events after n: no gap, no repeat
    assert by_query == whole[n + 2:]
    assert json.loads(whole[-1]["data"])["counts"]["succeeded"] == 4


# --- 4. a replica killed mid-batch ------------------------------------------------------------

LEASE = 1.5


@pytest.fixture
def cluster(gateway, crm, redis_process):
    """Real `adapter serve` replicas against the doubles served over TCP here and the test's own Redis."""

    @asynccontextmanager
    async def start(n: int = 2, **overrides: object):
        async with serving(gateway.app) as gw_url, serving(crm.app) as crm_url, replica_cluster(
                n, gateway_url=gw_url, crm_url=crm_url, redis_url=redis_process.url, lease=LEASE, prefix="batches",
                logged=("batch.", "job.", "shutdown."), **overrides) as cluster:
            yield cluster

    return start



@pytest.mark.redis
@pytest.mark.timeout(90)
async def test_a_replica_killed_mid_batch_is_finished_by_the_other(cluster, gateway, crm, seed, auth):
    leads = add_leads(crm, seed["alice"], 8)
    held = gateway.gate = asyncio.Event()
    async with cluster(2, batch_concurrency=2) as ([a, b], client):
        created = await create_on(client, a, auth, leads)
        batch_id = created["batch_id"]
        # Two items answered, two more asked and held, the rest queued: then the runner dies.
        await asyncio.wait_for(gateway.calls.reach(2), 20)
        gateway.gate = asyncio.Event()
        held.set()
        await asyncio.wait_for(gateway.calls.reach(4), 20)

        # The log as Redis holds it (read on b, which follows it): which items were answered and which
        # were in the air. Read on `a`, it could show events the kill keeps from ever reaching Redis.
        seen = await sse(client, b.url + created["events_url"], timeout=20,
                         stop=lambda evs: len(latest(evs, "succeeded")) == 2 and len(latest(evs, "running")) == 2)
        finished, in_flight = latest(seen, "succeeded"), latest(seen, "running")
        a.kill()
        assert await a.exited() == -9
        gateway.gate.set()
        # That reader hung up: b's sweeper follows every running batch, so b takes it over unasked.
        await b.saw("batch.resumed", batch_id=batch_id, timeout=20)
        reader = Reader([b.url], created["events_url"])
        # Within a deadline well under CACHE_LOCK_TIMEOUT (30 s): the takeover must not wait out the
        # single-flight locks the dead runner still holds on paper for the items it was asking.
        events = await reader.run(client, timeout=15)
        view = (await client.get(b.url + f"{BATCHES}/{batch_id}", headers=auth)).json()
    reader.check_sequence()
    assert view["status"] == "completed"
    assert view["counts"] == {"queued": 0, "running": 0, "succeeded": 8, "failed": 0, "cancelled": 0, "cached": 0}
    assert done_of(events[-1].json) == {"status": "completed", "counts": view["counts"]}
    resumed = [e for e in events if e.event == "status" and e.json.get("resumed")]
    assert len(resumed) == 1 and "after 2 item(s)" in resumed[0].json["message"]
    per_lead = asked(gateway)
    for lead in finished:  # answered before the kill: never asked again
        assert per_lead[tag(leads.index(lead))] == 1, (lead, per_lead)
    for lead in in_flight:  # in the air at the kill: its answer never came back, so asked once more
        assert per_lead[tag(leads.index(lead))] == 2, (lead, per_lead)
    for lead in set(leads) - set(finished) - set(in_flight):
        assert per_lead[tag(leads.index(lead))] == 1, (lead, per_lead)
    assert gateway.calls[LEAD_AGENT] == 8 + len(in_flight)
    assert seen == [{"id": e.id, "event": e.event, "data": e.data} for e in events[:len(seen)]]  # one log, continued
    assert b.logged("job.taken_over", job_id=batch_id) and b.logged("batch.done", batch_id=batch_id, status="completed")
    assert not a.logged("batch.done")


async def create_on(client: httpx.AsyncClient, replica: Replica, auth: dict, ids: list[str]) -> dict:
    r = await client.post(replica.url + BATCHES, json={"task": "lead.qualify", "ids": ids}, headers=auth)
    assert r.status_code == 202, r.text
    return r.json()


def latest(events: list[dict], status: str) -> set[str]:
    """The items whose latest `item` event, among these, has this status."""
    items = {}
    for e in events:
        if e["event"] == "item":
            item = json.loads(e["data"])
            items[item["id"]] = item["status"]
    return {i for i, s in items.items() if s == status}


# --- 5. interactive requests during a big batch -----------------------------------------------


async def test_an_interactive_request_gets_a_slot_at_once_during_a_big_batch(rig, gateway, crm, seed, auth):
    leads = add_leads(crm, seed["alice"], 20)
    held = gateway.gate = asyncio.Event()
    # 4 gateway slots, a batch asking 8 at a time: it may hold 3, the last one is kept for people.
    # An interactive call that had to queue would fail after 0.5 s (503 gateway-busy).
    async with rig(batch_concurrency=8, gateway_max_concurrency=4, gateway_queue_timeout=0.5) as (client, app):
        created = await create(client, auth, leads)
        bulkhead = app.state.jobs.service.gateway.bulkhead
        batch_id = created["batch_id"]
        await asyncio.wait_for(gateway.calls.reach(3), 10)
        job = app.state.jobs.get(batch_id)
        await until_log(app, batch_id, lambda j: len(running_ids(j)) == 8, what="8 items past the batch's own gate")
        assert bulkhead.in_flight == 3 and gateway.calls[LEAD_AGENT] == 3  # 5 items wait at the bulkhead
        gateway.gate = None  # calls from now on answer at once; the batch's 3 stay held
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
        during = (await client.get(f"{BATCHES}/{batch_id}", headers=auth)).json()
        assert r.status_code == 200 and r.headers["x-cache"] == "MISS", r.text
        assert r.json()["lead_id"] == seed["leads"][0]
        # It was served while the batch still had every item but none done: 8 running, 12 queued.
        assert during["status"] == "running" and not job.finished
        assert during["counts"] == {"queued": 12, "running": 8, "succeeded": 0, "failed": 0, "cancelled": 0, "cached": 0}
        assert gateway.calls[LEAD_AGENT] == 4 and bulkhead.in_flight == 3  # the batch did not take the slot it freed
        held.set()
        await job_done(app, batch_id, timeout=20)
        view = (await client.get(f"{BATCHES}/{batch_id}", headers=auth)).json()
    assert view["counts"]["succeeded"] == 20 and gateway.calls[LEAD_AGENT] == 21
    assert bulkhead.in_flight == 0


async def test_an_interactive_request_joining_a_queued_batch_call_does_not_wait_behind_the_batch(rig, gateway, crm,
                                                                                                seed, auth):
    leads = add_leads(crm, seed["alice"], 4)
    held = gateway.gate = asyncio.Event()
    # 4 slots: the batch may hold 3, so its 4th item waits at the bulkhead, its flight already in the air.
    async with rig(batch_concurrency=4, gateway_max_concurrency=4, gateway_queue_timeout=5,
                   gateway_call_timeout=60) as (client, app):
        created = await create(client, auth, leads)
        bulkhead = app.state.jobs.service.gateway.bulkhead
        await asyncio.wait_for(gateway.calls.reach(3), 10)
        job = app.state.jobs.get(created["batch_id"])
        await until_log(app, created["batch_id"], lambda j: len(running_ids(j)) == 4, what="4 items running")
        waiting = next(i for i in leads if tag(leads.index(i)) not in asked(gateway))
        assert bulkhead.in_flight == 3
        # Someone asks about the waiting item's lead: they join its call, which now takes the last slot.
        person = asyncio.create_task(client.post(QUALIFY, json={"lead_id": waiting}, headers=auth))
        # While the batch's 3 calls are still held (nothing times out for a minute): the joined call
        # took the last slot at once, as the person's own call would have.
        await asyncio.wait_for(gateway.calls.reach(4), 3)
        assert tag(leads.index(waiting)) in asked(gateway) and bulkhead.in_flight == 4 and not job.finished
        held.set()
        answer = await asyncio.wait_for(person, 10)
        await job_done(app, created["batch_id"], timeout=15)
    assert answer.status_code == 200 and answer.json()["lead_id"] == waiting
    assert gateway.calls[LEAD_AGENT] == 4  # one call for the waiting item, shared by the batch and the person


async def test_cancel_while_reading_the_records_reads_no_more(rig, gateway, crm, seed, auth):
    leads = add_leads(crm, seed["alice"], 12)
    async with rig(batch_concurrency=2) as (client, app):
        crm.gate = asyncio.Event()  # the CRM holds every read until released
        created = await create(client, auth, leads)
        await asyncio.wait_for(crm.calls.reach(8), 10)  # the batch reads 8 at a time
        r = await client.delete(f"{BATCHES}/{created['batch_id']}", headers=auth)
        assert r.status_code == 202
        crm.gate.set()
        await job_done(app, created["batch_id"], timeout=15)
        view = (await client.get(f"{BATCHES}/{created['batch_id']}", headers=auth)).json()
    assert crm.calls.total() == 8  # the reads in flight when it was cancelled, and no more
    assert view["counts"]["cancelled"] == 12 and gateway.calls[LEAD_AGENT] == 0


# --- 6. bad input: refused whole, nothing runs --------------------------------------------------


def _bad_bodies(seed: dict) -> list[tuple[str, dict, str]]:
    lead, other = seed["leads"][0], seed["leads"][1]
    return [
        ("unknown task", {"task": "lead.nope", "ids": [lead]}, "task"),
        ("no ids", {"task": "lead.qualify", "ids": []}, "ids"),
        ("ids missing", {"task": "lead.qualify"}, "ids"),
        ("too many ids", {"task": "lead.qualify", "ids": [*seed["leads"], seed["bobs_lead"]]}, "ids"),
        ("malformed id", {"task": "lead.qualify", "ids": [lead, "65f1c0ffee00000000000zzz"]}, "ids[1]"),
        ("id not a string", {"task": "lead.qualify", "ids": [lead, 42]}, "ids[1]"),
        ("duplicate id", {"task": "lead.qualify", "ids": [lead, other, lead.upper()]}, "ids[2]"),
        ("unknown option", {"task": "lead.qualify", "ids": [lead], "options": {"tone": "casual"}}, "options.tone"),
        ("invalid option", {"task": "email.generate", "ids": [lead], "options": {"tone": "rude"}}, "options.tone"),
        ("empty option", {"task": "email.generate", "ids": [lead], "options": {"context": ""}}, "options.context"),
        ("option naming the id", {"task": "lead.qualify", "ids": [lead], "options": {"lead_id": other}}, "options.lead_id"),
        ("unknown field", {"task": "lead.qualify", "ids": [lead], "priority": "high"}, "priority"),
    ]


BAD_CASES = [case[0] for case in _bad_bodies({"leads": ["0" * 24] * 3, "bobs_lead": "1" * 24})]


@pytest.mark.parametrize("case", BAD_CASES)
async def test_bad_input_is_refused_whole_naming_the_field(rig, gateway, crm, seed, auth, case):
    _, body, field = next(c for c in _bad_bodies(seed) if c[0] == case)
    async with rig(batch_max_items=3) as (client, app):
        r = await client.post(BATCHES, json=body, headers=auth)
        problem = assert_problem(r, 400, "invalid-request")
        assert app.state.jobs.running == 0  # no batch runner was started
    assert problem["errors"][0]["field"] == field, problem
    assert f"`{field}`" in problem["detail"], problem["detail"]
    assert gateway.calls.total() == 0 and not gateway.prompts
    assert crm.calls.total() == 0  # not one record read


async def test_the_limit_and_a_valid_email_batch_with_options_pass(rig, gateway, crm, seed, auth):
    # The other side of the refusals above: exactly BATCH_MAX_ITEMS ids, and options the task takes.
    leads = seed["leads"]
    async with rig(batch_max_items=3) as (client, app):
        created = await create(client, auth, leads, task="email.generate", options={"tone": "casual", "context": "renewal of the annual plan"})
        await job_done(app, created["batch_id"], timeout=15)
        view = (await client.get(f"{BATCHES}/{created['batch_id']}", headers=auth)).json()
    assert view["counts"]["succeeded"] == 3 and gateway.calls[EMAIL_AGENT] == 3
    prompts = [p for agent, p in gateway.prompts if agent == EMAIL_AGENT]
    assert all("casual" in p and "renewal of the annual plan" in p for p in prompts)  # every item got the batch's options


# --- 7. who may read and cancel a batch; tokens do not cross kinds ------------------------------


async def test_another_user_and_other_tokens_are_refused(rig, gateway, seed, auth):
    bob = {"Authorization": f"Bearer {seed['bob_token']}"}
    async with rig() as (client, app):
        created = await create(client, auth, [seed["leads"][0]])
        batch_id = created["batch_id"]
        batch_token = created["events_url"].split("token=")[1]
        await job_done(app, batch_id, timeout=15)
        r = await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][1]}},
                              headers=auth)
        assert r.status_code == 202, r.text
        job = r.json()
        job_token = job["events_url"].split("token=")[1]
        await job_done(app, job["job_id"], timeout=15)

        answers = {
            "bob reads": await client.get(f"{BATCHES}/{batch_id}", headers=bob),
            "bob reads events": await client.get(f"{BATCHES}/{batch_id}/events", headers=bob),
            "bob cancels": await client.delete(f"{BATCHES}/{batch_id}", headers=bob),
            "bob cancels with the batch token": await client.delete(f"{BATCHES}/{batch_id}", params={"token": batch_token},
                                                                    headers=bob),
            "nobody reads": await client.get(f"{BATCHES}/{batch_id}"),
            "the batch token cancels": await client.delete(f"{BATCHES}/{batch_id}", params={"token": batch_token}),
            "the batch token as a job": await client.get(f"/api/v1/ai/jobs/{batch_id}", params={"token": batch_token}),
            "the batch token as a job's events": await client.get(f"/api/v1/ai/jobs/{batch_id}/events",
                                                                  params={"token": batch_token}),
            "the creator's bearer as a job": await client.get(f"/api/v1/ai/jobs/{batch_id}", headers=auth),
            "a job token on the batch": await client.get(f"{BATCHES}/{batch_id}", params={"token": job_token}),
            "a job token on its job as a batch": await client.get(f"{BATCHES}/{job['job_id']}", params={"token": job_token}),
            "a forged token": await client.get(f"{BATCHES}/{batch_id}", params={"token": batch_token[:-4] + "AAAA"}),
        }
        still = await client.get(f"{BATCHES}/{batch_id}", headers=auth)
        job_still = await client.get(f"/api/v1/ai/jobs/{job['job_id']}", params={"token": job_token})
    assert_problem(answers["bob reads"], 403, "forbidden")
    assert_problem(answers["bob reads events"], 403, "forbidden")
    assert_problem(answers["bob cancels"], 403, "forbidden")
    assert_problem(answers["bob cancels with the batch token"], 403, "forbidden")  # cancelling needs the creator
    assert_problem(answers["nobody reads"], 401, "unauthenticated")
    assert_problem(answers["the batch token cancels"], 401, "unauthenticated")
    assert_problem(answers["the batch token as a job"], 404, "not-found")
    assert_problem(answers["the batch token as a job's events"], 404, "not-found")
    assert_problem(answers["the creator's bearer as a job"], 404, "not-found")
    assert_problem(answers["a job token on the batch"], 403, "forbidden")
    assert_problem(answers["a job token on its job as a batch"], 404, "not-found")
    assert_problem(answers["a forged token"], 403, "forbidden")
    # None of it changed anything: the batch was not cancelled, the job still reads with its token.
    assert still.status_code == 200 and still.json()["cancel_requested"] is False and still.json()["status"] == "completed"
    assert job_still.status_code == 200
