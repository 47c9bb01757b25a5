"""The two sinks: the CRM's own `notifications` collection, and Standard Webhooks.

A sink's `send` takes the events the worker read together and returns, for each, None when it is
delivered (or already was) and the failure's words otherwise; the worker retries those. Neither
raises for a fault of the other side.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import time
from collections.abc import Callable

import aiohttp
import structlog
from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError, PyMongoError

from .triggers import Event

log = structlog.get_logger("adapter.notify")
CRM = "crm"
DUPLICATE_KEY = 11000  # MongoDB's code: the event's document is there already (exactly one per event)


class CrmNotifications:
    """Documents in the backend's `notifications` collection, exactly as its NotificationService
    writes them, so its bell and `GET /api/v1/notifications` show them with no backend change.

    The `_id` is the event's: a second insert of one event (a retry, another replica) is a
    duplicate-key error, taken as delivered. The URI's user needs only `insert` on the collection.
    """

    name = CRM

    def __init__(self, uri: str, *, timeout: float = 5.0) -> None:
        ms = int(timeout * 1000)
        self.client: AsyncMongoClient = AsyncMongoClient(uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms,
                                                         socketTimeoutMS=ms, tz_aware=False)
        # The backend's database is the URI's (mongodb://user:pw@host/<database>): a URI without one is refused at start-up.
        self.collection = self.client.get_default_database()["notifications"]

    @staticmethod
    def document(event: Event) -> dict:
        # The backend's create_notification, field by field: naive UTC datetimes, ObjectIds, and
        # entity_type / entity_id only when there is an entity.
        created = dt.datetime.fromtimestamp(event.created_at, dt.UTC).replace(tzinfo=None)
        doc: dict = {"_id": ObjectId(event.object_id), "user_id": ObjectId(event.user_id), "type": event.crm_type,
                     "title": event.title, "message": event.message, "priority": event.priority, "read": False,
                     "delivered_email": False, "delivered_push": False, "created_at": created, "updated_at": created}
        if event.entity_type:
            doc["entity_type"] = event.entity_type
        if event.entity_id:
            doc["entity_id"] = ObjectId(event.entity_id)
        return doc

    def wants(self, event: Event) -> bool:
        return event.user_id is not None  # a CRM notification needs its user (a batch creator is known only by `sub`)

    async def send(self, events: list[Event]) -> list[str | None]:
        """One unordered insert of them all: a document already there (duplicate key) counts as delivered."""
        try:
            await self.collection.insert_many([self.document(e) for e in events], ordered=False)
        except BulkWriteError as exc:
            failed = {w["index"]: w for w in exc.details.get("writeErrors", []) if w.get("code") != DUPLICATE_KEY}
            return [f"{failed[i].get('code')}: {failed[i].get('errmsg', '')}"[:300] if i in failed else None
                    for i in range(len(events))]
        except PyMongoError as exc:
            return [f"{type(exc).__name__}: {exc}"[:300]] * len(events)
        return [None] * len(events)

    async def aclose(self) -> None:
        await self.client.close()


def sink_name(url: str) -> str:
    """A webhook's name in the outbox: a digest of its URL, never the URL (only configured URLs are contacted)."""
    return "webhook:" + hashlib.sha256(url.encode()).hexdigest()[:16]


def sign(keys: tuple[bytes, ...], msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' `webhook-signature`: `v1,<base64 HMAC-SHA256 of id.timestamp.body>` per secret."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys)


def webhook_session(timeout: float, keepalive: float) -> aiohttp.ClientSession:
    """aiohttp itself, not httpx over it: building httpx's request was most of a delivery's CPU.
    No cookie jar: one receiver's cookie must never go back to it, nor to another."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), cookie_jar=aiohttp.DummyCookieJar(),
                                 connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=keepalive),
                                 auto_decompress=False)


class Webhook:
    """One configured URL. Redirects are not followed: a 3xx is a failure, not a new destination."""

    def __init__(self, url: str, keys: tuple[bytes, ...], http: aiohttp.ClientSession, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.name = sink_name(url)
        self.keys = keys
        self.http = http
        self._clock = clock

    def wants(self, event: Event) -> bool:
        return True

    async def send(self, events: list[Event]) -> list[str | None]:
        return list(await asyncio.gather(*(self._post(e) for e in events)))

    async def _post(self, event: Event) -> str | None:
        body = event.webhook_body()
        stamp = int(self._clock())
        headers = {"webhook-id": event.id, "webhook-timestamp": str(stamp),
                   "webhook-signature": sign(self.keys, event.id, stamp, body), "content-type": "application/json"}
        try:
            async with self.http.post(self.url, data=body, headers=headers, allow_redirects=False) as response:
                status = response.status
                response.release()  # its body is never read: an unread one closes the connection instead of queueing
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        return None if 200 <= status < 300 else f"HTTP {status}"
