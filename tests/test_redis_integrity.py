"""What comes back from Redis is checked before it is served (issue 22, finding 3).

An outsider who can write to Redis edits, moves or forges what the sidecar stored there: cache
entries, single-flight outcomes, job logs. Each test plays that outsider with a plain Redis
client, knowing the key layout but not REDIS_SIGNING_KEY, and checks that nothing they wrote
reaches a user.
"""

from __future__ import annotations

import asyncio
import socket

import msgspec
import pytest
import redis as redis_sync
from httpx_sse import aconnect_sse
from structlog.testing import capture_logs

from adapter.storage.memory import MemoryStore
from adapter.storage.store import Entry
from adapter.storage.keys import CacheKey
from tests.helpers import (LEAD_AGENT, QUALIFY, assert_problem, decode, job_done, make_settings, metric, replica_pair,
                           run_adapter_async)

pytestmark = pytest.mark.redis

FORGED = {"score": 1, "injected": "yes", "summary": '<img src=x onerror="alert(document.cookie)">'}
KEY_1, KEY_2 = "signing-key-one-" + "1" * 24, "signing-key-two-" + "2" * 24


def forged_json(body: bytes) -> bytes:
    """The stored answer as the outsider rewrites it: score 1, an extra field, markup."""
    return msgspec.json.encode({**msgspec.json.decode(body), **FORGED})


def body_start(raw: bytes) -> int:
    """Where the JSON body starts in a stored cache value, whatever the release put before it (a stamp,
    a signature: bytes that may hold a `{` themselves)."""
    at = -1
    while (at := raw.index(b"{", at + 1)) >= 0:
        try:
            msgspec.json.decode(raw[at:])
            return at
        except msgspec.DecodeError:
            continue
    raise AssertionError("no JSON body")


def edit_body(raw: bytes) -> bytes:
    """A stored cache value with its JSON body rewritten and everything before the body kept as it was."""
    start = body_start(raw)
    return raw[:start] + forged_json(raw[start:])


def assert_not_forged(content: bytes | str) -> None:
    text = content if isinstance(content, str) else content.decode()
    assert "<img" not in text and "injected" not in text, text


def tampered_lines(logs: list[dict]) -> list[dict]:
    lines = [line for line in logs if line["event"] == "cache.tampered"]
    for line in lines:  # the key and why, never the value
        assert "<img" not in repr(line) and "injected" not in repr(line), line
    return lines


async def qualify(client, lead: str, auth: dict):
    return await client.post(QUALIFY, json={"lead_id": lead}, headers=auth)


def result_keys(r: redis_sync.Redis, prefix: str) -> set[bytes]:
    return set(r.scan_iter(f"{prefix}:result:*"))


# --- cache entries ------------------------------------------------------------------------------

async def test_an_edited_cache_entry_is_a_miss_never_served_and_reported_once(make_client, seed, auth, gateway,
                                                                               redis_url, cache_prefix):
    lead = seed["leads"][0]
    with redis_sync.Redis.from_url(redis_url) as r:
        async with make_client(settings=make_settings(redis_url=redis_url, cache_prefix=cache_prefix)) as client:
            first = await qualify(client, lead, auth)
            [key] = result_keys(r, cache_prefix)
            r.set(key, edit_body(r.get(key)), keepttl=True)  # the reproduction
            gateway.push(LEAD_AGENT, "run_failed")  # the model fails once: a stale answer would be served now
            with capture_logs() as logs:
                failed = await qualify(client, lead, auth)
                again = await qualify(client, lead, auth)  # the same edited entry, read again
            hit = await qualify(client, lead, auth)
            exposition = (await client.get("/metrics")).text
    assert first.headers["x-cache"] == "MISS"
    assert_problem(failed, 502, "agent-failed")  # not the edited entry as a stale answer
    assert_not_forged(failed.content)
    assert again.status_code == 200 and again.headers["x-cache"] == "MISS", again.text
    assert_not_forged(again.content)
    assert decode(again)["score"] == decode(first)["score"] and set(decode(again)) == set(decode(first))
    assert gateway.calls[LEAD_AGENT] == 3  # first, the failed run, and the answer that replaced the edited entry
    [line] = tampered_lines(logs)  # once for the entry, though it was read twice
    assert line["key"] == key.decode() and line["kind"] == "cache" and line["reason"] == "bad-signature"
    assert metric(exposition, "crm_ai_cache_tampered_total", kind="cache") == 1
    # The answer that replaced it is signed: it hits.
    assert hit.headers["x-cache"] == "HIT" and hit.content == again.content


async def test_an_entry_moved_under_another_records_key_is_a_miss(make_client, seed, auth, gateway, redis_url, cache_prefix):
    mine, other = seed["leads"][0], seed["leads"][1]
    with redis_sync.Redis.from_url(redis_url) as r:
        async with make_client(settings=make_settings(redis_url=redis_url, cache_prefix=cache_prefix)) as client:
            await qualify(client, mine, auth)
            [mine_key] = result_keys(r, cache_prefix)
            await qualify(client, other, auth)
            [other_key] = result_keys(r, cache_prefix) - {mine_key}
            r.set(other_key, r.get(mine_key), keepttl=True)  # a valid entry, copied under another record's key
            with capture_logs() as logs:
                moved = await qualify(client, other, auth)
    assert moved.headers["x-cache"] == "MISS" and decode(moved)["lead_id"] == other, moved.text
    assert gateway.calls[LEAD_AGENT] == 3
    [line] = tampered_lines(logs)
    assert line["key"] == other_key.decode() and line["reason"] == "bad-signature"


async def test_an_unsigned_entry_or_one_that_is_no_answer_of_its_task_is_a_miss(make_client, seed, auth, gateway,
                                                                                redis_url, cache_prefix):
    """What an older release stored (a stamp and the body, no signature) is never served either."""
    lead = seed["leads"][0]
    with redis_sync.Redis.from_url(redis_url) as r:
        async with make_client(settings=make_settings(redis_url=redis_url, cache_prefix=cache_prefix)) as client:
            first = await qualify(client, lead, auth)
            [key] = result_keys(r, cache_prefix)
            stored = r.get(key)
            stamp_and_body = stored[body_start(stored) - 8:]  # as the release before signing stored it
            r.set(key, stamp_and_body[:8] + forged_json(stamp_and_body[8:]), keepttl=True)
            with capture_logs() as logs:
                unsigned = await qualify(client, lead, auth)
    assert unsigned.headers["x-cache"] == "MISS" and decode(unsigned) == decode(first)
    [line] = tampered_lines(logs)
    assert line["reason"] == "unsigned" and gateway.calls[LEAD_AGENT] == 2


async def test_a_body_that_is_not_exactly_a_result_of_its_task_is_a_miss(make_client, seed, auth, gateway):
    """The result struct is the last check, on every store: the in-memory one here, where nobody else
    writes, with an answer of another shape (an extra field, as an older or newer release may store)."""
    lead = seed["leads"][0]
    store = MemoryStore(max_entries=10)
    async with make_client(store=store) as client:
        first = await qualify(client, lead, auth)
        [key] = list(store._data)  # noqa: SLF001 - the test's own store
        entry = await store.get(key)
        await store.put(key, Entry(entry.stored_at, forged_json(entry.body)), 3600)
        with capture_logs() as logs:
            second = await qualify(client, lead, auth)
    assert second.headers["x-cache"] == "MISS" and decode(second) == decode(first)
    [line] = tampered_lines(logs)
    assert line["reason"] == "not-a-result" and line["key"] == key and gateway.calls[LEAD_AGENT] == 2


async def test_rotation_accepts_the_previous_key_until_it_is_dropped(make_client, seed, auth, gateway, redis_url, cache_prefix):
    lead = seed["leads"][0]

    def settings(**keys: str):
        return make_settings(redis_url=redis_url, cache_prefix=cache_prefix, **keys)

    async with make_client(settings=settings(redis_signing_key=KEY_1)) as client:
        signed_with_1 = await qualify(client, lead, auth)
    async with make_client(settings=settings(redis_signing_key=KEY_2, redis_signing_key_previous=KEY_1)) as client:
        rotating = await qualify(client, lead, auth)
    async with make_client(settings=settings(redis_signing_key=KEY_2)) as client:
        with capture_logs() as logs:
            rotated = await qualify(client, lead, auth)  # the previous key dropped: what it signed is no longer trusted
        signed_with_2 = await qualify(client, lead, auth)
    assert signed_with_1.headers["x-cache"] == "MISS"
    assert rotating.headers["x-cache"] == "HIT" and rotating.content == signed_with_1.content
    assert rotated.headers["x-cache"] == "MISS" and [line["reason"] for line in tampered_lines(logs)] == ["bad-signature"]
    assert signed_with_2.headers["x-cache"] == "HIT" and gateway.calls[LEAD_AGENT] == 2


async def test_apps_without_a_signing_key_trust_only_what_they_wrote(make_client, seed, auth, gateway, redis_url, cache_prefix):
    """In process, an app without REDIS_SIGNING_KEY signs with a key of its own: replicas must share one."""
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, redis_signing_key="")  # "": unset
    async with make_client(settings=settings) as client:
        first = await qualify(client, seed["leads"][0], auth)
        mine = await qualify(client, seed["leads"][0], auth)
    async with make_client(settings=settings) as client:
        with capture_logs() as logs:
            other = await qualify(client, seed["leads"][0], auth)
    assert [r.headers["x-cache"] for r in (first, mine, other)] == ["MISS", "HIT", "MISS"]
    assert [line["reason"] for line in tampered_lines(logs)] == ["bad-signature"]


# --- single-flight outcomes ---------------------------------------------------------------------

@pytest.mark.parametrize("outcome", ["forged", "another question's"])
async def test_a_tampered_flight_outcome_is_ignored_and_the_request_asks_itself(make_client, seed, auth, gateway, redis_url,
                                                                                cache_prefix, outcome):
    """A request that finds the question's flight lock held waits for the holder's outcome: an outsider
    who holds the lock and writes the outcome (or points the lock at another question's real outcome)
    must not decide the answer, nor make the request wait on them again."""
    mine, other = seed["leads"][0], seed["leads"][1]
    with redis_sync.Redis.from_url(redis_url) as r:
        async with make_client(settings=make_settings(redis_url=redis_url, cache_prefix=cache_prefix)) as client:
            other_answer = await qualify(client, other, auth)
            other_key = next(iter(result_keys(r, cache_prefix)))
            [real_outcome] = r.scan_iter(f"{cache_prefix}:outcome:*")  # the flight's outcome, kept 30 s
            await qualify(client, mine, auth)
            [mine_key] = result_keys(r, cache_prefix) - {other_key}
            r.delete(mine_key)  # the next request for my lead is a miss, and takes the flight lock
            key = CacheKey(cache_prefix, "lead.qualify", mine_key.decode().rsplit(":", 1)[-1].strip("{}"))
            if outcome == "forged":
                holder = "outsider"
                r.set(key.outcome_key(holder), b"\x01" + forged_json(other_answer.content), px=60_000)
            else:  # the other question's real, validly signed outcome, copied under this question's outcome key
                holder = real_outcome.decode().rsplit(":", 1)[-1]
                r.set(key.outcome_key(holder), r.get(real_outcome), px=60_000)
            r.set(key.lock_key, holder, px=60_000)
            with capture_logs() as logs:
                answer = await asyncio.wait_for(qualify(client, mine, auth), 30)
    assert answer.status_code == 200 and answer.headers["x-cache"] == "MISS", answer.text
    assert decode(answer)["lead_id"] == mine and decode(answer) != decode(other_answer)
    assert_not_forged(answer.content)
    [line] = tampered_lines(logs)
    assert line["kind"] == "flight" and line["key"].startswith(f"{cache_prefix}:outcome:")
    assert gateway.calls[LEAD_AGENT] == 3


# --- job logs -----------------------------------------------------------------------------------

async def start_job(client, lead: str, auth: dict) -> dict:
    r = await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": lead}}, headers=auth)
    assert r.status_code == 202, r.text
    return decode(r)


async def read_events(client, url: str) -> list:
    async with asyncio.timeout(30), aconnect_sse(client, "GET", url) as source:
        return [sse async for sse in source.aiter_sse() if sse.id]


def rewrite_log(r: redis_sync.Redis, log_key: str, change) -> None:
    """Replace the stream as an outsider can: the same ids, each entry's fields through `change`."""
    entries = r.xrange(log_key)
    ttl = r.pttl(log_key)
    r.delete(log_key)
    for entry_id, fields in entries:
        r.xadd(log_key, change(fields), id=entry_id)
    r.pexpire(log_key, ttl)


def assert_ends_tampered(events: list) -> None:
    assert [e.event for e in events[-2:]] == ["error", "done"], [(e.event, e.data) for e in events]
    error = msgspec.json.decode(events[-2].data)
    assert error["type"].endswith("job-log-tampered") and error["status"] == 502 and "integrity" in error["detail"]
    assert msgspec.json.decode(events[-1].data)["status"] == "failed"
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
    for e in events:
        assert_not_forged(e.data)


async def test_a_replaced_job_log_ends_another_replicas_readers_with_job_log_tampered(gateway, crm, seed, auth, redis_url,
                                                                                     cache_prefix):
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="s" * 40)
    with redis_sync.Redis.from_url(redis_url) as r:
        async with replica_pair(gateway, crm, settings) as (a, b, _):
            job = await start_job(a, seed["leads"][0], auth)
            on_a = await read_events(a, job["events_url"])
            log_key = f"{cache_prefix}:job:{{{job['job_id']}}}:log"

            def forge_result(fields: dict) -> dict:
                return {**fields, b"d": forged_json(fields[b"d"])} if fields[b"e"] == b"result" else fields

            rewrite_log(r, log_key, forge_result)
            with capture_logs() as logs:
                on_b = await read_events(b, job["events_url"])
            state = decode(await b.get(f"/api/v1/ai/jobs/{job['job_id']}", headers=auth))
            exposition = (await b.get("/metrics")).text
    assert [e.event for e in on_a][-2:] == ["result", "done"]
    result_id = next(int(e.id) for e in on_a if e.event == "result")
    assert_ends_tampered(on_b)
    assert [(e.id, e.data) for e in on_b[:result_id - 1]] == [(e.id, e.data) for e in on_a[:result_id - 1]]
    assert state["status"] == "failed" and state["result"] is None and state["error"]["type"].endswith("job-log-tampered")
    [line] = tampered_lines(logs)
    assert line["kind"] == "job-log" and line["key"] == f"{log_key}#{result_id}"
    assert metric(exposition, "crm_ai_cache_tampered_total", kind="job-log") == 1


async def test_a_forged_event_ends_a_following_replicas_readers(gateway, crm, seed, auth, redis_url, cache_prefix):
    """Replica B follows a job replica A runs; the outsider appends the next events before A does."""
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="s" * 40)
    gateway.gate = asyncio.Event()
    with redis_sync.Redis.from_url(redis_url) as r:
        async with replica_pair(gateway, crm, settings) as (a, b, apps):
            job = await start_job(a, seed["leads"][0], auth)
            log_key = f"{cache_prefix}:job:{{{job['job_id']}}}:log"
            events = []
            with capture_logs() as logs:
                async with asyncio.timeout(30), aconnect_sse(b, "GET", job["events_url"]) as source:
                    stream = source.aiter_sse()
                    async for sse in stream:  # up to the gateway's last status before the gate holds the model
                        events += [sse] if sse.id else []
                        if "Agente processando" in sse.data:
                            break
                    running = apps[0].state.jobs.get(job["job_id"])
                    await apps[0].state.jobs.mirror.written(running)
                    assert len(running.events) == len(events) == r.xlen(log_key)  # A waits on the model
                    [(_, first)] = r.xrange(log_key, count=1)
                    n = len(events)
                    for seq, name, data in ((n + 1, b"result", forged_json(msgspec.json.encode({"lead_id": seed["leads"][0]}))),
                                            (n + 2, b"done", b'{"status":"succeeded","cached":false}')):
                        # Another entry's signature comes along, as if a valid entry had been moved here.
                        r.xadd(log_key, {b"e": name, b"d": data, **({b"s": first[b"s"]} if b"s" in first else {})},
                               id=f"{seq}-0")
                    events += [sse async for sse in stream if sse.id]
            gateway.gate.set()
            await job_done(apps[0], job["job_id"], timeout=30)  # A's run ends before the apps do
    assert_ends_tampered(events)
    [line] = tampered_lines(logs)
    assert line["kind"] == "job-log" and line["key"] == f"{log_key}#{n + 1}"


async def test_a_claim_pointed_at_another_users_job_is_not_followed(make_client, seed, auth, gateway, redis_url, cache_prefix):
    """The claim on a question (which job answers it, for every replica) is not signed: the job it names
    must be about the same question, by its signed metadata, or the caller gets a job of their own."""
    mine, theirs = seed["leads"][0], seed["bobs_lead"]
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="s" * 40)
    with redis_sync.Redis.from_url(redis_url) as r:
        async with make_client(settings=settings) as client:
            await qualify(client, mine, auth)  # to learn my question's key
            [mine_key] = result_keys(r, cache_prefix)
            r.delete(mine_key)
            gateway.gate = asyncio.Event()
            other = await start_job(client, theirs, {"Authorization": f"Bearer {seed['bob_token']}"})  # Bob's, running
            r.set(CacheKey(cache_prefix, "lead.qualify", mine_key.decode().rsplit(":", 1)[-1].strip("{}")).claim_key, other["job_id"], px=60_000)
            job = await start_job(client, mine, auth)
            gateway.gate.set()
            async with asyncio.timeout(30):
                body = (await client.get(job["events_url"])).text
                await client.get(other["events_url"])  # Bob's job ends before the app does
    assert job["job_id"] != other["job_id"]
    result = next(line for line in body.split("\n\n") if "event: result" in line)
    assert f'"lead_id":"{mine}"' in result and theirs not in body


async def test_a_job_whose_metadata_was_edited_is_answered_as_tampered(gateway, crm, seed, auth, redis_url, cache_prefix):
    """The metadata says whose record a job is about (a bearer reader is authorised by it) and what a
    replica taking it over asks the model: a job whose metadata fails its check is not served at all."""
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="s" * 40)
    with redis_sync.Redis.from_url(redis_url) as r:
        async with replica_pair(gateway, crm, settings) as (a, b, _):
            job = await start_job(a, seed["leads"][0], auth)
            await read_events(a, job["events_url"])
            r.hset(f"{cache_prefix}:job:{{{job['job_id']}}}", "record_id", seed["leads"][1])
            events = await b.get(job["events_url"])
            state = await b.get(f"/api/v1/ai/jobs/{job['job_id']}", headers=auth)
    for response in (events, state):
        body = assert_problem(response, 502, "job-log-tampered")
        assert "metadata" in body["detail"] and "integrity" in body["detail"]


async def test_a_job_whose_key_parts_were_edited_is_answered_as_tampered(gateway, crm, seed, auth, redis_url, cache_prefix):
    """A job's metadata keeps its cache key's digest beside the signed rendered key, so no replica parses
    the key apart; the digest is not signed itself, so it must render to the signed key or the job is refused
    (a digest pointed at another question would join, and release, that question's claim)."""
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="s" * 40)
    with redis_sync.Redis.from_url(redis_url) as r:
        async with replica_pair(gateway, crm, settings) as (a, b, _):
            job = await start_job(a, seed["leads"][0], auth)
            await read_events(a, job["events_url"])
            meta = f"{cache_prefix}:job:{{{job['job_id']}}}"
            assert len(r.hget(meta, "digest")) == 40 and r.hget(meta, "key").endswith(b"{" + r.hget(meta, "digest") + b"}")
            r.hset(meta, "digest", "0" * 40)
            events = await b.get(job["events_url"])
    body = assert_problem(events, 502, "job-log-tampered")
    assert "metadata" in body["detail"]


async def test_a_job_logged_without_its_key_parts_is_still_served(gateway, crm, seed, auth, redis_url, cache_prefix):
    """Metadata written by the release before `CacheKey` has the rendered key only: another replica still
    serves the job's log (it has no key of its own to share, and a takeover derives it again)."""
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="s" * 40)
    with redis_sync.Redis.from_url(redis_url) as r:
        async with replica_pair(gateway, crm, settings) as (a, b, _):
            job = await start_job(a, seed["leads"][0], auth)
            await read_events(a, job["events_url"])
            r.hdel(f"{cache_prefix}:job:{{{job['job_id']}}}", "digest")
            events = await read_events(b, job["events_url"])
    assert [e.event for e in events][-2:] == ["result", "done"] and '"succeeded"' in events[-1].data


# --- start-up -----------------------------------------------------------------------------------

async def test_serve_with_redis_refuses_to_start_without_a_signing_key(redis_url):
    # The port is taken: a sidecar that got as far as binding it would fail with another message.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {"REDIS_URL": redis_url, "ADAPTER_PORT": port, "REDIS_SIGNING_KEY": "", "REDIS_SIGNING_KEY_PREVIOUS": ""}
        code, _, err = await asyncio.wait_for(run_adapter_async("serve", env=env), 60)
        short = "short-signing-key"
        code_short, _, err_short = await asyncio.wait_for(
            run_adapter_async("serve", env={**env, "REDIS_SIGNING_KEY": short}), 60)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("adapter: invalid configuration: REDIS_SIGNING_KEY: must be set"), err
    assert code_short == 2 and "REDIS_SIGNING_KEY: must be at least 32 characters long" in err_short
    assert short not in err_short  # a secret's value is never echoed


# --- ids from outside name no other key ---------------------------------------------------------


@pytest.mark.parametrize("suffix", [":log", ":inputs", ":lease", ":cancel"])
async def test_an_id_naming_another_of_a_jobs_keys_is_not_found_not_tampering(make_client, seed, auth, gateway, redis_url,
                                                                                cache_prefix, suffix):
    """A job's keys are `<prefix>:job:<id>` and `<id>:log`, `:inputs`, ...: a path's id was looked up as given,
    so `<id>:log` read the job's stream as its metadata (a WRONGTYPE error: 503, the store marked
    unavailable) and a batch's `<id>:inputs` failed its signature check (502 job-log-tampered, a
    `cache.tampered` line and count): anyone, without a token, could fake Redis trouble or tampering."""
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, job_token_secret="s" * 40)
    async with make_client(settings=settings) as client:
        job = await start_job(client, seed["leads"][0], auth)
        await read_events(client, job["events_url"])
        r = await client.post("/api/v1/ai/batches", json={"task": "lead.qualify", "ids": [seed["leads"][1]]}, headers=auth)
        assert r.status_code == 202, r.text
        batch = decode(r)
        await read_events(client, batch["events_url"])
        with capture_logs() as logs:
            for path in (f"/api/v1/ai/jobs/{job['job_id']}{suffix}", f"/api/v1/ai/batches/{batch['batch_id']}{suffix}"):
                for tail in ("", "/events"):
                    assert_problem(await client.get(path + tail), 404, "not-found")
            metrics = (await client.get("/metrics")).text
    assert not [line for line in logs if line["event"] in ("cache.tampered", "cache.redis_unavailable")], logs
    assert metric(metrics, "crm_ai_cache_tampered_total", kind="job") == 0
