"""The result store of one process: a bounded LRU with per-entry expiry (the default without Redis)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from ..models import DependencyState
from .keys import CacheKey
from .store import Entry, Flight, NoFlight


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

    def flight(self, key: CacheKey) -> Flight:
        return NoFlight()

    async def state(self) -> DependencyState:
        return DependencyState(status="up", backend=self.backend, detail=f"{len(self._data)}/{self._max} entries")

    async def aclose(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
