"""Redis storage for the result cache, shared by every replica.

Redis is an optimisation, never a dependency of an answer: every operation
that fails marks the store degraded and behaves like a miss (or a no-op), and
the next operation simply tries again, so caching resumes by itself when Redis
returns. The failure is logged once per `retry_log_interval`, not per request.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import structlog
from redis.exceptions import RedisClusterException, RedisError

from ..settings import RedisTarget
from .connect import Client, open_client
from .keys import CacheKey
from .signing import Signer, Tampered, Tampering
from .store import Entry
from ..errors import AdapterError, from_record, to_record
from ..models import DependencyState
from ..stopping import cancel_and_wait

log = structlog.get_logger("adapter.cache")
# RedisClusterException is not a RedisError: a slot nobody serves yet, or a redirect loop mid-reshard.
# RuntimeError and AttributeError: redis-py's asyncio Cluster client, while it re-reads the slot map
# mid-reshard, closes connections other tasks are writing on (uvloop's "handler is closed", or the
# connection's writer already None): a dropped connection in all but name (bench.redis_ha reshard:
# before this, 8 of 40 followers died of it and their readers hung). The `try` blocks around Redis
# calls are narrow, and every fault is logged with its type (`cache.redis_unavailable`).
FAULTS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError, RuntimeError, AttributeError)
RELEASE_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_EXTEND = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_OK, _ERR = b"\x01", b"\x00"


def redis_client(target: RedisTarget | str) -> Client:
    """The requests' client (connect.py has the rules): of a RedisTarget, or of a REDIS_URL."""
    return open_client(target if isinstance(target, RedisTarget) else RedisTarget.from_url(target))


class RedisStore:
    backend = "redis"

    def __init__(self, client: Client, *, prefix: str, lock_ttl: float, retry_log_interval: float, signer: Signer,
                 tampering: Tampering | None = None, target: RedisTarget | None = None) -> None:
        self.redis = client
        # What the client was opened on: the job log opens its own clients (blocking reads, leases) on it.
        self.target = target
        # Every value read back is checked (signing.py); the job log and the flights use the same two.
        self.signer = signer
        self.tampering = tampering or Tampering()
        self.prefix = prefix
        self.lock_ttl = lock_ttl
        self._log_every = retry_log_interval
        self._last_log = float("-inf")
        self.degraded: str | None = None
        # Since when every command has succeeded (monotonic), None while Redis fails: a follower takes a
        # job over only after a lease of this (issue 24), so a runner that lost Redis for a moment (a
        # failover) has had its chance to renew before anyone reads its lease as lapsed.
        self.healthy_since: float | None = time.monotonic()

    def fault(self, exc: BaseException) -> None:
        self.degraded = f"{type(exc).__name__}: {exc}"[:200]
        self.healthy_since = None
        now = time.monotonic()
        if now - self._last_log >= self._log_every:
            self._last_log = now
            log.warning("cache.redis_unavailable", error=self.degraded, effect="answering uncached")

    def ok(self) -> None:
        if self.healthy_since is None:
            self.healthy_since = time.monotonic()
        if self.degraded is not None:
            self.degraded = None
            self._last_log = float("-inf")
            log.info("cache.redis_recovered")

    async def get(self, key: str) -> Entry | None:
        try:
            raw = await self.redis.get(key)
        except FAULTS as exc:
            self.fault(exc)
            return None
        self.ok()
        if not raw:
            return None
        try:
            return Entry.unpack(self.signer.unseal(key, raw))
        except Tampered as exc:
            self.tampering("cache", key, exc.reason, raw, effect="served as a miss")
            return None

    async def put(self, key: str, entry: Entry, keep: float) -> None:
        try:
            await self.redis.set(key, self.signer.seal(key, entry.pack()), px=max(int(keep * 1000), 1))
        except FAULTS as exc:
            self.fault(exc)
        else:
            self.ok()

    def flight(self, key: CacheKey) -> RedisFlight:
        return RedisFlight(self, key)

    async def state(self) -> DependencyState:
        t0 = time.perf_counter()
        try:
            await self.redis.ping()
        except FAULTS as exc:
            self.fault(exc)
            return DependencyState(status="degraded", backend=self.backend, detail=f"Redis unavailable, answering uncached ({self.degraded})")
        self.ok()
        return DependencyState(status="up", backend=self.backend, latency_ms=round((time.perf_counter() - t0) * 1000, 2))

    def healthy_for(self, seconds: float) -> bool:
        """Whether Redis has answered every command for at least `seconds`."""
        return self.healthy_since is not None and time.monotonic() - self.healthy_since >= seconds

    async def aclose(self) -> None:
        await self.redis.aclose()


class RedisFlight:
    """One process's part in a cross-process single flight for one key."""

    def __init__(self, store: RedisStore, key: CacheKey) -> None:
        self._s = store
        self._r = store.redis
        self._key = key
        self._lock = key.lock_key
        self._channel = key.channel
        self._token = uuid.uuid4().hex
        self._holder: str | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False
        self._pubsub = None
        # Set when the holder's outcome failed its check: this flight stops coordinating and computes.
        self._untrusted = False

    def _outcome_key(self, token: str) -> str:
        return self._key.outcome_key(token)

    async def acquire(self) -> bool | None:
        if self._untrusted:
            return None  # whoever holds the lock wrote an outcome we cannot trust: waiting on it again would spin
        ttl_ms = int(self._s.lock_ttl * 1000)
        try:
            if await self._r.set(self._lock, self._token, nx=True, px=ttl_ms):
                self._watchdog = asyncio.create_task(self._keep_lock(ttl_ms))
                return True
            holder = await self._r.get(self._lock)
        except FAULTS as exc:
            self._s.fault(exc)
            return None  # no coordination possible: compute here
        if holder is None:
            return await self.acquire()  # released between our two commands
        self._holder = holder.decode()
        return False

    async def _keep_lock(self, ttl_ms: int) -> None:
        # The lock is short so a crashed holder is noticed quickly; a live one renews it. Checked each
        # turn, not only cancelled: a lost cancel (adapter/stopping.py) must not renew it forever.
        while not self._closed:
            await asyncio.sleep(self._s.lock_ttl / 3)
            try:
                await self._r.eval(_EXTEND, 1, self._lock, self._token, ttl_ms)
            except FAULTS as exc:
                self._s.fault(exc)

    async def follow(self) -> bytes | AdapterError | None:
        assert self._holder is not None
        key = self._outcome_key(self._holder)
        try:
            if self._pubsub is None:
                self._pubsub = self._r.pubsub()
                await self._pubsub.subscribe(self._channel)  # before the first check: no lost wake-up
            while True:
                if (raw := await self._r.get(key)) is not None:
                    return self._outcome(key, raw)
                if (await self._r.get(self._lock) or b"").decode() != self._holder:
                    raw = await self._r.get(key)  # it may have finished between the two reads
                    return None if raw is None else self._outcome(key, raw)
                await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=min(1.0, self._s.lock_ttl / 3))
        except FAULTS as exc:
            self._s.fault(exc)
            return None

    def _outcome(self, key: str, raw: bytes) -> bytes | AdapterError | None:
        # The outcome's MAC binds it to this question's lock as well as to its own key: the lock's
        # value (the holder) is not signed, and pointing it at another question's valid outcome
        # must not serve that answer here.
        try:
            return _decode_outcome(self._s.signer.unseal(key, raw, self._lock.encode()))
        except Tampered as exc:
            self._s.tampering("flight", key, exc.reason, raw, effect="ignored: this request asks the model itself")
            self._untrusted = True
            return None

    async def _finish(self, payload: bytes) -> None:
        try:
            key = self._outcome_key(self._token)
            await self._r.set(key, self._s.signer.seal(key, payload, self._lock.encode()), px=30_000)
            await self._r.publish(self._channel, self._token)
            await self._r.eval(RELEASE_SCRIPT, 1, self._lock, self._token)
        except FAULTS as exc:
            self._s.fault(exc)

    async def succeed(self, body: bytes) -> None:
        if self._watchdog is not None:
            await self._finish(_OK + body)

    async def fail(self, exc: AdapterError) -> None:
        if self._watchdog is not None:
            await self._finish(_ERR + msgspec.msgpack.encode(to_record(exc)))

    async def close(self) -> None:
        self._closed = True
        try:
            if self._watchdog is not None:
                await cancel_and_wait(lambda: [self._watchdog], timeout=1.0)
        finally:
            if self._pubsub is not None:
                try:
                    await self._pubsub.aclose()
                except FAULTS:
                    pass


def _decode_outcome(raw: bytes) -> bytes | AdapterError:
    if raw[:1] == _OK:
        return raw[1:]
    return from_record(msgspec.msgpack.decode(raw[1:]))
