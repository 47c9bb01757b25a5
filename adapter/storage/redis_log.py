"""The event log in Redis, so any replica can serve, and take over, any log (a job's, a batch's).

Four parts, each a module: the leased writer (log_writer.py), the follower (log_follower.py),
question claims (claims.py) and what a batch keeps beside its log (batch_store.py); where the
keys are and how each kind is encoded is log_layout.py. This is the one object the pipeline holds.

The SSE ids clients resume from are the stream ids, so they are the same on every replica.
Takeover is dispatched by the log's kind to what the pipeline handed `start` (event_log.Kinds):
storage never imports the pipeline, and nothing is set into it from outside after start-up.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

import structlog

from ..metrics import Metrics
from .batch_store import BatchStore
from .claims import QuestionClaims
from .event_log import Kinds, Log
from .log_follower import FOLLOWER_CONNECTIONS, Follower
from .log_layout import Layout, Timing
from .log_writer import LeasedWriter
from .redis_store import RedisStore

__all__ = ["FOLLOWER_CONNECTIONS", "RedisLog", "replica_id"]

log = structlog.get_logger("adapter.jobs")


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class RedisLog:
    def __init__(self, store: RedisStore, ttl: float, *, lease: float, replica: str | None = None,
                 metrics: Metrics | None = None) -> None:
        self._metrics = metrics or Metrics()
        self._store = store
        self.replica = replica or replica_id()
        self.lease = lease
        layout, timing = Layout(store), Timing(ttl, lease)
        self.claims = QuestionClaims(store, ttl)
        self.batches = BatchStore(store, ttl)
        self.writer = LeasedWriter(store, layout, timing, self.claims, self, metrics=self._metrics)
        self.follower = Follower(store, layout, timing, self, metrics=self._metrics)
        # Off while this replica drains for shutdown: it must not take over the logs it is about to leave.
        self.accepting = True
        self._kinds: Kinds = {}

    @property
    def degraded(self) -> str | None:
        """Why Redis failed last, while it does."""
        return self._store.degraded

    def start(self, kinds: Kinds) -> None:
        """The pipeline's continuation of each kind of log: who resumes, stops and ends one (event_log.Continuation)."""
        self._kinds = dict(kinds)

    # --- the runner's side (log_writer.py) ---------------------------------------------------

    def own(self, entry: Log, written: int = 0) -> None:
        self.writer.own(entry, written)

    def owns(self, log_id: str) -> bool:
        return self.writer.owns(log_id)

    def write(self, entry: Log) -> None:
        self.writer.write(entry)

    async def written(self, entry: Log, timeout: float = 5.0) -> None:
        await self.writer.written(entry, timeout)

    async def readable(self, entry: Log, timeout: float = 5.0) -> bool:
        return await self.writer.readable(entry, timeout)

    def forget(self, entry: Log) -> None:
        """A log that never became readable, abandoned before anyone was told of it: stop writing and renewing it."""
        self.writer.forget(entry.id)

    async def hand_over(self, entry: Log, timeout: float = 2.0) -> None:
        await self.writer.hand_over(entry, timeout)

    async def flush_all(self, timeout: float) -> None:
        await self.writer.flush_all(timeout)

    # --- the follower's side (log_follower.py) -----------------------------------------------

    async def load(self, log_id: str) -> Log | None:
        return await self.follower.load(log_id)

    async def take_over_now(self, entry: Log) -> None:
        """An identical request found this log: if its runner is gone, take it over without waiting."""
        if entry.finished or self.writer.owns(entry.id) or not self.accepting:
            return
        await self.follower.take_over_now(entry)

    def stop_following(self) -> None:
        self.follower.stop()

    # --- between the two, dispatched by kind -------------------------------------------------

    def lost(self, entry: Log, written: int) -> None:
        """Another replica owns the log now (our lease lapsed): its kind stops its run; we follow its log."""
        log.warning("job.ownership_lost", job_id=entry.id, replica=self.replica,
                    effect="another replica runs it now; this one follows its log")
        if (kind := self._kinds.get(entry.kind)) is not None:
            kind.lost(entry)
        self.follower.follow(entry, written)

    async def taken_over(self, entry: Log, handed_over: bool) -> None:
        log.info("job.taken_over", job_id=entry.id, replica=self.replica, after_event=len(entry.events))
        self._metrics.job_takeovers.labels("handed_over" if handed_over else "lease_lapsed").inc()
        self.writer.own(entry, len(entry.events))
        if (kind := self._kinds.get(entry.kind)) is not None:
            await kind.resume(entry)

    def end(self, entry: Log, exc: Exception) -> None:
        """This replica's copy cannot go on: its kind ends it, so that every reader gets its end."""
        if (kind := self._kinds.get(entry.kind)) is not None:
            kind.end(entry, exc)

    # --- shutdown ----------------------------------------------------------------------------

    def background(self) -> list[asyncio.Task[None]]:
        return [*self.writer.background(), *self.follower.background()]

    def close(self) -> None:
        for background in self.background():
            background.cancel()

    async def aclose(self) -> None:
        await self.follower.aclose()
        await self.writer.aclose()
