"""Per-user token buckets for the AI routes: in Redis (shared by replicas) or per process.

The model-call buckets are shared; the CRM read bucket, spent on every request, is each process's
own (see `Policy.shared`).

A bucket holds `limit` tokens and refills `limit` every `window` seconds; a
request that would call the model takes one (cache hits take none), and every
CRM record read takes one of the `crm.read` bucket (CRM_READS_PER_USER). The user is
the JWT's `sub` when the signature was verified (CRM_JWT_SECRET), otherwise a
hash of the bearer token: never an identity nobody checked.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import RateLimited
from .redis_store import FAULTS, RedisStore

# Redis's own clock: replicas with skewed clocks still share one bucket correctly.
_TAKE = """
local cap, rate, ttl, reserve = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4] or 0)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil then tokens, ts = cap, now end
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if tokens >= 1 + reserve then tokens = tokens - 1; allowed = 1 end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ttl)
return {allowed, tostring(tokens)}
"""


# The bucket of CRM record reads (CRM_READS_PER_USER), beside one per task (RATE_LIMIT_<TASK>).
CRM_READS = "crm.read"


@dataclass(frozen=True, slots=True)
class Policy:
    limit: int
    window: float
    setting: str = ""  # the variable that sets it: a 429 names it
    what: str = ""  # what a token pays for, in the 429's words ("<task name> requests")
    # Shared through Redis by every replica, or kept by each process. A bucket spent on every request
    # (CRM reads, cache hits included) is kept per process: in Redis it cost ~70 µs of CPU per hit
    # (+9 %, `bench.cpu --rows hit`), and N replicas still bound a user to N times its rate.
    shared: bool = True

    @property
    def rate(self) -> float:
        return self.limit / self.window

    @classmethod
    def parse(cls, text: str, *, setting: str = "", what: str = "", shared: bool = True) -> Policy | None:
        if text.strip().lower() in {"off", "0", ""}:
            return None
        count, _, window = text.partition("/")
        return cls(int(count), float(window), setting, what, shared)


class RateLimiter:
    def __init__(self, policies: dict[str, Policy | None], *, prefix: str, store: RedisStore | None,
                 clock: Callable[[], float] = time.monotonic, max_local: int = 100_000,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.policies = policies
        self._prefix = prefix
        self._store = store
        # EVALSHA, not EVAL: every request spends a CRM read token, and sending the script each time
        # cost a tenth more CPU per call (redis-py reloads it by itself after a Redis restart).
        self._take = store.redis.register_script(_TAKE) if store is not None else None
        self._clock = clock
        self._sleep = sleep  # `wait`'s: a test moving `clock` by hand moves it here too
        self._local: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max_local = max_local

    async def take(self, task: str, user: str, *, reserve: float = 0) -> None:
        """Spend one token, or raise `RateLimited` with the headers a client needs to back off.

        `reserve`: tokens that must be left after this one (a batch leaves some for the user's
        interactive requests).
        """
        policy = self.policies.get(task)
        if policy is None:
            return
        if (short := await self._short(task, policy, user, reserve)) is None:
            return
        wait = max(1, math.ceil(short))
        named = f" ({policy.setting})" if policy.setting else ""
        raise RateLimited(
            f"at most {policy.limit} {policy.what or task + ' requests'} per {policy.window:g} s per user{named}; "
            f"retry in {wait} s",
            headers={"Retry-After": str(wait), "RateLimit-Limit": str(policy.limit), "RateLimit-Remaining": "0",
                     "RateLimit-Reset": str(wait), "RateLimit-Policy": f"{policy.limit};w={policy.window:g}"})

    async def wait(self, task: str, user: str, *, reserve: float = 0, on_wait: Callable[[], object] | None = None) -> None:
        """Spend one token, waiting for the bucket to refill rather than failing: background work
        (a batch) waits; `on_wait` is told each time it has to."""
        policy = self.policies.get(task)
        if policy is None:
            return
        while (short := await self._short(task, policy, user, reserve)) is not None:
            if on_wait is not None:
                on_wait()
            await self._sleep(short)

    async def _short(self, task: str, policy: Policy, user: str, reserve: float) -> float | None:
        """Take a token: None when taken, else how long until the bucket has one (with `reserve` left)."""
        key = f"{self._prefix}:rl:{task}:{user}"
        tokens = await self._redis_take(key, policy, reserve) if self._store is not None and policy.shared else None
        if tokens is None:  # no Redis, or Redis is down: this process keeps its own buckets
            tokens = self._local_take(key, policy, reserve)
        allowed, left = tokens
        return None if allowed else max((1 + reserve - left) / policy.rate, 0.001)

    def reserve_for(self, task: str) -> float:
        """What a batch leaves of a user's budget for their interactive requests: a quarter of it."""
        policy = self.policies.get(task)
        return 0 if policy is None else max(1, policy.limit // 4) if policy.limit > 1 else 0

    async def _redis_take(self, key: str, policy: Policy, reserve: float = 0) -> tuple[bool, float] | None:
        try:
            allowed, left = await self._take(keys=[key], args=[policy.limit, policy.rate, int(policy.window * 2000), reserve])  # type: ignore[misc]
        except FAULTS as exc:
            self._store.fault(exc)  # type: ignore[union-attr]
            return None
        return bool(allowed), float(left)

    def _local_take(self, key: str, policy: Policy, reserve: float = 0) -> tuple[bool, float]:
        now = self._clock()
        tokens, ts = self._local.pop(key, (float(policy.limit), now))
        tokens = min(policy.limit, tokens + max(0.0, now - ts) * policy.rate)
        allowed = tokens >= 1 + reserve
        if allowed:
            tokens -= 1
        self._local[key] = (tokens, now)
        while len(self._local) > self._max_local:  # bounded: the least recently seen users go first
            self._local.popitem(last=False)
        return allowed, tokens
