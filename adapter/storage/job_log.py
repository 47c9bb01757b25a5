"""A job's events in a Redis Stream, so any replica can serve, and take over, any job.

Layout, per job (every key expires with the job's retention):
  <prefix>:job:<id>        hash: task, record_id, key, expires, mode, input, owner
  <prefix>:job:<id>:log    stream: one entry per event, with the explicit id `<n>-0`
  <prefix>:job:<id>:lease  the owner's replica id, with a short TTL the owner renews

The SSE ids clients resume from are the stream ids, so they are the same on every
replica. Appends go through one Lua script that checks ownership, renews the lease
and skips ids already there, so a write can be retried blindly, a stale owner can
never write, and a runner that finds its job gone (Redis restarted) rewrites the
metadata and every event with the same ids.

A replica asked for a job it does not run replays the stream into a local copy and
follows it with a blocking XREAD (on a client whose socket timeout is longer than the
block, so a silent model is never taken for a Redis fault). Between reads it checks
the lease: a job whose lease lapsed before `done` is orphaned, and the follower takes
it over (`Jobs.resume`). Redis faults are retried with backoff, from the last id read.

What a replica reads back is checked (signing.py): the metadata carries a MAC over its fields
(`sig`; not over `owner`, which only says who writes), each stream entry one over its id, name
and data (`s`), each of a batch's inputs one over its item id. A follower whose log fails the
check ends its copy with `error` (`job-log-tampered`) and `done`; a job whose metadata fails it
is answered as that problem (502), since nothing about it can be trusted.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import structlog
from redis.asyncio import BlockingConnectionPool, Redis

from ..errors import JobExpired, JobLogTampered, JobLogUnavailable
from ..metrics import Metrics
from .job_state import Job
from .keys import CacheKey
from .redis_store import FAULTS, RELEASE_SCRIPT, RedisStore
from .signing import Tampered

log = structlog.get_logger("adapter.jobs")
_encode = msgspec.json.Encoder().encode

# KEYS: meta, log, lease. ARGV: owner, lease_ms, ttl_ms, n_meta, <meta field, value>..., <id, name, data, mac>...
# Returns the stream's last id after the write, or -1 (another replica owns the job),
# -2 (the job is gone from Redis: send the metadata and every event), -3 (a gap before this batch).
_APPEND = """
local holder = redis.call('get', KEYS[3])
if holder and holder ~= ARGV[1] then return -1 end
local n_meta = tonumber(ARGV[4])
local owner = redis.call('hget', KEYS[1], 'owner')
if owner then
  if owner ~= ARGV[1] then return -1 end
elseif n_meta == 0 then
  return -2
end
redis.call('set', KEYS[3], ARGV[1], 'px', ARGV[2])
local i = 5
for _ = 1, n_meta do
  redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('pexpire', KEYS[1], ARGV[3])
local top = 0
local last = redis.call('xrevrange', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then top = tonumber(string.match(last[1][1], '^(%d+)')) end
if i <= #ARGV and tonumber(ARGV[i]) > top + 1 then return -3 end
-- when Redis received the event (ms): a follower's lag is measured against it
local clock = redis.call('time')
local now = clock[1] .. string.format('%03d', math.floor(tonumber(clock[2]) / 1000))
while i <= #ARGV do
  local id = tonumber(ARGV[i])
  if id > top then
    redis.call('xadd', KEYS[2], ARGV[i] .. '-0', 'e', ARGV[i + 1], 'd', ARGV[i + 2], 's', ARGV[i + 3], 't', now)
    top = id
  end
  i = i + 4
end
if top > 0 then redis.call('pexpire', KEYS[2], ARGV[3]) end
return top
"""

# KEYS: meta, log, lease. ARGV: new owner, lease_ms.
# 1: taken over; -1: the owner's lease is alive; -2: no such job in Redis; -3: the job ended.
_TAKEOVER = """
if redis.call('exists', KEYS[3]) == 1 then return -1 end
if redis.call('exists', KEYS[1]) == 0 then return -2 end
local last = redis.call('xrevrange', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 and last[1][2][2] == 'done' then return -3 end
redis.call('set', KEYS[3], ARGV[1], 'px', ARGV[2])
redis.call('hset', KEYS[1], 'owner', ARGV[1])
return 1
"""


FOLLOWER_CONNECTIONS = 1_000
# The metadata fields the `sig` field's MAC covers, in this order.
SIGNED_META = ("task", "record_id", "key", "expires", "mode", "input")


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# (error, the job's URL path) -> the `error` event's data: a problem object, as JSON (web/problems.py).
Describe = Callable[[Exception, str], bytes]


class RedisJobLog:
    def __init__(self, store: RedisStore, ttl: float, *, lease: float, describe: Describe,
                 replica: str | None = None, metrics: Metrics | None = None) -> None:
        self._s = store
        self._metrics = metrics or Metrics()
        self._describe = describe
        self._r = store.redis
        self.replica = replica or replica_id()
        self._ttl_ms = int(ttl * 1000)
        self.lease = lease
        self._lease_ms = max(int(lease * 1000), 100)
        # A follower wakes this often without news, to check the lease; a runner renews 3 times per lease.
        self.block = min(max(lease / 4, 0.1), 2.0)
        # Blocking reads get a pool of their own, same server, whose socket timeout outlives the
        # block: on the shared client (1 s) a model silent for a second would read as a Redis fault.
        # Each follower holds one connection while it blocks: past the pool's size, a follower
        # waits for a free one (then retries) instead of failing at once as redis-py's default pool does.
        pool = store.redis.connection_pool
        # Connecting may be slow when many followers start at once on a busy loop: that is no fault either.
        kwargs = {**pool.connection_kwargs, "socket_timeout": self.block + 3.0, "socket_connect_timeout": self.block + 1.0}
        self._blocking = Redis(connection_pool=BlockingConnectionPool(
            connection_class=pool.connection_class, max_connections=FOLLOWER_CONNECTIONS, timeout=self.block + 1.0, **kwargs))
        self._backoff_cap = min(max(lease / 3, 0.2), 2.0)
        self._append = self._r.register_script(_APPEND)
        self._takeover = self._r.register_script(_TAKEOVER)
        self._release = self._r.register_script(RELEASE_SCRIPT)
        self._owned: dict[str, Job] = {}
        self._written: dict[str, int] = {}
        self._repair: set[str] = set()
        self._renew: set[str] = set()
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._renewer: asyncio.Task[None] | None = None
        # Off while this replica drains for shutdown: it must not take over the jobs it is about to leave.
        self.accepting = True
        # Set by Jobs: what to do with a job this replica just took over, or lost to another one.
        self.on_orphan: Callable[[Job, dict[str, str]], Awaitable[None]] | None = None
        self.on_lost: Callable[[Job], None] | None = None

    def _log(self, job_id: str) -> str:
        return f"{self._s.prefix}:job:{job_id}:log"

    def _meta(self, job_id: str) -> str:
        return f"{self._s.prefix}:job:{job_id}"

    def _lease(self, job_id: str) -> str:
        return f"{self._s.prefix}:job:{job_id}:lease"

    def _nudge(self, job_id: str) -> str:
        # Written once when a runner hands the job over: its followers wake at once instead of at their next block.
        return f"{self._s.prefix}:job:{job_id}:handover"

    def _claim(self, key: CacheKey) -> str:
        return f"{self._s.prefix}:jobkey:{key.digest}"

    # --- the runner's side ------------------------------------------------------------------

    def own(self, job: Job, written: int = 0) -> None:
        """This replica runs the job from now on: its lease is renewed until the job's `done` is in Redis."""
        self._owned[job.id] = job
        self._written[job.id] = written
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_leases(), name="job lease renewer")

    def owns(self, job_id: str) -> bool:
        return job_id in self._owned

    def write(self, job: Job) -> None:
        """Schedule the job's unwritten events; one writer per job keeps them in order."""
        if job.id in self._owned and job.id not in self._writers:
            self._writers[job.id] = asyncio.create_task(self._flush(job), name=f"job log {job.id}")

    async def written(self, job: Job, timeout: float = 5.0) -> None:
        """Wait until the events emitted so far are readable in Redis (or Redis failed this attempt)."""
        target = len(job.events)
        if job.id not in self._owned or self._written.get(job.id, 0) >= target:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job.id, []).append((target, future))
        self.write(job)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            log.warning("job.log_write_slow", job_id=job.id, waited_s=timeout)

    def _wake_waiters(self, job_id: str, *, failed: bool = False) -> None:
        waiters = self._waiters.get(job_id)
        if not waiters:
            return
        done = self._written.get(job_id, 0)
        keep = []
        for target, future in waiters:
            if failed or target <= done:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((target, future))
        if keep:
            self._waiters[job_id] = keep
        else:
            del self._waiters[job_id]

    def _meta_args(self, job: Job) -> list[str | bytes]:
        key = job.key.redis_key if job.key is not None else ""
        meta: dict[str, str | bytes] = {"task": job.task, "record_id": job.record_id, "key": key,
                                        "expires": repr(job.expires), "mode": job.mode, "input": job.agent_input}
        meta["sig"] = self._s.signer.mac(self._meta(job.id), *(str(meta[f]).encode() for f in SIGNED_META))
        if job.key is not None:
            # The key's parts, so a replica reading the job back never parses "key" apart. Not signed
            # itself (older releases sign the fields above): `_job_of` checks it renders to the signed "key".
            meta["digest"] = job.key.digest
        meta["owner"] = self.replica
        return [str(len(meta)), *(x for kv in meta.items() for x in kv)]

    def _entry_mac(self, job_id: str, seq: int, event: bytes, data: bytes) -> bytes:
        # The entry's id is in the MAC: a valid entry moved to another place in the log fails its check.
        return self._s.signer.mac(self._log(job_id), b"%d" % seq, event, data)

    def _checked_meta(self, job_id: str, raw: dict[bytes, bytes]) -> dict[str, str]:
        """The job's metadata once its MAC checks out; else reported, and raised as JobLogTampered."""
        fields = {k.decode(errors="replace"): v for k, v in raw.items()}
        try:
            self._s.signer.check(fields.get("sig"), self._meta(job_id), *(fields.get(f, b"") for f in SIGNED_META))
            if "digest" in fields and _key_of(self._s.prefix, fields).redis_key.encode() != fields.get("key"):
                raise Tampered("digest-mismatch")  # unsigned itself: the key's parts must render to the signed key
        except Tampered as exc:
            self._s.tampering("job-log", self._meta(job_id), exc.reason, b"\0".join(sorted(k + b"=" + v for k, v in raw.items())),
                              effect="the job is answered as job-log-tampered (502)")
            raise JobLogTampered(f"job {job_id}'s metadata in Redis failed its integrity check (REDIS_SIGNING_KEY): "
                                 "it was changed outside the sidecar, or signed with a key this replica does not accept; "
                                 "start the job again") from None
        return {k: v.decode(errors="replace") for k, v in fields.items() if k != "sig"}  # `owner` is not signed

    def _replay(self, job: Job, entries: list[Any], *, lag: bool = False) -> bool:
        """Append the entries that come next to the local copy, exactly once and in order, each once its MAC
        checks out. The first that fails ends the copy with `error` and `done` (False). `lag`: live entries,
        whose delay from the runner's write (`t`, Redis's clock; a metric only, so unsigned) is observed."""
        now = time.time()
        for entry_id, fields in entries:
            seq = _seq(entry_id)
            if seq != len(job.events) + 1:
                continue
            event, data, mac = fields.get(b"e", b""), fields.get(b"d", b""), fields.get(b"s")
            try:
                self._s.signer.check(mac, self._log(job.id), b"%d" % seq, event, data)
            except Tampered as exc:
                self._s.tampering("job-log", f"{self._log(job.id)}#{seq}", exc.reason, event + b"\0" + data,
                                  effect="the job's readers get error job-log-tampered and done")
                self._end_tampered(job, f"event {seq} of its log")
                return False
            job.emit(event.decode(), data)
            if lag and (written := fields.get(b"t")) is not None:  # clocks a little apart: never below 0
                self._metrics.follower_lag.observe(max(now - int(written) / 1000, 0.0))
        return True

    def _end_tampered(self, job: Job, what: str) -> None:
        # Ends this replica's copy as _expire does: every reader gets `error` then `done`, none is served what failed.
        job.emit("error", self._describe(JobLogTampered(
            f"{what} in Redis failed its integrity check (REDIS_SIGNING_KEY): it was changed outside the sidecar, "
            "or signed with a key this replica does not accept; nothing from it was served; start the job again"),
            f"/api/v1/ai/jobs/{job.id}"))
        job.emit("done", {"status": "failed", "cached": False})

    async def _flush(self, job: Job) -> None:
        delay = 0.05
        try:
            while job.id in self._owned:
                done = self._written.get(job.id, 0)
                repair = job.id in self._repair
                if done >= len(job.events) and job.id not in self._renew and not repair:
                    break
                self._renew.discard(job.id)
                batch = job.events if repair else job.events[done:]
                args: list[Any] = [self.replica, self._lease_ms, self._ttl_ms]
                args += self._meta_args(job) if repair or done == 0 else ["0"]
                for ev in batch:
                    args += [ev.id, ev.event, ev.data, self._entry_mac(job.id, ev.id, ev.event.encode(), ev.data)]
                try:
                    top = int(await self._append(keys=[self._meta(job.id), self._log(job.id), self._lease(job.id)], args=args))
                except FAULTS as exc:
                    self._s.fault(exc)
                    self._wake_waiters(job.id, failed=True)  # nobody waits on a Redis that is down
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, self._backoff_cap)
                    continue
                self._s.ok()
                delay = 0.05
                if top == -1:
                    self._lose(job)
                    return
                if top in (-2, -3):
                    if not repair:
                        log.warning("job.log_repair", job_id=job.id, events=len(job.events),
                                    reason="the job is gone from Redis" if top == -2 else "events missing in Redis")
                    self._repair.add(job.id)
                    continue
                if repair:
                    self._repair.discard(job.id)
                    log.info("job.log_repaired", job_id=job.id, events=top)
                self._written[job.id] = max(done, top if repair else (batch[-1].id if batch else done))
                self._wake_waiters(job.id)
            if job.finished and self._written.get(job.id, 0) >= len(job.events):
                await self._let_go(job)
        finally:
            self._writers.pop(job.id, None)

    async def _let_go(self, job: Job) -> None:
        """The job's `done` is in Redis: stop renewing, and let the next identical question start afresh."""
        self._forget(job.id)
        try:
            await self._release(keys=[self._lease(job.id)], args=[self.replica])
            if job.key is not None:  # a batch claims no question
                await self._release(keys=[self._claim(job.key)], args=[job.id])
        except FAULTS as exc:
            self._s.fault(exc)

    def _forget(self, job_id: str) -> None:
        self._owned.pop(job_id, None)
        self._written.pop(job_id, None)
        self._repair.discard(job_id)
        self._renew.discard(job_id)
        self._wake_waiters(job_id, failed=True)

    def _lose(self, job: Job) -> None:
        log.warning("job.ownership_lost", job_id=job.id, replica=self.replica,
                    effect="another replica runs it now; this one follows its log")
        written = self._written.get(job.id, 0)
        self._forget(job.id)
        if self.on_lost is not None:
            self.on_lost(job)
        self.follow(job, written)

    async def _renew_leases(self) -> None:
        # One coroutine renews every lease of this replica: a third of the lease apart, so two
        # renewals can fail before the lease lapses.
        while self._owned:
            await asyncio.sleep(self.lease / 3)
            for job in list(self._owned.values()):
                self._renew.add(job.id)
                self.write(job)

    async def hand_over(self, job: Job, timeout: float = 2.0) -> None:
        """Shutdown: write what is left, then give the lease up so another replica takes over at once."""
        writer = self._writers.get(job.id)
        if writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout)
            except TimeoutError:
                pass
        self._forget(job.id)
        self._metrics.job_handovers.inc()
        if (writer := self._writers.get(job.id)) is not None:
            writer.cancel()
        try:
            await self._release(keys=[self._lease(job.id)], args=[self.replica])
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.xadd(self._nudge(job.id), {"from": self.replica})
                pipe.pexpire(self._nudge(job.id), self._ttl_ms)
                await pipe.execute()
        except FAULTS as exc:
            self._s.fault(exc)  # the lease lapses by itself instead

    async def flush_all(self, timeout: float) -> None:
        """Shutdown: let every job's pending events (and the release after `done`) reach Redis."""
        writers = [w for w in self._writers.values() if not w.done()]
        if writers:
            await asyncio.wait(writers, timeout=timeout)

    async def claim(self, key: CacheKey, job_id: str) -> str:
        """The job answering this question across replicas: ours if nobody runs one, else theirs."""
        try:
            if await self._r.set(self._claim(key), job_id, nx=True, px=self._ttl_ms):
                return job_id
            holder = await self._r.get(self._claim(key))
        except FAULTS as exc:
            self._s.fault(exc)
            return job_id  # no coordination possible: run it here
        return holder.decode() if holder else job_id

    async def reclaim(self, key: CacheKey, old: str, new: str) -> bool:
        """Point the question at a new job, if it still points at `old` (a job that ended without unclaiming)."""
        try:
            if await self._release(keys=[self._claim(key)], args=[old]):
                return bool(await self._r.set(self._claim(key), new, nx=True, px=self._ttl_ms))
        except FAULTS as exc:
            self._s.fault(exc)
        return False

    # --- what a batch keeps beside its log -------------------------------------------------

    def _batches(self) -> str:
        return f"{self._s.prefix}:batches"

    def _inputs(self, job_id: str) -> str:
        return f"{self._s.prefix}:job:{job_id}:inputs"

    def _cancel(self, job_id: str) -> str:
        return f"{self._s.prefix}:job:{job_id}:cancel"

    async def add_batch(self, job_id: str) -> None:
        """A running batch every replica looks after: if its runner dies, the next sweep takes it over."""
        try:
            await self._r.sadd(self._batches(), job_id)
        except FAULTS as exc:
            self._s.fault(exc)

    async def drop_batch(self, job_id: str) -> None:
        try:
            await self._r.srem(self._batches(), job_id)
        except FAULTS as exc:
            self._s.fault(exc)

    async def active_batches(self) -> list[str]:
        try:
            return [m.decode() for m in await self._r.smembers(self._batches())]
        except FAULTS as exc:
            self._s.fault(exc)
            return []

    async def save_inputs(self, job_id: str, inputs: dict[str, str]) -> None:
        """The rendered input of each item: what a replica taking the batch over asks the model
        without the creator's token (which is never stored)."""
        if not inputs:
            return
        key = self._inputs(job_id)
        # Each input sealed with its item's id: a replica taking the batch over asks the model exactly this.
        sealed = {item: self._s.signer.seal(key, text.encode(), item.encode()) for item, text in inputs.items()}
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=sealed)  # type: ignore[arg-type]
                pipe.pexpire(key, self._ttl_ms)
                await pipe.execute()
        except FAULTS as exc:
            self._s.fault(exc)

    async def load_inputs(self, job_id: str) -> dict[str, str]:
        try:
            raw = await self._r.hgetall(self._inputs(job_id))
        except FAULTS as exc:
            self._s.fault(exc)
            return {}
        key, inputs = self._inputs(job_id), {}
        for item, value in raw.items():
            name = item.decode(errors="replace")  # the MAC covers the field's bytes: a forged name fails it
            try:
                inputs[name] = self._s.signer.unseal(key, value, item).decode()
            except Tampered as exc:
                # Left out: the item counts as never read, and fails with batch-item-lost instead of asking this.
                self._s.tampering("batch-inputs", f"{key}#{name}", exc.reason, value, effect="the item fails as never read")
        return inputs

    async def request_cancel(self, job_id: str) -> None:
        try:
            await self._r.set(self._cancel(job_id), b"1", px=self._ttl_ms)
        except FAULTS as exc:
            self._s.fault(exc)
            raise JobLogUnavailable(f"the job log store (Redis) is unavailable: {self._s.degraded}") from None

    async def cancel_requested(self, job_id: str) -> bool:
        try:
            return bool(await self._r.exists(self._cancel(job_id)))
        except FAULTS as exc:
            self._s.fault(exc)
            return False

    # --- the follower's side ----------------------------------------------------------------

    async def load(self, job_id: str) -> Job | None:
        """A local copy of a job another replica runs, kept up to date until its `done`.

        `None` only when Redis says there is no such job: a Redis fault is retried for a
        moment, then answered as 503 (a 404 would tell a reader its job is gone when it is not).
        """
        delay = 0.05
        for attempt in range(5):
            try:
                meta = await self._r.hgetall(self._meta(job_id))
                if not meta:
                    return None
                entries = await self._r.xrange(self._log(job_id))
                break
            except FAULTS as exc:
                self._s.fault(exc)
                if attempt == 4:
                    raise JobLogUnavailable(f"the job log store (Redis) is unavailable: {self._s.degraded}") from None
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay *= 2
        job = _job_of(self._s.prefix, job_id, self._checked_meta(job_id, meta))
        if self._replay(job, entries) and not job.finished:
            self.follow(job, len(job.events))
        return job

    def follow(self, job: Job, after: int) -> None:
        if job.id not in self._followers:
            follower = asyncio.create_task(self._follow(job, after), name=f"job follower {job.id}")
            self._followers[job.id] = follower
            follower.add_done_callback(lambda _: self._followers.pop(job.id, None))

    async def _follow(self, job: Job, after: int) -> None:
        delay = 0.05
        missing_since: float | None = None
        last_check = time.monotonic()
        nudge, nudged_at = self._nudge(job.id), "0-0"
        while not job.finished:
            if job.expires <= time.time():
                self._expire(job, "the job reached the end of its lifetime before it finished")
                return
            try:
                answer = await self._blocking.xread({self._log(job.id): f"{len(job.events)}-0", nudge: nudged_at},
                                                    block=int(self.block * 1000), count=500)
                self._s.ok()
            except FAULTS as exc:
                # Never a reason to give up: readers keep getting heartbeats; retry from the last id.
                self._s.fault(exc)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._backoff_cap)
                continue
            delay = 0.05
            handed_over = False
            for stream, entries in answer or ():
                if stream in (nudge, nudge.encode()):
                    nudged_at, handed_over = entries[-1][0], True
                    continue
                if not self._replay(job, entries, lag=True):
                    return
            if job.finished or not self.accepting:
                continue
            if answer and not handed_over and time.monotonic() - last_check < self.block:
                continue
            last_check = time.monotonic()
            try:
                outcome = await self._try_takeover(job)
            except FAULTS as exc:
                self._s.fault(exc)
                continue
            if outcome == -2:
                # Gone from Redis: a restart its runner will repair within a renewal, or a job nobody runs any more.
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since > 3 * self.lease:
                    self._expire(job, "the job's log is gone from Redis and no replica restored it")
                    return
                continue
            missing_since = None
            if outcome == 1:
                await self._take_over(job)
                return

    async def _try_takeover(self, job: Job) -> int:
        """The atomic takeover script: 1 taken, -2 gone from Redis, anything else still someone's."""
        return await self._takeover(keys=[self._meta(job.id), self._log(job.id), self._lease(job.id)],
                                    args=[self.replica, self._lease_ms])

    async def _take_over(self, job: Job) -> None:
        # Ours now, and nobody else writes: read what the old owner wrote after our last read.
        while True:
            try:
                entries = await self._r.xrange(self._log(job.id), min=f"{len(job.events) + 1}-0")
                meta = await self._r.hgetall(self._meta(job.id))
                # A replica that drains writes the handover nudge: a takeover after it is the plan,
                # one without it means the runner died (what the "takeovers" alert is about).
                handed_over = bool(await self._r.exists(self._nudge(job.id)))
                break
            except FAULTS as exc:
                self._s.fault(exc)
                await asyncio.sleep(self._backoff_cap)
        if not self._replay(job, entries):
            return  # the lease we took lapses by itself: whoever takes it next finds the same
        try:
            m = self._checked_meta(job.id, meta) if meta else {}  # gone since the takeover: what was loaded stands
        except JobLogTampered:
            self._end_tampered(job, "its metadata")
            return
        job.agent_input, job.mode = m.get("input", job.agent_input), m.get("mode", job.mode)  # type: ignore[assignment]
        log.info("job.taken_over", job_id=job.id, replica=self.replica, after_event=len(job.events))
        self._metrics.job_takeovers.labels("handed_over" if handed_over else "lease_lapsed").inc()
        self.own(job, len(job.events))
        if self.on_orphan is not None:
            await self.on_orphan(job, m)

    async def take_over_now(self, job: Job) -> None:
        """An identical request found this job: if its runner is gone, take it over without waiting."""
        if job.finished or job.id in self._owned or not self.accepting:
            return
        try:
            outcome = await self._try_takeover(job)
        except FAULTS as exc:
            self._s.fault(exc)
            return
        if outcome == 1:
            if (follower := self._followers.pop(job.id, None)) is not None:
                follower.cancel()
            await self._take_over(job)

    def _expire(self, job: Job, why: str) -> None:
        # Ends this replica's copy: every reader gets `error` then `done`, none pings forever.
        job.emit("error", self._describe(JobExpired(why), f"/api/v1/ai/jobs/{job.id}"))
        job.emit("done", {"status": "failed", "cached": False})
        log.warning("job.expired", job_id=job.id, reason=why, events=len(job.events))

    def stop_following(self) -> None:
        for follower in list(self._followers.values()):
            follower.cancel()

    def background(self) -> list[asyncio.Task[None]]:
        return [*self._writers.values(), *self._followers.values(), *([self._renewer] if self._renewer else [])]

    def close(self) -> None:
        for background in self.background():
            background.cancel()

    async def aclose(self) -> None:
        await self._blocking.aclose()
        await self._blocking.connection_pool.disconnect()  # a pool handed in is not closed by aclose


def _seq(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def _key_of(prefix: str, m: Mapping[str, str] | Mapping[str, bytes]) -> CacheKey:
    """The cache key a job's metadata names, from its parts (task, digest): never parsed from "key"."""
    task, digest = m.get("task", ""), m["digest"]
    return CacheKey(prefix, *(part.decode(errors="replace") if isinstance(part, bytes) else part for part in (task, digest)))


def _job_of(prefix: str, job_id: str, m: dict[str, str]) -> Job:
    # No "digest": written by a release that kept only the rendered key (a batch's log has none either);
    # a job resumed from it has its key derived again (pipeline/jobs.py `resume`).
    key = _key_of(prefix, m) if "digest" in m else None
    return Job(id=job_id, task=m["task"], record_id=m["record_id"], key=key, expires=float(m["expires"]),
               agent_input=m.get("input", ""), mode=m.get("mode", "default"))  # type: ignore[arg-type]
