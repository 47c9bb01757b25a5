"""The follower: a copy of a log another replica runs, kept up to date, and taken over when its runner is gone.

A replica asked for a log it does not run replays the stream into a local copy and follows it
with a blocking XREAD (on a client whose socket timeout is longer than the block, so a silent
model is never taken for a Redis fault). On one server or a Sentinel's master, every followed log
of the replica is read by the stream hub (stream_hub.py: one XREAD BLOCK per thousand logs, fanned
out), so 5,000 followed logs hold 5 connections; in a Cluster, where each log has a slot of its
own, each follower keeps its own XREAD. Between reads it checks the lease: a log whose lease
lapsed before `done` is orphaned, and the follower takes it over (the log's kind continues it:
redis_log.py). Redis faults are retried with backoff, from the last id read.

A follower takes nothing over until this replica has had answers from Redis for a whole lease
(`RedisStore.healthy_for`): after a failover or a moment without Redis the runner, alive, has had
its turn to renew before anyone reads its lease as lapsed (issue 24).

A follower whose log fails its integrity check ends its copy (`job-log-tampered`); a log whose
metadata fails it is answered as that problem (502), since nothing about it can be trusted.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any

import structlog
from redis.asyncio import BlockingConnectionPool, Redis

from ..errors import JobExpired, JobLogTampered, JobLogUnavailable
from ..metrics import Metrics
from .connect import open_client
from .event_log import Log
from .log_layout import Layout, Timing, seq_of
from .redis_store import FAULTS, RedisStore
from .signing import Tampered
from .stream_hub import StreamHub, Watch

if TYPE_CHECKING:
    from .redis_log import RedisLog

log = structlog.get_logger("adapter.jobs")

# KEYS: meta, log, lease. ARGV: new owner, lease_ms.
# 1: taken over; -1: the owner's lease is alive; -2: no such log in Redis; -3: the log ended.
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
CHECKS_IN_FLIGHT = 32


class Follower:
    def __init__(self, store: RedisStore, layout: Layout, timing: Timing, home: RedisLog, *, metrics: Metrics) -> None:
        self._s, self._r, self._keys, self._home, self._metrics = store, store.redis, layout, home, metrics
        self.lease = lease = timing.lease
        self._lease_ms = timing.lease_ms
        # A follower wakes this often without news, to check the lease; a runner renews 3 times per lease.
        self.block = min(max(lease / 4, 0.1), 2.0)
        # Blocking reads get a pool of their own, same server, whose socket timeout outlives the
        # block: on the shared client (1 s) a model silent for a second would read as a Redis fault.
        # Each follower holds one connection while it blocks: past the pool's size, a follower
        # waits for a free one (then retries) instead of failing at once as redis-py's default pool does.
        # Connecting may be slow when many followers start at once on a busy loop: that is no fault either.
        self.hub: StreamHub | None = None
        if store.target is not None:
            self.blocking = open_client(store.target, socket_timeout=self.block + 3.0, connect_timeout=self.block + 1.0,
                                        max_connections=FOLLOWER_CONNECTIONS, pool_timeout=self.block + 1.0, role="blocking")
            if store.target.mode != "cluster":
                self.hub = StreamHub(self.blocking, wake_key=f"{store.prefix}:hub:{home.replica}", block=self.block,
                                     on_fault=store.fault, on_ok=store.ok)
        else:  # a store built around a client handed in (benchmarks): its pool's settings, blocking
            pool = store.redis.connection_pool
            kwargs = {**pool.connection_kwargs, "socket_timeout": self.block + 3.0, "socket_connect_timeout": self.block + 1.0}
            self.blocking = Redis(connection_pool=BlockingConnectionPool(
                connection_class=pool.connection_class, max_connections=FOLLOWER_CONNECTIONS, timeout=self.block + 1.0, **kwargs))
        self._backoff_cap = timing.backoff_cap
        self._takeover = self._r.register_script(_TAKEOVER)
        # Lease checks in flight at once, over every followed log: thousands of followers checking each
        # block must not hold a connection each (bench.redis_ha: 1,000 followed logs held 959).
        self._checks = asyncio.Semaphore(CHECKS_IN_FLIGHT)
        self._followers: dict[str, asyncio.Task[None]] = {}

    def _replay(self, entry: Log, entries: list[Any], *, lag: bool = False) -> bool:
        """Append the entries that come next to the local copy, exactly once and in order, each once its MAC
        checks out. The first that fails ends the copy (False). `lag`: live entries, whose delay from the
        runner's write (`t`, Redis's clock; a metric only, so unsigned) is observed."""
        now = time.time()
        stream = self._keys.log(entry.id)
        for entry_id, fields in entries:
            seq = seq_of(entry_id)
            if seq != len(entry.events) + 1:
                continue
            event, data, mac = fields.get(b"e", b""), fields.get(b"d", b""), fields.get(b"s")
            try:
                self._s.signer.check(mac, stream, b"%d" % seq, event, data)
            except Tampered as exc:
                self._s.tampering("job-log", f"{stream}#{seq}", exc.reason, event + b"\0" + data,
                                  effect="the job's readers get error job-log-tampered and done")
                self._end_tampered(entry, f"event {seq} of its log")
                return False
            entry.emit(event.decode(), data)
            if lag and (written := fields.get(b"t")) is not None:  # clocks a little apart: never below 0
                self._metrics.follower_lag.observe(max(now - int(written) / 1000, 0.0))
        return True

    def _end_tampered(self, entry: Log, what: str) -> None:
        # Ends this replica's copy as _expire does: every reader gets the end, none is served what failed.
        self._home.end(entry, JobLogTampered(
            f"{what} in Redis failed its integrity check (REDIS_SIGNING_KEY): it was changed outside the sidecar, "
            "or signed with a key this replica does not accept; nothing from it was served; start the job again"))

    async def load(self, log_id: str) -> Log | None:
        """A local copy of a log another replica runs, kept up to date until its `done`.

        `None` only when Redis says there is no such log: a Redis fault is retried for a
        moment, then answered as 503 (a 404 would tell a reader its job is gone when it is not).
        """
        delay = 0.05
        for attempt in range(5):
            try:
                async with self._checks:  # a thousand readers arriving at once share a few connections
                    meta = await self._r.hgetall(self._keys.meta(log_id))
                    if not meta:
                        return None
                    entries = await self._r.xrange(self._keys.log(log_id))
                break
            except FAULTS as exc:
                self._s.fault(exc)
                if attempt == 4:
                    raise JobLogUnavailable(f"the job log store (Redis) is unavailable: {self._s.degraded}") from None
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay *= 2
        entry = self._keys.log_of(log_id, self._keys.checked_meta(log_id, meta))
        if self._replay(entry, entries) and not entry.finished:
            self.follow(entry, len(entry.events))
        return entry

    def follow(self, entry: Log, after: int) -> None:
        if entry.id not in self._followers:
            follower = asyncio.create_task(self._follow(entry, after), name=f"job follower {entry.id}")
            self._followers[entry.id] = follower
            follower.add_done_callback(lambda _: self._followers.pop(entry.id, None))

    async def _follow(self, entry: Log, after: int) -> None:
        nudge, nudged_at = self._keys.nudge(entry.id), "0-0"
        stream = self._keys.log(entry.id)
        watch = self.hub.watch({stream: f"{after}-0", nudge: nudged_at}) if self.hub is not None else None
        try:
            await self._follow_loop(entry, watch, stream, nudge, nudged_at)
        finally:
            if watch is not None:
                watch.close()

    async def _follow_loop(self, entry: Log, watch: Watch | None, stream: str, nudge: str, nudged_at: Any) -> None:
        delay = 0.05
        missing_since: float | None = None
        last_check = time.monotonic()
        while not entry.finished:
            if entry.expires <= time.time():
                self._expire(entry, "the job reached the end of its lifetime before it finished")
                return
            try:
                if watch is not None:  # the hub reads (and retries) for every follower of this replica
                    answer: Any = await watch.get(self.block)
                else:
                    answer = await self.blocking.xread({stream: f"{len(entry.events)}-0", nudge: nudged_at},
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
            for name, entries in answer or ():
                if name in (nudge, nudge.encode()):
                    nudged_at, handed_over = entries[-1][0], True
                    continue
                if not self._replay(entry, entries, lag=True):
                    return
            if entry.finished or not self._home.accepting:
                continue
            if answer and not handed_over and time.monotonic() - last_check < self.block:
                continue
            last_check = time.monotonic()
            if not self._s.healthy_for(self.lease):
                continue  # Redis was away within a lease: the runner may not have had its turn to renew
            try:
                outcome = await self._try_takeover(entry)
            except FAULTS as exc:
                self._s.fault(exc)
                continue
            if outcome == -2:
                # Gone from Redis: a restart its runner will repair within a renewal, or a log nobody runs any more.
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since > 3 * self.lease:
                    self._expire(entry, "the job's log is gone from Redis and no replica restored it")
                    return
                continue
            missing_since = None
            if outcome == 1:
                await self._take_over(entry)
                return

    async def _try_takeover(self, entry: Log) -> int:
        """The atomic takeover script: 1 taken, -2 gone from Redis, anything else still someone's."""
        async with self._checks:
            return await self._takeover(keys=[self._keys.meta(entry.id), self._keys.log(entry.id), self._keys.lease(entry.id)],
                                    args=[self._home.replica, self._lease_ms])

    async def _take_over(self, entry: Log) -> None:
        # Ours now, and nobody else writes: read what the old owner wrote after our last read.
        while True:
            try:
                entries = await self._r.xrange(self._keys.log(entry.id), min=f"{len(entry.events) + 1}-0")
                meta = await self._r.hgetall(self._keys.meta(entry.id))
                # A replica that drains writes the handover nudge: a takeover after it is the plan,
                # one without it means the runner died (what the "takeovers" alert is about).
                handed_over = bool(await self._r.exists(self._keys.nudge(entry.id)))
                break
            except FAULTS as exc:
                self._s.fault(exc)
                await asyncio.sleep(self._backoff_cap)
        if not self._replay(entry, entries):
            return  # the lease we took lapses by itself: whoever takes it next finds the same
        try:
            m = self._keys.checked_meta(entry.id, meta) if meta else {}  # gone since the takeover: what was loaded stands
        except JobLogTampered:
            self._end_tampered(entry, "its metadata")
            return
        self._keys.refresh(entry, m)
        await self._home.taken_over(entry, handed_over)

    async def take_over_now(self, entry: Log) -> None:
        """An identical request found this log: if its runner is gone, take it over without waiting."""
        if not self._s.healthy_for(self.lease):
            return  # as in _follow: a runner that lost Redis a moment ago may be alive
        try:
            outcome = await self._try_takeover(entry)
        except FAULTS as exc:
            self._s.fault(exc)
            return
        if outcome == 1:
            if (follower := self._followers.pop(entry.id, None)) is not None:
                follower.cancel()
            await self._take_over(entry)

    def _expire(self, entry: Log, why: str) -> None:
        # Ends this replica's copy: every reader gets the end, none pings forever.
        self._home.end(entry, JobExpired(why))
        log.warning("job.expired", job_id=entry.id, reason=why, events=len(entry.events))

    def stop(self) -> None:
        for follower in list(self._followers.values()):
            follower.cancel()

    def background(self) -> list[asyncio.Task[None]]:
        return [*self._followers.values(), *(self.hub.background() if self.hub is not None else [])]

    async def aclose(self) -> None:
        if self.hub is not None:
            self.hub.close()
        await self.blocking.aclose()
        if isinstance(self.blocking, Redis):  # a pool handed in is not closed by aclose (a Cluster client has none)
            await self.blocking.connection_pool.disconnect()
