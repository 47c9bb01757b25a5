"""A call counter that tests can await ("until 100 calls arrived"), instead of sleeping."""

from __future__ import annotations

import asyncio
from collections import Counter


class Tally(Counter[str]):
    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def hit(self, key: str) -> None:
        self[key] += 1
        total = self.total()
        for n, fut in self._waiters:
            if total >= n and not fut.done():
                fut.set_result(None)

    async def reach(self, n: int) -> None:
        """Return once at least `n` calls (of any key) have arrived."""
        if self.total() >= n:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut
        finally:
            self._waiters.remove((n, fut))
