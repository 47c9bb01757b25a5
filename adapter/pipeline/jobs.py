"""Streamed AI jobs: the sidecar is the gateway job's only reader; clients read the job's log.

A job runs in its own task, so it finishes (and fills the cache) even when every
client has gone: the model's work is paid for either way. Each event gets a
consecutive id (1, 2, ...), which is what `Last-Event-ID` resumes from. With
Redis the log is also written to a Redis Stream, so another replica can serve it,
and the replica running a job holds a short lease on it: when the lease lapses
(the replica died, or handed the job over while shutting down), the next replica
that sees the job takes it over, asks the model again and continues the same log.

A job gets its answer as the synchronous routes do (answers.py `ask`): one key derivation,
one freshness rule, one stale-if-error rule, one single flight (a job and a synchronous request
for the same question make one model call between them), one write-back. It differs in how it
delivers: progress and the answer are events in its log. Its start asks `hit` and `admit` first,
so that the 202 says HIT or MISS and a 429 comes before any job exists. Stream readers also share
the job itself: identical streams follow one job (and, across replicas, the claim on the question).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import structlog

from ..storage.event_log import JOB, Continuation, Job, JobStatus, Log
from ..storage.redis_log import RedisLog
from ..storage.ids import may_be_live, new_id
from ..storage.keys import CacheKey
from ..tasks import Task
from .cache import key_lock
from ..errors import AdapterError, CrmRefused, Forbidden, GatewayProtocolError, JobLogTampered, JobLogUnavailable, NotFound, ShuttingDown
from .answers import Answer, Answers, Delivery
from .service import AiService, Prepared

log = structlog.get_logger("adapter.jobs")
# How long a 202 waits for the new log to be readable in Redis (the writer retries meanwhile).
READABLE_WITHIN = 5.0
_encode = msgspec.json.Encoder().encode


def well_formed(job_id: str) -> bool:
    """Whether `job_id` is an id as the sidecar makes them (`<kind>_<32 hex digits>`: aijob, aibatch).

    Only such an id is looked up in Redis. A job's keys are `<prefix>:job:<id>` and `<id>:log`,
    `<id>:inputs`, ...: an id from a path (anyone's, before any token is checked), or from a claim
    read back from Redis (unsigned), that ends in `:log` would read another key of a job as its
    metadata, and fail as Redis trouble or as tampering that nobody did.
    """
    kind, _, tail = job_id.partition("_")
    return kind.isascii() and kind.isalpha() and len(tail) == 32 and all(c in _HEX for c in tail)


_HEX = frozenset("0123456789abcdef")


# An error about a log -> its `error` event's problem JSON (web/problems.py renders it, and knows the log's URL).
Describe = Callable[[Exception, Log], bytes]


class Jobs:
    """The logs this replica runs or follows (a job's, a batch's), and the job kind of them."""

    def __init__(self, answers: Answers, *, describe: Describe, clock: Callable[[], float] = time.time,
                 mirror: RedisLog | None = None) -> None:
        self.answers = answers
        self.service: AiService = answers.service
        self.describe = describe
        self.settings = answers.settings
        self._clock = clock
        self._jobs: dict[str, Log] = {}
        self._by_key: dict[CacheKey, Job] = {}
        self._runners: set[asyncio.Task[None]] = set()
        self.mirror = mirror  # the event log in Redis, with Redis: other replicas follow and take over logs through it
        self._admitting: dict[CacheKey, asyncio.Lock] = {}
        # Each kind of log and what continues, stops and ends one (a batch adds its own): the Redis
        # log is handed these at start-up (RedisLog.start), and shutdown ends a log by its kind.
        self.kinds: dict[str, Continuation] = {JOB: self}
        self._loading: dict[str, asyncio.Lock] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self.draining = False
        # Set when this replica closes its SSE responses for good (shutdown): readers end cleanly
        # and the browser's EventSource reconnects, with Last-Event-ID, to another replica.
        self.closing = asyncio.Event()

    @property
    def running(self) -> int:
        return len(self._runners)

    async def start(self, task: Task, request: Any, authorization: str, mode: str, user: str = "") -> tuple[Job, str]:
        """A job for this question and the X-Cache it amounts to. The CRM check runs first."""
        if self.draining:
            raise ShuttingDown("this replica is shutting down and takes no new jobs; retry (another replica answers)")
        prepared = await self.service.prepare(task, request, authorization, user)
        key = prepared.key
        self._purge()
        if (hit := await self.answers.hit(prepared, mode)) is not None:  # type: ignore[arg-type]
            job = self._new(prepared, mode=mode)
            await self.answers.deliver(prepared, hit, _Delivery(self, job))
            await self._readable(job)  # a hit's events_url works on every replica too
            return job, "HIT"
        async with key_lock(self._admitting, key):
            shared = self._by_key.get(key) if mode != "no-store" else None
            if shared is not None and not shared.finished:
                return self._shared(shared)
            job_id = new_id("aijob", self._clock())
            if mode != "no-store" and self.mirror is not None:
                # Another replica may already be asking the model this question: follow its job,
                # or take it over at once if its runner is gone.
                holder = await self.mirror.claims.claim(key, job_id)
                if holder != job_id:
                    try:
                        remote = await self.find(holder)
                    except JobLogTampered:
                        remote = None  # reported by the job log; this question gets a job of its own
                    # The claim itself is not signed: its job's (signed) metadata must name this very
                    # question, or a claim pointed at another user's job would serve that job here.
                    if isinstance(remote, Job) and not remote.finished and remote.key == key:
                        await self.mirror.take_over_now(remote)
                        return self._shared(remote)
                    # The holder ended (or vanished) without letting go of the question: ours now.
                    await self.mirror.claims.reclaim(key, holder, job_id)
            await self.answers.admit(prepared)  # a new job is a model call: rate-limited like one (joining one is free)
            job = self._new(prepared, job_id, mode=mode)
            if mode != "no-store":
                self._by_key[key] = job
            self._start_runner(job, prepared)
        await self._readable(job)  # its events_url must work on every replica from now on
        return job, "BYPASS" if mode == "no-store" else "MISS"

    def _shared(self, job: Job) -> tuple[Job, str]:
        """An identical question's job, followed instead of asking again: a coalesced miss."""
        assert job.key is not None
        self.service.cache.note_coalesced(job.key)
        self.service.metrics.cache.labels(job.task, "miss").inc()
        return job, "MISS"

    async def _readable(self, job: Log) -> None:
        """With Redis, the 202 naming a job waits until its log is readable there (issue 24): a job whose
        first write never succeeds is stopped and answered 503, never a 202 whose events_url is a 404
        on every other replica."""
        if self.mirror is None or await self.mirror.readable(job, READABLE_WITHIN):
            return
        self.abandon(job)
        raise JobLogUnavailable(f"the job log store (Redis) did not take the new job's log within {READABLE_WITHIN:g} s "
                                f"({self.mirror.degraded or 'no answer'}); nothing was started: retry shortly")

    def abandon(self, job: Log) -> None:
        """A log nobody was told of (its 202 was never sent): stop its run, forget it here and in the mirror."""
        if (runner := self._running.pop(job.id, None)) is not None:
            runner.cancel()
        if self.mirror is not None:
            self.mirror.forget(job)
        self._drop(job)

    def may_be_live(self, log_id: str, lifetime: float) -> bool:
        """Whether a log this sidecar does not find could still be running: Redis is in use (a restart may have
        emptied it until the runner repairs the log) and the id says it was made less than `lifetime` ago."""
        return self.mirror is not None and may_be_live(log_id, self._clock(), lifetime)

    def _start_runner(self, job: Job, prepared: Prepared, *, resumed: bool = False) -> None:
        run = self._run(job, prepared, resumed=resumed)
        self.run_owned(job, self.service.tracing.run("job.run", run, **{"job.id": job.id, "job.task": job.task}))

    def adopt(self, job: Log) -> None:
        """A log this replica writes (a batch's too): found by `find`, mirrored to Redis, purged when expired."""
        self._jobs[job.id] = job
        if self.mirror is not None:
            self.mirror.own(job)

    def emit(self, job: Log, event: str, data: Any) -> None:
        self._emit(job, event, data)

    def run_owned(self, job: Log, run: Coroutine[Any, Any, None]) -> None:
        """Run the coroutine that writes this job's log; shutdown drains it and a lost lease stops it."""
        runner = asyncio.create_task(run, name=f"job {job.id}")
        self._runners.add(runner)
        self._running[job.id] = runner
        runner.add_done_callback(self._runners.discard)
        runner.add_done_callback(lambda _: self._running.pop(job.id, None))

    def track(self, log: Log) -> None:
        """A log this replica took over (any kind): found by `find` from now on."""
        self._jobs[log.id] = log

    async def resume(self, job: Job) -> None:
        """This replica took an orphaned job over: continue its log, asking the model again if need be."""
        self._jobs[job.id] = job
        task = self.service.tasks.get(job.task)
        if job.finished:
            return
        if job.result is not None or job.error is not None or task is None:
            # The old runner got as far as the outcome: only `done` is missing.
            log.info("job.resumed", job_id=job.id, replica=self._replica, rerun=False, events=len(job.events))
            if task is None:
                self._fail(job, GatewayProtocolError(f"job {job.id} is for unknown task {job.task}"))
            else:
                self._finish(job, "succeeded" if job.result is not None else "failed")
            return
        # Its key as `prepare` derived it (derived again from the kept input for a log of the release
        # before CacheKey, which kept only the rendered key); nobody's token: the write-back is skipped.
        prepared = self.service.prepared_again(task, job.record_id, job.agent_input, job.key)
        job.key = prepared.key
        if job.mode != "no-store" and job.key not in self._by_key:
            self._by_key[job.key] = job
        log.info("job.resumed", job_id=job.id, replica=self._replica, rerun=True, events=len(job.events))
        self._emit(job, "status", {"state": "running", "resumed": True,
                                   "message": "resumed on another replica: asking the agent again"})
        self._start_runner(job, prepared, resumed=True)

    @property
    def _replica(self) -> str | None:
        return self.mirror.replica if self.mirror is not None else None

    def lost(self, job: Log) -> None:
        """Another replica owns the log now (our lease lapsed): stop our run; we follow its log."""
        if (runner := self._running.pop(job.id, None)) is not None:
            runner.cancel()

    def end(self, job: Job, exc: Exception) -> None:
        """This replica's copy cannot go on (expired, tampered): every reader gets `error` then `done`."""
        self._fail(job, exc)

    async def check_reader(self, job: Job, authorization: str, user: str) -> None:
        """A reader without the job's token: whoever the CRM backend lets read the job's record may read the
        job about it (the read spends one of the user's CRM_READS_PER_USER); else Forbidden."""
        task = self.service.tasks.get(job.task)
        if task is None:  # a job another replica runs for a task this one does not serve
            raise NotFound(f"job {job.id} is for task {job.task}, which this sidecar does not serve")
        await self.service.admit_read(user)
        try:
            await self.service.crm.get_record(task.record_kind, job.record_id, authorization)
        except CrmRefused:
            raise Forbidden(f"the CRM backend does not let this caller read the job's {task.record_kind}") from None

    def get(self, job_id: str) -> Log | None:
        job = self._jobs.get(job_id)
        if job is not None and job.expires <= self._clock():
            self._drop(job)
            return None
        return job

    async def find(self, job_id: str) -> Log | None:
        """The job, run here or (through the Redis log) on another replica."""
        job = self.get(job_id)
        if job is None and self.mirror is not None and well_formed(job_id):
            # One load per job: two readers arriving together must share one copy and one follower.
            async with key_lock(self._loading, job_id):
                if (job := self.get(job_id)) is None and (job := await self.mirror.load(job_id)) is not None:
                    self._jobs[job.id] = job  # later readers on this replica share the one follower
        return job

    def _new(self, prepared: Prepared, job_id: str | None = None, *, mode: str = "default") -> Job:
        ttl = self.settings.job_max_seconds + self.settings.job_retention_seconds
        job = Job(id=job_id or new_id("aijob", self._clock()), task=prepared.task.name, record_id=prepared.record_id,
                  key=prepared.key, expires=self._clock() + ttl, agent_input=prepared.agent_input, mode=mode)  # type: ignore[arg-type]
        self._jobs[job.id] = job
        if self.mirror is not None:
            self.mirror.own(job)
        self._emit(job, "status", {"state": "queued", "message": "queued", "job_id": job.id})
        return job

    def _emit(self, job: Log, event: str, data: Any) -> None:
        job.emit(event, data)
        self._mirror(job)

    def _mirror(self, job: Log) -> None:
        if self.mirror is not None:
            self.mirror.write(job)

    def _finish(self, job: Job, status: JobStatus, *, cached: bool = False, stale: bool = False) -> None:
        self._emit(job, "done", {"status": status, "cached": cached, **({"stale": True} if stale else {})})
        if self._by_key.get(job.key) is job:
            del self._by_key[job.key]

    async def _run(self, job: Job, prepared: Prepared, *, resumed: bool = False) -> None:
        """The job's answer, delivered as events; a job taken over asks again (its start's admission was the first runner's)."""
        try:
            # The creator's token (in `prepared`, held by this coroutine only, never stored or logged)
            # makes the write-back, after `done`; a job taken over has none, and skips it.
            await self.answers.ask(prepared, mode=job.mode, delivery=_Delivery(self, job), resumed=resumed, owned=True,
                                   deadline=self.settings.job_max_seconds, admitted=not resumed)
        except AdapterError as exc:
            if not job.finished:
                self._fail(job, exc)
        except Exception as exc:  # a bug must still end the job with error + done, never hang its readers
            log.error("job.crashed", job_id=job.id, exc_info=exc)
            if not job.finished:
                self._fail(job, exc)
        log.info("job.done", job_id=job.id, task=job.task, status=job.status, events=len(job.events), replica=self._replica)

    def _fail(self, job: Job, exc: Exception) -> None:
        self._emit(job, "error", self.describe(exc, job))
        self._finish(job, "failed")

    def _purge(self) -> None:
        # Jobs sit in creation order with one lifetime, so the expired ones are at the front:
        # stop at the first live job instead of scanning them all on every start. A batch lives
        # longer (BATCH_MAX_SECONDS): a live one is stepped over, not taken for the first live job.
        now = self._clock()
        for job in list(self._jobs.values()):
            if job.expires <= now:
                self._drop(job)
            elif job.kind == JOB:
                break
        # Bounded: past the cap, forget the oldest finished jobs first.
        if len(self._jobs) > self.settings.job_max_jobs:
            for job in [j for j in self._jobs.values() if j.finished][: len(self._jobs) - self.settings.job_max_jobs]:
                self._drop(job)

    def _drop(self, job: Log) -> None:
        self._jobs.pop(job.id, None)
        if isinstance(job, Job) and self._by_key.get(job.key) is job:
            del self._by_key[job.key]

    async def drain(self, grace: float, forced: Callable[[], bool] = lambda: False) -> None:
        """Shutdown: take no new jobs, let running ones finish for up to `grace`, then hand the rest over.

        With Redis, a job still running at the deadline gives up its lease at once, so another
        replica takes it over (its readers there see one log, with a `resumed` status). Without
        Redis nobody can, so it ends with `error` and `done`. Either way this replica's own SSE
        readers are then closed cleanly: the browser's EventSource reconnects elsewhere with
        Last-Event-ID. Every job gets a log line saying what happened to it.
        """
        self.draining = True
        if self.mirror is not None:
            self.mirror.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        log.info("shutdown.draining", running=len(self._running), grace_s=grace, replica=self._replica)
        # Checked a few times a second so that a second Ctrl+C (uvicorn's force exit) cuts the wait short.
        while self._running and not forced() and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._running.values()), timeout=min(left, 0.25))
        unfinished = [(self._jobs.get(job_id), runner) for job_id, runner in self._running.items()]
        for _, runner in unfinished:
            runner.cancel()
        if unfinished:
            await asyncio.wait([runner for _, runner in unfinished], timeout=5)
        left_over = [job for job, _ in unfinished if job is not None and not job.finished]
        if self.mirror is not None:
            await asyncio.gather(*(self.mirror.hand_over(job) for job in left_over))  # all at once
        for job in left_over:
            if self.mirror is not None:
                log.warning("job.handed_over", job_id=job.id, task=job.task, events=len(job.events),
                            reason="shutdown grace over", replica=self._replica)
            else:
                self.kinds[job.kind].end(job, ShuttingDown(f"the sidecar shut down before the {job.kind} finished; start it again"))
                log.warning("job.interrupted", job_id=job.id, task=job.task, events=len(job.events), reason="shutdown grace over")
        if self.mirror is not None:
            await self.mirror.flush_all(timeout=2)
        self.close_readers()
        log.info("shutdown.drained", handed_over=len(left_over) if self.mirror is not None else 0,
                 interrupted=0 if self.mirror is not None else len(left_over))

    def close_readers(self) -> None:
        self.closing.set()
        for job in self._jobs.values():
            job.wake()
        if self.mirror is not None:
            self.mirror.stop_following()

    def background(self) -> list[asyncio.Task[None]]:
        """Every task this replica runs for its jobs (runners, and the job log's writers and followers)."""
        return [*self._runners, *(self.mirror.background() if self.mirror is not None else [])]

    def cancel_all(self) -> None:
        for runner in list(self._runners):
            runner.cancel()
        if self.mirror is not None:
            self.mirror.close()


class _Delivery(Delivery):
    """A job takes its answer as events: progress as `status` and `delta`, the answer as `result` then `done`."""

    streams = True

    def __init__(self, jobs: Jobs, job: Job) -> None:
        self._jobs, self._job = jobs, job

    def event(self, name: str, data: Any) -> None:
        self._jobs._emit(self._job, name, data)

    def answered(self, answer: Answer) -> None:
        self._jobs._emit(self._job, "result", answer.event)
        self._jobs._finish(self._job, "succeeded", cached=answer.cached, stale=answer.x_cache == "STALE")
