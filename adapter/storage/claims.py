"""Question claims: which job answers a question across replicas (`<prefix>:jobkey:<digest>`).

The first job to claim a question runs it; an identical question on another replica follows that
job instead of asking the model again. The claim is let go when the job's `done` is in Redis.
The claim itself is not signed: whoever follows it checks that the job's (signed) metadata names
the very same question (pipeline/jobs.py).
"""

from __future__ import annotations

from .keys import CacheKey
from .redis_store import FAULTS, RELEASE_SCRIPT, RedisStore


class QuestionClaims:
    def __init__(self, store: RedisStore, ttl: float) -> None:
        self._s = store
        self._r = store.redis
        self._ttl_ms = int(ttl * 1000)
        self._release = self._r.register_script(RELEASE_SCRIPT)

    def _claim(self, key: CacheKey) -> str:
        return f"{self._s.prefix}:jobkey:{key.digest}"

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

    async def release(self, key: CacheKey, job_id: str) -> None:
        """The job ended: the next identical question starts afresh (raises the store's faults)."""
        await self._release(keys=[self._claim(key)], args=[job_id])
