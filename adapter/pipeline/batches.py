"""Batches: one task over many records, each item through the normal pipeline, durable as jobs are.

A batch is a log of events of its own kind (storage/event_log.Batch, mirrored to Redis like a
job's): `status`, then per item `item` {id, status, cached, result | error} and `progress`
(the counts), and `done` last. Its state follows from its events, so a replayed log rebuilds it:
readers on any replica follow it and resume with Last-Event-ID, and when the replica running it
dies, its lease lapses and another replica takes it over and continues with the items not done.

Two phases:
1. **Read.** Each record is read from the CRM backend with the creator's token (a 403 or 404
   fails that item alone, with the backend's problem) and rendered. The rendered inputs are kept
   beside the log. This phase needs the creator's token, which is never stored: a batch taken
   over before it finished reading fails the items it had not read (their problem says so).
2. **Ask.** BATCH_CONCURRENCY items at a time get their answer as every caller does (answers.py
   `ask`, with the key `prepare` derived): the cache (a hit is instant and free), single flight
   with any identical request, the model, validation and repair, and the write-back (skipped
   after a takeover, as for jobs).

A batch is background work: its model calls yield to interactive ones at the gateway bulkhead
(`resilience.BACKGROUND`), and each model call and each CRM read takes a token of the user's
bucket (RATE_LIMIT_<TASK>, CRM_READS_PER_USER) only while a quarter of it stays free for their
interactive requests, waiting for the bucket to refill instead of failing an item. A user runs
at most MAX_BATCHES_PER_USER batches at a time (storage/quota.py). Cancelling lets running items
finish; queued ones never start. An ended batch is kept JOB_RETENTION_SECONDS (its `done` says
when it ended), then it and its token are gone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import structlog

from ..errors import AdapterError, BatchItemLost, JobLogUnavailable, ShuttingDown, TooManyAtOnce
from ..storage.event_log import BATCH, Batch
from ..storage.ids import new_id
from ..storage.quota import RunningBatches
from ..tasks import Task
from .answers import Answer, Delivery
from .jobs import READABLE_WITHIN, Jobs
from .service import Prepared

log = structlog.get_logger("adapter.batches")
PREFIX = "aibatch"
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
FINAL = frozenset({"succeeded", "failed", "cancelled"})
READ_CONCURRENCY = 8  # CRM reads at a time while a batch starts: quick, and far below CRM_MAX_CONNECTIONS


def items_of(job: Batch) -> dict[str, dict[str, Any]]:
    """Each item's latest `item` event, by id."""
    items: dict[str, dict[str, Any]] = {}
    for ev in job.events:
        if ev.event == "item":
            data = _decode(ev.data)
            items[data["id"]] = data
    return items


def counts_of(ids: Iterable[str], items: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled", "cached"), 0)
    for item_id in ids:
        item = items.get(item_id, {"status": "queued"})
        counts[item["status"]] += 1
        counts["cached"] += bool(item.get("cached"))
    return counts


class _Head(msgspec.Struct):
    """What the counts need of an `item` event: its result or problem is not decoded."""

    id: str
    status: str
    cached: bool = False


_decode_head = msgspec.json.Decoder(_Head).decode


class Tally:
    """A running batch's counts, folded in from its log as it grows: a `progress` event costs the
    events since the last one, not a pass over the whole log (which made a batch quadratic)."""

    def __init__(self, ids: list[str]) -> None:
        self.seen = 0
        self.status: dict[str, str] = {}
        self.cached: set[str] = set()
        self.counts = counts_of(ids, {})

    def fold(self, job: Batch) -> dict[str, int]:
        for ev in job.events[self.seen:]:
            if ev.event == "item":
                head = _decode_head(ev.data)
                self.counts[self.status.get(head.id, "queued")] -= 1
                self.counts[head.status] += 1
                self.status[head.id] = head.status
                if head.cached != (head.id in self.cached):
                    self.counts["cached"] += 1 if head.cached else -1
                    (self.cached.add if head.cached else self.cached.discard)(head.id)
        self.seen = len(job.events)
        return dict(self.counts)


class Batches:
    def __init__(self, jobs: Jobs, *, clock: Callable[[], float] = time.time, quota: RunningBatches | None = None) -> None:
        self.jobs = jobs
        self.answers = jobs.answers
        self.service = jobs.service
        self.settings = jobs.settings
        self.mirror = jobs.mirror
        self._clock = clock
        self.quota = quota  # each user's running batches (MAX_BATCHES_PER_USER)
        self._cancelled: set[str] = set()
        self._tallies: dict[str, Tally] = {}
        self._sweeper: asyncio.Task[None] | None = None
        jobs.kinds[BATCH] = self

    @property
    def running(self) -> int:
        """Batches this replica runs now (each has its tally while its runner lives)."""
        return len(self._tallies)

    # --- the API's side -------------------------------------------------------------------------

    async def create(self, task: Task, ids: list[str], options: dict[str, Any], authorization: str, user: str) -> Batch:
        """Start a batch (validated by the caller): 202 at once, items run in the background."""
        if self.jobs.draining:
            raise ShuttingDown("this replica is shutting down and takes no new batches; retry (another replica answers)")
        batch_id = new_id(PREFIX, self._clock())
        if self.quota is not None:
            # 429 naming MAX_BATCHES_PER_USER; from here to the runner's start nothing awaits, so the
            # place taken is given back by the runner (`_finish`) and by nothing else.
            try:
                await self.quota.start(user, batch_id)
            except TooManyAtOnce:
                self.service.metrics.limit_refusals.labels("MAX_BATCHES_PER_USER").inc()
                raise
        ttl = self.settings.batch_max_seconds + self.settings.job_retention_seconds
        job = Batch(id=batch_id, task=task.name, expires=self._clock() + ttl, ids=ids, options=options, user=user)
        self.jobs.adopt(job)
        self.jobs.emit(job, "status", {"state": "queued", "message": f"{len(ids)} item(s) queued", "batch_id": job.id})
        self.jobs.run_owned(job, self._run(job, task, authorization, None))
        if self.mirror is not None:
            await self.mirror.batches.add(job.id)
            # Its events_url must work on every replica from now on: no 202 before its log is readable (issue 24).
            if not await self.mirror.readable(job, READABLE_WITHIN):
                self.jobs.abandon(job)
                await self.mirror.batches.drop(job.id)
                if self.quota is not None:
                    await self.quota.ended(user, job.id)
                raise JobLogUnavailable(f"the job log store (Redis) did not take the new batch's log within {READABLE_WITHIN:g} s "
                                        f"({self.mirror.degraded or 'no answer'}); nothing was started: retry shortly")
        log.info("batch.created", batch_id=job.id, task=task.name, items=len(ids))
        return job

    def expired(self, job: Batch) -> bool:
        """An ended batch is kept JOB_RETENTION_SECONDS: after that neither its token nor its creator reads it."""
        ended = job.ended_at
        return ended is not None and ended + self.settings.job_retention_seconds <= self._clock()

    async def cancel(self, job: Batch) -> None:
        """Queued items never start; running ones finish. Whichever replica runs it sees the request."""
        if job.finished:
            return
        self._cancelled.add(job.id)
        if self.mirror is not None:
            await self.mirror.batches.request_cancel(job.id)
        log.info("batch.cancel_requested", batch_id=job.id)

    async def cancel_requested(self, job: Batch) -> bool:
        if job.id in self._cancelled:
            return True
        return self.mirror is not None and await self.mirror.batches.cancel_requested(job.id)

    # --- the runner's side ----------------------------------------------------------------------

    async def resume(self, job: Batch) -> None:
        """This replica took an orphaned batch over: continue with the items not done."""
        self.jobs.track(job)
        task = self.service.tasks.get(job.task)
        if job.finished:
            return
        if task is None:
            await self._finish(job, cancelled=False, note=f"batch {job.id} is for task {job.task}, which this sidecar does not serve")
            return
        inputs = await self.mirror.batches.load_inputs(job.id) if self.mirror is not None else {}
        # Each item's question as `prepare` derived it: its kept input, keyed again; nobody's token.
        prepared = {item_id: self.service.prepared_again(task, item_id, text, user=job.user) for item_id, text in inputs.items()}
        items = items_of(job)
        done = sum(1 for item in items.values() if item["status"] in FINAL)
        # The items the dead runner was asking: their single-flight locks outlive it (CACHE_LOCK_TIMEOUT).
        in_flight = frozenset(i for i, item in items.items() if item["status"] == "running")
        log.info("batch.resumed", batch_id=job.id, replica=self.mirror.replica if self.mirror else None, done=done,
                 read=len(inputs), in_flight=len(in_flight))
        self.jobs.emit(job, "status", {"state": "running", "resumed": True,
                                       "message": f"resumed on another replica after {done} item(s)"})
        self.jobs.run_owned(job, self._run(job, task, None, prepared, in_flight))

    def lost(self, job: Batch) -> None:
        """Another replica runs the batch now: stop its runner here (this replica follows its log)."""
        self.jobs.lost(job)

    def end(self, job: Batch, exc: Exception) -> None:
        """This replica's copy cannot go on (expired, tampered, or shut down without Redis): `done` says
        failed, with the counts so far and why, as every batch's `done` does (never a job's `error`)."""
        detail = getattr(exc, "detail", None) or str(exc)
        ended = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        self.jobs.emit(job, "done", {"status": "failed", "counts": counts_of(job.ids, items_of(job)), "ended_at": ended,
                                     "message": detail})
        job.expires = min(job.expires, ended.timestamp() + self.settings.job_retention_seconds)

    async def _run(self, job: Batch, task: Task, authorization: str | None, inputs: dict[str, Prepared] | None,
                   in_flight: frozenset[str] = frozenset()) -> None:
        ids = job.ids
        note = None
        self._tallies[job.id] = Tally(ids)
        try:
            async with asyncio.timeout(max(job.expires - self.settings.job_retention_seconds - self._clock(), 1)):
                if job.status == "queued":
                    self.jobs.emit(job, "status", {"state": "running", "message": "reading the records"})
                read = await self._read(job, task, ids, authorization, inputs)
                await self._ask_all(job, ids, read, in_flight)
        except TimeoutError:
            note = "the batch reached BATCH_MAX_SECONDS: the items not done were cancelled"
            self._cancel_rest(job, ids, note)
        except Exception as exc:  # a bug must still end the batch with `done`, never hang its readers
            log.error("batch.crashed", batch_id=job.id, exc_info=exc)
            note = "the batch stopped unexpectedly: the items not done were cancelled"
            self._cancel_rest(job, ids, note)
        finally:
            self._tallies.pop(job.id, None)
        if not job.finished:
            await self._finish(job, cancelled=await self.cancel_requested(job), note=note)

    async def _read(self, job: Batch, task: Task, ids: list[str], authorization: str | None,
                    inputs: dict[str, Prepared] | None) -> dict[str, Prepared]:
        """Every item's question: read now (with the creator's token), or kept by the replica that did."""
        inputs = dict(inputs or {})
        items = items_of(job)
        unread = [i for i in ids if i not in inputs and items.get(i, {}).get("status") not in FINAL]
        if not unread:
            return inputs
        if authorization is None:
            for item_id in unread:
                self._fail(job, ids, item_id, BatchItemLost(
                    "the replica running this batch stopped before it read this record, and the creator's token is "
                    "never stored: start a batch for the failed items"))
            return inputs
        gate = asyncio.Semaphore(READ_CONCURRENCY)
        refused: list[AdapterError] = []

        async def read(item_id: str) -> None:
            async with gate:
                if await self.cancel_requested(job):  # cancelled while reading: the rest is never read
                    self._item(job, ids, {"id": item_id, "status": "cancelled", "cached": False})
                    return
                if refused:  # the backend refused the creator's token: it would refuse every other read too
                    self._fail(job, ids, item_id, refused[0])
                    return
                request = msgspec.convert({task.id_field: item_id, **job.options}, task.request_type)
                try:
                    # Paced by the user's CRM_READS_PER_USER bucket: a batch waits for it, never fails on it.
                    prepared = await self.service.prepare(task, request, authorization, job.user, background=True)
                except AdapterError as exc:  # the backend's 403 or 404 fails this item alone
                    if exc.status == 401:
                        refused.append(exc)
                    self._fail(job, ids, item_id, exc)
                    return
                inputs[item_id] = prepared

        await asyncio.gather(*(read(i) for i in unread))
        if self.mirror is not None:
            await self.mirror.batches.save_inputs(job.id, {i: inputs[i].agent_input for i in unread if i in inputs})
        return inputs

    async def _ask_all(self, job: Batch, ids: list[str], questions: dict[str, Prepared],
                       in_flight: frozenset[str] = frozenset()) -> None:
        gate = asyncio.Semaphore(self.settings.batch_concurrency)
        items = items_of(job)
        todo = [i for i in ids if i in questions and items.get(i, {}).get("status") not in FINAL]

        async def one(item_id: str) -> None:
            async with gate:
                if await self.cancel_requested(job):
                    self._item(job, ids, {"id": item_id, "status": "cancelled", "cached": False})
                    return
                self._item(job, ids, {"id": item_id, "status": "running", "cached": False}, progress=False)
                try:
                    # Background work: the user's budget is waited for (a quarter left to their interactive
                    # requests), and its model call yields to interactive ones at the bulkhead. An item the
                    # dead runner was asking is asked again without waiting out that runner's lock on it.
                    await self.answers.ask(questions[item_id], priority="background", delivery=_Item(self, job, ids, item_id),
                                           resumed=item_id in in_flight)
                except AdapterError as exc:
                    self._fail(job, ids, item_id, exc)

        await asyncio.gather(*(one(i) for i in todo))

    # --- events ---------------------------------------------------------------------------------

    def _item(self, job: Batch, ids: list[str], data: dict[str, Any], *, result: bytes | None = None,
              error: bytes | None = None, progress: bool = True) -> None:
        body = _encode(data)
        if result is not None:  # already-encoded JSON: spliced in rather than decoded and encoded again
            body = body[:-1] + b',"result":' + result + b"}"
        elif error is not None:
            body = body[:-1] + b',"error":' + error + b"}"
        self.jobs.emit(job, "item", body)
        if progress:
            tally = self._tallies.get(job.id)
            self.jobs.emit(job, "progress", tally.fold(job) if tally is not None else counts_of(ids, items_of(job)))

    def _fail(self, job: Batch, ids: list[str], item_id: str, exc: Exception) -> None:
        problem = self.jobs.describe(exc, job)
        self._item(job, ids, {"id": item_id, "status": "failed", "cached": False}, error=problem)

    def _cancel_rest(self, job: Batch, ids: list[str], why: str) -> None:
        items = items_of(job)
        for item_id in ids:
            if items.get(item_id, {}).get("status") not in FINAL:
                self._item(job, ids, {"id": item_id, "status": "cancelled", "cached": False}, progress=False)
        log.warning("batch.stopped", batch_id=job.id, reason=why)

    async def _finish(self, job: Batch, *, cancelled: bool, note: str | None = None) -> None:
        ids = job.ids
        if cancelled:
            self._cancel_rest(job, ids, "cancelled")
        counts = counts_of(ids, items_of(job))
        ended = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        self.jobs.emit(job, "done", {"status": "cancelled" if cancelled else "completed", "counts": counts,
                                     "ended_at": ended, **({"message": note} if note else {})})
        # Kept JOB_RETENTION_SECONDS from now, not from its BATCH_MAX_SECONDS deadline.
        job.expires = min(job.expires, ended.timestamp() + self.settings.job_retention_seconds)
        log.info("batch.done", batch_id=job.id, status=job.status, **counts)
        await self.service.notifier.batch_finished(job.id, job.task, counts, cancelled, job.user)
        if self.quota is not None:
            await self.quota.ended(job.user, job.id)
        if self.mirror is not None:
            await self.mirror.batches.drop(job.id)

    # --- every replica looks after the running batches -----------------------------------------

    def start_sweeper(self) -> None:
        if self.mirror is not None and self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="batch sweeper")

    async def _sweep(self) -> None:
        """Follow every running batch, so one whose runner died is taken over within a lease or two
        even when nobody reads its events."""
        assert self.mirror is not None
        while True:
            await asyncio.sleep(self.settings.job_lease_seconds / 2)
            if not self.mirror.accepting:
                continue
            for batch_id in await self.mirror.batches.active():
                if self.jobs.get(batch_id) is not None:
                    continue  # ours, or followed already
                try:
                    found = await self.jobs.find(batch_id)
                except AdapterError:
                    continue  # Redis is failing: the next sweep tries again
                if found is None or found.finished:
                    if isinstance(found, Batch) and self.quota is not None:
                        await self.quota.ended(found.user, batch_id)
                    await self.mirror.batches.drop(batch_id)

    def background(self) -> list[asyncio.Task[None]]:
        return [self._sweeper] if self._sweeper is not None else []

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()


class _Item(Delivery):
    """A batch item takes its answer as one `item` event (and the batch's `progress`)."""

    def __init__(self, batches: Batches, job: Batch, ids: list[str], item_id: str) -> None:
        self._batches, self._job, self._ids, self._id = batches, job, ids, item_id

    def answered(self, answer: Answer) -> None:
        self._batches._item(self._job, self._ids, {"id": self._id, "status": "succeeded", "cached": answer.cached},
                            result=answer.event)
