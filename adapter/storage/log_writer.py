"""The leased writer: a log this replica runs reaches Redis in order, under a lease it renews.

Appends go through one Lua script that checks ownership, renews the lease and skips ids already
there, so a write can be retried blindly, a stale owner can never write, and a runner that finds
its log gone (Redis restarted) rewrites the metadata and every event with the same ids.

Between writes, every lease of this replica is renewed at once by leases.py (one pipeline, on
connections of its own, retried until it succeeds), not by one script call per log on the shared
pool: 5,000 running logs cost one round trip a third of a lease apart (issue 24).
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Any

import structlog

from ..metrics import Metrics
from .claims import QuestionClaims
from .connect import open_client
from .event_log import Job, Log
from .leases import LeaseKeeper
from .log_layout import Layout, Timing
from .redis_store import FAULTS, RELEASE_SCRIPT, RedisStore

if TYPE_CHECKING:
    from .redis_log import RedisLog

log = structlog.get_logger("adapter.jobs")
WRITES_IN_FLIGHT = 64

# KEYS: meta, log, lease. ARGV: owner, lease_ms, ttl_ms, n_meta, <meta field, value>..., <id, name, data, mac>...
# Returns the stream's last id after the write, or -1 (another replica owns the log),
# -2 (the log is gone from Redis: send the metadata and every event), -3 (a gap before this batch).
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


class LeasedWriter:
    def __init__(self, store: RedisStore, layout: Layout, timing: Timing, claims: QuestionClaims, home: RedisLog, *,
                 metrics: Metrics) -> None:
        self._s, self._r, self._keys, self._home, self._metrics = store, store.redis, layout, home, metrics
        self._claims = claims
        self._ttl_ms, self.lease, self._lease_ms = timing.ttl_ms, timing.lease, timing.lease_ms
        self._backoff_cap = timing.backoff_cap
        self._append = self._r.register_script(_APPEND)
        # Appends in flight at once, over every log: 5,000 logs each flushing on the shared pool (1,000
        # connections, failing at once when full) starved the requests and failed their own writes.
        self._slots = asyncio.Semaphore(WRITES_IN_FLIGHT)
        self._release = self._r.register_script(RELEASE_SCRIPT)
        self._owned: dict[str, Log] = {}
        self._written: dict[str, int] = {}
        self._repair: set[str] = set()
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}
        # Renewals on a client of their own (a few connections per node): followers holding the
        # blocking pool and a burst of requests on the shared one can never starve them.
        self._lease_client = open_client(store.target, max_connections=4, role="leases") if store.target is not None else None
        self.leases = LeaseKeeper(self._lease_client or store.redis, replica=home.replica, lease=timing.lease, lease_key=layout.lease,
                                  meta_key=layout.meta, on_lost=self._lease_lost, on_gone=self._gone, on_fault=store.fault,
                                  on_ok=store.ok)

    def own(self, entry: Log, written: int = 0) -> None:
        """This replica runs the log from now on: its lease is renewed until its `done` is in Redis."""
        self._owned[entry.id] = entry
        self._written[entry.id] = written
        self.leases.hold(entry.id)

    def _lease_lost(self, log_id: str) -> None:
        """A renewal found another replica's name on the lease: it took the log over."""
        if (entry := self._owned.get(log_id)) is not None:
            written = self._written.get(log_id, 0)
            self.forget(log_id)
            self._home.lost(entry, written)

    def _gone(self, log_id: str) -> None:
        """A renewal found the log's metadata gone (Redis restarted empty): rewrite it all, even if the log is silent."""
        if (entry := self._owned.get(log_id)) is not None and log_id not in self._repair:
            log.warning("job.log_repair", job_id=log_id, events=len(entry.events), reason="the job is gone from Redis")
            self._repair.add(log_id)
            self.write(entry)

    def owns(self, log_id: str) -> bool:
        return log_id in self._owned

    def write(self, entry: Log) -> None:
        """Schedule the log's unwritten events; one writer per log keeps them in order."""
        if entry.id in self._owned and entry.id not in self._writers:
            self._writers[entry.id] = asyncio.create_task(self._flush(entry), name=f"job log {entry.id}")

    async def written(self, entry: Log, timeout: float = 5.0) -> None:
        """Wait until the events emitted so far are readable in Redis (or Redis failed this attempt)."""
        target = len(entry.events)
        if entry.id not in self._owned or self._written.get(entry.id, 0) >= target:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(entry.id, []).append((target, future))
        self.write(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            log.warning("job.log_write_slow", job_id=entry.id, waited_s=timeout)

    async def readable(self, entry: Log, timeout: float) -> bool:
        """Whether the log's metadata and first events are in Redis, so another replica can serve it: waits
        up to `timeout` for them, through the writer's own retries. A 202 naming the log waits on this."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Not owned any more: its `done` was written and the log let go (a cache hit's, at once), or another
        # replica took it over; either way it is in Redis.
        while entry.id in self._owned and self._written.get(entry.id, 0) < 1:
            left = deadline - loop.time()
            if left <= 0:
                return False
            await self.written(entry, left)  # back at once on a failed attempt: the writer retries by itself
            if entry.id in self._owned and self._written.get(entry.id, 0) < 1:
                await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0)))
        return True

    def _wake_waiters(self, log_id: str, *, failed: bool = False) -> None:
        waiters = self._waiters.get(log_id)
        if not waiters:
            return
        done = self._written.get(log_id, 0)
        keep = []
        for target, future in waiters:
            if failed or target <= done:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((target, future))
        if keep:
            self._waiters[log_id] = keep
        else:
            del self._waiters[log_id]

    def _meta_args(self, entry: Log) -> list[str | bytes]:
        meta = self._keys.meta_fields(entry, self._home.replica)
        return [str(len(meta)), *(x for kv in meta.items() for x in kv)]

    async def _flush(self, entry: Log) -> None:
        delay = 0.05
        log_id = entry.id
        try:
            while log_id in self._owned:
                done = self._written.get(log_id, 0)
                repair = log_id in self._repair
                if done >= len(entry.events) and not repair:
                    break
                batch = entry.events if repair else entry.events[done:]
                args: list[Any] = [self._home.replica, self._lease_ms, self._ttl_ms]
                args += self._meta_args(entry) if repair or done == 0 else ["0"]
                for ev in batch:
                    args += [ev.id, ev.event, ev.data, self._keys.entry_mac(log_id, ev.id, ev.event.encode(), ev.data)]
                try:
                    async with self._slots:
                        top = int(await self._append(keys=[self._keys.meta(log_id), self._keys.log(log_id),
                                                           self._keys.lease(log_id)], args=args))
                except FAULTS as exc:
                    self._s.fault(exc)
                    self._wake_waiters(log_id, failed=True)  # nobody waits on a Redis that is down
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, self._backoff_cap)
                    continue
                self._s.ok()
                delay = 0.05
                if top == -1:
                    self._lease_lost(log_id)
                    return
                if top in (-2, -3):
                    if not repair:
                        log.warning("job.log_repair", job_id=log_id, events=len(entry.events),
                                    reason="the job is gone from Redis" if top == -2 else "events missing in Redis")
                    self._repair.add(log_id)
                    continue
                if repair:
                    self._repair.discard(log_id)
                    log.info("job.log_repaired", job_id=log_id, events=top)
                self._written[log_id] = max(done, top if repair else (batch[-1].id if batch else done))
                self._wake_waiters(log_id)
            if entry.finished and self._written.get(log_id, 0) >= len(entry.events):
                await self._let_go(entry)
        finally:
            self._writers.pop(log_id, None)

    async def _let_go(self, entry: Log) -> None:
        """The log's `done` is in Redis: stop renewing, and let the next identical question start afresh."""
        self.forget(entry.id)
        try:
            await self._release(keys=[self._keys.lease(entry.id)], args=[self._home.replica])
            if isinstance(entry, Job) and entry.key is not None:  # only a job claims a question
                await self._claims.release(entry.key, entry.id)
        except FAULTS as exc:
            self._s.fault(exc)

    def forget(self, log_id: str) -> None:
        self._owned.pop(log_id, None)
        self._written.pop(log_id, None)
        self._repair.discard(log_id)
        self.leases.release(log_id)
        self._wake_waiters(log_id, failed=True)

    async def hand_over(self, entry: Log, timeout: float = 2.0) -> None:
        """Shutdown: write what is left, then give the lease up so another replica takes over at once."""
        writer = self._writers.get(entry.id)
        if writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout)
            except TimeoutError:
                pass
        self.forget(entry.id)
        self._metrics.job_handovers.inc()
        if (writer := self._writers.get(entry.id)) is not None:
            writer.cancel()
        try:
            await self._release(keys=[self._keys.lease(entry.id)], args=[self._home.replica])
            nudge = self._keys.nudge(entry.id)
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.xadd(nudge, {"from": self._home.replica})
                pipe.pexpire(nudge, self._ttl_ms)
                await pipe.execute()
        except FAULTS as exc:
            self._s.fault(exc)  # the lease lapses by itself instead

    async def flush_all(self, timeout: float) -> None:
        """Shutdown: let every log's pending events (and the release after `done`) reach Redis."""
        writers = [w for w in self._writers.values() if not w.done()]
        if writers:
            await asyncio.wait(writers, timeout=timeout)

    def background(self) -> list[asyncio.Task[None]]:
        return [*self._writers.values(), *self.leases.background()]

    async def aclose(self) -> None:
        if self._lease_client is not None:
            await self._lease_client.aclose()
