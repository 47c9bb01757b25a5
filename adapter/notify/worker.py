"""The delivery worker every replica runs: drains the outbox, retries, dead-letters.

New events come from the outbox stream through the consumer group, so each goes to one replica
(and to another if that one dies before acknowledging it); each sink gets one attempt at once, and
a sink that fails gets a retry scheduled in the same step as the entry's acknowledgement. Retries
back off exponentially with full jitter (WEBHOOK_RETRY_BASE_DELAY doubling up to
WEBHOOK_RETRY_MAX_DELAY) until WEBHOOK_RETRY_WINDOW has passed since the first failure, then the
delivery goes to the dead-letter list. Nothing here runs inside a request: a slow webhook delays
only its own delivery (at most WEBHOOK_TIMEOUT; BATCHES_AT_ONCE batches of READ_COUNT events at a time).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog

from ..metrics import Metrics
from ..settings import Settings
from .outbox import Delivery
from .triggers import Event

log = structlog.get_logger("adapter.notify")
READ_COUNT = 32  # outbox entries read (and handed to each sink) together
BATCHES_AT_ONCE = 8  # read batches delivering at once
READ_BLOCK_MS = 400  # how long a read waits for new events (retries that fall due wait at most this); below
# the Redis client's socket timeout (1 s, storage/redis_store.py), which would otherwise cut every idle read
FAULT_PAUSE = 1.0  # after Redis failed a read
RETRY_LOOK_EVERY = 0.25  # seconds between two looks for retries that fell due
PRUNE_EVERY = 300.0  # seconds between two looks for consumers of replicas long gone
PRUNE_IDLE = 3_600.0  # a consumer idle this long with nothing pending is a replica that is gone


class Sink(Protocol):
    name: str

    def wants(self, event: Event) -> bool: ...
    async def send(self, events: list[Event]) -> list[str | None]: ...


def backoff(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential, with full jitter over its upper half: attempt 1 waits base/2..base, then doubling up to cap."""
    delay = min(base * 2 ** max(attempt - 1, 0), cap)
    return delay / 2 + rand() * delay / 2


class Worker:
    def __init__(self, outbox: Any, sinks: Mapping[str, Sink], settings: Settings, metrics: Metrics, consumer: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.outbox = outbox
        self.sinks = dict(sinks)
        self.settings = settings
        self.metrics = metrics
        self.consumer = consumer
        self._clock = clock
        self._slots = asyncio.Semaphore(BATCHES_AT_ONCE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="notify worker")

    def background(self) -> list[asyncio.Task[Any]]:
        return [*([self._loop] if self._loop is not None else []), *self._tasks]

    async def _run(self) -> None:
        faulted = False
        now = time.monotonic()
        # Claims and retries are looked for on a clock, not on every read: under load a read returns a
        # few entries at a time, and two more round trips per read were most of a notification's CPU.
        next_prune, next_claim, next_due = now + PRUNE_EVERY, now, now
        claim_every = min(max(self.settings.notify_claim_idle_seconds / 4, 0.1), 5.0)
        while True:
            try:
                now = time.monotonic()
                if now >= next_prune:
                    next_prune = now + PRUNE_EVERY
                    await self.outbox.prune(PRUNE_IDLE)
                if now >= next_claim:
                    next_claim = now + claim_every
                    if claimed := await self.outbox.claim(self.consumer, READ_COUNT):
                        await self._spawn(self._first(claimed))
                if entries := await self.outbox.read(self.consumer, READ_COUNT, READ_BLOCK_MS):
                    await self._spawn(self._first(entries))
                if time.monotonic() >= next_due:
                    next_due = time.monotonic() + RETRY_LOOK_EVERY
                    for member, delivery in await self.outbox.due(READ_COUNT, self.settings.notify_claim_idle_seconds):
                        await self._spawn(self._again(member, delivery))
                if faulted:
                    faulted = False
                    log.info("notify.outbox_recovered")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away, or a bug: the outbox keeps the events; try again shortly
                if not faulted:
                    log.warning("notify.outbox_unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
                faulted = True
                await asyncio.sleep(FAULT_PAUSE)

    async def _spawn(self, work: Any) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(work)
        self._tasks.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._slots.release()
            if not t.cancelled() and (exc := t.exception()) is not None:
                log.error("notify.delivery_crashed", exc_info=exc)

        task.add_done_callback(finished)

    def _due(self, attempt: int) -> float:
        s = self.settings
        return self._clock() + backoff(attempt, s.webhook_retry_base_delay, s.webhook_retry_max_delay)

    async def _first(self, entries: list[tuple[Any, Event]]) -> None:
        """New events read together: each sink gets them in one call; the entries are acknowledged, and
        the failed deliveries scheduled again, in one step."""
        now = self._clock()
        for _, event in entries:
            self.metrics.notify_outbox_lag.observe(max(now - event.created_at, 0.0))
        wanted = [(sink, [e for _, e in entries if sink.wants(e)]) for sink in self.sinks.values()]
        wanted = [(sink, events) for sink, events in wanted if events]
        outcomes = await asyncio.gather(*(sink.send(events) for sink, events in wanted))
        retries, delivered = [], {}
        for (sink, events), errors in zip(wanted, outcomes, strict=True):
            for event, error in zip(events, errors, strict=True):
                if error is None:
                    self.metrics.notify_delivered.labels(_kind(sink.name)).inc()
                    delivered.setdefault(event.id, []).append(sink.name)
                    continue
                self.metrics.notify_retried.labels(_kind(sink.name)).inc()
                log.info("notify.retry", event_id=event.id, sink=sink.name, attempt=1, error=error)
                retries.append((Delivery(event=event, sink=sink.name, attempt=1, first=now, error=error), self._due(1)))
        for event_id, sinks in delivered.items():
            log.info("notify.delivered", event_id=event_id, sinks=sinks, attempts=1)
        await self.outbox.done([entry_id for entry_id, _ in entries], retries)

    async def _again(self, member: Any, d: Delivery) -> None:
        sink = self.sinks.get(d.sink)
        if sink is None:  # its URL left WEBHOOK_URLS: it is never contacted again; an operator may replay
            await self._dead(member, Delivery(event=d.event, sink=d.sink, attempt=d.attempt, first=d.first,
                                              error="this sink is no longer configured"))
            return
        [error] = await sink.send([d.event])
        if error is None:
            self.metrics.notify_delivered.labels(_kind(sink.name)).inc()
            log.info("notify.delivered", event_id=d.event.id, sinks=[sink.name], attempts=d.attempt + 1)
            await self.outbox.settle(member)
            return
        failed = Delivery(event=d.event, sink=d.sink, attempt=d.attempt + 1, first=d.first, error=error)
        if self._clock() - d.first >= self.settings.webhook_retry_window:
            await self._dead(member, failed)
            return
        self.metrics.notify_retried.labels(_kind(sink.name)).inc()
        log.info("notify.retry", event_id=d.event.id, sink=sink.name, attempt=failed.attempt, error=error)
        await self.outbox.settle(member, again=(failed, self._due(failed.attempt)))

    async def _dead(self, member: Any, d: Delivery) -> None:
        self.metrics.notify_dead_lettered.labels(_kind(d.sink)).inc()
        log.warning("notify.dead_letter", event_id=d.event.id, sink=d.sink, attempts=d.attempt, error=d.error)
        await self.outbox.settle(member, dead=d)


def _kind(sink: str) -> str:
    return sink.partition(":")[0]  # crm or webhook: one label value per kind, not per URL
