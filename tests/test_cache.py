"""The result cache: in-process semantics, and the real Redis shared by replicas."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from adapter.tasks import TASKS
from adapter.pipeline.cache import cache_key
from adapter.storage.memory import MemoryStore
from adapter.settings import Settings
from tests.helpers import EMAIL_AGENT, LEAD_AGENT, QUALIFY, Clock, assert_problem, closed_port_url, decode, make_settings, sync_client


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def redis_settings(redis_url, cache_prefix):
    def build(**overrides) -> Settings:
        return make_settings(redis_url=redis_url, cache_prefix=cache_prefix, **overrides)
    return build


async def qualify(client, lead, auth, **headers):
    return await client.post(QUALIFY, json={"lead_id": lead}, headers={**auth, **headers})


# --- semantics, in one process ---------------------------------------------------------------

async def test_hit_after_miss(make_client, seed, auth, gateway, clock):
    async with make_client(clock=clock) as client:
        first = await qualify(client, seed["leads"][0], auth)
        clock.now += 42
        second = await qualify(client, seed["leads"][0], auth)
    assert first.headers["x-cache"] == "MISS" and "age" not in first.headers
    assert second.headers["x-cache"] == "HIT" and second.headers["age"] == "42"
    assert second.content == first.content and gateway.calls[LEAD_AGENT] == 1


async def test_ttl_expiry_asks_again(make_client, seed, auth, gateway, clock):
    settings = make_settings(cache_ttl_lead_qualify=60)
    async with make_client(settings=settings, clock=clock) as client:
        await qualify(client, seed["leads"][0], auth)
        clock.now += 59
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "HIT"
        clock.now += 2
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "MISS"
    assert gateway.calls[LEAD_AGENT] == 2


async def test_ttls_are_per_task(make_client, seed, auth, gateway, clock):
    settings = make_settings(cache_ttl_lead_qualify=1000, cache_ttl_email_generate=10)
    async with make_client(settings=settings, clock=clock) as client:
        await qualify(client, seed["leads"][0], auth)
        await client.post("/api/v1/ai/email/generate", json={"lead_id": seed["leads"][0]}, headers=auth)
        clock.now += 11
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "HIT"
        email = await client.post("/api/v1/ai/email/generate", json={"lead_id": seed["leads"][0]}, headers=auth)
    assert email.headers["x-cache"] == "MISS"


async def test_record_edit_gets_a_fresh_answer(client, crm, seed, auth, gateway):
    lead = seed["leads"][1]
    await qualify(client, lead, auth)
    crm.leads[lead]["job_title"] = "Chief Revenue Officer"
    again = await qualify(client, lead, auth)
    assert again.headers["x-cache"] == "MISS" and gateway.calls[LEAD_AGENT] == 2
    assert "Chief Revenue Officer" in gateway.prompts[-1][1]


async def test_email_context_is_part_of_the_question(client, seed, auth, gateway):
    for context in ("initial outreach", "follow-up", "initial outreach"):
        await client.post("/api/v1/ai/email/generate", json={"lead_id": seed["leads"][0], "context": context}, headers=auth)
    assert gateway.calls[EMAIL_AGENT] == 2


async def test_no_cache_refreshes_and_stores(client, seed, auth, gateway):
    await qualify(client, seed["leads"][0], auth)
    refreshed = await qualify(client, seed["leads"][0], auth, **{"Cache-Control": "no-cache"})
    assert refreshed.headers["x-cache"] == "MISS" and gateway.calls[LEAD_AGENT] == 2
    after = await qualify(client, seed["leads"][0], auth)
    assert after.headers["x-cache"] == "HIT" and gateway.calls[LEAD_AGENT] == 2


async def test_no_store_neither_reads_nor_writes(client, seed, auth, gateway):
    bypass = await qualify(client, seed["leads"][0], auth, **{"Cache-Control": "no-store"})
    assert bypass.headers["x-cache"] == "BYPASS"
    assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "MISS"
    assert (await qualify(client, seed["leads"][0], auth, **{"Cache-Control": "no-store"})).headers["x-cache"] == "BYPASS"
    assert gateway.calls[LEAD_AGENT] == 3


async def test_errors_are_never_cached(client, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "error_500")
    assert_problem(await qualify(client, seed["leads"][0], auth), 502, "gateway-error")
    ok = await qualify(client, seed["leads"][0], auth)
    assert ok.status_code == 200 and ok.headers["x-cache"] == "MISS"


@pytest.mark.parametrize("fault", ["unavailable_503", "garbage", "run_failed"])
async def test_stale_served_when_the_agent_fails(make_client, seed, auth, gateway, clock, fault):
    settings = make_settings(cache_ttl_lead_qualify=60, cache_stale_grace=600)
    async with make_client(settings=settings, clock=clock) as client:
        fresh = await qualify(client, seed["leads"][0], auth)
        clock.now += 120
        gateway.default = fault  # every attempt, retries and repairs included, fails
        stale = await qualify(client, seed["leads"][0], auth)
        assert stale.status_code == 200 and stale.headers["x-cache"] == "STALE" and stale.headers["age"] == "120"
        assert stale.content == fresh.content
        clock.now += 600  # past the grace period: nothing left to stand in
        assert (await qualify(client, seed["leads"][0], auth)).status_code in {502, 503}


async def test_stale_served_while_the_gateway_times_out(make_client, seed, auth, gateway, clock):
    settings = make_settings(cache_ttl_lead_qualify=60, gateway_call_timeout=0.2)
    async with make_client(settings=settings, clock=clock) as client:
        await qualify(client, seed["leads"][0], auth)
        clock.now += 61
        gateway.delay = 30
        stale = await qualify(client, seed["leads"][0], auth)
    assert stale.status_code == 200 and stale.headers["x-cache"] == "STALE"


async def test_crm_refusal_is_never_answered_from_cache(client, crm, seed, auth, gateway):
    await qualify(client, seed["leads"][0], auth)
    as_bob = await qualify(client, seed["leads"][0], {"Authorization": f"Bearer {seed['bob_token']}"})
    assert_problem(as_bob, 403, "forbidden")
    expired = await qualify(client, seed["leads"][0], {"Authorization": f"Bearer {crm.token(seed['alice'], expires_in=-1)}"})
    assert_problem(expired, 401, "unauthenticated")
    del crm.leads[seed["leads"][0]]
    assert_problem(await qualify(client, seed["leads"][0], auth), 404, "not-found")
    assert gateway.calls[LEAD_AGENT] == 1


async def test_single_flight_in_one_process(client, crm, seed, auth, gateway):
    gateway.gate = asyncio.Event()
    requests = [asyncio.create_task(qualify(client, seed["leads"][0], auth)) for _ in range(20)]
    await crm.calls.reach(20)  # every caller was authorized by the backend
    await gateway.calls.reach(1)
    gateway.gate.set()
    responses = await asyncio.gather(*requests)
    assert gateway.calls[LEAD_AGENT] == 1
    assert {r.status_code for r in responses} == {200} and len({r.content for r in responses}) == 1


async def test_single_flight_shares_the_error(client, crm, seed, auth, gateway):
    gateway.gate = asyncio.Event()
    gateway.push(LEAD_AGENT, "error_500")
    requests = [asyncio.create_task(qualify(client, seed["leads"][0], auth)) for _ in range(10)]
    await crm.calls.reach(10)
    await gateway.calls.reach(1)
    gateway.gate.set()
    responses = await asyncio.gather(*requests)
    assert gateway.calls[LEAD_AGENT] == 1
    assert {r.status_code for r in responses} == {502}


async def test_memory_store_is_bounded_lru(make_client, seed, crm, auth, gateway):
    store = MemoryStore(max_entries=2)
    leads = [seed["leads"][0], seed["leads"][1], crm.add_lead(seed["alice"], name="Third")]
    async with make_client(store=store) as client:
        for lead in leads:
            await qualify(client, lead, auth)
        assert len(store) == 2
        assert (await qualify(client, leads[2], auth)).headers["x-cache"] == "HIT"
        assert (await qualify(client, leads[0], auth)).headers["x-cache"] == "MISS"  # the oldest was evicted


# --- Redis, shared by replicas -----------------------------------------------------------------

def test_a_cache_key_renders_as_the_release_before_it_did():
    """Entries are signed over their Redis key: a rendering that moved would turn every stored answer into a
    miss after an upgrade (and split the single-flight locks between releases). It moved once, on purpose,
    for the Cluster's hash tag; the parts are kept, so nothing parses the key back."""
    key = cache_key("crm-ai", "lead.qualify", "LeadQualifier", "v7", "lead_42", "the rendered input")
    # The digest is the key's hash tag (issue 24: a Cluster puts the entry and its side keys in one slot).
    assert key.redis_key == "crm-ai:result:lead.qualify:{c06f2ea69c211e2854a60be94d66e320ba9dca49}"
    assert (key.task, key.digest) == ("lead.qualify", "c06f2ea69c211e2854a60be94d66e320ba9dca49")
    # Agent, version, record and input each make another question.
    others = [cache_key("crm-ai", "lead.qualify", *parts) for parts in (
        ("LeadQualifier2", "v7", "lead_42", "the rendered input"), ("LeadQualifier", "v8", "lead_42", "the rendered input"),
        ("LeadQualifier", "v7", "lead_43", "the rendered input"), ("LeadQualifier", "v7", "lead_42", "another input"))]
    assert len({key, *others}) == 5 and len({k.redis_key for k in (key, *others)}) == 5


@pytest.mark.redis
@pytest.mark.redis_topologies
async def test_redis_hit_after_miss_with_bounded_namespaced_keys(make_client, redis_settings, redis_url, cache_prefix, crm, seed, auth, gateway):
    lead = crm.add_lead(seed["alice"], name="Big Notes", notes="x" * 100_000)
    async with make_client(settings=redis_settings()) as client:
        assert (await qualify(client, lead, auth)).headers["x-cache"] == "MISS"
        assert (await qualify(client, lead, auth)).headers["x-cache"] == "HIT"
    with sync_client(redis_url) as r:
        keys = [k.decode() for k in r.scan_iter(f"{cache_prefix}:*")]
        results = [k for k in keys if ":result:" in k]
        assert len(results) == 1 and len(results[0]) < 100 and results[0].startswith(f"{cache_prefix}:result:lead.qualify:")
        settings = redis_settings()
        kept_ms = r.pttl(results[0])
        assert (settings.ttl_for(TASKS["lead.qualify"]) + settings.cache_stale_grace) * 1000 - 10_000 < kept_ms
    assert gateway.calls[LEAD_AGENT] == 1


@pytest.mark.redis
@pytest.mark.redis_topologies
async def test_redis_ttl_expiry_and_stale(make_client, redis_settings, seed, auth, gateway, clock):
    async with make_client(settings=redis_settings(cache_ttl_lead_qualify=60), clock=clock) as client:
        await qualify(client, seed["leads"][0], auth)
        clock.now += 61
        gateway.push(LEAD_AGENT, *["unavailable_503"] * 2)  # the call and its one retry; no model ran
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "STALE"
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "MISS"
    assert gateway.calls[LEAD_AGENT] == 2


@pytest.mark.redis
async def test_persona_change_invalidates(make_client, redis_settings, seed, auth, gateway, tmp_path):
    agents = tmp_path / "agents"
    shutil.copytree(Settings.from_env({}).conductor_agents_dir, agents)
    async with make_client(settings=redis_settings(conductor_agents_dir=str(agents))) as client:
        await qualify(client, seed["leads"][0], auth)
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "HIT"
    persona = Path(agents, LEAD_AGENT, "persona.md")
    persona.write_text(persona.read_text().replace("Suggested temperature: 0.7.", "Suggested temperature: 0.6."))
    async with make_client(settings=redis_settings(conductor_agents_dir=str(agents))) as client:
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "MISS"
    assert gateway.calls[LEAD_AGENT] == 2


async def across_two_replicas(make_client, settings, crm, gateway, lead, auth, n):
    """`n` identical requests spread over two sidecars sharing one Redis, all in flight at once.

    The model is held until every request has been authorized by the backend, then released.
    """
    gateway.gate = asyncio.Event()
    async with make_client(settings=settings) as a, make_client(settings=settings) as b:
        requests = [asyncio.create_task(qualify(a if i % 2 else b, lead, auth)) for i in range(n)]
        await crm.calls.reach(n)
        await gateway.calls.reach(1)
        gateway.gate.set()
        return await asyncio.gather(*requests)


@pytest.mark.redis
# Not on the Cluster: 100 requests at once open 100 connections to a node's cold pool, and on a busy
# 2-core machine a few connects fail; each such request is answered uncached (fail open), one more
# model call. The 10-request test below runs the cross-replica flight on the Cluster too.
@pytest.mark.redis_topologies("single", "sentinel")
async def test_hundred_requests_across_two_replicas_make_one_call(make_client, redis_settings, crm, seed, auth, gateway):
    # One user's 100 requests at once: past CRM_READS_PER_USER's burst, so that limit is off here.
    responses = await across_two_replicas(make_client, redis_settings(crm_reads_per_user="off"), crm, gateway, seed["leads"][0],
                                          auth, 100)
    assert gateway.calls[LEAD_AGENT] == 1
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1


@pytest.mark.redis
@pytest.mark.redis_topologies("single", "sentinel")  # the Cluster's cold pools: as the test above says
async def test_replicas_share_the_error_of_the_one_call(make_client, redis_settings, crm, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "error_500")  # not retried: the gateway may have started the agent
    responses = await across_two_replicas(make_client, redis_settings(), crm, gateway, seed["leads"][0], auth, 10)
    assert gateway.calls[LEAD_AGENT] == 1
    assert {r.status_code for r in responses} == {502}
    assert all(decode(r)["type"].endswith("gateway-error") for r in responses)


@pytest.mark.redis
@pytest.mark.redis_topologies
async def test_waiter_takes_over_from_a_crashed_holder(make_client, redis_settings, redis_url, cache_prefix, seed, auth, gateway):
    settings = redis_settings(cache_lock_timeout=0.3)
    async with make_client(settings=settings) as client:
        await qualify(client, seed["leads"][0], auth, **{"Cache-Control": "no-store"})  # learn the rendered input
        task = TASKS.load(settings.conductor_agents_dir)["lead.qualify"]
        key = cache_key(cache_prefix, "lead.qualify", LEAD_AGENT, task.version, seed["leads"][0], gateway.prompts[-1][1])
        with sync_client(redis_url) as r:
            # A replica took the lock and died: nobody renews it, nobody publishes an outcome.
            r.set(key.lock_key, "crashed-holder", px=300)
        response = await qualify(client, seed["leads"][0], auth)
    assert response.status_code == 200 and response.headers["x-cache"] == "MISS"
    assert gateway.calls[LEAD_AGENT] == 2  # the no-store probe, then the one takeover call


async def test_redis_down_at_start_answers_uncached_and_reports_degraded(make_client, seed, auth, gateway):
    settings = make_settings(redis_url=closed_port_url().replace("http", "redis"))
    async with make_client(settings=settings) as client:
        for _ in range(2):
            r = await qualify(client, seed["leads"][0], auth)
            assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
        ready = await client.get("/readyz")
        health = decode(await client.get("/api/v1/ai/health"))
    assert ready.status_code == 200 and decode(ready)["cache"] == "degraded"
    assert health["cache"]["status"] == "degraded" and health["status"] == "degraded"
    assert gateway.calls[LEAD_AGENT] == 2


@pytest.mark.redis
async def test_redis_killed_mid_run_then_restarted(make_client, redis_process, seed, auth, gateway):
    settings = make_settings(redis_url=redis_process.url, cache_prefix="restart")
    async with make_client(settings=settings) as client:
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "MISS"
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "HIT"
        redis_process.stop()
        for _ in range(3):
            r = await qualify(client, seed["leads"][0], auth)
            assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
        assert decode(await client.get("/api/v1/ai/health"))["cache"]["status"] == "degraded"
        redis_process.start()  # same port, empty: caching resumes without a restart of the sidecar
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "MISS"
        assert (await qualify(client, seed["leads"][0], auth)).headers["x-cache"] == "HIT"
        assert decode(await client.get("/api/v1/ai/health"))["cache"]["status"] == "up"
    assert gateway.calls[LEAD_AGENT] == 5


async def test_records_with_the_same_content_never_share_an_answer(client, crm, seed, auth, gateway):
    twins = [crm.add_lead(seed["alice"], name="Twin", company="Same Co", job_title="CTO") for _ in range(2)]
    first = await qualify(client, twins[0], auth)
    second = await qualify(client, twins[1], auth)
    assert second.headers["x-cache"] == "MISS" and decode(second)["lead_id"] == twins[1]
    assert decode(first)["lead_id"] == twins[0] and gateway.calls[LEAD_AGENT] == 2
