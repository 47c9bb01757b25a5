"""Streams and jobs over real sockets (ASGI in-process transports buffer whole bodies)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest
from httpx_sse import aconnect_sse
from structlog.testing import capture_logs

from adapter.app import create_app
from tests.helpers import LEAD_AGENT, QUALIFY_STREAM, asgi_client, decode, job_done, make_settings, serving, sync_client


@pytest.fixture
def stack(gateway, crm):
    """A sidecar served over TCP, with the gateway double over TCP and the CRM double in process."""

    @asynccontextmanager
    async def start(**overrides):
        settings = make_settings(**{"sse_heartbeat_seconds": 5, **overrides})
        async with serving(gateway.app) as gw_url, httpx.AsyncClient(base_url=gw_url) as gw, \
                asgi_client(crm.app, "http://crm.test") as backend:
            app = create_app(settings, gateway_http=gw, crm_http=backend)
            async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
                yield client, app

    return start


async def read_all(client, method, url, **kwargs) -> tuple[httpx.Response, list]:
    """The events of one connection; checks that it opened with the `retry:` hint."""
    # aconnect_sse writes its Accept and Cache-Control into the headers dict it is given: pass a copy.
    kwargs["headers"] = dict(kwargs.get("headers") or {})
    async with aconnect_sse(client, method, url, **kwargs) as source:
        events = [sse async for sse in source.aiter_sse()]
    # The hint is a block of its own with no data (a browser dispatches nothing for it).
    assert events[0].retry == 3000 and events[0].data == "" and events[0].id == ""
    return source.response, events[1:]


def kinds(events) -> list[str]:
    return [e.event for e in events]


@pytest.mark.parametrize(("path", "body_key", "record"), [
    ("/api/v1/ai/lead/qualify/stream", "lead_id", "leads"),
    ("/api/v1/ai/email/generate/stream", "lead_id", "leads"),
    ("/api/v1/ai/deal/predict/stream", "deal_id", "deals"),
])
async def test_stream_routes_event_order_and_ids(stack, seed, auth, path, body_key, record):
    async with stack() as (client, _):
        response, events = await read_all(client, "POST", path, json={body_key: seed[record][0]}, headers=auth)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-cache"] == "MISS" and response.headers["x-job-id"].startswith("aijob_")
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
    assert kinds(events)[:2] == ["status", "status"] and kinds(events)[-2:] == ["result", "done"]
    states = [msgspec.json.decode(e.data)["state"] for e in events if e.event == "status"]
    assert states[0] == "queued" and "running" in states and states[-1] == "validating"
    result = msgspec.json.decode(events[-2].data)
    assert result[body_key] == seed[record][0] and result["agent"].endswith("_CRM_Agent")
    assert msgspec.json.decode(events[-1].data) == {"status": "succeeded", "cached": False}


async def test_deltas_carry_the_model_text(stack, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "tokens")
    async with stack() as (client, _):
        _, events = await read_all(client, "POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth)
    deltas = [msgspec.json.decode(e.data)["text"] for e in events if e.event == "delta"]
    assert len(deltas) > 5
    text = "".join(deltas)
    assert msgspec.json.decode(text)["score"] == msgspec.json.decode(events[-2].data)["score"]
    assert kinds(events).index("delta") < kinds(events).index("result")


async def test_stream_matches_the_synchronous_body(stack, seed, auth):
    async with stack() as (client, _):
        _, events = await read_all(client, "POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth)
        sync = await client.post("/api/v1/ai/lead/qualify", json={"lead_id": seed["leads"][0]}, headers=auth)
    assert sync.headers["x-cache"] == "HIT"  # the stream's validated result went into the cache
    assert events[-2].data.encode() == sync.content


async def test_cache_hit_answers_result_then_done_at_once(stack, seed, auth, gateway):
    async with stack() as (client, _):
        await client.post("/api/v1/ai/lead/qualify", json={"lead_id": seed["leads"][0]}, headers=auth)
        response, events = await read_all(client, "POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert response.headers["x-cache"] == "HIT"
    assert kinds(events) == ["status", "result", "done"]
    assert msgspec.json.decode(events[-1].data) == {"status": "succeeded", "cached": True}
    assert gateway.calls[LEAD_AGENT] == 1


async def test_heartbeats_while_the_gateway_is_silent(stack, seed, auth, gateway):
    gateway.gate = asyncio.Event()
    async with stack(sse_heartbeat_seconds=0.05) as (client, _):
        async with client.stream("POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth) as response:
            lines = response.aiter_lines()
            pings = 0
            async for line in lines:
                if line == ": ping":
                    pings += 1
                    if pings == 3:
                        gateway.gate.set()  # the model finally answers
                        break
            rest = [line async for line in lines]
    assert pings == 3 and "event: done" in rest


@pytest.mark.parametrize(("behaviour", "slug"), [
    ("start_fails", "gateway-unavailable"),
    ("stream_error", "agent-failed"),
    ("run_failed", "agent-failed"),  # a `result` event whose status is "error": a failed run, never model text
])
async def test_failures_end_in_error_then_done_failed(stack, seed, auth, gateway, behaviour, slug):
    gateway.push(LEAD_AGENT, behaviour)
    async with stack() as (client, _):
        response, events = await read_all(client, "POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert response.status_code == 200
    assert kinds(events)[-2:] == ["error", "done"] and "result" not in kinds(events)
    problem = msgspec.json.decode(events[-2].data)
    assert problem["type"].endswith(slug) and problem["status"] >= 502 and problem["detail"]
    assert msgspec.json.decode(events[-1].data) == {"status": "failed", "cached": False}


async def test_invalid_final_output_is_repaired(stack, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "garbage", "json")  # the stream's answer, then the repair call's
    async with stack() as (client, _):
        _, events = await read_all(client, "POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert kinds(events)[-2:] == ["result", "done"]
    assert any("repairing" in e.data for e in events if e.event == "status")
    assert gateway.calls[LEAD_AGENT] == 2


async def test_invalid_twice_ends_in_error_never_result(stack, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "wrong_shape", "wrong_shape")
    async with stack() as (client, _):
        _, events = await read_all(client, "POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert kinds(events)[-2:] == ["error", "done"] and "result" not in kinds(events)
    assert msgspec.json.decode(events[-2].data)["type"].endswith("invalid-agent-output")
    assert not any("looks promising" in e.data for e in events)


async def test_problems_before_the_stream_opens(stack, seed, gateway):
    async with stack() as (client, _):
        no_auth = await client.post(QUALIFY_STREAM, json={"lead_id": seed["leads"][0]})
        refused = await client.post(QUALIFY_STREAM, json={"lead_id": seed["bobs_lead"]},
                                    headers={"Authorization": f"Bearer {seed['token']}"})
        bad = await client.post(QUALIFY_STREAM, json={"lead_id": "nope"}, headers={"Authorization": f"Bearer {seed['token']}"})
    assert (no_auth.status_code, refused.status_code, bad.status_code) == (401, 403, 400)
    assert {r.headers["content-type"] for r in (no_auth, refused, bad)} == {"application/problem+json"}
    assert gateway.calls[LEAD_AGENT] == 0


async def create_job(client, seed, auth, task="lead.qualify", **extra):
    r = await client.post("/api/v1/ai/jobs", json={"task": task, "input": {"lead_id": seed["leads"][0], **extra}}, headers=auth)
    assert r.status_code == 202, r.text
    return decode(r)


async def test_job_events_with_job_token_and_polling(stack, seed, auth):
    async with stack() as (client, app):
        job = await create_job(client, seed, auth)
        assert job["status"] == "queued" and "token=" in job["events_url"] and job["expires_at"].endswith("Z")
        assert seed["token"] not in job["events_url"]  # never the user's JWT
        response, events = await read_all(client, "GET", job["events_url"])
        assert kinds(events)[-1] == "done"
        token = job["events_url"].split("token=")[1]
        polled = decode(await client.get(f"/api/v1/ai/jobs/{job['job_id']}?token={token}"))
        by_bearer = decode(await client.get(f"/api/v1/ai/jobs/{job['job_id']}", headers=auth))
    assert polled == by_bearer
    assert polled["status"] == "succeeded" and polled["result"] == msgspec.json.decode(events[-2].data)
    assert polled["error"] is None


async def test_reconnect_with_last_event_id_loses_and_repeats_nothing(stack, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "tokens")
    gateway.gate = asyncio.Event()
    async with stack() as (client, app):
        job = await create_job(client, seed, auth)
        first = []
        async with aconnect_sse(client, "GET", job["events_url"]) as source:
            async for sse in source.aiter_sse():
                if sse.data:
                    first.append(sse)
                if len(first) == 2:
                    break  # the connection drops mid-job
        gateway.gate.set()
        _, rest = await read_all(client, "GET", job["events_url"], headers={"Last-Event-ID": first[-1].id})
        _, whole = await read_all(client, "GET", job["events_url"])
    resumed = [(e.id, e.event, e.data) for e in first + rest]
    assert resumed == [(e.id, e.event, e.data) for e in whole]
    assert kinds(whole)[-1] == "done" and "delta" in kinds(whole)


async def test_two_clients_on_one_job_see_the_same_events(stack, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "tokens")
    gateway.gate = asyncio.Event()
    async with stack() as (client, _):
        job = await create_job(client, seed, auth)
        readers = [asyncio.create_task(read_all(client, "GET", job["events_url"])) for _ in range(2)]
        await gateway.calls.reach(1)
        gateway.gate.set()
        (_, a), (_, b) = await asyncio.gather(*readers)
    assert [(e.id, e.data) for e in a] == [(e.id, e.data) for e in b] and kinds(a)[-1] == "done"


async def test_identical_concurrent_streams_share_one_job(stack, seed, auth, gateway):
    gateway.gate = asyncio.Event()
    async with stack() as (client, _):
        first, second = await create_job(client, seed, auth), await create_job(client, seed, auth)
        gateway.gate.set()
        assert first["job_id"] == second["job_id"]
        _, events = await read_all(client, "GET", second["events_url"])
    assert gateway.calls[LEAD_AGENT] == 1 and kinds(events)[-1] == "done"


async def test_job_finishes_and_is_cached_after_every_client_left(stack, seed, auth, gateway):
    gateway.gate = asyncio.Event()
    async with stack() as (client, app):
        async with aconnect_sse(client, "POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=dict(auth)) as source:
            job_id = source.response.headers["x-job-id"]
            async for _ in source.aiter_sse():
                break  # read one event, then hang up
        gateway.gate.set()
        assert (await job_done(app, job_id)).status == "succeeded"
        async with asyncio.timeout(10):  # `done` goes out before the write-back; the runner ends after it
            while app.state.jobs.running:
                await asyncio.sleep(0.01)
        again = await client.post("/api/v1/ai/lead/qualify", json={"lead_id": seed["leads"][0]}, headers=auth)
    assert again.headers["x-cache"] == "HIT" and gateway.calls[LEAD_AGENT] == 1
    assert gateway.jobs == {}  # the gateway's job was read to its end: nothing left behind there either


async def test_job_max_duration_ends_in_error(stack, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "never_ends")
    async with stack(job_max_seconds=0.3) as (client, _):
        _, events = await read_all(client, "POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert kinds(events)[-2:] == ["error", "done"]
    assert msgspec.json.decode(events[-2].data)["type"].endswith("job-timeout")


async def test_job_access_control(stack, seed, auth, crm):
    async with stack() as (client, _):
        job = await create_job(client, seed, auth)
        second = decode(await client.post("/api/v1/ai/jobs", headers=auth,
                                          json={"task": "deal.predict", "input": {"deal_id": seed["deals"][0]}}))
        jid, other_token = job["job_id"], second["events_url"].split("token=")[1]
        bob = {"Authorization": f"Bearer {seed['bob_token']}"}
        checks = {
            "bob's bearer": await client.get(f"/api/v1/ai/jobs/{jid}", headers=bob),
            "bob's bearer on events": await client.get(f"/api/v1/ai/jobs/{jid}/events", headers=bob),
            "another job's token": await client.get(f"/api/v1/ai/jobs/{jid}/events?token={other_token}"),
            "no token": await client.get(f"/api/v1/ai/jobs/{jid}/events"),
            "forged token": await client.get(f"/api/v1/ai/jobs/{jid}/events?token=abc.def.ghi"),
        }
        unknown = await client.get("/api/v1/ai/jobs/aijob_0000/events", headers=auth)
        alice = await client.get(f"/api/v1/ai/jobs/{jid}", headers=auth)
    for name, response in checks.items():
        assert response.status_code == (401 if name == "no token" else 403), name
        assert response.headers["content-type"] == "application/problem+json"
    assert unknown.status_code == 404 and alice.status_code == 200


@pytest.mark.parametrize(("body", "field"), [
    ({"task": "lead.qualify", "input": {"lead_id": "nope"}}, "input.lead_id"),
    ({"task": "lead.qualify", "input": {"lead_id": "65f1c0ffee0000000000a001", "x": 1}}, "input"),
    ({"task": "lead.explode", "input": {}}, "task"),
    ({"task": "deal.predict"}, "input"),
])
async def test_job_request_validation_names_the_field(client, auth, body, field):
    r = await client.post("/api/v1/ai/jobs", json=body, headers=auth)
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    problem = decode(r)
    assert any(e["field"] == field for e in problem["errors"]), problem


@asynccontextmanager
async def two_replicas(gateway, crm, settings):
    """Two sidecars over TCP sharing one Redis (through `settings`), one gateway double and one CRM double."""
    async with serving(gateway.app) as gw_url, httpx.AsyncClient(base_url=gw_url) as gw, \
            asgi_client(crm.app, "http://crm.test") as backend:
        replica_a = create_app(settings, gateway_http=gw, crm_http=backend)
        replica_b = create_app(settings, gateway_http=gw, crm_http=backend)
        async with serving(replica_a) as url_a, serving(replica_b) as url_b, \
                httpx.AsyncClient(base_url=url_a) as a, httpx.AsyncClient(base_url=url_b) as b:
            yield a, b


@pytest.mark.redis
@pytest.mark.redis_topologies
async def test_another_replica_serves_the_job_from_the_redis_log(gateway, crm, seed, auth, redis_url, cache_prefix):
    import redis as redis_sync

    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="s" * 40, sse_heartbeat_seconds=5)
    gateway.push(LEAD_AGENT, "tokens")
    gateway.gate = asyncio.Event()
    async with two_replicas(gateway, crm, settings) as (a, b):
        job = await create_job(a, seed, auth)
        on_b = asyncio.create_task(read_all(b, "GET", job["events_url"]))  # joins mid-job, on the other replica
        await gateway.calls.reach(1)
        gateway.gate.set()
        _, from_b = await on_b
        _, from_a = await read_all(a, "GET", job["events_url"])
        _, resumed_b = await read_all(b, "GET", job["events_url"], headers={"Last-Event-ID": "3"})
        polled_b = decode(await b.get(f"/api/v1/ai/jobs/{job['job_id']}", headers=auth))
    assert [(e.id, e.event, e.data) for e in from_b] == [(e.id, e.event, e.data) for e in from_a]
    assert kinds(from_b)[-1] == "done" and "delta" in kinds(from_b)
    assert [e.id for e in resumed_b] == [e.id for e in from_a[3:]]
    assert polled_b["status"] == "succeeded" and polled_b["result"]["lead_id"] == seed["leads"][0]
    with sync_client(redis_url) as r:
        log_key = f"{cache_prefix}:job:{{{job['job_id']}}}:log"
        assert r.xlen(log_key) == len(from_a) and 0 < r.pttl(log_key)


@pytest.mark.redis
@pytest.mark.redis_topologies
async def test_identical_streams_on_two_replicas_share_one_job(gateway, crm, seed, auth, redis_url, cache_prefix):
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="s" * 40)
    gateway.gate = asyncio.Event()
    async with two_replicas(gateway, crm, settings) as (a, b):
        on_a = await create_job(a, seed, auth)
        on_b = await create_job(b, seed, auth)
        gateway.gate.set()
        _, events = await read_all(b, "GET", on_b["events_url"])
        after = await create_job(b, seed, auth)  # once finished, the answer is a cache hit
    assert on_a["job_id"] == on_b["job_id"] and kinds(events)[-2:] == ["result", "done"]
    assert gateway.calls[LEAD_AGENT] == 1 and after["status"] == "succeeded"


async def test_drain_without_redis_lets_jobs_finish_then_ends_the_rest(stack, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "never_ends")  # cannot finish within the grace
    gateway.gate = asyncio.Event()
    async with stack() as (client, app):
        stuck = await create_job(client, seed, auth)
        fits = decode(await client.post("/api/v1/ai/jobs", headers=auth,
                                        json={"task": "deal.predict", "input": {"deal_id": seed["deals"][0]}}))
        readers = [asyncio.create_task(read_all(client, "GET", j["events_url"])) for j in (stuck, fits)]
        await gateway.calls.reach(2)
        with capture_logs() as logs:
            draining = asyncio.create_task(app.state.jobs.drain(0.5))
            ready = await client.get("/readyz")
            refused = await client.post("/api/v1/ai/jobs", headers=auth, json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][1]}})
            gateway.gate.set()  # the deal's model answers within the grace; the lead's never does
            await draining
        (_, stuck_events), (_, fits_events) = await asyncio.gather(*readers)
        late = await client.get(fits["events_url"])  # this replica's readers are closed now
    assert ready.status_code == 503 and decode(ready)["detail"].startswith("shutting down")
    assert refused.status_code == 503 and decode(refused)["type"].endswith("shutting-down")
    assert kinds(fits_events)[-2:] == ["result", "done"]
    assert kinds(stuck_events)[-2:] == ["error", "done"] and "shutting-down" in stuck_events[-2].data
    assert msgspec.json.decode(stuck_events[-1].data)["status"] == "failed"
    assert [e["event"] for e in logs if e["event"].startswith(("job.", "shutdown."))] == [
        "shutdown.draining", "job.done", "job.interrupted", "shutdown.drained"]
    assert late.status_code == 200 and late.text == "retry: 3000\n\n"


async def test_a_streamed_runs_progress_is_bounded_and_its_status_texts_redacted(make_client, auth, seed):
    """Every token and status message a gateway streams became a job event, kept in memory and in Redis for
    the job's life, and status texts went to the browser as the gateway wrote them. A hostile or broken
    gateway now gets at most PROGRESS_MAX characters of progress through, without internal URLs."""
    from adapter.upstreams.gateway import PROGRESS_MAX
    token = "t" * 1000
    envelopes = [{"event": "status_update", "data": {"message": "queued at http://10.0.0.5:8080/internal/queue"}}]
    envelopes += [{"event": "on_llm_new_token", "data": token}] * (4 * PROGRESS_MAX // len(token))
    envelopes += [{"event": "result", "data": {"status": "error", "result": "the run failed", "exit_code": 1}}]
    stream = b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in envelopes)

    def gateway(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/stream-execute":
            return httpx.Response(200, json={"job_id": "flood"})
        if request.url.path == "/api/v1/stream/flood":
            return httpx.Response(200, content=stream, headers={"Content-Type": "text/event-stream"})
        return httpx.Response(404, json={"detail": "not here"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(gateway), base_url="http://gateway.test") as gateway_http, \
            make_client(gateway_http=gateway_http) as client:
        response, events = await read_all(client, "POST", QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert response.status_code == 200 and kinds(events)[-2:] == ["error", "done"]
    deltas = [e for e in events if e.event == "delta"]
    assert 0 < sum(len(e.data) for e in deltas) <= PROGRESS_MAX < len(stream) // 2
    statuses = [msgspec.json.decode(e.data)["message"] for e in events if e.event == "status"]
    assert "queued at <internal URL>" in statuses and not any("10.0.0.5" in s for s in statuses), statuses
