"""Threads (issue 25): conversations about one CRM record whose history lives in the Conductor."""

from __future__ import annotations

import asyncio
import re

import hashlib

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from adapter.doubles.crm import CrmDouble
from adapter.doubles.gateway import GatewayDouble
from adapter.pipeline.threads import FIRST_TURN
from adapter.storage.keys import CacheKey
from tests.helpers import RedisProcess, assert_problem, decode, make_settings, sse_events

THREADS = "/api/v1/ai/threads"
EMAIL_AGENT = "EmailAssistant_CRM_Agent"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


async def start_thread(client: httpx.AsyncClient, auth: dict, lead_id: str, **options: str) -> dict:
    response = await client.post(THREADS, json={"task": "email.generate", "input": {"lead_id": lead_id, **options}},
                                 headers=auth)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"{THREADS}/{response.json()['thread_id']}"
    return response.json()


async def continue_thread(client: httpx.AsyncClient, auth: dict, thread_id: str, message: str) -> httpx.Response:
    return await client.post(f"{THREADS}/{thread_id}/turns", json={"message": message}, headers=auth)


def stored(gateway: GatewayDouble, thread_id: str) -> list[dict]:
    return gateway.conversations.docs[thread_id]["messages"]


async def test_a_three_turn_email_thread_replays_the_earlier_turns_to_the_model(client, auth, seed, gateway) -> None:
    lead = seed["leads"][0]
    thread = await start_thread(client, auth, lead, context="follow-up after the demo", tone="casual")
    thread_id = thread["thread_id"]
    assert UUID4.fullmatch(thread_id)
    assert thread["task"] == "email.generate" and thread["record"] == {"kind": "lead", "id": lead}
    assert thread["input"] == {"lead_id": lead, "context": "follow-up after the demo", "tone": "casual"}
    first = thread["turns"][0]
    assert first["message"] is None and len(first["result"]["variations"]) == 3 and first["result"]["lead_id"] == lead
    assert first["agent_version"] and first["warnings"] == []

    second = await continue_thread(client, auth, thread_id, "make the casual one shorter")
    assert second.status_code == 201, second.text
    third = await continue_thread(client, auth, thread_id, "now in Portuguese")
    assert third.status_code == 201, third.text
    assert third.json()["message"] == "now in Portuguese"

    # What the gateway double received: each run named the conversation and got every earlier turn replayed.
    runs = [r for r in gateway.runs if r["conversation_id"] == thread_id]
    assert [len(r["history"]) for r in runs] == [0, 1, 2]
    assert not any(r["saved"] for r in runs)  # save_to_conversation is never used
    history = runs[2]["history"]
    assert history[0][0] == FIRST_TURN and msgspec.json.decode(history[0][1]) == first["result"]
    assert history[1][0] == "make the casual one shorter"
    assert msgspec.json.decode(history[1][1]) == second.json()["result"]
    # The follow-up reaches the model in a block of its own, with the thread's request in the conversation context.
    assert '<follow_up>\n{"message":"now in Portuguese"}\n</follow_up>' in runs[2]["input"]
    assert '"tone":"casual"' in runs[2]["context"] and "<crm_record>" in runs[2]["input"]

    read = await client.get(f"{THREADS}/{thread_id}", headers=auth)
    assert read.status_code == 200
    turns = read.json()["turns"]
    assert [t["message"] for t in turns] == [None, "make the casual one shorter", "now in Portuguese"]
    assert [t["turn_id"] for t in turns] == [first["turn_id"], second.json()["turn_id"], third.json()["turn_id"]]


async def test_every_thread_route_refuses_another_users_bearer(client, auth, seed, crm, gateway) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    before = sum(gateway.calls.values()), len(stored(gateway, thread_id))
    # Bob may read the record too now: the thread is still Alice's alone.
    crm.leads[seed["leads"][0]]["owner_id"] = seed["bob"]
    bob = {"Authorization": f"Bearer {seed['bob_token']}"}
    for response in (await client.get(f"{THREADS}/{thread_id}", headers=bob),
                     await continue_thread(client, bob, thread_id, "shorter"),
                     await client.post(f"{THREADS}/{thread_id}/turns/stream", json={"message": "shorter"}, headers=bob),
                     await client.delete(f"{THREADS}/{thread_id}", headers=bob)):
        body = assert_problem(response, 403, "forbidden")
        assert "another user" in body["detail"]
    listed = await client.get(THREADS, params={"lead_id": seed["leads"][0]}, headers=bob)
    assert listed.status_code == 200 and listed.json() == {"threads": [], "next_cursor": None}
    assert (sum(gateway.calls.values()), len(stored(gateway, thread_id))) == before
    assert not gateway.conversations.docs[thread_id].get("isDeleted")


async def test_a_record_the_crm_stops_sharing_ends_the_threads_access(client, auth, seed, crm, gateway) -> None:
    lead = seed["leads"][0]
    thread_id = (await start_thread(client, auth, lead))["thread_id"]
    calls, messages = sum(gateway.calls.values()), len(stored(gateway, thread_id))
    crm.leads[lead]["owner_id"] = seed["bob"]  # the CRM no longer lets Alice read the lead
    for response in (await client.get(f"{THREADS}/{thread_id}", headers=auth),
                     await continue_thread(client, auth, thread_id, "shorter"),
                     await client.get(THREADS, params={"lead_id": lead}, headers=auth),
                     await client.delete(f"{THREADS}/{thread_id}", headers=auth)):
        body = assert_problem(response, 403, "forbidden")
        assert body["detail"] == "Not authorized to access this lead"  # the CRM's own words
    assert (sum(gateway.calls.values()), len(stored(gateway, thread_id))) == (calls, messages)
    assert not gateway.conversations.docs[thread_id].get("isDeleted")
    del crm.leads[lead]
    assert_problem(await client.get(f"{THREADS}/{thread_id}", headers=auth), 404, "not-found")


async def test_a_double_click_makes_one_turn(client, auth, seed, gateway) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    calls = gateway.calls[EMAIL_AGENT]
    gateway.gate = asyncio.Event()
    clicks = [asyncio.create_task(continue_thread(client, auth, thread_id, "shorter")) for _ in range(2)]
    await gateway.calls.reach(sum(gateway.calls.values()) + 1)
    gateway.gate.set()
    first, second = await asyncio.gather(*clicks)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert gateway.calls[EMAIL_AGENT] == calls + 1
    turns = (await client.get(f"{THREADS}/{thread_id}", headers=auth)).json()["turns"]
    assert [t["message"] for t in turns] == [None, "shorter"]


async def test_a_different_message_waits_for_the_turn_in_flight_and_sees_it(client, auth, seed, gateway) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    gateway.gate = asyncio.Event()
    shorter = asyncio.create_task(continue_thread(client, auth, thread_id, "shorter"))
    await gateway.calls.reach(sum(gateway.calls.values()) + 1)
    formal = asyncio.create_task(continue_thread(client, auth, thread_id, "more formal"))
    gateway.gate.set()
    assert (await shorter).status_code == (await formal).status_code == 201
    runs = [r for r in gateway.runs if r["conversation_id"] == thread_id]
    assert [len(r["history"]) for r in runs] == [0, 1, 2]
    assert runs[2]["history"][1][0] == "shorter"


async def test_an_invalid_answer_after_repair_leaves_the_thread_unchanged(client, auth, seed, gateway) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    before = [dict(m) for m in stored(gateway, thread_id)]
    runs = len(gateway.runs)
    gateway.push(EMAIL_AGENT, "garbage", "garbage")
    assert_problem(await continue_thread(client, auth, thread_id, "shorter"), 502, "invalid-agent-output")
    assert stored(gateway, thread_id) == before
    # The turn's run named the conversation; its repair did not (nothing it says can be replayed).
    turn_run, repair_run = gateway.runs[runs:]
    assert turn_run["conversation_id"] == thread_id and repair_run["conversation_id"] != thread_id
    assert "previous_answer" in repair_run["input"]
    # A repaired answer is kept as the turn: the repaired one, never the broken one.
    gateway.push(EMAIL_AGENT, "garbage")
    repaired = await continue_thread(client, auth, thread_id, "shorter")
    assert repaired.status_code == 201, repaired.text
    assert [m["type"] for m in stored(gateway, thread_id)] == ["user", "bot", "user", "bot"]
    assert "could not analyse" not in stored(gateway, thread_id)[-1]["content"]


async def test_a_thread_whose_first_answer_fails_is_not_kept(client, auth, seed, gateway) -> None:
    gateway.push(EMAIL_AGENT, "garbage", "garbage")
    response = await client.post(THREADS, json={"task": "email.generate", "input": {"lead_id": seed["leads"][0]}},
                                 headers=auth)
    assert_problem(response, 502, "invalid-agent-output")
    (doc,) = gateway.conversations.docs.values()
    assert doc["isDeleted"] is True and doc["messages"] == []
    listed = await client.get(THREADS, params={"lead_id": seed["leads"][0]}, headers=auth)
    assert listed.json()["threads"] == []


async def test_thread_max_turns_bounds_a_thread(make_client, auth, seed, gateway) -> None:
    async with make_client(settings=make_settings(thread_max_turns=2)) as client:
        thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
        assert (await continue_thread(client, auth, thread_id, "shorter")).status_code == 201
        calls = sum(gateway.calls.values())
        body = assert_problem(await continue_thread(client, auth, thread_id, "shorter still"), 409, "thread-full")
        assert "THREAD_MAX_TURNS" in body["detail"]
        assert sum(gateway.calls.values()) == calls


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"message": ""}, "message", "empty"),
    ({"message": "  \n "}, "message", "empty"),
    ({"message": "x" * 2001}, "message", "at most 2000"),
    ({"message": "shorter\x07please"}, "message", "U+0007"),
    ({"message": "shorter\x9b"}, "message", "U+009B"),
    ({}, "message", "missing"),
    ({"message": "ok", "tone": "casual"}, "tone", "unknown"),
    ({"message": 5}, "message", "Expected `str`"),
])
async def test_bad_messages_are_400_naming_the_field(client, auth, seed, gateway, body, field, words) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    calls = sum(gateway.calls.values())
    problem = assert_problem(await client.post(f"{THREADS}/{thread_id}/turns", json=body, headers=auth), 400,
                             "invalid-request")
    assert problem["errors"][0]["field"] == field and words in problem["detail"]
    assert sum(gateway.calls.values()) == calls


async def test_a_message_with_line_breaks_and_tabs_is_text(client, auth, seed) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    response = await continue_thread(client, auth, thread_id, "shorter,\n\tplease\r\n")
    assert response.status_code == 201 and response.json()["message"] == "shorter,\n\tplease\r\n"


async def test_only_tasks_with_threads_start_one_and_bad_input_names_its_field(client, auth, seed) -> None:
    response = await client.post(THREADS, json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][0]}}, headers=auth)
    assert assert_problem(response, 400, "invalid-request")["errors"][0]["field"] == "task"
    response = await client.post(THREADS, json={"task": "email.generate", "input": {"lead_id": seed["leads"][0],
                                                                                      "tone": "rude"}}, headers=auth)
    assert assert_problem(response, 400, "invalid-request")["errors"][0]["field"] == "input.tone"


async def test_a_deal_thread(client, auth, seed, gateway) -> None:
    deal = seed["deals"][0]
    response = await client.post(THREADS, json={"task": "deal.predict", "input": {"deal_id": deal}}, headers=auth)
    assert response.status_code == 201, response.text
    thread_id = response.json()["thread_id"]
    turn = await continue_thread(client, auth, thread_id, "assume the champion leaves")
    assert turn.status_code == 201 and turn.json()["result"]["deal_id"] == deal
    listed = (await client.get(THREADS, params={"deal_id": deal}, headers=auth)).json()["threads"]
    assert [(t["thread_id"], t["task"], t["turn_count"]) for t in listed] == [(thread_id, "deal.predict", 2)]


async def test_thread_ids_are_unguessable_and_only_their_shape_is_looked_up(client, auth, seed, gateway) -> None:
    ids = {(await start_thread(client, auth, seed["leads"][0]))["thread_id"] for _ in range(3)}
    assert len(ids) == 3 and all(UUID4.fullmatch(i) for i in ids)
    calls = len(gateway.conversation_calls)
    for wrong in ("1", "crm-ai-thread", "00000000-0000-0000-0000-000000000000", "6B1F7C1E-8D3A-4C55-9E0A-2F4B6C8D0E1F"):
        assert_problem(await client.get(f"{THREADS}/{wrong}", headers=auth), 404, "not-found")
    assert len(gateway.conversation_calls) == calls  # none reached the gateway
    assert_problem(await client.get(f"{THREADS}/6b1f7c1e-8d3a-4c55-9e0a-2f4b6c8d0e1f", headers=auth), 404, "not-found")


async def test_a_conversation_that_is_no_thread_is_not_found(client, auth, gateway) -> None:
    other = gateway.conversations.create({"title": "Lead 42: outreach", "screenplay_id": "crm-lead-42"})
    assert_problem(await client.get(f"{THREADS}/{other['conversation_id']}", headers=auth), 404, "not-found")


async def test_lists_are_the_callers_newest_first_a_page_at_a_time(client, auth, seed, crm, gateway) -> None:
    lead = seed["leads"][0]
    made = [(await start_thread(client, auth, lead))["thread_id"] for _ in range(3)]
    # Another lead's thread, and a thread another user made about this lead (once the CRM shared it with them).
    await start_thread(client, auth, seed["leads"][1])
    crm.leads[lead]["owner_id"] = seed["bob"]
    bobs = await start_thread(client, {"Authorization": f"Bearer {seed['bob_token']}"}, lead)
    crm.leads[lead]["owner_id"] = seed["alice"]

    page = (await client.get(THREADS, params={"lead_id": lead, "limit": 2}, headers=auth)).json()
    assert [t["thread_id"] for t in page["threads"]] == made[:0:-1]
    assert page["next_cursor"]
    rest = (await client.get(THREADS, params={"lead_id": lead, "limit": 2, "cursor": page["next_cursor"]},
                             headers=auth)).json()
    assert [t["thread_id"] for t in rest["threads"]] == made[:1] and rest["next_cursor"] is None
    assert bobs["thread_id"] not in {t["thread_id"] for t in page["threads"] + rest["threads"]}
    # The gateway itself lists every conversation: it has no owner filter.
    everything = (await client.get(THREADS, params={"lead_id": lead, "limit": 100}, headers=auth)).json()["threads"]
    assert len(everything) == 3 and len(gateway.conversations.docs) == 5

    bad = await client.get(THREADS, params={"lead_id": lead, "cursor": "not-a-cursor"}, headers=auth)
    assert assert_problem(bad, 400, "invalid-request")["errors"][0]["field"] == "cursor"
    both = await client.get(THREADS, params={"lead_id": lead, "deal_id": seed["deals"][0]}, headers=auth)
    assert_problem(both, 400, "invalid-request")
    assert_problem(await client.get(THREADS, headers=auth), 400, "invalid-request")
    assert_problem(await client.get(THREADS, params={"lead_id": "x"}, headers=auth), 400, "invalid-request")


async def test_delete_deletes_in_the_conductor_too(client, auth, seed, gateway) -> None:
    lead = seed["leads"][0]
    thread_id = (await start_thread(client, auth, lead))["thread_id"]
    response = await client.delete(f"{THREADS}/{thread_id}", headers=auth)
    assert response.status_code == 204
    doc = gateway.conversations.docs[thread_id]
    assert doc["isDeleted"] is True and doc["title"].startswith("crm-ai deleted ")
    assert ("DELETE", "/api/conversations/{id}") in gateway.conversation_calls
    # The gateway's GET still reads it (its delete is soft); the sidecar does not.
    assert_problem(await client.get(f"{THREADS}/{thread_id}", headers=auth), 404, "not-found")
    assert_problem(await continue_thread(client, auth, thread_id, "shorter"), 404, "not-found")
    assert (await client.get(THREADS, params={"lead_id": lead}, headers=auth)).json()["threads"] == []
    assert_problem(await client.delete(f"{THREADS}/{thread_id}", headers=auth), 404, "not-found")


async def test_a_delete_that_stopped_after_its_tombstone_finishes_when_asked_again(client, auth, seed, gateway) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    doc = gateway.conversations.docs[thread_id]
    doc["title"] = doc["title"].replace("crm-ai thread ", "crm-ai deleted ")  # the tombstone landed, the DELETE did not
    assert not doc.get("isDeleted")
    assert (await client.delete(f"{THREADS}/{thread_id}", headers=auth)).status_code == 204
    assert doc["isDeleted"] is True


async def test_a_turn_the_conductor_cannot_store_is_no_turn(client, auth, seed, gateway) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    gateway.fail_messages = True
    assert_problem(await continue_thread(client, auth, thread_id, "shorter"), 502, "gateway-error")
    gateway.fail_messages = False
    assert len((await client.get(f"{THREADS}/{thread_id}", headers=auth)).json()["turns"]) == 1


async def test_turns_are_never_cached_and_spend_the_users_rate_limit(make_client, auth, seed, gateway) -> None:
    async with make_client(settings=make_settings(rate_limit_email_generate="2/3600")) as client:
        thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
        assert (await continue_thread(client, auth, thread_id, "shorter")).status_code == 201
        assert_problem(await continue_thread(client, auth, thread_id, "shorter"), 429, "rate-limited")
        assert gateway.calls[EMAIL_AGENT] == 2


async def test_the_one_shot_routes_keep_fresh_conversations(client, auth, seed, gateway) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    await continue_thread(client, auth, thread_id, "shorter")
    response = await client.post("/api/v1/ai/email/generate", json={"lead_id": seed["leads"][0]}, headers=auth)
    assert response.status_code == 200 and response.headers["x-cache"] == "MISS"  # no turn reached the cache
    assert gateway.runs[-1]["conversation_id"].startswith("crm-ai-") and gateway.runs[-1]["history"] == []


async def test_a_restart_of_the_sidecar_and_of_redis_loses_no_turn(make_client, auth, seed, gateway) -> None:
    redis = RedisProcess()
    redis.start()
    try:
        settings = make_settings(redis_url=redis.url)
        async with make_client(settings=settings) as client:
            thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
            assert (await continue_thread(client, auth, thread_id, "shorter")).status_code == 201
        redis.stop()
        redis.start()  # empty: it keeps nothing on disk
        async with make_client(settings=settings) as client:
            listed = (await client.get(THREADS, params={"lead_id": seed["leads"][0]}, headers=auth)).json()["threads"]
            assert [(t["thread_id"], t["turn_count"]) for t in listed] == [(thread_id, 2)]
            assert [t["message"] for t in (await client.get(f"{THREADS}/{thread_id}", headers=auth)).json()["turns"]] == [
                None, "shorter"]
            assert (await continue_thread(client, auth, thread_id, "more formal")).status_code == 201
        assert len(gateway.runs[-1]["history"]) == 2
    finally:
        redis.stop()


async def test_a_double_click_on_two_replicas_makes_one_turn(make_client, auth, seed, gateway, redis_url, cache_prefix) -> None:
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix)
    async with make_client(settings=settings) as one, make_client(settings=settings) as two:
        thread_id = (await start_thread(one, auth, seed["leads"][0]))["thread_id"]
        calls = gateway.calls[EMAIL_AGENT]
        gateway.gate = asyncio.Event()
        first = asyncio.create_task(continue_thread(one, auth, thread_id, "shorter"))
        await gateway.calls.reach(sum(gateway.calls.values()) + 1)
        second = asyncio.create_task(continue_thread(two, auth, thread_id, "shorter"))
        await following(redis_url, cache_prefix, thread_id)
        gateway.gate.set()
        a, b = await asyncio.gather(first, second)
        assert a.status_code == b.status_code == 201 and a.json() == b.json()
        assert gateway.calls[EMAIL_AGENT] == calls + 1


async def following(redis_url: str, prefix: str, thread_id: str, deadline: float = 10.0) -> None:
    """Until a replica follows the thread's turn lock (subscribed to its outcome), within a deadline."""
    digest = hashlib.sha256(f"thread-turn\0{thread_id}".encode()).hexdigest()[:40]
    channel = CacheKey(prefix, "thread", digest).channel  # rendered as the store renders it (hash-tagged, issue 24)
    async with aioredis.from_url(redis_url) as r, asyncio.timeout(deadline):
        while not (await r.pubsub_numsub(channel))[0][1]:
            await asyncio.sleep(0.01)


# --- the gateway double's conversations, as the real Conductor has them (upstreams.md §6) ----------

async def test_the_double_saves_whatever_a_run_returned_with_save_to_conversation(gateway) -> None:
    from tests.helpers import asgi_client

    async with asgi_client(gateway.app, "http://gateway.test") as gw:
        created = await gw.post("/api/conversations/", json={"title": "Lead 42: outreach", "screenplay_id": "crm-lead-42"})
        conversation_id = created.json()["conversation_id"]
        assert UUID4.fullmatch(conversation_id)  # chosen by the Conductor
        assert (await gw.post("/api/conversations", json={})).status_code == 307
        assert (await gw.post("/api/conversations/", json={"title": "ab"})).status_code == 500
        run = {"input_text": "Write an outreach email.", "instance_id": "i-42", "conversation_id": conversation_id,
               "cwd": "/tmp", "screenplay_id": "crm-lead-42", "save_to_conversation": True, "context_mode": "stateless"}
        gateway.push(EMAIL_AGENT, "run_failed")
        assert (await gw.post(f"/api/agents/{EMAIL_AGENT}/execute", json=run)).json()["status"] == "error"
        # The failed run was saved, and the next run (stateless or not) gets it replayed.
        assert (await gw.post(f"/api/agents/{EMAIL_AGENT}/execute", json={**run, "input_text": "Again."})).status_code == 200
        assert gateway.runs[-1]["history"] == [("Write an outreach email.",
                                                "Error: claude exited with code 1: rate limit exceeded")]
        messages = (await gw.get(f"/api/conversations/{conversation_id}/messages")).json()
        assert [(m["type"], m.get("status")) for m in messages["messages"]] == [
            ("user", None), ("bot", "error"), ("user", None), ("bot", "completed")]
        assert (await gw.get(f"/api/conversations/{conversation_id}/messages", params={"limit": 0})).status_code == 422
        unknown = await gw.get("/api/conversations/6b1f7c1e-8d3a-4c55-9e0a-2f4b6c8d0e1f/messages")
        assert unknown.status_code == 200 and unknown.json()["total"] == 0
        # POST .../messages: a bot message needs agent_info; nothing to add is a 400; no name, a 422.
        assert (await gw.post(f"/api/conversations/{conversation_id}/messages", json={"agent_response": "x"})).status_code == 400
        bad = {"agent_response": "x", "agent_info": {"agent_id": EMAIL_AGENT, "instance_id": "i"}}
        assert (await gw.post(f"/api/conversations/{conversation_id}/messages", json=bad)).status_code == 422
        # The list has no owner filter and no paging: without screenplay_id it is every conversation.
        gateway.conversations.create({"title": "someone else's", "screenplay_id": "other"})
        assert (await gw.get("/api/conversations/", params={"limit": 1})).json()["count"] == 2
        listed = (await gw.get("/api/conversations/", params={"screenplay_id": "crm-lead-42"})).json()
        assert listed["count"] == 1 and len(listed["conversations"][0]["messages"]) == 4  # whole documents
        # DELETE is soft: the list hides it, GET still reads it (nothing in it says so), a second DELETE is a 404.
        assert (await gw.delete(f"/api/conversations/{conversation_id}")).json()["instances_deleted"] == 1
        assert (await gw.get("/api/conversations/", params={"screenplay_id": "crm-lead-42"})).json()["count"] == 0
        read = (await gw.get(f"/api/conversations/{conversation_id}")).json()
        assert len(read["messages"]) == 4 and "isDeleted" not in read
        assert (await gw.delete(f"/api/conversations/{conversation_id}")).status_code == 404


async def test_the_doubles_stream_replays_the_history_and_never_saves(client, auth, seed, gateway) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    from tests.helpers import asgi_client

    async with asgi_client(gateway.app, "http://gateway.test") as gw:
        started = await gw.post("/api/v1/stream-execute", json={
            "agent_id": EMAIL_AGENT, "input": "shorter", "conversation_id": thread_id, "instance_id": "i", "cwd": "/tmp",
            "screenplay_id": "s"})
        async with gw.stream("GET", started.json()["stream_url"]) as events:
            assert "result" in (await events.aread()).decode()
    assert len(gateway.runs[-1]["history"]) == 1 and not gateway.runs[-1]["saved"]
    assert len(stored(gateway, thread_id)) == 2


async def test_a_streamed_turn_ends_with_the_turn_as_result_then_done(client, auth, seed, gateway) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    response = await client.post(f"{THREADS}/{thread_id}/turns/stream", json={"message": "shorter"}, headers=auth)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert [name for name, _ in events][-2:] == ["result", "done"]
    assert "status" in [name for name, _ in events[:-2]]
    turn, done = events[-2][1], events[-1][1]
    assert done == {"status": "succeeded", "cached": False}
    # The turn as the non-streamed route gives it, and kept in the thread: the streamed run named the conversation.
    thread = (await client.get(f"{THREADS}/{thread_id}", headers=auth)).json()
    assert thread["turns"][-1] == turn and turn["message"] == "shorter"
    runs = [r for r in gateway.runs if r["conversation_id"] == thread_id]
    assert [len(r["history"]) for r in runs] == [0, 1]


async def test_a_streamed_turn_checks_the_thread_before_the_stream_opens(client, auth, seed, crm, gateway) -> None:
    thread_id = (await start_thread(client, auth, seed["leads"][0]))["thread_id"]
    path = f"{THREADS}/{thread_id}/turns/stream"
    assert_problem(await client.post(path, json={"message": " "}, headers=auth), 400, "invalid-request")
    before = len(stored(gateway, thread_id))
    gateway.push(EMAIL_AGENT, "garbage", "garbage")
    events = sse_events(await client.post(path, json={"message": "shorter"}, headers=auth))
    assert [name for name, _ in events][-2:] == ["error", "done"]
    assert events[-2][1]["status"] == 502 and events[-1][1]["status"] == "failed"
    assert len(stored(gateway, thread_id)) == before  # an invalid answer is no turn, streamed or not


async def test_a_double_click_on_create_makes_one_thread(client, auth, seed, gateway) -> None:
    lead = seed["leads"][0]
    gateway.gate = asyncio.Event()
    calls = sum(gateway.calls.values())
    clicks = [asyncio.create_task(client.post(THREADS, json={"task": "email.generate", "input": {"lead_id": lead}},
                                              headers=auth)) for _ in range(2)]
    await asyncio.wait_for(gateway.calls.reach(calls + 1), 10)
    gateway.gate.set()
    first, second = await asyncio.wait_for(asyncio.gather(*clicks), 10)
    assert first.status_code == second.status_code == 201
    assert first.json()["thread_id"] == second.json()["thread_id"]
    assert sum(gateway.calls.values()) == calls + 1
    listed = (await client.get(THREADS, params={"lead_id": lead}, headers=auth)).json()["threads"]
    assert [t["thread_id"] for t in listed] == [first.json()["thread_id"]]


async def test_a_double_click_on_create_on_two_replicas_makes_one_thread(make_client, auth, seed, gateway, redis_url,
                                                                          cache_prefix) -> None:
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix)
    lead = seed["leads"][0]
    body = {"task": "email.generate", "input": {"lead_id": lead}}
    async with make_client(settings=settings) as one, make_client(settings=settings) as two:
        calls = sum(gateway.calls.values())
        gateway.gate = asyncio.Event()
        first = asyncio.create_task(one.post(THREADS, json=body, headers=auth))
        await asyncio.wait_for(gateway.calls.reach(calls + 1), 10)
        second = asyncio.create_task(two.post(THREADS, json=body, headers=auth))
        await following_any(redis_url, cache_prefix)  # replica two follows replica one's creation
        gateway.gate.set()
        a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert a.status_code == b.status_code == 201 and a.json()["thread_id"] == b.json()["thread_id"]
        assert sum(gateway.calls.values()) == calls + 1
        listed = (await one.get(THREADS, params={"lead_id": lead}, headers=auth)).json()["threads"]
        assert len(listed) == 1


async def following_any(redis_url: str, prefix: str, deadline: float = 10.0) -> None:
    """Until a replica follows some flight lock under this test's prefix, within a deadline."""
    async with aioredis.from_url(redis_url) as r, asyncio.timeout(deadline):
        while True:
            channels = await r.pubsub_channels(f"{prefix}:flight:*")
            if channels and any(n for _, n in await r.pubsub_numsub(*channels)):
                return
            await asyncio.sleep(0.01)


async def test_thread_max_per_record_caps_a_users_threads_about_one_record(make_client, auth, seed, gateway) -> None:
    lead = seed["leads"][0]
    async with make_client(settings=make_settings(thread_max_per_record=2)) as client:
        first = await start_thread(client, auth, lead)
        await start_thread(client, auth, lead, tone="formal")
        calls = sum(gateway.calls.values())
        body = {"task": "email.generate", "input": {"lead_id": lead, "tone": "casual"}}
        refused = assert_problem(await client.post(THREADS, json=body, headers=auth), 409, "thread-full")
        assert "THREAD_MAX_PER_RECORD" in refused["detail"] and sum(gateway.calls.values()) == calls
        assert (await client.delete(f"{THREADS}/{first['thread_id']}", headers=auth)).status_code == 204
        assert (await client.post(THREADS, json=body, headers=auth)).status_code == 201
