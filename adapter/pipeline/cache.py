"""Result cache policy: freshness, stale-if-error and single flight.

Storage is pluggable (`MemoryStore` in one process, `RedisStore` across
replicas). Entries are the validated response body, prefixed by the time it was
stored; they are kept `ttl + grace` so a stale answer can stand in for an error.

Single flight has two layers. In one process, identical requests await one
asyncio task, which is not tied to any single request: a caller that
disconnects does not cancel the model call the others wait for. Across
processes the task first takes a store lock; the other processes wait for the
lock holder's outcome (result or error) and take over if the holder dies.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

from ..errors import AdapterError, AgentFailed, GatewayRejected, GatewayUnavailable, InvalidAgentOutput, UpstreamTimeout
from ..models import DependencyState

Mode = Literal["default", "no-cache", "no-store"]
XCache = Literal["HIT", "MISS", "STALE", "BYPASS"]
_STAMP = struct.Struct(">d")
# Faults of the model's side, where an older answer beats none; never the CRM's refusals.
STALE_ON = (GatewayUnavailable, GatewayRejected, UpstreamTimeout, InvalidAgentOutput, AgentFailed)


@dataclass(frozen=True, slots=True)
class Entry:
    stored_at: float
    body: bytes

    def pack(self) -> bytes:
        return _STAMP.pack(self.stored_at) + self.body

    @classmethod
    def unpack(cls, raw: bytes) -> Entry:
        return cls(_STAMP.unpack_from(raw)[0], raw[_STAMP.size :])


@dataclass(frozen=True, slots=True)
class Outcome:
    body: bytes
    x_cache: XCache
    age: int | None = None


class Flight(Protocol):
    """A store's cross-process lock on one key: `None` from `lead` means no coordination."""

    async def lead(self) -> bool | None: ...
    async def follow(self) -> bytes | AdapterError | None: ...
    async def succeed(self, body: bytes) -> None: ...
    async def fail(self, exc: AdapterError) -> None: ...
    async def close(self) -> None: ...


class Store(Protocol):
    backend: str

    async def get(self, key: str) -> Entry | None: ...
    async def put(self, key: str, entry: Entry, keep: float) -> None: ...
    def flight(self, key: str) -> Flight: ...
    async def state(self) -> DependencyState: ...
    async def aclose(self) -> None: ...


class _NoFlight:
    async def lead(self) -> bool | None:
        return None

    async def follow(self) -> None:
        return None

    async def succeed(self, body: bytes) -> None:
        pass

    async def fail(self, exc: AdapterError) -> None:
        pass

    async def close(self) -> None:
        pass


class MemoryStore:
    """Bounded LRU with per-entry expiry, for one process (the default without Redis)."""

    backend = "memory"

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self._data: OrderedDict[str, tuple[float, Entry]] = OrderedDict()
        self._max = max_entries
        self._clock = clock

    async def get(self, key: str) -> Entry | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[1]

    async def put(self, key: str, entry: Entry, keep: float) -> None:
        self._data[key] = (self._clock() + keep, entry)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def flight(self, key: str) -> Flight:
        return _NoFlight()

    async def state(self) -> DependencyState:
        return DependencyState(status="up", backend=self.backend, detail=f"{len(self._data)}/{self._max} entries")

    async def aclose(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def cache_key(prefix: str, task: str, agent: str, version: str, record_id: str, agent_input: str) -> str:
    # The prompt holds the record's content, so an edited record is a new key. The record id
    # is in it too: two leads with the same content must not share an answer that names one
    # of them. Hashing keeps keys short whatever the record's size.
    digest = hashlib.sha256(f"{agent}\0{version}\0{record_id}\0{agent_input}".encode()).hexdigest()[:40]
    return f"{prefix}:result:{task}:{digest}"


@asynccontextmanager
async def key_lock(locks: dict[str, asyncio.Lock], key: str) -> AsyncIterator[None]:
    lock = locks.setdefault(key, asyncio.Lock())
    try:
        async with lock:
            yield
    finally:
        if not lock.locked() and locks.get(key) is lock:
            del locks[key]


class ResultCache:
    def __init__(self, store: Store, grace: float, clock: Callable[[], float] = time.time,
                 on_coalesced: Callable[[str], None] = lambda key: None) -> None:
        self.store = store
        self._grace = grace
        self._clock = clock
        self._flights: dict[str, asyncio.Task[bytes]] = {}
        self.coalesced = 0
        self._on_coalesced = on_coalesced
        self._admitting: dict[str, asyncio.Lock] = {}

    async def get_or_compute(self, key: str, ttl: float, mode: Mode, compute: Callable[[], Awaitable[bytes]],
                             admit: Callable[[], Awaitable[None]] | None = None) -> Outcome:
        """`admit` runs only when this request makes the model call (it may refuse: a rate limit).

        Hits and requests that join a call already in flight are free.
        """
        if mode == "no-store":
            if admit is not None:
                await admit()
            return Outcome(await compute(), "BYPASS")
        stale = await self.store.get(key) if mode == "default" else None
        if stale is not None:
            age = self._clock() - stale.stored_at
            if age < ttl:
                return Outcome(stale.body, "HIT", int(max(age, 0)))
            if age >= ttl + self._grace:
                stale = None
        task = self._flights.get(key)
        if task is None and admit is not None:
            # One request at a time decides to take off for a key: the others wait the length
            # of one admission, then join its flight instead of spending tokens of their own.
            lock = self._admitting.get(key)
            waited = lock is not None and lock.locked()
            async with key_lock(self._admitting, key):
                task = self._flights.get(key)
                if task is None and waited and mode == "default":
                    # The flight we queued behind may have landed already: its answer is in the store.
                    fresh = await self.store.get(key)
                    if fresh is not None and (age := self._clock() - fresh.stored_at) < ttl:
                        return Outcome(fresh.body, "HIT", int(max(age, 0)))
                if task is None:
                    await admit()
        try:
            body = await self._join(key, ttl, compute, task)
        except STALE_ON:
            if stale is None:
                raise
            return Outcome(stale.body, "STALE", int(self._clock() - stale.stored_at))
        return Outcome(body, "MISS")

    async def _join(self, key: str, ttl: float, compute: Callable[[], Awaitable[bytes]],
                    task: asyncio.Task[bytes] | None) -> bytes:
        if task is None:
            task = self._flights.get(key)
        if task is None:
            task = asyncio.create_task(self._fly(key, ttl, compute), name=f"flight {key}")
            self._flights[key] = task
            task.add_done_callback(lambda t: self._landed(key, t))
        else:
            self.note_coalesced(key)
        # shield: one caller leaving must not cancel the call the others share.
        return await asyncio.shield(task)

    def _landed(self, key: str, task: asyncio.Task[bytes]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an error nobody awaited is not reported as lost

    async def _fly(self, key: str, ttl: float, compute: Callable[[], Awaitable[bytes]]) -> bytes:
        flight = self.store.flight(key)
        try:
            while await flight.lead() is False:
                outcome = await flight.follow()
                if isinstance(outcome, bytes):
                    self.note_coalesced(key)
                    return outcome
                if isinstance(outcome, AdapterError):
                    raise outcome
                # None: the holder vanished without an outcome; try to take the lock over.
            try:
                body = await compute()
            except AdapterError as exc:
                await flight.fail(exc)
                raise
            await self.store.put(key, Entry(self._clock(), body), ttl + self._grace)
            await flight.succeed(body)
            return body
        finally:
            await flight.close()

    def note_coalesced(self, key: str) -> None:
        self.coalesced += 1
        self._on_coalesced(key)

    def cancel_flights(self) -> None:
        for task in list(self._flights.values()):
            task.cancel()
