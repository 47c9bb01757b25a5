"""Streamed AI jobs: the sidecar is the gateway job's only reader; clients read the job's log.

A job runs in its own task, so it finishes (and fills the cache) even when every
client has gone: the model's work is paid for either way. Each event gets a
consecutive id (1, 2, ...), which is what `Last-Event-ID` resumes from. With
Redis the log is also written to a Redis Stream, so another replica can serve it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import structlog

from .agents import Task
from .cache import Entry, cache_key, key_lock
from .errors import AdapterError, UpstreamTimeout
from .problems import problem_of
from .service import AiService

log = structlog.get_logger("adapter.jobs")
_encode = msgspec.json.Encoder().encode
Status = Literal["queued", "running", "succeeded", "failed"]


@dataclass(slots=True)
class Event:
    id: int
    event: str
    data: bytes  # JSON


@dataclass(eq=False)
class Job:
    id: str
    task: str
    record_id: str
    key: str
    expires: float
    status: Status = "queued"
    result: bytes | None = None
    error: bytes | None = None
    events: list[Event] = field(default_factory=list)
    finished: bool = False
    _signal: asyncio.Event = field(default_factory=asyncio.Event)

    def emit(self, event: str, data: Any) -> Event:
        """Append an event; the job's state follows from its events, so a replayed log rebuilds it."""
        ev = Event(len(self.events) + 1, event, data if isinstance(data, bytes) else _encode(data))
        self.events.append(ev)
        if event == "status" and self.status == "queued" and b'"queued"' not in ev.data:
            self.status = "running"
        elif event == "result":
            self.result = ev.data
        elif event == "error":
            self.error = ev.data
        elif event == "done":
            self.status = msgspec.json.decode(ev.data)["status"]
            self.finished = True
        # Wake every reader once, then give later waiters a fresh event to wait on.
        self._signal.set()
        self._signal = asyncio.Event()
        return ev

    async def after(self, last_id: int, timeout: float) -> list[Event] | None:
        """Events after `last_id`; waits up to `timeout` for one, `None` if none came."""
        if len(self.events) > last_id or self.finished:
            return self.events[last_id:]
        signal = self._signal
        try:
            await asyncio.wait_for(signal.wait(), timeout)
        except TimeoutError:
            return None
        return self.events[last_id:]


class Jobs:
    def __init__(self, service: AiService, *, clock: Callable[[], float] = time.time, mirror: Any = None) -> None:
        self.service = service
        self.settings = service.settings
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[str, Job] = {}
        self._runners: set[asyncio.Task[None]] = set()
        self.mirror = mirror  # optional RedisJobLog
        self._admitting: dict[str, asyncio.Lock] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def running(self) -> int:
        return len(self._runners)

    async def start(self, task_name: str, request: Any, authorization: str, mode: str, user: str = "") -> tuple[Job, str]:
        """A job for this question and the X-Cache it amounts to. The CRM check runs first."""
        task, record_id, agent_input = await self.service.prepare(task_name, request, authorization)
        key = cache_key(self.settings.cache_prefix, task.name, task.agent_id, task.version, record_id, agent_input)
        self._purge()
        if mode == "default" and (entry := await self.service.cache.store.get(key)) is not None:
            if self._clock() - entry.stored_at < self.settings.ttl_for(task.name):
                job = self._new(task, record_id, key)
                self._emit(job, "result", self.service.result_event(task.name, entry.body))
                self._finish(job, "succeeded", cached=True)
                return job, "HIT"
        async with key_lock(self._admitting, key):
            shared = self._by_key.get(key) if mode != "no-store" else None
            if shared is not None and not shared.finished:
                self.service.cache.note_coalesced(key)
                return shared, "MISS"
            job_id = f"aijob_{uuid.uuid4().hex}"
            if mode != "no-store" and self.mirror is not None:
                # Another replica may already be asking the model this question: follow its job.
                holder = await self.mirror.claim(key, job_id)
                if holder != job_id and (remote := await self.find(holder)) is not None and not remote.finished:
                    self.service.cache.note_coalesced(key)
                    return remote, "MISS"
            await self.service.admit(task.name, user)  # a new job is a model call: rate-limited like one
            return await self._launch(task, record_id, key, agent_input, mode, authorization, job_id)

    async def _launch(self, task: Task, record_id: str, key: str, agent_input: str, mode: str,
                      authorization: str, job_id: str) -> tuple[Job, str]:
        job = self._new(task, record_id, key, job_id)
        if mode != "no-store":
            self._by_key[key] = job
        runner = asyncio.create_task(self.service.tracing.run("job.run", self._run(job, task, agent_input, authorization, store=mode != "no-store"),
                                                             **{"job.id": job.id, "job.task": task.name}), name=f"job {job.id}")
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)
        if self.mirror is not None:
            await self.mirror.written(job)  # its events_url must work on every replica from now on
        return job, "BYPASS" if mode == "no-store" else "MISS"

    def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is not None and job.expires <= self._clock():
            self._drop(job)
            return None
        return job

    async def find(self, job_id: str) -> Job | None:
        """The job, run here or (through the Redis log) on another replica."""
        job = self.get(job_id)
        if job is None and self.mirror is not None and (job := await self.mirror.load(job_id)) is not None:
            self._jobs[job.id] = job  # later readers on this replica share the one follower
        return job

    def _new(self, task: Task, record_id: str, key: str, job_id: str | None = None) -> Job:
        ttl = self.settings.job_max_seconds + self.settings.job_retention_seconds
        job = Job(id=job_id or f"aijob_{uuid.uuid4().hex}", task=task.name, record_id=record_id, key=key, expires=self._clock() + ttl)
        self._jobs[job.id] = job
        self._emit(job, "status", {"state": "queued", "message": "queued", "job_id": job.id})
        return job

    def _emit(self, job: Job, event: str, data: Any) -> None:
        job.emit(event, data)
        self._mirror(job)

    def _mirror(self, job: Job) -> None:
        if self.mirror is not None:
            self.mirror.write(job)

    def _finish(self, job: Job, status: Status, *, cached: bool = False) -> None:
        self._emit(job, "done", {"status": status, "cached": cached})
        if self._by_key.get(job.key) is job:
            del self._by_key[job.key]

    async def _run(self, job: Job, task: Task, agent_input: str, authorization: str, *, store: bool) -> None:
        try:
            async with asyncio.timeout(self.settings.job_max_seconds):
                body = await self._produce(job, task, agent_input)
        except TimeoutError:
            self._fail(job, UpstreamTimeout("job", self.settings.job_max_seconds, "job-timeout"))
        except AdapterError as exc:
            self._fail(job, exc)
        except Exception as exc:  # a bug must still end the job with error + done, never hang its readers
            log.error("job.crashed", job_id=job.id, exc_info=exc)
            self._fail(job, exc)
        else:
            self._emit(job, "result", self.service.result_event(task.name, body))
            self._finish(job, "succeeded")
            if store:
                ttl = self.settings.ttl_for(task.name) + self.settings.cache_stale_grace
                await self.service.cache.store.put(job.key, Entry(self._clock(), body), ttl)
            # A fresh qualification is written back as on the synchronous route, with the creator's
            # token (held in this task only, never stored or logged); the outcome goes to the log.
            if task.name == "lead.qualify" and self.settings.crm_write_back:
                await self.service.write_back(job.record_id, authorization, body)
        if store and self.mirror is not None:
            await self.mirror.unclaim(job.key, job.id)
        log.info("job.done", job_id=job.id, task=job.task, status=job.status, events=len(job.events))

    def _fail(self, job: Job, exc: Exception) -> None:
        problem, _ = problem_of(exc, "POST", f"/api/v1/ai/jobs/{job.id}")
        problem.instance = f"/api/v1/ai/jobs/{job.id}"
        self._emit(job, "error", _encode(problem))
        self._finish(job, "failed")

    async def _produce(self, job: Job, task: Task, agent_input: str) -> bytes:
        gateway = self.service.gateway
        plan = gateway.plan()
        async with gateway.guarded():
            self._emit(job, "status", {"state": "running", "message": "starting the agent"})
            with self.service.gateway_span(task, 1, plan, stream=True):
                text = await gateway.stream_run(task.agent_id, agent_input, plan, lambda name, data: self._emit(job, name, data))
        self._emit(job, "status", {"state": "validating", "message": "validating the agent's answer"})

        def repairing(attempt: int) -> None:
            self._emit(job, "status", {"state": "running", "message": f"repairing invalid output (attempt {attempt + 1})"})

        result = await self.service.validated(task, job.record_id, agent_input, text, on_repair=repairing, plan=plan)
        return _encode(result)

    def _purge(self) -> None:
        # Jobs sit in creation order with one lifetime, so the expired ones are at the front:
        # stop at the first live one instead of scanning them all on every start.
        now = self._clock()
        while self._jobs and (oldest := next(iter(self._jobs.values()))).expires <= now:
            self._drop(oldest)
        # Bounded: past the cap, forget the oldest finished jobs first.
        if len(self._jobs) > self.settings.job_max_jobs:
            for job in [j for j in self._jobs.values() if j.finished][: len(self._jobs) - self.settings.job_max_jobs]:
                self._drop(job)

    def _drop(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if self._by_key.get(job.key) is job:
            del self._by_key[job.key]

    def cancel_all(self) -> None:
        for runner in list(self._runners):
            runner.cancel()
        if self.mirror is not None:
            self.mirror.close()
