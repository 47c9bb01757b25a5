"""The outbox: events wait here until every sink has them, whichever replica wrote them.

With Redis (keys under `<prefix>:{<prefix>:notify}:`, one Cluster slot: `notify_key`):
  outbox   a Stream of new events, read by every replica's worker through one consumer group
           (`deliver`); an entry is acknowledged and deleted once each sink has the event or has a
           retry scheduled for it. An entry a replica read and never acknowledged (it died) is
           claimed by another replica's worker after NOTIFY_CLAIM_IDLE_SECONDS (XAUTOCLAIM).
  seen:<id> the event was written once (7 days): the same event from another replica, a retried
           request or a second evaluation is not written again.
  retry    a sorted set of (event, sink, attempt) by when to try next. A worker takes what is due
           by moving it a lease ahead (one script), so a worker that dies holding it only delays it.
  dead     the dead-letter list: deliveries still failing after WEBHOOK_RETRY_WINDOW;
           `adapter webhooks replay` moves them back to `retry`.
Every value is sealed with REDIS_SIGNING_KEY (storage/signing.py) and checked when read back:
an entry that fails its check is dropped and counted, never delivered.

Without Redis the same interface is kept in process (`MemoryOutbox`): nothing survives a restart.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ..storage.signing import Signer, Tampered, Tampering
from .triggers import Event

log = structlog.get_logger("adapter.notify")
GROUP = "deliver"
SEEN_SECONDS = 7 * 86_400


class Delivery(msgspec.Struct, kw_only=True, frozen=True):
    """One event for one sink, waiting for its next attempt."""

    event: Event
    sink: str  # `crm`, or `webhook:<digest of its URL>` (never the URL: only configured ones are contacted)
    attempt: int  # attempts made so far
    first: float  # when the first attempt failed: the retry window counts from here
    error: str = ""  # the last failure, for the dead-letter list


_enc = msgspec.json.Encoder().encode
_dec_event = msgspec.json.Decoder(Event).decode
_dec_delivery = msgspec.json.Decoder(Delivery).decode

# Written once per event id: the seen-marker and the stream entry in one step.
_ADD = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  return redis.call('XADD', KEYS[2], '*', 'e', ARGV[1])
end
return false
"""
# What is due, moved a lease ahead: its taker has that long before another worker may take it.
_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""
# A dead letter back in the retry set, once (two operators replaying at once move it once).
_REPLAY = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  return 1
end
return 0
"""


def notify_key(prefix: str, name: str) -> str:
    """One of the outbox's keys. They share the hash tag `{<prefix>:notify}`: in a Redis Cluster the
    scripts and transactions naming several of them (the seen-marker with the stream entry, the retry
    set with the stream or the dead letters) stay in one slot (issue 24); the key still starts with the prefix."""
    return f"{prefix}:{{{prefix}:notify}}:{name}"


class RedisOutbox:
    durable = True

    def __init__(self, redis: Redis, *, prefix: str, signer: Signer, tampering: Tampering | None = None,
                 claim_idle: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.signer = signer
        self.tampering = tampering or Tampering()
        self.claim_idle = claim_idle
        self._clock = clock
        self.stream, self.retry_key, self.dead_key = notify_key(prefix, "outbox"), notify_key(prefix, "retry"), notify_key(prefix, "dead")
        self._seen = notify_key(prefix, "seen:")
        self._add = redis.register_script(_ADD)
        self._due = redis.register_script(_DUE)
        self._replay = redis.register_script(_REPLAY)
        self._group_ready = False
        self._claim_from = "0-0"

    # --- writing ------------------------------------------------------------------------------

    async def add(self, event: Event) -> bool:
        """Write the event unless it was written before; True when this call wrote it."""
        sealed = self.signer.seal(self.stream, _enc(event))
        return await self._add(keys=[self._seen + event.id, self.stream], args=[sealed, SEEN_SECONDS]) is not None

    # --- the worker's side --------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[bytes, Event]]:
        """New entries, waiting up to `block_ms` for one."""
        await self._ensure_group()
        entries: list[Any] = []
        got = await self.redis.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms)
        for _, items in got or []:
            entries.extend(items)
        return await self._events(entries)

    async def claim(self, consumer: str, count: int) -> list[tuple[bytes, Event]]:
        """Entries other consumers read and left unacknowledged for NOTIFY_CLAIM_IDLE_SECONDS (they died)."""
        await self._ensure_group()
        claimed = await self.redis.xautoclaim(self.stream, GROUP, consumer, int(self.claim_idle * 1000),
                                              start_id=self._claim_from, count=count)
        self._claim_from = claimed[0]  # where the next scan goes on ("0-0" once it went round)
        return await self._events([e for e in claimed[1] if e and e[1]])

    async def _events(self, entries: list[Any]) -> list[tuple[bytes, Event]]:
        out = []
        for entry_id, fields in entries:
            raw = fields.get(b"e") or fields.get("e") or b""
            try:
                out.append((entry_id, _dec_event(self.signer.unseal(self.stream, raw))))
            except (Tampered, msgspec.DecodeError) as exc:
                self.tampering("notify-outbox", self.stream, getattr(exc, "reason", "not-an-event"), raw, effect="dropped")
                await self.done([entry_id])
        return out

    async def done(self, entry_ids: list[bytes], retries: list[tuple[Delivery, float]] = ()) -> None:  # type: ignore[assignment]
        """The entries are handled: each sink has their events, or a retry is scheduled (in the same step)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if retries:
                pipe.zadd(self.retry_key, {self._seal_delivery(delivery): due for delivery, due in retries})
            pipe.xack(self.stream, GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            await pipe.execute()

    def _seal_delivery(self, delivery: Delivery) -> bytes:
        return self.signer.seal(self.retry_key, _enc(delivery))

    async def due(self, count: int, lease: float) -> list[tuple[bytes, Delivery]]:
        now = self._clock()
        members = await self._due(keys=[self.retry_key], args=[now, now + lease, count])
        out = []
        for member in members:
            try:
                out.append((member, _dec_delivery(self.signer.unseal(self.retry_key, member))))
            except (Tampered, msgspec.DecodeError) as exc:
                self.tampering("notify-retry", self.retry_key, getattr(exc, "reason", "not-a-delivery"), member, effect="dropped")
                await self.redis.zrem(self.retry_key, member)
        return out

    async def settle(self, member: bytes, *, again: tuple[Delivery, float] | None = None, dead: Delivery | None = None) -> None:
        """A retry attempt ended: delivered (neither), failing still (`again` at its due time) or given up (`dead`)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.retry_key, member)
            if again is not None:
                pipe.zadd(self.retry_key, {self._seal_delivery(again[0]): again[1]})
            if dead is not None:
                pipe.lpush(self.dead_key, self.signer.seal(self.dead_key, _enc(dead)))
            await pipe.execute()

    async def bury(self, entry_id: bytes, dead: list[Delivery]) -> None:
        """A first attempt that can never succeed (its sink is gone from the configuration)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for d in dead:
                pipe.lpush(self.dead_key, self.signer.seal(self.dead_key, _enc(d)))
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    # --- what an operator and the metrics see -------------------------------------------------

    async def dead(self) -> list[Delivery]:
        out = []
        for raw in await self.redis.lrange(self.dead_key, 0, -1):
            try:
                out.append(_dec_delivery(self.signer.unseal(self.dead_key, raw)))
            except (Tampered, msgspec.DecodeError):
                continue
        return out

    async def replay(self) -> int:
        """Every dead letter back to the retry set, due now, with a fresh retry window."""
        moved = 0
        now = self._clock()
        for raw in await self.redis.lrange(self.dead_key, 0, -1):
            try:
                d = _dec_delivery(self.signer.unseal(self.dead_key, raw))
            except (Tampered, msgspec.DecodeError) as exc:
                self.tampering("notify-dead", self.dead_key, getattr(exc, "reason", "not-a-delivery"), raw, effect="left in the list")
                continue
            fresh = Delivery(event=d.event, sink=d.sink, attempt=0, first=now)
            moved += int(await self._replay(keys=[self.dead_key, self.retry_key], args=[raw, self._seal_delivery(fresh), now]))
        return moved

    async def pending(self) -> int:
        """Events written and not yet handed to every sink (or to the retry set)."""
        try:
            return int(await self.redis.xlen(self.stream))
        except ResponseError:
            return 0

    async def prune(self, idle: float) -> int:
        """Forget consumers (replicas gone) that hold nothing and were idle this long: every start adds one."""
        await self._ensure_group()
        gone = 0
        for c in await self.redis.xinfo_consumers(self.stream, GROUP):
            if c["pending"] == 0 and c["idle"] > idle * 1000:
                gone += await self.redis.xgroup_delconsumer(self.stream, GROUP, c["name"]) == 0
        return gone


class MemoryOutbox:
    """The outbox of an app without Redis: one process, nothing survives a restart."""

    durable = False

    def __init__(self, *, clock: Callable[[], float] = time.time, remember: int = 100_000) -> None:
        self._clock = clock
        self._seen: dict[str, None] = {}
        self._remember = remember
        self._queue: list[tuple[int, Event]] = []
        self._next = 0
        self._wake = asyncio.Event()
        self._retry: list[tuple[float, int, Delivery]] = []
        self._taken: dict[int, Delivery] = {}
        self.dead_letters: list[Delivery] = []

    async def add(self, event: Event) -> bool:
        if event.id in self._seen:
            return False
        self._seen[event.id] = None
        if len(self._seen) > self._remember:
            del self._seen[next(iter(self._seen))]
        self._next += 1
        self._queue.append((self._next, event))
        self._wake.set()
        return True

    async def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[int, Event]]:
        if not self._queue:
            self._wake.clear()
            try:
                async with asyncio.timeout(block_ms / 1000):
                    await self._wake.wait()
            except TimeoutError:
                return []
        taken, self._queue = self._queue[:count], self._queue[count:]
        return taken

    async def claim(self, consumer: str, count: int) -> list[tuple[int, Event]]:
        return []  # one process: nobody else could have read an entry

    async def done(self, entry_ids: list[int], retries: list[tuple[Delivery, float]] = ()) -> None:  # type: ignore[assignment]
        for delivery, due in retries:
            self._next += 1
            heapq.heappush(self._retry, (due, self._next, delivery))

    async def due(self, count: int, lease: float) -> list[tuple[int, Delivery]]:
        now, out = self._clock(), []
        while self._retry and self._retry[0][0] <= now and len(out) < count:
            _, n, delivery = heapq.heappop(self._retry)
            out.append((n, delivery))
        return out

    async def settle(self, member: int, *, again: tuple[Delivery, float] | None = None, dead: Delivery | None = None) -> None:
        if again is not None:
            await self.done([], [again])
        if dead is not None:
            self.dead_letters.insert(0, dead)

    async def bury(self, entry_id: int, dead: list[Delivery]) -> None:
        self.dead_letters[:0] = dead

    async def dead(self) -> list[Delivery]:
        return list(self.dead_letters)

    async def replay(self) -> int:
        now, moved = self._clock(), len(self.dead_letters)
        await self.done([], [(Delivery(event=d.event, sink=d.sink, attempt=0, first=now), now) for d in self.dead_letters])
        self.dead_letters.clear()
        return moved

    async def pending(self) -> int:
        return len(self._queue)

    async def prune(self, idle: float) -> int:
        return 0
