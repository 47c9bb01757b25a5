"""How many batches each user has running (MAX_BATCHES_PER_USER): in Redis, shared by replicas, or per process.

In Redis, per user, a sorted set of running batch ids scored by the time each must have ended
by (its BATCH_MAX_SECONDS deadline, on Redis's clock): a batch leaves it when it ends, on
whichever replica ends it, and a batch whose every replica died leaves it at its deadline
without anybody's help. One Lua script drops the expired ids, counts and adds, so two
replicas starting a user's batches at once cannot both take the last place.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import TooManyAtOnce
from .redis_store import FAULTS, RedisStore

# KEYS[1]: the user's running batches. ARGV: limit, batch id, lifetime (s).
# Returns -1 when the batch was added, else how many run already.
_START = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local running = redis.call('ZCARD', KEYS[1])
if running >= tonumber(ARGV[1]) then return running end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
return -1
"""

# A batch's end cannot be foreseen (its items run at the model's pace): its events say when.
RETRY_AFTER = 30


class RunningBatches:
    def __init__(self, limit: int, *, lifetime: float, prefix: str, store: RedisStore | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self._lifetime = lifetime
        self._prefix = prefix
        self._store = store
        self._clock = clock
        self._start = store.redis.register_script(_START) if store is not None else None
        self._local: dict[str, dict[str, float]] = {}  # user -> {batch id: deadline}

    def _key(self, user: str) -> str:
        return f"{self._prefix}:batches:user:{user}"

    async def start(self, user: str, batch_id: str) -> None:
        """Count the batch as running for `user`, or raise TooManyAtOnce (429) naming MAX_BATCHES_PER_USER."""
        running = await self._redis_start(user, batch_id) if self._store is not None else None
        if running is None:  # no Redis, or Redis is down: this process counts its own
            running = self._local_start(user, batch_id)
        if running >= 0:
            raise TooManyAtOnce(
                f"{running} of this user's batches are running; at most {self.limit} at a time (MAX_BATCHES_PER_USER): "
                "start another once one has ended (its events_url says when)", retry_after=RETRY_AFTER)

    async def ended(self, user: str, batch_id: str) -> None:
        """The batch ended (or never started): it no longer counts."""
        if (mine := self._local.get(user)) is not None:
            mine.pop(batch_id, None)
            if not mine:
                del self._local[user]
        if self._store is not None:
            try:
                await self._store.redis.zrem(self._key(user), batch_id)
            except FAULTS as exc:  # it leaves the set at its deadline instead
                self._store.fault(exc)

    async def _redis_start(self, user: str, batch_id: str) -> int | None:
        try:
            return int(await self._start(keys=[self._key(user)], args=[self.limit, batch_id, self._lifetime]))  # type: ignore[misc]
        except FAULTS as exc:
            self._store.fault(exc)  # type: ignore[union-attr]
            return None

    def _local_start(self, user: str, batch_id: str) -> int:
        now = self._clock()
        mine = {b: deadline for b, deadline in self._local.get(user, {}).items() if deadline > now}
        if len(mine) >= self.limit:
            self._local[user] = mine
            return len(mine)
        mine[batch_id] = now + self._lifetime
        self._local[user] = mine
        return -1
