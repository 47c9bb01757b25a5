"""What a batch keeps beside its log: the set of running batches, its rendered inputs, its cancel flag.

  <prefix>:batches            set: the batches running on any replica (every replica's sweeper follows them)
  <prefix>:job:<id>:inputs    hash: item id -> its rendered input, sealed with the item's id
  <prefix>:job:<id>:cancel    set once the creator asked to cancel it
"""

from __future__ import annotations

from ..errors import JobLogUnavailable
from .redis_store import FAULTS, RedisStore
from .signing import Tampered


class BatchStore:
    def __init__(self, store: RedisStore, ttl: float) -> None:
        self._s = store
        self._r = store.redis
        self._ttl_ms = int(ttl * 1000)

    def _batches(self) -> str:
        return f"{self._s.prefix}:batches"

    def _inputs(self, batch_id: str) -> str:
        return f"{self._s.prefix}:job:{batch_id}:inputs"

    def _cancel(self, batch_id: str) -> str:
        return f"{self._s.prefix}:job:{batch_id}:cancel"

    async def add(self, batch_id: str) -> None:
        """A running batch every replica looks after: if its runner dies, the next sweep takes it over."""
        try:
            await self._r.sadd(self._batches(), batch_id)
        except FAULTS as exc:
            self._s.fault(exc)

    async def drop(self, batch_id: str) -> None:
        try:
            await self._r.srem(self._batches(), batch_id)
        except FAULTS as exc:
            self._s.fault(exc)

    async def active(self) -> list[str]:
        try:
            return [m.decode() for m in await self._r.smembers(self._batches())]
        except FAULTS as exc:
            self._s.fault(exc)
            return []

    async def save_inputs(self, batch_id: str, inputs: dict[str, str]) -> None:
        """The rendered input of each item: what a replica taking the batch over asks the model
        without the creator's token (which is never stored)."""
        if not inputs:
            return
        key = self._inputs(batch_id)
        # Each input sealed with its item's id: a replica taking the batch over asks the model exactly this.
        sealed = {item: self._s.signer.seal(key, text.encode(), item.encode()) for item, text in inputs.items()}
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=sealed)  # type: ignore[arg-type]
                pipe.pexpire(key, self._ttl_ms)
                await pipe.execute()
        except FAULTS as exc:
            self._s.fault(exc)

    async def load_inputs(self, batch_id: str) -> dict[str, str]:
        try:
            raw = await self._r.hgetall(self._inputs(batch_id))
        except FAULTS as exc:
            self._s.fault(exc)
            return {}
        key, inputs = self._inputs(batch_id), {}
        for item, value in raw.items():
            name = item.decode(errors="replace")  # the MAC covers the field's bytes: a forged name fails it
            try:
                inputs[name] = self._s.signer.unseal(key, value, item).decode()
            except Tampered as exc:
                # Left out: the item counts as never read, and fails with batch-item-lost instead of asking this.
                self._s.tampering("batch-inputs", f"{key}#{name}", exc.reason, value, effect="the item fails as never read")
        return inputs

    async def request_cancel(self, batch_id: str) -> None:
        try:
            await self._r.set(self._cancel(batch_id), b"1", px=self._ttl_ms)
        except FAULTS as exc:
            self._s.fault(exc)
            raise JobLogUnavailable(f"the job log store (Redis) is unavailable: {self._s.degraded}") from None

    async def cancel_requested(self, batch_id: str) -> bool:
        try:
            return bool(await self._r.exists(self._cancel(batch_id)))
        except FAULTS as exc:
            self._s.fault(exc)
            return False
