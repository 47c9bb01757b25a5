"""The real Conductor stack and CRM backend as they behave on the wire (upstreams.md §5).

Each behaviour the doubles reproduce has a test here that fails if the sidecar regresses on it.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from structlog.testing import capture_logs

from adapter.agent_sync import local_agents, sync_agents
from adapter.tasks import TASKS
from adapter.doubles.gateway import NO_CWD, NO_SCREENPLAY, GatewayDouble
from adapter.errors import GatewayRejected
from adapter.upstreams.gateway import GatewayClient, _status_error, listed_agents
from adapter.settings import Settings
from tests.helpers import (DEAL_AGENT, EMAIL_AGENT, LEAD_AGENT, QUALIFY, QUALIFY_STREAM, asgi_client, assert_problem,
                           decode, make_settings, run_adapter_async, serving, sse_events, stale_after_500)

AGENT_IDS = TASKS.agent_ids
NO_STORE = {"Cache-Control": "no-store"}


# --- requests the real stack accepts -------------------------------------------------------

async def test_every_run_carries_screenplay_id_and_cwd(make_client, gateway, seed, auth):
    settings = make_settings(conductor_screenplay_id="65f1c0ffee00000000000abc", conductor_cwd="/srv/crm-ai")
    async with make_client(settings=settings) as client:
        assert (await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers={**auth, **NO_STORE})).status_code == 200
        stream = await client.post(QUALIFY_STREAM, json={"lead_id": seed["leads"][1]}, headers=auth)
    assert sse_events(stream)[-1] == ("done", {"status": "succeeded", "cached": False})
    assert len(gateway.bodies) == 2 and not gateway.refused  # the double enforces the real rules
    for body in gateway.bodies:
        assert body["screenplay_id"] == "65f1c0ffee00000000000abc" and body["cwd"] == "/srv/crm-ai"
    assert len({b["instance_id"] for b in gateway.bodies} | {b["conversation_id"] for b in gateway.bodies}) == 4


async def test_the_double_refuses_runs_as_the_real_stack_does(gateway):
    async with asgi_client(gateway.app, "http://gateway.test") as http:
        base = {"input_text": "hi", "instance_id": "i1", "conversation_id": "c1", "cwd": "/tmp"}
        no_screenplay = await http.post(f"/api/agents/{LEAD_AGENT}/execute", json=base)
        no_cwd = await http.post(f"/api/agents/{LEAD_AGENT}/execute", json={**base, "screenplay_id": "x", "cwd": None})
        stream_no_cwd = await http.post("/api/v1/stream-execute", json={"agent_id": LEAD_AGENT, "input": "hi"})
        ok = await http.post(f"/api/agents/{LEAD_AGENT}/execute", json={**base, "screenplay_id": "anything"})
    assert no_screenplay.status_code == 500 and "Campo 'screenplay_id' é obrigatório" in no_screenplay.json()["detail"]
    assert no_cwd.status_code == 400 and no_cwd.json()["detail"] == NO_CWD
    assert stream_no_cwd.status_code == 200 and stream_no_cwd.json() == [{"error": f"400: {NO_CWD}"}, 500]
    answer = ok.json()
    assert set(answer) == {"status", "result", "instance_id", "context_mode", "execution_id", "task_id", "duration_ms"}
    assert set(answer["result"]) == {"result", "exit_code", "status"}  # no stdout


def test_a_refusal_inside_a_500_is_a_final_502_with_the_conductors_words():
    response = httpx.Response(500, json={"detail": "Conductor API error: " + json.dumps({"detail": NO_SCREENPLAY})})
    error = _status_error(LEAD_AGENT, response)
    assert isinstance(error, GatewayRejected) and error.status == 502 and "Retry-After" not in error.headers
    assert "Campo 'screenplay_id' é obrigatório" in error.detail and "{" not in error.detail


def test_a_500_from_the_gateways_own_database_is_unavailable_not_final():
    # Measured: with its MongoDB gone, the real gateway blocks 30 s, then answers this 500.
    response = httpx.Response(500, json={"detail": "127.0.0.1:27027: [Errno 111] Connection refused (configured timeouts: "
                                                   "socketTimeoutMS: 20000.0ms), Timeout: 30s, Topology Description: <...>"})
    error = _status_error(LEAD_AGENT, response)
    assert error.status == 503 and error.slug == "gateway-unavailable" and "127.0.0.1" not in error.detail


def test_internal_urls_never_leak_from_upstream_details():
    response = httpx.Response(503, json={"detail": "Cannot connect to Conductor API after 3 attempts: "
                                                   "[Errno 111] http://10.0.3.7:8000/agents/x/execute"})
    assert "10.0.3.7" not in _status_error(LEAD_AGENT, response).detail


def test_settings_default_to_what_current_gateways_require():
    s = Settings.from_env({})
    assert s.conductor_screenplay_id and s.conductor_cwd == "/tmp" and s.conductor_cleanup_instances is True
    with pytest.raises(Exception, match="CONDUCTOR_CWD"):
        Settings.from_env({"CONDUCTOR_CWD": "relative/dir"})
    assert Settings.from_env({"CONDUCTOR_AI_PROVIDER": "claude, gemini"}).providers == ("claude", "gemini")


# --- answers read as the real stack means them ------------------------------------------------

async def test_a_failed_run_is_agent_failed_never_model_text(client, gateway, seed, auth):
    gateway.push(LEAD_AGENT, "run_failed", "run_failed")
    sync = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    body = assert_problem(sync, 502, "agent-failed")
    stream = await client.post(QUALIFY_STREAM, json={"lead_id": seed["leads"][1]}, headers=auth)
    events = sse_events(stream)
    assert [e for e, _ in events][-2:] == ["error", "done"] and events[-1][1]["status"] == "failed"
    assert events[-2][1]["type"].endswith("agent-failed") and "rate limit" in events[-2][1]["detail"]
    assert "exit code 1" in body["detail"]
    assert gateway.calls[LEAD_AGENT] == 2  # one run each: the error text never went to a repair prompt


async def test_the_real_stream_has_no_token_events(client, gateway, seed, auth):
    stream = await client.post(QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth)
    events = sse_events(stream)
    assert "delta" not in [e for e, _ in events] and events[-2][0] == "result"
    messages = [d["message"] for e, d in events if e == "status"]
    assert "Agente processando a tarefa..." in messages and any("Tarefa submetida" in m for m in messages)


async def test_a_token_streaming_gateway_still_gives_deltas(client, gateway, seed, auth):
    gateway.push(LEAD_AGENT, "tokens")
    events = sse_events(await client.post(QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth))
    assert sum(1 for e, _ in events if e == "delta") > 5 and events[-1][1]["status"] == "succeeded"


async def test_a_job_the_gateway_forgot_is_recovered_by_one_synchronous_run(client, gateway, seed, auth):
    gateway.push(LEAD_AGENT, "vanished")
    with capture_logs() as logs:
        stream = await client.post(QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth)
    events = sse_events(stream)
    assert [e for e, _ in events][-2:] == ["result", "done"] and events[-1][1] == {"status": "succeeded", "cached": False}
    assert any("lost the job" in d.get("message", "") for e, d in events if e == "status")
    assert gateway.calls[LEAD_AGENT] == 2  # the lost run and the one that learned its outcome
    lost = [entry for entry in logs if entry["event"] == "gateway.stream_lost"]
    assert len(lost) == 1 and "404" in lost[0]["reason"]
    metrics = (await client.get("/metrics")).text
    assert f'crm_ai_gateway_lost_streams_total{{agent="{LEAD_AGENT}"}} 1.0' in metrics


async def test_the_double_forgets_a_job_once_read(gateway):
    async with asgi_client(gateway.app, "http://gateway.test") as http:
        start = await http.post("/api/v1/stream-execute", json={"agent_id": LEAD_AGENT, "input": "hi", "cwd": "/tmp",
                                                                "screenplay_id": "x"})
        url = start.json()["stream_url"]
        first = await http.get(url)
        again = await http.get(url)
    names = [json.loads(line[6:])["event"] for line in first.text.splitlines() if line.startswith("data: ")]
    assert names == ["task_started", "status_update", "result"]
    assert again.status_code == 404 and again.headers["content-type"].startswith("text/plain")
    assert again.text.endswith("not found or already completed.")


# --- agents the gateway knows -------------------------------------------------------------------

def test_agent_listings_are_matched_by_id_only():
    router_shape = [{"id": LEAD_AGENT, "name": "Lead Qualifier"}, {"id": "x", "name": DEAL_AGENT}]
    old_shape = [{"id": "65f1c0ffee0000000000a001", "agent_id": EMAIL_AGENT, "name": EMAIL_AGENT}]
    fallback = {"total": 1, "agents": [{"id": DEAL_AGENT, "name": "whatever"}]}
    assert set(listed_agents(router_shape)) == {LEAD_AGENT, "x"}  # a listed name proves nothing
    assert set(listed_agents(old_shape)) == {EMAIL_AGENT}
    assert set(listed_agents(fallback)) == {DEAL_AGENT}


async def test_health_reads_both_listing_shapes_and_never_counts_a_name(client, gateway):
    assert all(decode(await client.get("/api/v1/ai/health"))["agents"].values())
    gateway.down = True  # its MongoDB is down: /api/agents relays the Conductor API's {"total", "agents"}
    assert all(decode(await client.get("/api/v1/ai/health"))["agents"].values())
    gateway.down = False
    doc = gateway.registry.pop(DEAL_AGENT)
    gateway.registry["Renamed_Agent"] = {**doc, "agent_id": "Renamed_Agent"}  # its definition name is still DEAL_AGENT
    assert decode(await client.get("/api/v1/ai/health"))["agents"][DEAL_AGENT] is False


@pytest.fixture
def agents_dir(tmp_path):
    target = tmp_path / "agents"
    shutil.copytree(Settings.from_env({}).conductor_agents_dir, target)
    return target


async def test_agents_sync_creates_then_is_idempotent_then_updates(agents_dir):
    gateway = GatewayDouble(registry={})
    settings = make_settings(conductor_agents_dir=str(agents_dir))
    async with asgi_client(gateway.app, "http://gateway.test") as http:
        client = GatewayClient(http, settings)
        created = await sync_agents(client, local_agents(str(agents_dir), AGENT_IDS))
        again = await sync_agents(client, local_agents(str(agents_dir), AGENT_IDS))
        persona = agents_dir / LEAD_AGENT / "persona.md"
        persona.write_text(persona.read_text() + "\nOne more rule.\n")
        updated = await sync_agents(client, local_agents(str(agents_dir), AGENT_IDS))
    assert [r.outcome for r in created] == ["created"] * len(TASKS)  # one agent per registered task
    assert [r.outcome for r in again] == ["unchanged"] * len(TASKS)
    assert {r.agent_id: (r.outcome, r.detail) for r in updated}[LEAD_AGENT] == ("updated", "persona")
    assert gateway.registry[LEAD_AGENT]["persona"]["content"].endswith("One more rule.\n")
    assert set(gateway.registry) == set(AGENT_IDS)


async def test_agents_sync_refuses_what_the_gateway_would_refuse(agents_dir):
    gateway = GatewayDouble(registry={})
    definition = agents_dir / EMAIL_AGENT / "definition.yaml"
    definition.write_text(definition.read_text().replace("description:", "description: Short.\nold_description:", 1))
    async with asgi_client(gateway.app, "http://gateway.test") as http:
        results = await sync_agents(GatewayClient(http, make_settings()), local_agents(str(agents_dir), AGENT_IDS))
    outcome = {r.agent_id: r for r in results}
    assert outcome[EMAIL_AGENT].outcome == "invalid" and "10-200 characters" in outcome[EMAIL_AGENT].detail
    assert EMAIL_AGENT not in gateway.registry and outcome[LEAD_AGENT].outcome == "created"


async def test_the_double_keeps_the_real_agent_api_rules(gateway):
    persona = "# Tester_Agent\n\n" + "A persona long enough to pass the fifty character rule."
    async with asgi_client(gateway.app, "http://gateway.test") as http:
        bad_name = await http.post("/api/agents", json={"name": "Tester", "description": "A test agent here", "persona_content": persona})
        short = await http.post("/api/agents", json={"name": "Tester_Agent", "description": "short", "persona_content": persona})
        no_heading = await http.post("/api/agents", json={"name": "Tester_Agent", "description": "A test agent here",
                                                          "persona_content": persona.lstrip("# ")})
        exists = await http.post("/api/agents", json={"name": LEAD_AGENT, "description": "A test agent here", "persona_content": persona})
        unknown = await http.put("/api/agents/Nobody_Agent", json={"description": "whatever it is"})
        update = await http.put(f"/api/agents/{LEAD_AGENT}", json={"tags": ["x"]})
    assert bad_name.status_code == 500 and "_Agent" in bad_name.json()["detail"]
    assert short.status_code == 422 and no_heading.status_code == 500 and exists.status_code == 409
    assert unknown.status_code == 404 and update.json()["updated_fields"] == ["tags"]


async def test_check_reports_a_persona_that_differs_and_sync_fixes_it(gateway, agents_dir):

    gateway.registry[LEAD_AGENT]["persona"]["content"] += "\nAn edit made on the gateway.\n"
    async with serving(gateway.app) as gw:
        env = {"CONDUCTOR_GATEWAY_URL": gw, "CONDUCTOR_AGENTS_DIR": str(agents_dir), "REDIS_URL": ""}
        code, _, err = await run_adapter_async("check", env=env)
        synced, out, sync_err = await run_adapter_async("agents", "sync", env=env)
        after, out_after, err_after = await run_adapter_async("check", env=env)
    assert code == 1 and f"agent {LEAD_AGENT} on the gateway differs" in err and "(persona)" in err
    assert synced == 0, sync_err
    assert {line.split()[1]: line.split()[0] for line in out.splitlines()} == {
        **dict.fromkeys(AGENT_IDS, "unchanged"), LEAD_AGENT: "updated"}
    assert "differs" not in err_after and out_after.count("with the same persona") == len(AGENT_IDS)


# --- no garbage left on the gateway ----------------------------------------------------------------

async def test_each_synchronous_run_removes_its_instance(make_client, gateway, seed, auth):
    async with make_client() as client:
        assert (await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)).status_code == 200
    assert gateway.instances == {} and gateway.deleted_instances == [gateway.bodies[0]["instance_id"]]
    async with make_client(settings=make_settings(conductor_cleanup_instances=False)) as client:
        await client.post(QUALIFY, json={"lead_id": seed["leads"][1]}, headers=auth)
    assert list(gateway.instances) == [gateway.bodies[1]["instance_id"]]


class _NoDelete(httpx.AsyncBaseTransport):
    """The gateway, except that deleting an instance fails at the connection."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            raise httpx.ConnectError("refused", request=request)
        return await self.inner.handle_async_request(request)


async def test_a_failed_instance_cleanup_never_fails_the_answer(make_client, gateway, seed, auth):
    transport = _NoDelete(httpx.ASGITransport(app=gateway.app))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as gw, make_client(gateway_http=gw) as client:
        with capture_logs() as logs:
            r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 200
    assert [e["outcome"] for e in logs if e["event"] == "gateway.instance_cleanup"] == ["failed"]
    assert 'crm_ai_gateway_instance_cleanups_total{outcome="failed"} 1.0' in metrics


# --- provider fallback and the bound on model runs ------------------------------------------------------

async def test_a_failed_run_falls_back_to_the_next_provider_once(make_client, gateway, seed, auth):
    async with make_client(settings=make_settings(conductor_ai_provider="claude,gemini")) as client:
        gateway.push(LEAD_AGENT, "run_failed")
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
        metrics = (await client.get("/metrics")).text
        gateway.push(LEAD_AGENT, "run_failed", "run_failed")
        failed = await client.post(QUALIFY, json={"lead_id": seed["leads"][1]}, headers=auth)
    assert r.status_code == 200 and r.headers["x-ai-provider"] == "gemini" and decode(r)["provider"] == "gemini"
    assert [b["ai_provider"] for b in gateway.bodies] == ["claude", "gemini", "claude", "gemini"]
    assert f'crm_ai_provider_fallbacks_total{{agent="{LEAD_AGENT}",from_provider="claude",to_provider="gemini"}} 1.0' in metrics
    assert_problem(failed, 502, "agent-failed")  # once: the second provider's failure is the answer


async def test_a_stream_falls_back_to_the_next_provider(make_client, gateway, seed, auth):
    async with make_client(settings=make_settings(conductor_ai_provider="claude,gemini")) as client:
        gateway.push(LEAD_AGENT, "run_failed")
        events = sse_events(await client.post(QUALIFY_STREAM, json={"lead_id": seed["leads"][0]}, headers=auth))
    assert events[-2][0] == "result" and events[-2][1]["provider"] == "gemini"
    assert any("trying provider gemini" in d.get("message", "") for e, d in events if e == "status")


async def test_one_request_runs_the_model_a_bounded_number_of_times(make_client, gateway, seed, auth):
    # Worst case of the documented bound: 1 run + AGENT_REPAIR_ATTEMPTS repairs + 1 provider fallback.
    settings = make_settings(conductor_ai_provider="claude,gemini", agent_repair_attempts=1, upstream_retries=3)
    async with make_client(settings=settings) as client:
        gateway.push(LEAD_AGENT, "run_failed", "garbage", "garbage", "json")
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert_problem(r, 502, "invalid-agent-output")
    assert gateway.calls[LEAD_AGENT] == 3 == 1 + settings.agent_repair_attempts + 1


# --- the CRM backend as it really is ---------------------------------------------------------------

async def test_a_lookup_on_a_connection_dropped_after_a_500_is_retried_once(make_client, crm, seed, auth):
    async with stale_after_500(crm.app) as front:
        limits = httpx.Limits(max_connections=1)  # one connection: the next request must reuse the poisoned one
        async with httpx.AsyncClient(base_url=front.url, limits=limits) as http, make_client(crm_http=http) as client:
            assert (await client.get("/api/v1/leads/not-an-id", headers=auth)).status_code == 500  # the CRM's own
            lookup = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
            assert (await client.get("/api/v1/leads/not-an-id", headers=auth)).status_code == 500
            proxied = await client.get(f"/api/v1/leads/{seed['leads'][0]}", headers=auth)
            assert (await client.get("/api/v1/leads/not-an-id", headers=auth)).status_code == 500
            post = await client.post("/api/v1/leads/", json={"name": "x"}, headers=auth)  # never retried
    assert lookup.status_code == 200 and proxied.status_code == 200
    assert front.dropped == 3
    assert_problem(post, 502, "crm-unavailable")


async def test_a_backend_redirect_points_at_the_sidecar(client, auth):
    plain = await client.get("/api/v1/leads?page=2", headers=auth)
    forwarded = await client.get("/api/v1/leads", headers={**auth, "X-Forwarded-Proto": "https",
                                                           "X-Forwarded-Host": "crm.example.com"})
    assert plain.status_code == 307 and plain.headers["location"] == "http://sidecar.test/api/v1/leads/?page=2"
    assert forwarded.headers["location"] == "https://crm.example.com/api/v1/leads/"
    listed = await client.get("/api/v1/leads/", headers=auth)
    assert listed.status_code == 200 and listed.json()["total"] == 3


async def test_write_back_sends_only_what_the_lead_update_model_keeps(client, crm, seed, auth):
    r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert r.headers["x-crm-write-back"] == "ok"
    [(lead_id, changes)] = crm.patches
    assert lead_id == seed["leads"][0] and set(changes) == {"score", "classification"}
    lead = crm.leads[lead_id]
    assert (lead["score"], lead["classification"]) == (decode(r)["score"], decode(r)["classification"])


async def test_the_crm_double_drops_what_its_update_model_does_not_know(client, crm, seed, auth):
    lead_id = seed["leads"][0]
    r = await client.patch(f"/api/v1/leads/{lead_id}", headers=auth,
                           json={"score": 80, "qualification_reasoning": "lost", "next_actions": ["lost"]})
    assert r.status_code == 200 and crm.leads[lead_id]["score"] == 80
    assert "qualification_reasoning" not in crm.leads[lead_id] and "next_actions" not in crm.leads[lead_id]
    unauthorised = await client.get(f"/api/v1/leads/{lead_id}", headers={"Authorization": "Bearer nope"})
    assert unauthorised.status_code == 401 and "www-authenticate" not in unauthorised.headers  # as the real one


async def test_a_401_from_the_crm_still_names_the_scheme(client, seed):
    r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers={"Authorization": "Bearer forged"})
    assert_problem(r, 401, "unauthenticated")
    assert r.headers["www-authenticate"] == "Bearer"

