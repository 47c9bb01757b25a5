"""What a result store is: entries, the store's interface and its cross-process flight lock.

Two stores implement it: `MemoryStore` (one process) and `RedisStore` (every replica).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from ..errors import AdapterError
from .keys import CacheKey
from ..models import DependencyState

_STAMP = struct.Struct(">d")


@dataclass(frozen=True, slots=True)
class Entry:
    stored_at: float
    body: bytes

    def pack(self) -> bytes:
        return _STAMP.pack(self.stored_at) + self.body

    @classmethod
    def unpack(cls, raw: bytes) -> Entry:
        return cls(_STAMP.unpack_from(raw)[0], raw[_STAMP.size :])


class Flight(Protocol):
    """A store's cross-process lock on one question: `acquire` is True when this process holds it
    (it asks the model), False when another does (`follow` its outcome), None for no coordination."""

    async def acquire(self) -> bool | None: ...
    async def follow(self) -> bytes | AdapterError | None: ...
    async def succeed(self, body: bytes) -> None: ...
    async def fail(self, exc: AdapterError) -> None: ...
    async def close(self) -> None: ...


class Store(Protocol):
    """Entries by their rendered key (`CacheKey.redis_key`, opaque here); the flight lock by the key itself."""

    backend: str

    async def get(self, key: str) -> Entry | None: ...
    async def put(self, key: str, entry: Entry, keep: float) -> None: ...
    def flight(self, key: CacheKey) -> Flight: ...
    async def state(self) -> DependencyState: ...
    async def aclose(self) -> None: ...


class NoFlight:
    """No coordination: one process has no one to share a flight with."""

    async def acquire(self) -> bool | None:
        return None

    async def follow(self) -> None:
        return None

    async def succeed(self, body: bytes) -> None:
        pass

    async def fail(self, exc: AdapterError) -> None:
        pass

    async def close(self) -> None:
        pass
