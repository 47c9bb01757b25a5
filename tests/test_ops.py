"""Write-back to the CRM and the Prometheus metrics."""

from __future__ import annotations

import pytest

from tests.helpers import LEAD_AGENT, QUALIFY, decode, make_settings, metric, samples


async def test_fresh_qualification_is_written_back(client, crm, seed, auth):
    lead = seed["leads"][0]
    r = await client.post(QUALIFY, json={"lead_id": lead}, headers=auth)
    body = decode(r)
    assert r.headers["x-crm-write-back"] == "ok"
    assert crm.patches == [(lead, {"score": body["score"], "classification": body["classification"]})]
    assert crm.leads[lead]["score"] == body["score"] and crm.leads[lead]["classification"] == body["classification"]


async def test_cached_answer_is_not_written_again(client, crm, seed, auth):
    await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert r.headers["x-cache"] == "HIT" and r.headers["x-crm-write-back"] == "skipped" and len(crm.patches) == 1


async def test_failed_write_back_never_fails_the_answer(client, crm, seed, auth):
    crm.fail_patch = 500
    r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert r.status_code == 200 and r.headers["x-crm-write-back"] == "failed"
    assert decode(r)["agent"] == LEAD_AGENT and crm.leads[seed["leads"][0]]["score"] is None


async def test_write_back_can_be_turned_off(make_client, crm, seed, auth):
    async with make_client(settings=make_settings(crm_write_back="false")) as client:
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert r.headers["x-crm-write-back"] == "skipped" and crm.patches == []


async def test_stale_answer_is_not_written_back(make_client, crm, seed, auth, gateway):
    now = [1_800_000_000.0]
    async with make_client(settings=make_settings(cache_ttl_lead_qualify=10), clock=lambda: now[0]) as client:
        await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
        now[0] += 11
        gateway.default = "unavailable_503"
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert r.headers["x-cache"] == "STALE" and r.headers["x-crm-write-back"] == "skipped" and len(crm.patches) == 1


async def test_only_qualification_writes_back(client, crm, seed, auth):
    r = await client.post("/api/v1/ai/deal/predict", json={"deal_id": seed["deals"][0]}, headers=auth)
    assert "x-crm-write-back" not in r.headers and crm.patches == []


async def test_metrics_move_for_hit_miss_repair_stream_and_write_back(client, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "garbage", "json")
    await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)  # miss, repaired
    await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)  # hit
    await client.post("/api/v1/ai/lead/qualify/stream", json={"lead_id": seed["leads"][1]}, headers=auth)  # stream, miss
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "crm_ai_cache_events_total", task="lead.qualify", result="miss") == 2
    assert metric(text, "crm_ai_cache_events_total", task="lead.qualify", result="hit") == 1
    assert metric(text, "crm_ai_agent_output_total", agent=LEAD_AGENT, outcome="invalid") == 1
    assert metric(text, "crm_ai_agent_output_total", agent=LEAD_AGENT, outcome="repaired") == 1
    assert metric(text, "crm_ai_gateway_calls_total", agent=LEAD_AGENT, outcome="ok") == 2
    assert metric(text, "crm_ai_gateway_calls_total", agent=LEAD_AGENT, outcome="stream_started") == 1
    assert metric(text, "crm_ai_write_backs_total", outcome="ok") == 2  # the sync miss and the stream
    assert metric(text, "crm_ai_write_backs_total", outcome="skipped") == 1
    assert metric(text, "crm_ai_http_requests_total", route="/api/v1/ai/lead/qualify", method="POST", status="200") == 2
    assert metric(text, "crm_ai_http_request_duration_seconds_count", route="/api/v1/ai/lead/qualify") == 2
    assert metric(text, "crm_ai_open_streams") == 0  # the stream was read to its end and closed
    assert ("crm_ai_running_jobs", ()) in samples(text)  # a sample, not just its HELP line
    # The CRM's side (issue 27): three reads (miss, hit, stream) and two write-backs, each timed.
    assert metric(text, "crm_ai_crm_calls_total", method="GET", outcome="ok") == 3
    assert metric(text, "crm_ai_crm_calls_total", method="PATCH", outcome="ok") == 2
    assert metric(text, "crm_ai_crm_call_duration_seconds_count", method="GET") == 3
    assert metric(text, "crm_ai_cache_store_up", backend="memory") == 1
    # Primed at start-up: a task nobody asked for yet has its series at 0, so a rate over it is 0, not "no data".
    assert ("crm_ai_cache_events_total", (("result", "hit"), ("task", "deal.predict"))) in samples(text)


async def test_readiness_is_a_metric_too(make_client):
    import httpx

    up = True

    def gateway(request: httpx.Request) -> httpx.Response:
        if up:
            return httpx.Response(200, json={"status": "healthy"})
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(base_url="http://gateway.test", transport=httpx.MockTransport(gateway)) as gw, \
            make_client(gateway_http=gw) as client:
        assert (await client.get("/readyz")).status_code == 200
        ready = metric((await client.get("/metrics")).text, "crm_ai_ready")
        up = False
        not_ready = await client.get("/readyz")
        after = metric((await client.get("/metrics")).text, "crm_ai_ready")
    assert ready == 1 and not_ready.status_code == 503 and after == 0


async def test_proxied_requests_are_labelled_proxy(client):
    await client.get("/api/v1/leads/unknown-path-for-the-backend")
    text = (await client.get("/metrics")).text
    assert any(name == "crm_ai_http_requests_total" and dict(labels).get("route") == "proxy"
               for name, labels in samples(text))


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/schema/openapi.json"])
async def test_ops_routes_are_ours(client, crm, path):
    r = await client.get(path)
    assert r.status_code == 200 and crm.calls.total() == 0


async def test_streamed_qualification_is_written_back_too(client, crm, seed, auth):
    r = await client.post("/api/v1/ai/lead/qualify/stream", json={"lead_id": seed["leads"][1]}, headers=auth)
    assert r.status_code == 200 and b"event: done" in r.content
    lead = crm.leads[seed["leads"][1]]
    assert [p[0] for p in crm.patches] == [seed["leads"][1]] and lead["score"] is not None
    hit = await client.post("/api/v1/ai/lead/qualify/stream", json={"lead_id": seed["leads"][1]}, headers=auth)
    assert hit.headers["x-cache"] == "HIT" and len(crm.patches) == 1  # a cached answer is not written again
