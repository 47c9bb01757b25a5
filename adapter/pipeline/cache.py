"""Result cache policy: freshness, stale-if-error and single flight.

Storage is pluggable (`MemoryStore` in one process, `RedisStore` across
replicas). Entries are the validated response body, prefixed by the time it was
stored; they are kept `ttl + grace` so a stale answer can stand in for an error.

Single flight has two layers, shared by the synchronous routes and the streamed jobs. In one
process, identical questions await one model call (an asyncio task, `_flights[key]`): a
synchronous request and a job for the same question share it, whichever asked first. A call a
request started is not tied to that request: a caller that disconnects does not cancel the call
the others wait for. A call a job started belongs to the job: when the job stops (handed to
another replica, or past its deadline) the call stops too, and whoever joined it gets
`SharedCallCancelled`. Across processes the call first takes a store lock; the other processes
wait for the lock holder's outcome (result or error) and take over if the holder dies.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec

from ..errors import (
    AdapterError,
    AgentFailed,
    GatewayRejected,
    GatewayUnavailable,
    InvalidAgentOutput,
    SharedCallCancelled,
    UpstreamTimeout,
)
from ..storage.keys import CacheKey
from ..storage.signing import Tampering
from ..storage.store import Entry, Store
from ..upstreams.resilience import BACKGROUND, Background

_encode = msgspec.json.Encoder().encode
K = TypeVar("K", bound=Hashable)
Mode = Literal["default", "no-cache", "no-store"]
XCache = Literal["HIT", "MISS", "STALE", "BYPASS"]
# Faults of the model's side, where an older answer beats none; never the CRM's refusals.
STALE_ON = (GatewayUnavailable, GatewayRejected, UpstreamTimeout, InvalidAgentOutput, AgentFailed)


@dataclass(frozen=True, slots=True)
class Kept:
    """A stored answer as read back: its body, when it was stored, and its result decoded once (the check
    that it is an answer of its task decodes it anyway; whoever serves it reads it from here)."""

    stored_at: float
    body: bytes
    result: Any = None


# Entries are signed (storage/signing.py) since issue 22, and their keys moved with them: during a
# rolling upgrade a replica of the older release would serve a signed value's bytes as an answer,
# and its unsigned entries would only be misses here. Separate keys keep the two releases apart
# (their single-flight locks too, which follow the key).
KEY_FORMAT = "signed-1"


def cache_key(prefix: str, task: str, agent: str, version: str, record_id: str, agent_input: str) -> CacheKey:
    """The one key derivation (storage/keys.py renders it)."""
    # The prompt holds the record's content, so an edited record is a new key. The record id
    # is in it too: two leads with the same content must not share an answer that names one
    # of them. Hashing keeps keys short whatever the record's size.
    digest = hashlib.sha256(f"{KEY_FORMAT}\0{agent}\0{version}\0{record_id}\0{agent_input}".encode()).hexdigest()[:40]
    return CacheKey(prefix, task, digest)


@asynccontextmanager
async def key_lock(locks: dict[K, asyncio.Lock], key: K) -> AsyncIterator[None]:
    lock = locks.setdefault(key, asyncio.Lock())
    try:
        async with lock:
            yield
    finally:
        if not lock.locked() and locks.get(key) is lock:
            del locks[key]


class ResultCache:
    """The cache's rules, which pipeline/answers.py applies for every caller: `get` (an answer of its
    task, or nothing), freshness and the stale grace, `keep` (how long an answer is stored), and single
    flight (`take_off`, then `ride`)."""

    def __init__(self, store: Store, grace: float, clock: Callable[[], float] = time.time,
                 on_coalesced: Callable[[CacheKey], None] = lambda key: None,
                 readers: Mapping[str, Callable[[bytes], Any]] | None = None, tampering: Tampering | None = None) -> None:
        self.store = store
        # Each task's result struct, by task name (Task.reread): a stored body that is not exactly an
        # encoded result of its task is never served. The store's signature (Redis) says who wrote an
        # entry, not that it is an answer this release gives (an older release's shape, a bug): both
        # checks, on every read, whatever the store.
        self._readers = dict(readers or {})
        self._tampering = tampering or Tampering()
        self._grace = grace
        self._clock = clock
        self._flights: dict[CacheKey, asyncio.Task[bytes]] = {}
        self._background: dict[CacheKey, Background] = {}  # flights a batch started, while none but batches joined
        self._on_coalesced = on_coalesced
        self._admitting: dict[CacheKey, asyncio.Lock] = {}

    def age(self, entry: Kept) -> int:
        return int(max(self._clock() - entry.stored_at, 0))

    def is_fresh(self, entry: Kept, ttl: float) -> bool:
        return self._clock() - entry.stored_at < ttl

    def is_usable_stale(self, entry: Kept, ttl: float) -> bool:
        """Past its freshness but within CACHE_STALE_GRACE: may stand in for a model-side fault."""
        return self._clock() - entry.stored_at < ttl + self._grace

    async def get(self, key: CacheKey) -> Kept | None:
        """The stored answer, if its body is still an answer of its task (the one way entries are read)."""
        entry = await self.store.get(key.redis_key)
        if entry is None:
            return None
        if (read := self._readers.get(key.task)) is None:
            return Kept(entry.stored_at, entry.body)
        # Decoded and encoded again, it must give the very bytes stored (what the pipeline writes is an
        # encoded result): an extra field, a missing one, or an older release's shape is no answer of ours.
        if (result := read(entry.body)) is not None and _encode(result) == entry.body:
            return Kept(entry.stored_at, entry.body, result)
        self._tampering("cache", key.redis_key, "not-a-result", entry.body, effect="served as a miss")
        return None

    async def keep(self, key: CacheKey, body: bytes, ttl: float) -> None:
        """Store a fresh answer for its freshness plus the stale grace."""
        await self.store.put(key.redis_key, Entry(self._clock(), body), ttl + self._grace)

    def in_flight(self, key: CacheKey) -> bool:
        """A model call for `key` is in the air in this process: joining it costs nothing."""
        return key in self._flights

    async def take_off(self, key: CacheKey, ttl: float, admit: Callable[[], Awaitable[None]], *,
                       recheck: bool) -> Kept | asyncio.Task[bytes] | None:
        """Whether this caller makes the model call for `key`: the flight in the air to join (free), or None
        once `admit` let it take off (it may refuse: a rate limit), or (`recheck`) the answer a flight it
        queued behind has just stored.

        One request at a time decides to take off for a key: the others wait the length of one
        admission, then join its flight instead of spending tokens of their own.
        """
        if (flight := self._flights.get(key)) is not None:
            return flight
        lock = self._admitting.get(key)
        waited = lock is not None and lock.locked()
        async with key_lock(self._admitting, key):
            if (flight := self._flights.get(key)) is not None:
                return flight
            if waited and recheck and (fresh := await self.get(key)) is not None and self.is_fresh(fresh, ttl):
                return fresh  # the flight we queued behind has landed: its answer is in the store
            await admit()
        return None

    async def ride(self, key: CacheKey, ttl: float, compute: Callable[[], Awaitable[bytes]],
                   flight: asyncio.Task[bytes] | None, *, coordinate: bool = True, keep: bool = True, owned: bool = False,
                   on_join: Callable[[], None] = lambda: None) -> bytes:
        """The answer of the flight for `key`: the one in the air (joined), or one this caller launches.

        `owned`: a log's runner owns the flight it launches (awaited unshielded): stopping the runner
        (handed over, past its deadline) stops the call, and whoever joined it gets SharedCallCancelled.
        A request's flight is not tied to it: one caller leaving does not cancel the call the others share.
        `coordinate=False` skips the cross-process lock: a log taken over from a dead replica must not wait
        out the lock that replica still holds on paper. `keep=False`: the answer is not stored (a thread's turn).
        """
        if flight is None:
            flight = self._flights.get(key)
        if flight is not None:
            self._joined(key)
            on_join()
            return await self._shared(flight)
        flight = self._launch(key, ttl, compute, coordinate, keep)
        return await (flight if owned else self._shared(flight))

    def _launch(self, key: CacheKey, ttl: float, compute: Callable[[], Awaitable[bytes]], coordinate: bool = True,
                keep: bool = True) -> asyncio.Task[bytes]:
        flight = asyncio.create_task(self._fly(key, ttl, compute, coordinate, keep), name=f"flight {key.redis_key}")
        self._flights[key] = flight
        if (background := BACKGROUND.get()) is not None:
            self._background[key] = background
        flight.add_done_callback(lambda landed: self._landed(key, landed))
        return flight

    def _joined(self, key: CacheKey) -> None:
        self.note_coalesced(key)
        if BACKGROUND.get() is None and (background := self._background.pop(key, None)) is not None:
            background.promote()  # an interactive request must not wait behind a batch's queue

    @staticmethod
    async def _shared(flight: asyncio.Task[bytes]) -> bytes:
        try:
            # shield: one caller leaving must not cancel the call the others share.
            return await asyncio.shield(flight)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if flight.cancelled() and not (current is not None and current.cancelling()):
                raise SharedCallCancelled("the agent call this request shared was stopped by the job that made it "
                                          "(handed to another replica, or past JOB_MAX_SECONDS); ask again") from None
            raise

    def _landed(self, key: CacheKey, flight: asyncio.Task[bytes]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
            self._background.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # retrieved here, so an error nobody awaited is not reported as lost

    async def _fly(self, key: CacheKey, ttl: float, compute: Callable[[], Awaitable[bytes]], coordinate: bool = True,
                   keep: bool = True) -> bytes:
        if not coordinate:
            body = await compute()
            if keep:
                await self.keep(key, body, ttl)
            return body
        lock = self.store.flight(key)
        try:
            while await lock.acquire() is False:
                outcome = await lock.follow()
                if isinstance(outcome, bytes):
                    self.note_coalesced(key)
                    return outcome
                if isinstance(outcome, AdapterError):
                    raise outcome
                # None: the holder vanished without an outcome; try to take the lock over.
            try:
                body = await compute()
            except AdapterError as exc:
                await lock.fail(exc)
                raise
            if keep:
                await self.keep(key, body, ttl)
            await lock.succeed(body)
            return body
        finally:
            await lock.close()

    def note_coalesced(self, key: CacheKey) -> None:
        self._on_coalesced(key)

    def background(self) -> list[asyncio.Task[bytes]]:
        """The flights in the air: shutdown stops them (adapter/stopping.py) before Redis is closed."""
        return list(self._flights.values())

    def cancel_flights(self) -> None:
        for flight in list(self._flights.values()):
            flight.cancel()
