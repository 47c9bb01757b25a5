"""No client state is shared between callers: a cookie one caller's answer set never goes upstream
with another caller's request, through any of the three clients the sidecar builds (issue 22 §1).

The sidecar here builds every client itself, as `adapter serve` does, and reaches both upstreams
by host name: aiohttp's cookie jar ignores cookies from IP addresses, so a jar kept between
callers never shows on `127.0.0.1`. Every answer of both upstreams sets a cookie (`CookieSetter`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from adapter.app import create_app
from tests.helpers import (QUALIFY, QUALIFY_STREAM, CookieSetter, asgi_client, make_settings, running,
                           serving_by_name)


@pytest.fixture
def alice(seed: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {seed['token']}"}


@pytest.fixture
def bob(seed: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {seed['bob_token']}"}


@asynccontextmanager
async def by_name(gateway, crm) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, CookieSetter, CookieSetter]]:
    """The sidecar with the clients it builds itself, both upstreams at `localhost`.

    Yields a client for Alice and one for Bob (each browser keeps its own cookies), the CRM and the gateway.
    """
    crm_side, gateway_side = CookieSetter(crm.app), CookieSetter(gateway.app)
    async with serving_by_name(crm_side) as crm_url, serving_by_name(gateway_side) as gateway_url:
        assert crm_url.startswith("http://localhost:") and gateway_url.startswith("http://localhost:")
        app = create_app(make_settings(crm_backend_url=crm_url, conductor_gateway_url=gateway_url))
        async with running(app) as alices, asgi_client(app, "http://sidecar.test") as bobs:
            yield alices, bobs, crm_side, gateway_side


async def test_the_pass_through_sends_each_caller_only_the_cookies_it_sent(gateway, crm, alice, bob):
    async with by_name(gateway, crm) as (alices, bobs, backend, _):
        given = await alices.get("/api/v1/leads/", headers=alice)
        bare = await bobs.get("/api/v1/leads/", headers=bob)
        own = await bobs.get("/api/v1/leads/", headers={**bob, "Cookie": "mine=1"})
    assert given.status_code == bare.status_code == own.status_code == 200
    assert given.headers.get_list("set-cookie") == ["session=set-by-answer-0; Path=/"]  # Alice's, to Alice
    assert [a.cookie for a in backend.sent_by(alice["Authorization"])] == [None]
    # Bob's requests carry his own Cookie header, untouched, and nothing an answer to Alice set.
    assert [a.cookie for a in backend.sent_by(bob["Authorization"])] == [None, "mine=1"]


async def test_record_lookups_and_write_backs_carry_no_cookie_another_callers_answer_set(gateway, crm, seed, alice, bob):
    async with by_name(gateway, crm) as (alices, bobs, backend, _):
        first = await alices.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=alice)
        second = await bobs.post(QUALIFY, json={"lead_id": seed["bobs_lead"]}, headers=bob)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-crm-write-back"] == second.headers["x-crm-write-back"] == "ok"
    # Alice's lookup and write-back were answered with cookies; Bob's lookup and write-back carry none.
    assert [a.method for a in backend.sent_by(alice["Authorization"])] == ["GET", "PATCH"]
    assert [(a.method, a.cookie) for a in backend.sent_by(bob["Authorization"])] == [("GET", None), ("PATCH", None)]
    assert [a.cookie for a in backend.arrivals] == [None] * 4


async def test_gateway_calls_carry_no_cookie_an_earlier_callers_answer_set(gateway, crm, seed, alice, bob):
    async with by_name(gateway, crm) as (alices, bobs, _, gateway_side):
        first = await alices.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=alice)
        before = len(gateway_side.arrivals)
        streamed = await bobs.post(QUALIFY_STREAM, json={"lead_id": seed["bobs_lead"]}, headers=bob)
    assert first.status_code == streamed.status_code == 200 and "event: done" in streamed.text
    # Alice's run was answered with cookies (the run, its instance's clean-up); Bob's streamed run came after.
    assert before >= 1 and len(gateway_side.arrivals) > before
    assert [a.cookie for a in gateway_side.arrivals] == [None] * len(gateway_side.arrivals)
