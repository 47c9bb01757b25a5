"""Notifications (issue 26): triggers on fresh answers, the CRM's own collection, signed webhooks, durability.

MongoDB is real (an nx-27017 wire-protocol server the module starts), Redis is real, webhook
receivers are real HTTP servers; signatures are checked with Standard Webhooks' reference package
(`standardwebhooks`), never with the sidecar's own code.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from bson import ObjectId
from litestar import Litestar, Request, Response, post
from pymongo import AsyncMongoClient
from standardwebhooks import Webhook as ReferenceWebhook, WebhookVerificationError

from adapter.doubles.crm import CrmDouble
from adapter.notify.outbox import notify_key
from adapter.notify.sinks import CrmNotifications
from adapter.notify.triggers import Event
from tests.helpers import (
    QUALIFY, TEST_SIGNING_KEY, Changes, MongoProcess, asgi_client, make_settings, metric, replica_cluster, replica_pair,
    run_adapter_async, serving,
)

pytestmark = pytest.mark.redis

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 24).decode()


@pytest.fixture(scope="module")
def mongo(tmp_path_factory: pytest.TempPathFactory):
    server = MongoProcess(tmp_path_factory.mktemp("nx-27017"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def database(mongo: MongoProcess) -> AsyncIterator[tuple[str, Any]]:
    """A database of this test's own: its URI and its `notifications` collection."""
    uri = mongo.uri(f"crm_{uuid.uuid4().hex[:10]}")
    client: AsyncMongoClient = AsyncMongoClient(uri, serverSelectionTimeoutMS=5000)
    yield uri, client.get_default_database()["notifications"]
    await client.close()


@pytest.fixture
def crm(database: tuple[str, Any]) -> CrmDouble:
    """The CRM double reading its notifications from the same collection the sidecar writes to."""
    return CrmDouble(notifications=database[1])


class Receiver(Changes):
    """A webhook receiver: answers the statuses in `script` in turn (then 204), keeps every request."""

    def __init__(self, script: list[int] | None = None) -> None:
        super().__init__()
        self.script = list(script or [])
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.gate: asyncio.Event | None = None  # set: requests wait for it

        @post("/hook", status_code=200)
        async def hook(request: Request) -> Response[bytes]:
            body = await request.body()
            if self.gate is not None:
                await self.gate.wait()
            status = self.script.pop(0) if self.script else 204
            self.received.append((dict(request.headers), body, status))
            self.changed()
            return Response(b"", status_code=status)

        self.app = Litestar([hook], logging_config=None)

    def delivered(self) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for h, b, status in self.received if 200 <= status < 300]


def verify(headers: dict[str, str], body: bytes, secret: str = SECRET) -> dict:
    """Standard Webhooks' reference verification (it also checks the timestamp's tolerance)."""
    return ReferenceWebhook(secret).verify(body, {k: v for k, v in headers.items() if k.startswith("webhook-")})


async def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """For state outside this process's events (MongoDB, Redis): asked again every 50 ms, up to a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := await condition()):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.05)
    return value


async def drained(redis_url: str, prefix: str) -> bool:
    """Every event handed to every sink: nothing in the outbox, nothing waiting for a retry."""
    async with aioredis.Redis.from_url(redis_url) as r:
        return await r.xlen(notify_key(prefix, "outbox")) == 0 and await r.zcard(notify_key(prefix, "retry")) == 0


def notify_settings(redis_url: str, prefix: str, mongo_uri: str | None, hook_url: str | None, **extra: object):
    return make_settings(redis_url=redis_url, cache_prefix=prefix, crm_notifications_mongodb_uri=mongo_uri or "",
                         webhook_urls=hook_url or "", webhook_secrets=f"{SECRET},{OLD_SECRET}",
                         webhook_retry_base_delay=0.05, webhook_retry_max_delay=0.2, notify_claim_idle_seconds=1, **extra)


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[str]:
    async with serving(receiver.app) as url:
        yield url + "/hook"


def hot_lead(crm: CrmDouble, owner: str) -> str:
    """A lead the sample model scores 90 (Hot): senior title, funding, referral, email and phone."""
    return crm.add_lead(owner, name="Maria Silva", email="maria@acme.example", phone="+55 11 99999-0001",
                        company="Acme Logistics", job_title="VP of Sales", source="referral",
                        enrichment_data={"funding": "Series C"}, classification="Warm")


async def test_a_lead_turning_hot_notifies_once_across_two_replicas_a_retry_and_a_hit(
        gateway, crm, database, redis_url, cache_prefix):
    uri, notifications = database
    alice = crm.add_user()
    lead = hot_lead(crm, alice)
    auth = {"Authorization": f"Bearer {crm.token(alice)}"}
    receiver = Receiver()
    async with receiving(receiver) as hook:
        settings = notify_settings(redis_url, cache_prefix, uri, hook)
        async with replica_pair(gateway, crm, settings) as (a, b, apps):
            gateway.gate = asyncio.Event()  # both replicas ask while the model thinks
            first = [asyncio.create_task(c.post(QUALIFY, json={"lead_id": lead}, headers=auth)) for c in (a, b)]
            await crm.calls.reach(2)  # both replicas read the lead (and its facts) with the caller's token
            await gateway.calls.reach(1)
            gateway.gate.set()
            answers = await asyncio.gather(*first)
            assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
            assert {r.json()["classification"] for r in answers} == {"Hot"}
            hit = await a.post(QUALIFY, json={"lead_id": lead}, headers=auth)
            assert hit.headers["x-cache"] == "HIT"
            retry = await b.post(QUALIFY, json={"lead_id": lead}, headers={**auth, "Cache-Control": "no-cache"})
            assert retry.status_code == 200 and retry.headers["x-cache"] == "MISS"
            await receiver.until(receiver.delivered, 15, "the webhook's delivery")
            await until(lambda: drained(redis_url, cache_prefix), 15, "an empty outbox")

            docs = [d async for d in notifications.find({})]
            assert len(docs) == 1, docs
            doc = docs[0]
            # The backend's Notification shape, field by field (its NotificationService's create_notification).
            assert set(doc) == {"_id", "user_id", "type", "title", "message", "priority", "entity_type", "entity_id", "read",
                                "delivered_email", "delivered_push", "created_at", "updated_at"}
            assert doc["user_id"] == ObjectId(alice) and doc["entity_id"] == ObjectId(lead) and doc["entity_type"] == "lead"
            assert (doc["type"], doc["priority"], doc["read"], doc["delivered_email"], doc["delivered_push"]) == (
                "lead_qualified", "high", False, False, False)
            assert doc["message"] == "Lead Maria Silva has been qualified as Hot (was Warm)"
            # Only the title and what the trigger is about: nothing else of the record.
            assert "acme" not in (doc["title"] + doc["message"]).lower()

            [(headers, body)] = receiver.delivered()
            payload = verify(headers, body)
            verify(headers, body, OLD_SECRET)  # signed with every secret: either one verifies during a rotation
            assert payload["type"] == "lead.classification_changed"
            assert payload["data"]["id"] == headers["webhook-id"] and bytes.fromhex(headers["webhook-id"][4:]) == doc["_id"].binary
            assert payload["data"]["classification"] == "Hot" and payload["data"]["previous_classification"] == "Warm"
            assert len(receiver.received) == 1

            assert gateway.calls["LeadQualifier_CRM_Agent"] == 2  # the two replicas shared one call; the retry made the other
            texts = [(await c.get("/metrics")).text for c in (a, b)]
            assert sum(metric(t, "crm_ai_notify_events_total", type="lead.classification_changed", outcome="written")
                       for t in texts) == 1

        # The CRM's own route shows it (the double reads the collection as the backend does).
        async with asgi_client(crm.app, "http://crm.test") as backend:
            listed = (await backend.get("/api/v1/notifications/", headers=auth)).json()
            assert listed["total"] == 1 and listed["unread_count"] == 1
            assert listed["items"][0]["_id"] == str(doc["_id"]) and listed["items"][0]["title"] == doc["title"]


async def test_a_hit_never_notifies(make_client, crm, database, redis_url, cache_prefix):
    uri, notifications = database
    alice = crm.add_user()
    lead = hot_lead(crm, alice)
    auth = {"Authorization": f"Bearer {crm.token(alice)}"}
    async with make_client(settings=notify_settings(redis_url, cache_prefix, uri, None, crm_write_back=False)) as client:
        assert (await client.post(QUALIFY, json={"lead_id": lead}, headers=auth)).headers["x-cache"] == "MISS"
        await until(lambda: notifications.count_documents({}), 15, "the first notification")
        # The record changes where the answer's key does not look (its classification): a fresh answer would
        # notify again (Cold -> Hot, a new record version); the cached one must not.
        crm.leads[lead].update(classification="Cold", updated_at="2030-01-01T00:00:00")
        for _ in range(3):
            assert (await client.post(QUALIFY, json={"lead_id": lead}, headers=auth)).headers["x-cache"] == "HIT"
        job = await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": lead}}, headers=auth)
        assert job.status_code == 202
        events = (await client.get(job.json()["events_url"])).text
        assert '"cached":true' in events
        await until(lambda: drained(redis_url, cache_prefix), 15, "an empty outbox")
        assert await notifications.count_documents({}) == 1
        text = (await client.get("/metrics")).text
        assert metric(text, "crm_ai_notify_events_total", type="lead.classification_changed", outcome="written") == 1
        # ...and a fresh answer does notify (the same record version as the hits saw): the test could fail.
        assert (await client.post(QUALIFY, json={"lead_id": lead}, headers={**auth, "Cache-Control": "no-cache"})).status_code == 200
        await until(lambda: _count_is(notifications, 2), 15, "the second notification")


async def _count_is(collection: Any, n: int) -> bool:
    return await collection.count_documents({}) == n


async def test_a_webhook_failing_twice_then_succeeding_gets_the_event_once_signed(
        make_client, crm, redis_url, cache_prefix):
    alice = crm.add_user()
    lead = hot_lead(crm, alice)
    receiver = Receiver(script=[500, 503])
    async with receiving(receiver) as hook:
        async with make_client(settings=notify_settings(redis_url, cache_prefix, None, hook)) as client:
            r = await client.post(QUALIFY, json={"lead_id": lead}, headers={"Authorization": f"Bearer {crm.token(alice)}"})
            assert r.status_code == 200
            await receiver.until(receiver.delivered, 15, "a successful delivery")
            await until(lambda: drained(redis_url, cache_prefix), 15, "an empty outbox")
            text = (await client.get("/metrics")).text
    assert [status for _, _, status in receiver.received] == [500, 503, 204]
    ids = {h["webhook-id"] for h, _, _ in receiver.received}
    assert len(ids) == 1  # one event, tried three times under one id (receivers dedupe on it)
    [(headers, body)] = receiver.delivered()
    payload = verify(headers, body)
    assert payload["type"] == "lead.classification_changed" and payload["data"]["entity_id"] == lead
    with pytest.raises(WebhookVerificationError):  # the reference refuses a body that was changed
        verify(headers, body.replace(b"Hot", b"Top"))
    assert metric(text, "crm_ai_notify_retried_total", sink="webhook") == 2
    assert metric(text, "crm_ai_notify_delivered_total", sink="webhook") == 1


async def test_a_delivery_failing_past_the_window_is_dead_lettered_and_replayed(
        make_client, crm, redis_url, cache_prefix):
    alice = crm.add_user()
    lead = hot_lead(crm, alice)
    receiver = Receiver(script=[500] * 1000)
    async with receiving(receiver) as hook:
        settings = notify_settings(redis_url, cache_prefix, None, hook, webhook_retry_window=1)
        async with make_client(settings=settings) as client:
            assert (await client.post(QUALIFY, json={"lead_id": lead},
                                      headers={"Authorization": f"Bearer {crm.token(alice)}"})).status_code == 200

            async def dead() -> int:
                async with aioredis.Redis.from_url(redis_url) as r:
                    return await r.llen(notify_key(cache_prefix, "dead"))

            await until(dead, 15, "a dead letter")
            assert await drained(redis_url, cache_prefix)
            tried = len(receiver.received)
            assert tried >= 2 and not receiver.delivered()
            receiver.script.clear()  # the receiver is fixed
            code, out, err = await run_adapter_async("webhooks", "replay", env={
                "REDIS_URL": redis_url, "CACHE_PREFIX": cache_prefix, "REDIS_SIGNING_KEY": TEST_SIGNING_KEY})
            assert code == 0, err
            assert "replayed 1 dead letter(s)" in out and "lead.classification_changed" in out
            await receiver.until(receiver.delivered, 15, "the replayed delivery")
            assert await dead() == 0
            [(headers, body)] = receiver.delivered()
            verify(headers, body)
            text = (await client.get("/metrics")).text
            assert metric(text, "crm_ai_notify_dead_lettered_total", sink="webhook") == 1


async def test_a_replica_killed_with_undelivered_events_loses_none(gateway, crm, database, redis_url):
    uri, notifications = database
    alice = crm.add_user()
    leads = [hot_lead(crm, alice) for _ in range(6)]
    auth = {"Authorization": f"Bearer {crm.token(alice)}"}
    receiver = Receiver()
    receiver.gate = asyncio.Event()  # deliveries hang: the events are read, and not acknowledged, when the replica dies
    async with AsyncExitStack() as stack:
        hook = await stack.enter_async_context(receiving(receiver))
        gw_url = await stack.enter_async_context(serving(gateway.app))
        crm_url = await stack.enter_async_context(serving(crm.app))
        replicas, client = await stack.enter_async_context(replica_cluster(
            2, gateway_url=gw_url, crm_url=crm_url, redis_url=redis_url, lease=1.5, prefix="notify",
            logged=("notify.",), CRM_NOTIFICATIONS_MONGODB_URI=uri, WEBHOOK_URLS=hook, WEBHOOK_SECRETS=SECRET,
            NOTIFY_CLAIM_IDLE_SECONDS=1, WEBHOOK_RETRY_BASE_DELAY=0.05, WEBHOOK_RETRY_MAX_DELAY=0.2))
        victim, survivor = replicas
        prefix = victim.env["CACHE_PREFIX"]
        # The survivor's worker is stopped first, so the victim's reads every event (SIGSTOP: it takes nothing).
        survivor.proc.send_signal(19)
        for lead in leads:
            r = await client.post(victim.url + QUALIFY, json={"lead_id": lead}, headers=auth)
            assert r.status_code == 200, r.text

        async def all_read_by_the_victim() -> bool:
            async with aioredis.Redis.from_url(redis_url) as r:
                pending = await r.xpending(notify_key(prefix, "outbox"), "deliver")
                return pending["pending"] == len(leads)

        await until(all_read_by_the_victim, 15, "every event read, none acknowledged")
        async with aioredis.Redis.from_url(redis_url) as r:
            holders = {c["name"].decode(): c["pending"] for c in
                       (await r.xpending(notify_key(prefix, "outbox"), "deliver"))["consumers"]}
        assert sum(n for name, n in holders.items() if f":{victim.proc.pid}:" in name) > 0, holders
        victim.kill()
        await victim.exited()
        survivor.proc.send_signal(18)  # SIGCONT
        receiver.gate.set()
        await until(lambda: drained(redis_url, prefix), 30, "an empty outbox")
        await receiver.until(lambda: len({h["webhook-id"] for h, _ in receiver.delivered()}) == len(leads), 15, "every event")
    docs = [d async for d in notifications.find({})]
    assert sorted(str(d["entity_id"]) for d in docs) == sorted(leads)  # none lost, none twice
    assert {h["webhook-id"] for h, _ in receiver.delivered()} == {f"msg_{d['_id']}" for d in docs}


async def test_the_crm_sink_keeps_one_document_per_event(database):
    uri, notifications = database
    sink = CrmNotifications(uri)
    event = Event(id="msg_" + "ab" * 12, type="lead.classification_changed", crm_type="lead_qualified",
                  user_id="65f1c0ffee0000000000a001", title="New Hot lead", message="Lead X has been qualified as Hot",
                  priority="high", entity_type="lead", entity_id="65f1c0ffee0000000000a002", created_at=1_800_000_000.0)
    try:
        assert await sink.send([event]) == [None]
        # A retried insert, beside a new event: the duplicate key is the proof it is there, the other goes in.
        other = Event(**{**msgspec.structs.asdict(event), "id": "msg_" + "cd" * 12})
        assert await sink.send([event, other]) == [None, None]
    finally:
        await sink.aclose()
    assert sorted([d["_id"] async for d in notifications.find({})]) == [ObjectId("ab" * 12), ObjectId("cd" * 12)]


async def test_a_finished_batch_notifies_its_creator(make_client, crm, database, redis_url, cache_prefix):
    uri, notifications = database
    alice = crm.add_user()
    leads = [hot_lead(crm, alice), hot_lead(crm, alice), crm.add_lead(alice, name="Cold one", classification="Cold")]
    auth = {"Authorization": f"Bearer {crm.token(alice)}"}
    # The creator is known as a CRM user only through a verified token (CRM_JWT_SECRET): never an unverified claim.
    settings = notify_settings(redis_url, cache_prefix, uri, None, crm_jwt_secret=crm.secret)
    async with make_client(settings=settings) as client:
        batch = (await client.post("/api/v1/ai/batches", json={"task": "lead.qualify", "ids": leads}, headers=auth)).json()
        events = (await client.get(batch["events_url"])).text
        assert "event: done" in events
        await until(lambda: _count_is(notifications, 3), 15, "two leads' notifications and the batch's")
        await until(lambda: drained(redis_url, cache_prefix), 15, "an empty outbox")
    docs = {d["type"]: d for d in [d async for d in notifications.find({})]}
    assert sorted(d["entity_id"] for d in [d async for d in notifications.find({"type": "lead_qualified"})]) == sorted(
        ObjectId(i) for i in leads[:2])  # the cold lead stayed Cold: no change, no notification
    done = docs["batch_completed"]
    assert done["user_id"] == ObjectId(alice) and "entity_id" not in done and "entity_type" not in done
    assert done["message"] == "Your lead.qualify batch finished: 3 succeeded, 0 failed" and done["priority"] == "low"


async def test_a_deal_dropping_notifies_and_a_trigger_switched_off_does_not(make_client, crm, database, redis_url, cache_prefix):
    uri, notifications = database
    alice = crm.add_user()
    # The sample model answers 50 % and health 65 for a deal in `proposal`, and names "No decision maker identified".
    deal = crm.add_deal(alice, title="Fleet rollout", stage="proposal", probability=80, ai_score=70)
    auth = {"Authorization": f"Bearer {crm.token(alice)}"}
    settings = notify_settings(redis_url, cache_prefix, uri, None, notify_triggers_off="deal.high_risk")
    async with make_client(settings=settings) as client:
        r = await client.post("/api/v1/ai/deal/predict", json={"deal_id": deal}, headers=auth)
        assert r.status_code == 200 and "No decision maker identified" in r.json()["risk_factors"]
        await until(lambda: _count_is(notifications, 1), 15, "the drop's notification")
        await until(lambda: drained(redis_url, cache_prefix), 15, "an empty outbox")
    [doc] = [d async for d in notifications.find({})]
    assert (doc["type"], doc["priority"], doc["entity_type"]) == ("deal_at_risk", "high", "deal")
    assert doc["message"] == "Deal Fleet rollout: win probability 80 → 50"  # health 70 -> 65 is within the 15 points


def test_the_deal_triggers_read_their_thresholds_from_the_settings():
    from adapter.tasks.deal_predict import TRIGGERS, DealPredictResult

    dropped, risky = TRIGGERS
    result = DealPredictResult(deal_id="d", agent="a", win_probability=40, health_score=30, predicted_close_date=None,
                               risk_factors=["Competitor offered a discount", "Slow legal review"],
                               recommended_actions=["x"], reasoning="r")
    facts = {"probability": 60, "ai_score": 45, "risk_factors": ["slow legal review"], "label": "D"}
    assert dropped.check(facts, result, make_settings(notify_deal_drop_points=15)).about == {
        "win_probability": {"previous": 60, "now": 40}}
    assert dropped.check(facts, result, make_settings(notify_deal_drop_points=20)) is None  # a drop of 20 is not more than 20
    found = risky.check(facts, result, make_settings())
    assert found.about == {"risk_factors": ["Competitor offered a discount"]}  # the legal one was on the record already
    assert risky.check(facts, result, make_settings(notify_deal_risk_words="churn")) is None


@pytest.mark.parametrize(("env", "problem"), [
    ({"WEBHOOK_SECRETS": "not-a-whsec"}, "WEBHOOK_SECRETS: must be comma-separated `whsec_<base64>` secrets"),
    ({"WEBHOOK_URLS": "ftp://hooks.example"}, "WEBHOOK_URLS: must hold absolute http(s) URLs"),
    ({"CRM_NOTIFICATIONS_MONGODB_URI": "mongodb://u:pw@db:27017"}, "CRM_NOTIFICATIONS_MONGODB_URI: must be a mongodb:// URL naming the CRM backend's database"),
])
def test_notification_settings_are_checked_at_start_up(env, problem):
    from adapter.settings import ConfigError, Settings

    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert problem in str(caught.value) and "pw" not in str(caught.value)


def test_webhooks_without_a_secret_or_an_unknown_trigger_stop_start_up():
    from adapter.app import create_app
    from adapter.settings import ConfigError

    with pytest.raises(ConfigError, match="WEBHOOK_SECRETS: at least one"):
        create_app(make_settings(webhook_urls="http://hooks.example/in"))
    with pytest.raises(ConfigError, match="NOTIFY_TRIGGERS_OFF: lead.hot is no trigger"):
        create_app(make_settings(notify_triggers_off="lead.hot"))


async def test_a_tampered_delivery_is_dropped_and_only_configured_urls_are_contacted(
        make_client, crm, redis_url, cache_prefix):
    """What Redis holds names a sink by a digest of its URL: a forged entry can neither be delivered nor send the
    sidecar anywhere else."""
    receiver = Receiver()
    async with receiving(receiver) as hook:
        async with make_client(settings=notify_settings(redis_url, cache_prefix, None, hook)) as client:
            async with aioredis.Redis.from_url(redis_url) as r:
                forged = (b'{"event":{"id":"msg_' + b"0" * 24 + b'","type":"x","crm_type":"x","user_id":null,"title":"t",'
                          b'"message":"m","priority":"low"},"sink":"webhook:0","attempt":1,"first":0}')
                await r.zadd(notify_key(cache_prefix, "retry"), {forged: 0})
                await until(lambda: drained(redis_url, cache_prefix), 15, "the forged delivery dropped")
            text = (await client.get("/metrics")).text
    assert receiver.received == []
    assert metric(text, "crm_ai_cache_tampered_total", kind="notify-retry") == 1


async def test_the_double_serves_the_backends_notification_routes(crm, database):
    uri, notifications = database
    alice, bob = crm.add_user(), crm.add_user()
    sink = CrmNotifications(uri)
    ids = []
    try:
        for n in range(3):
            event = Event(id=f"msg_{n:024x}", type="t", crm_type="lead_qualified", user_id=alice, title=f"T{n}", message="m",
                          priority="high", entity_type="lead", entity_id="65f1c0ffee0000000000a002", created_at=1_800_000_000.0 + n)
            assert await sink.send([event]) == [None]
            ids.append(f"{n:024x}")
    finally:
        await sink.aclose()
    alice_auth, bob_auth = ({"Authorization": f"Bearer {crm.token(u)}"} for u in (alice, bob))
    async with asgi_client(crm.app, "http://crm.test") as backend:
        assert (await backend.get("/api/v1/notifications", headers=alice_auth)).status_code == 307
        listed = (await backend.get("/api/v1/notifications/?limit=2", headers=alice_auth)).json()
        assert [i["title"] for i in listed["items"]] == ["T2", "T1"]  # newest first
        assert (listed["total"], listed["unread_count"], listed["skip"], listed["limit"]) == (3, 3, 0, 2)
        item = listed["items"][0]
        assert list(item) == ["_id", "created_at", "updated_at", "user_id", "type", "title", "message", "priority",
                              "entity_type", "entity_id", "read", "read_at", "delivered_email", "delivered_push"]
        assert item["created_at"] == "2027-01-15T08:00:02" and item["user_id"] == alice
        assert (await backend.get("/api/v1/notifications/", headers=bob_auth)).json()["total"] == 0
        assert (await backend.delete(f"/api/v1/notifications/{ids[0]}", headers=bob_auth)).status_code == 403
        assert (await backend.delete(f"/api/v1/notifications/{ids[0]}", headers=alice_auth)).status_code == 204
        assert (await backend.delete(f"/api/v1/notifications/{ids[0]}", headers=alice_auth)).status_code == 404
        assert (await backend.delete("/api/v1/notifications/nope", headers=alice_auth)).status_code == 500
        marked = await backend.post("/api/v1/notifications/mark-all-read", headers=alice_auth)
        assert marked.json() == {"message": "Marked 2 notifications as read"}
        # The backend stores `read_at` as a datetime its own model refuses: every list holding one is a 500.
        assert (await backend.get("/api/v1/notifications/", headers=alice_auth)).status_code == 500
        assert (await backend.patch(f"/api/v1/notifications/{ids[1]}/read", headers=bob_auth)).status_code == 500


async def test_without_redis_the_outbox_lives_in_the_process(make_client, crm):
    alice = crm.add_user()
    lead = hot_lead(crm, alice)
    receiver = Receiver(script=[500])
    async with receiving(receiver) as hook:
        settings = make_settings(webhook_urls=hook, webhook_secrets=SECRET, webhook_retry_base_delay=0.05)
        async with make_client(settings=settings) as client:
            r = await client.post(QUALIFY, json={"lead_id": lead}, headers={"Authorization": f"Bearer {crm.token(alice)}"})
            assert r.status_code == 200
            await receiver.until(receiver.delivered, 15, "the delivery after one retry")
    [(headers, body)] = receiver.delivered()
    assert verify(headers, body)["data"]["entity_id"] == lead
    assert [status for _, _, status in receiver.received] == [500, 204]


def test_the_readme_lists_every_trigger():
    from adapter.notify.triggers import BATCH_FINISHED
    from adapter.tasks import TASKS
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    names = [t.name for task in TASKS.values() for t in task.triggers] + [BATCH_FINISHED]
    assert [n for n in names if f"| `{n}` |" not in readme] == []
