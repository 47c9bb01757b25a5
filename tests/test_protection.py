"""Protection: input limits, early authentication, rate limits, breakers, bulkhead, retries."""

from __future__ import annotations

import asyncio
import random

import pytest

from adapter.doubles.gateway import DB_DOWN
from adapter.settings import Settings
from adapter.upstreams.resilience import CircuitBreaker
from tests.helpers import LEAD_AGENT, QUALIFY, Clock, assert_problem, decode, make_settings


async def test_body_over_the_limit_is_413_naming_it(make_client, auth, crm):
    async with make_client(settings=make_settings(max_body_bytes=2048)) as client:
        r = await client.post("/api/v1/ai/email/generate", headers=auth,
                              json={"lead_id": "65f1c0ffee0000000000a001", "context": "x" * 4000})
    body = assert_problem(r, 413, "payload-too-large")
    assert "2048-byte limit (MAX_BODY_BYTES)" in body["detail"] and crm.calls.total() == 0


async def test_headers_over_the_limit_are_431_naming_it(make_client, auth, crm):
    async with make_client(settings=make_settings(max_header_bytes=2048)) as client:
        routed = await client.post(QUALIFY, json={"lead_id": "65f1c0ffee0000000000a001"}, headers={**auth, "X-Junk": "j" * 3000})
        proxied = await client.get("/api/v1/leads", headers={**auth, "X-Junk": "j" * 3000})
    for r in (routed, proxied):
        assert "MAX_HEADER_BYTES" in assert_problem(r, 431, "headers-too-large")["detail"]
    assert crm.calls.total() == 0


@pytest.mark.parametrize(("case", "detail"), [("expired", "expired"), ("forged", "not valid"), ("garbage", "not valid")])
async def test_early_authentication_refuses_bad_tokens_before_any_upstream(make_client, crm, seed, gateway, case, detail):
    token = {"expired": crm.token(seed["alice"], expires_in=-5), "forged": crm.token(seed["alice"], secret="f" * 40),
             "garbage": "not-a-jwt"}[case]
    async with make_client(settings=make_settings(crm_jwt_secret=crm.secret)) as client:
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers={"Authorization": f"Bearer {token}"})
        ok = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers={"Authorization": f"Bearer {seed['token']}"})
    assert detail in assert_problem(r, 401, "unauthenticated")["detail"]
    assert ok.status_code == 200 and crm.calls.total() == 2  # the good token's read and write-back only


async def test_rate_limit_per_user_with_headers_and_free_hits(make_client, crm, seed, auth, gateway):
    leads = [seed["leads"][0], seed["leads"][1], crm.add_lead(seed["alice"], name="Third")]
    async with make_client(settings=make_settings(rate_limit_lead_qualify="2/60")) as client:
        first = [await client.post(QUALIFY, json={"lead_id": lead}, headers=auth) for lead in leads[:2]]
        hits = [await client.post(QUALIFY, json={"lead_id": leads[0]}, headers=auth) for _ in range(5)]
        limited = await client.post(QUALIFY, json={"lead_id": leads[2]}, headers=auth)
        bob = await client.post(QUALIFY, json={"lead_id": seed["bobs_lead"]}, headers={"Authorization": f"Bearer {seed['bob_token']}"})
        deal = await client.post("/api/v1/ai/deal/predict", json={"deal_id": seed["deals"][0]}, headers=auth)
    assert [r.status_code for r in first] == [200, 200]
    assert {r.headers["x-cache"] for r in hits} == {"HIT"}  # hits spend nothing
    body = assert_problem(limited, 429, "rate-limited")
    assert "2 lead.qualify requests per 60 s" in body["detail"]
    assert int(limited.headers["retry-after"]) >= 1 and limited.headers["ratelimit-limit"] == "2"
    assert limited.headers["ratelimit-remaining"] == "0" and limited.headers["ratelimit-policy"] == "2;w=60"
    assert bob.status_code == 200 and deal.status_code == 200  # other users, other tasks: other buckets
    assert gateway.calls[LEAD_AGENT] == 3


@pytest.mark.redis
@pytest.mark.redis_topologies
async def test_rate_limit_is_shared_by_replicas_through_redis(make_client, redis_url, cache_prefix, crm, seed, auth):
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, rate_limit_deal_predict="3/60")
    deals = [crm.add_deal(seed["alice"], title=f"Deal {i}") for i in range(4)]
    async with make_client(settings=settings) as a, make_client(settings=settings) as b:
        codes = [(await (a if i % 2 else b).post("/api/v1/ai/deal/predict", json={"deal_id": d}, headers=auth)).status_code
                 for i, d in enumerate(deals)]
    assert codes == [200, 200, 200, 429]


async def test_jwt_sub_names_the_user_when_verified(make_client, crm, seed, gateway):
    # Two different tokens of the same user share one bucket once the signature is checked.
    other_token = crm.token(seed["alice"], expires_in=7200)
    settings = make_settings(crm_jwt_secret=crm.secret, rate_limit_lead_qualify="1/60")
    async with make_client(settings=settings) as client:
        first = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers={"Authorization": f"Bearer {seed['token']}"})
        second = await client.post(QUALIFY, json={"lead_id": seed["leads"][1]}, headers={"Authorization": f"Bearer {other_token}"})
    assert first.status_code == 200 and second.status_code == 429


async def test_streams_and_jobs_are_rate_limited_too(make_client, seed, auth):
    async with make_client(settings=make_settings(rate_limit_lead_qualify="1/60")) as client:
        first = await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][0]}}, headers=auth)
        second = await client.post("/api/v1/ai/lead/qualify/stream", json={"lead_id": seed["leads"][1]}, headers=auth)
    assert first.status_code == 202
    assert_problem(second, 429, "rate-limited")


async def test_gateway_database_503_is_retried_once_then_succeeds(client, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "unavailable_503")
    r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert r.status_code == 200
    assert gateway.refused == [(503, DB_DOWN)] and gateway.calls[LEAD_AGENT] == 1


async def test_a_second_database_503_is_the_answer(make_client, seed, auth, gateway):
    gateway.default = "unavailable_503"
    async with make_client(settings=make_settings(upstream_retries=3)) as client:
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert_problem(r, 503, "gateway-unavailable")
    assert len(gateway.refused) == 2 and gateway.calls[LEAD_AGENT] == 0  # one retry, whatever UPSTREAM_RETRIES says


async def test_conductor_unreachable_503_is_never_retried(client, seed, auth, gateway):
    # The gateway already tried the Conductor API three times: a retry here would make it six.
    gateway.push(LEAD_AGENT, "conductor_down")
    r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    body = assert_problem(r, 503, "gateway-unavailable")
    assert len(gateway.refused) == 1 and "after 3 attempts" in body["detail"]
    assert "conductor-api" not in body["detail"] and "://" not in body["detail"]  # no internal URL leaks


async def test_gateway_500_is_a_final_502_never_retried(client, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "error_500")
    r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    body = assert_problem(r, 502, "gateway-error")
    assert gateway.calls[LEAD_AGENT] == 1  # it may have started the agent: a retry could double the work
    assert "retry-after" not in r.headers
    # The Conductor's own words, unwrapped from the gateway's "Conductor API error: {json}", without its URL.
    assert "Tempo de espera excedido" in body["detail"] and "://" not in body["detail"] and "{" not in body["detail"]


async def test_read_timeout_is_never_retried(make_client, seed, auth, gateway):
    gateway.delay = 30
    async with make_client(settings=make_settings(gateway_call_timeout=0.2)) as client:
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert_problem(r, 504, "gateway-timeout")
    assert gateway.calls[LEAD_AGENT] == 1


async def test_gateway_circuit_opens_fails_fast_probes_and_closes(make_client, seed, auth, gateway):
    clock = Clock()
    # CIRCUIT_FAILURE_THRESHOLD, the older setting, still reads as the minimum number of calls.
    settings = make_settings(circuit_failure_threshold=3, circuit_reset_seconds=30, circuit_half_open_probes=1, upstream_retries=0)
    async with make_client(settings=settings, clock=clock) as client:
        gateway.default = "error_500"
        for _ in range(3):
            assert_problem(await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth), 502, "gateway-error")
        fast = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
        body = assert_problem(fast, 503, "gateway-circuit-open")
        assert fast.headers["retry-after"] == "30" and gateway.calls[LEAD_AGENT] == 3  # failed fast: no call
        assert body["detail"].startswith("3 of the last 3 calls to the Conductor Gateway within 60 s failed")
        health = decode(await client.get("/api/v1/ai/health"))
        assert health["circuits"]["conductor-gateway"] == "open" and health["status"] == "degraded"
        metrics = (await client.get("/metrics")).text
        assert 'crm_ai_circuit_state{upstream="conductor-gateway"} 2.0' in metrics
        clock.now += 31  # cool-down over: one probe goes through, and the gateway has recovered
        gateway.default = "json"
        probe = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
        assert probe.status_code == 200
        assert decode(await client.get("/api/v1/ai/health"))["circuits"]["conductor-gateway"] == "closed"
    assert "circuit" in body["title"].lower()


async def test_stale_answer_is_served_while_the_circuit_is_open(make_client, seed, auth, gateway):
    clock = Clock()
    settings = make_settings(circuit_failure_threshold=1, circuit_reset_seconds=300, cache_ttl_deal_predict=10, upstream_retries=0)
    async with make_client(settings=settings, clock=clock) as client:
        fresh = await client.post("/api/v1/ai/deal/predict", json={"deal_id": seed["deals"][0]}, headers=auth)
        clock.now += 11
        gateway.default = "error_500"
        await client.post("/api/v1/ai/deal/predict", json={"deal_id": seed["deals"][1]}, headers=auth)  # opens the circuit
        calls = gateway.calls.total()
        stale = await client.post("/api/v1/ai/deal/predict", json={"deal_id": seed["deals"][0]}, headers=auth)
    assert stale.status_code == 200 and stale.headers["x-cache"] == "STALE" and stale.content == fresh.content
    assert gateway.calls.total() == calls


async def test_crm_circuit_opens_on_failures_but_not_on_refusals(make_client, crm, seed, auth):
    settings = make_settings(circuit_failure_threshold=2, upstream_retries=0)
    async with make_client(settings=settings) as client:
        for _ in range(3):  # 403s are the backend working: they never open the circuit
            await client.post(QUALIFY, json={"lead_id": seed["bobs_lead"]}, headers=auth)
        crm.fail_status = 500
        for _ in range(3):  # 3 of 6 calls: the 50 % that opens it (the refusals count as successes)
            assert_problem(await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth), 502, "crm-unavailable")
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert "3 of the last 6 calls to the CRM backend" in assert_problem(r, 503, "crm-circuit-open")["detail"]
    assert int(r.headers["retry-after"]) > 0 and crm.calls.total() == 6


async def test_bulkhead_bounds_calls_in_flight(make_client, seed, crm, auth, gateway):
    gateway.gate = asyncio.Event()
    leads = [crm.add_lead(seed["alice"], name=f"Lead {i}") for i in range(3)]
    settings = make_settings(gateway_max_concurrency=2, gateway_queue_timeout=0.2)
    async with make_client(settings=settings) as client:
        held = [asyncio.create_task(client.post(QUALIFY, json={"lead_id": lead}, headers=auth)) for lead in leads[:2]]
        await gateway.calls.reach(2)
        health = decode(await client.get("/api/v1/ai/health"))
        excess = await client.post(QUALIFY, json={"lead_id": leads[2]}, headers=auth)
        gateway.gate.set()
        done = await asyncio.gather(*held)
    assert health["gateway_calls_in_flight"] == 2
    body = assert_problem(excess, 503, "gateway-busy")
    assert "GATEWAY_MAX_CONCURRENCY" in body["detail"] and excess.headers["retry-after"]
    assert [r.status_code for r in done] == [200, 200] and gateway.calls[LEAD_AGENT] == 2


async def test_crm_connect_failures_are_retried(make_client, seed, auth):
    import httpx

    attempts = []

    def refuse_twice(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        if len(attempts) <= 2:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(404, json={"detail": "Lead not found"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse_twice), base_url="http://crm.test") as backend, \
            make_client(crm_http=backend) as client:
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert_problem(r, 404, "not-found")
    assert len(attempts) == 3


async def test_settings_reject_a_malformed_rate():
    from adapter.settings import ConfigError, Settings

    with pytest.raises(ConfigError, match="RATE_LIMIT_LEAD_QUALIFY"):
        Settings.from_env({"RATE_LIMIT_LEAD_QUALIFY": "lots"})


# --- the circuit breaker's window (issue 27: it opened on consecutive failures, per replica) -------

def _drive(breaker: CircuitBreaker, clock: Clock, *, calls: int, fail: float, every: float, seed: int) -> int:
    """`calls` calls `every` seconds apart, each failing with probability `fail`; how many the circuit refused."""
    rng, refused = random.Random(seed), 0
    for _ in range(calls):
        clock.now += every
        if not breaker.admit():
            refused += 1
            continue
        (breaker.failed if rng.random() < fail else breaker.succeeded)()
    return refused


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("every", [0.01, 1.0])  # 6,000 and 60 calls in a window
def test_twenty_percent_random_failures_never_open_the_circuit(seed, every):
    # 20,000 calls with the default settings: consecutive failures (5 in a row) happened about 5 times.
    clock = Clock()
    breaker = CircuitBreaker.of("conductor-gateway", Settings.from_env({}), clock)
    assert _drive(breaker, clock, calls=20_000, fail=0.2, every=every, seed=seed) == 0
    assert breaker.state == "closed"


def test_a_high_failure_ratio_opens_the_circuit_once_the_window_holds_enough_calls():
    clock = Clock()
    breaker = CircuitBreaker("crm-backend", min_calls=20, ratio=0.5, window=60, reset=30, probes=3, clock=clock)
    for _ in range(19):  # every call failed, but too few calls to judge
        clock.now += 1
        breaker.failed()
    assert breaker.state == "closed"
    clock.now += 61  # they leave the window: the count starts again
    for _ in range(10):
        clock.now += 0.5
        breaker.succeeded()
    for _ in range(9):
        clock.now += 0.5
        breaker.failed()
    assert breaker.state == "closed" and (breaker.calls, breaker.failures) == (19, 9)
    breaker.failed()  # 10 of 20: the ratio reached with the minimum number of calls
    assert breaker.state == "open" and not breaker.admit() and breaker.retry_after() == 30
    assert breaker.describe("CRM backend").startswith("10 of the last 20 calls to the CRM backend within 60 s failed")


def test_sixty_percent_random_failures_open_the_circuit():
    clock = Clock()
    breaker = CircuitBreaker.of("conductor-gateway", Settings.from_env({}), clock)
    assert _drive(breaker, clock, calls=200, fail=0.6, every=0.1, seed=7) > 0


def test_half_open_lets_n_probes_through_and_closes_after_n_successes():
    clock = Clock()
    breaker = CircuitBreaker("conductor-gateway", min_calls=4, ratio=0.5, window=60, reset=30, probes=3, clock=clock)
    for _ in range(4):
        breaker.failed()
    assert breaker.state == "open"
    clock.now += 30
    assert breaker.state == "half_open"
    assert [breaker.admit() for _ in range(4)] == [True, True, True, False]  # three probes at a time, no more
    breaker.released()  # a probe that ended without a verdict gives its place back
    assert breaker.admit() and not breaker.admit()
    breaker.succeeded()
    breaker.succeeded()
    assert breaker.state == "half_open" and not breaker.admit()  # two successes, one probe still out
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.admit() and (breaker.calls, breaker.failures) == (0, 0)


def test_a_failed_probe_opens_the_circuit_for_another_cool_down():
    clock = Clock()
    breaker = CircuitBreaker("conductor-gateway", min_calls=2, ratio=0.5, window=60, reset=30, probes=3, clock=clock)
    breaker.failed()
    breaker.failed()
    clock.now += 30
    assert breaker.admit() and breaker.admit()
    breaker.succeeded()
    breaker.failed()
    assert breaker.state == "open" and breaker.retry_after() == 30
    breaker.succeeded()  # the other probe's late success changes nothing
    clock.now += 29
    assert breaker.state == "open" and not breaker.admit()
    clock.now += 1
    assert [breaker.admit() for _ in range(4)] == [True, True, True, False]  # a fresh set of probes


def test_the_circuit_settings_and_the_older_threshold():
    assert Settings.from_env({}).circuit_breaker_min_calls == 20
    assert Settings.from_env({"CIRCUIT_FAILURE_THRESHOLD": "5"}).circuit_breaker_min_calls == 5
    assert Settings.from_env({"CIRCUIT_FAILURE_THRESHOLD": "5", "CIRCUIT_MIN_CALLS": "50"}).circuit_breaker_min_calls == 50
