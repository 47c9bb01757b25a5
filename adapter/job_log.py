"""A job's events in a Redis Stream, so any replica can serve any job.

The replica running a job writes each event with the explicit stream id
`<n>-0`, so the SSE ids clients resume from are the same on every replica.
A replica asked for a job it does not run replays the stream into a local
copy and follows it with one blocking XREAD, however many clients it serves.
Writes are ordered per job and never block the job: Redis trouble only
degrades the cache state, as everywhere else.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from .jobs import Job
from .redis_store import _RELEASE, FAULTS, RedisStore

log = structlog.get_logger("adapter.jobs")


class RedisJobLog:
    def __init__(self, store: RedisStore, ttl: float) -> None:
        self._s = store
        self._r = store.redis
        self._ttl_ms = int(ttl * 1000)
        self._written: dict[str, int] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._followers: set[asyncio.Task[None]] = set()

    def _log(self, job_id: str) -> str:
        return f"{self._s.prefix}:job:{job_id}:log"

    def _meta(self, job_id: str) -> str:
        return f"{self._s.prefix}:job:{job_id}"

    def write(self, job: Job) -> None:
        """Schedule the job's unwritten events; one writer per job keeps them in order."""
        if job.id not in self._writers:
            self._writers[job.id] = asyncio.create_task(self._flush(job))

    async def written(self, job: Job) -> None:
        """Wait until the events emitted so far are in Redis (or the write gave up)."""
        if (writer := self._writers.get(job.id)) is not None:
            await asyncio.shield(writer)

    async def _flush(self, job: Job) -> None:
        try:
            while (done := self._written.get(job.id, 0)) < len(job.events):
                pending = job.events[done:]
                try:
                    async with self._r.pipeline(transaction=False) as pipe:
                        if done == 0:
                            pipe.hset(self._meta(job.id), mapping={"task": job.task, "record_id": job.record_id, "key": job.key,
                                                                   "expires": str(job.expires)})
                            pipe.pexpire(self._meta(job.id), self._ttl_ms)
                        for ev in pending:
                            pipe.xadd(self._log(job.id), {"e": ev.event, "d": ev.data}, id=f"{ev.id}-0")
                        pipe.pexpire(self._log(job.id), self._ttl_ms)
                        await pipe.execute()
                except FAULTS as exc:
                    self._s.fault(exc)
                    return  # other replicas lose sight of this job; this one still serves it
                self._written[job.id] = done + len(pending)
        finally:
            del self._writers[job.id]
            if job.finished and self._written.get(job.id, 0) >= len(job.events):
                self._written.pop(job.id, None)

    async def claim(self, key: str, job_id: str) -> str:
        """The job answering this question across replicas: ours if nobody runs one, else theirs."""
        claim = f"{self._s.prefix}:jobkey:{key.rsplit(':', 1)[-1]}"
        try:
            if await self._r.set(claim, job_id, nx=True, px=self._ttl_ms):
                return job_id
            holder = await self._r.get(claim)
        except FAULTS as exc:
            self._s.fault(exc)
            return job_id  # no coordination possible: run it here
        return holder.decode() if holder else job_id

    async def unclaim(self, key: str, job_id: str) -> None:
        claim = f"{self._s.prefix}:jobkey:{key.rsplit(':', 1)[-1]}"
        try:
            await self._r.eval(_RELEASE, 1, claim, job_id)
        except FAULTS as exc:
            self._s.fault(exc)

    async def load(self, job_id: str) -> Job | None:
        """A local copy of a job another replica runs, kept up to date until its `done`."""
        try:
            meta = await self._r.hgetall(self._meta(job_id))
            if not meta:
                return None
            entries = await self._r.xrange(self._log(job_id))
        except FAULTS as exc:
            self._s.fault(exc)
            return None
        m = {k.decode(): v.decode() for k, v in meta.items()}
        job = Job(id=job_id, task=m["task"], record_id=m["record_id"], key=m["key"], expires=float(m["expires"]))  # type: ignore[arg-type]
        last = "0-0"
        for entry_id, fields in entries:
            job.emit(fields[b"e"].decode(), fields[b"d"])
            last = entry_id
        if not job.finished:
            follower = asyncio.create_task(self._follow(job, last))
            self._followers.add(follower)
            follower.add_done_callback(self._followers.discard)
        return job

    async def _follow(self, job: Job, last: bytes | str) -> None:
        while not job.finished and job.expires > time.time():
            try:
                answer = await self._r.xread({self._log(job.id): last}, block=5_000, count=100)
            except FAULTS as exc:
                self._s.fault(exc)
                return
            for _stream, entries in answer or ():
                for entry_id, fields in entries:
                    job.emit(fields[b"e"].decode(), fields[b"d"])
                    last = entry_id

    def close(self) -> None:
        for task in [*self._writers.values(), *self._followers]:
            task.cancel()
