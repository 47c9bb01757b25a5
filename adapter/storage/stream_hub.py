"""Every stream a replica follows, read by a few blocking XREADs and fanned out (issue 24).

Each followed job used to hold a blocking connection of its own (`XREAD BLOCK` on its log), so
the jobs a replica could follow were bounded by its pool (1,000). Here one task reads them all:
the streams are cut into chunks of `chunk`, each chunk is one task looping on one `XREAD BLOCK`
(one connection), and what comes back is handed to the job's watch. 5,000 followed jobs use 5
connections; readers of one job on one replica still share one follower.

A stream added to a chunk while its XREAD blocks must not wait for the block to end: `watch`
appends to the chunk's wake stream, which the chunk reads too, so it returns and starts again
with the new stream. A Redis fault is retried with backoff from the last id delivered to each watch:
followers keep sending heartbeats meanwhile, exactly as they did with their own XREAD.

One server (or a Sentinel's master) only: XREAD over many streams needs them in one slot in a
Cluster, where each job has its own (keys.py), so followers there keep one XREAD each.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from .connect import Client
from .redis_store import FAULTS

Entries = list[tuple[Any, dict[bytes, bytes]]]


class Watch:
    """One follower's view: the entries of its streams since the last `get`, as XREAD would answer them."""

    def __init__(self, hub: StreamHub, streams: dict[str, str]) -> None:
        self._hub = hub
        self.streams = streams  # stream key -> the last id delivered
        self._pending: list[tuple[str, Entries]] = []
        self._ready = asyncio.Event()
        self.fault: BaseException | None = None

    def _deliver(self, stream: str, entries: Entries) -> None:
        self._pending.append((stream, entries))
        self._ready.set()

    async def get(self, timeout: float) -> list[tuple[str, Entries]]:
        """What arrived since the last call, waiting up to `timeout` for something; [] when nothing did."""
        if not self._pending:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return []
        out, self._pending = self._pending, []
        self._ready.clear()
        return out

    def close(self) -> None:
        self._hub._unwatch(self)


class _Chunk:
    """Up to `chunk` streams read by one XREAD BLOCK (one connection), plus its own wake stream."""

    def __init__(self, wake_key: str) -> None:
        self.streams: set[str] = set()
        self.wake_key = wake_key
        self.wake_id = "$"
        self.task: asyncio.Task[None] | None = None
        self.waking = False  # one wake in flight per chunk: a thousand watches added at once send one or two


class StreamHub:
    def __init__(self, client: Client, *, wake_key: str, block: float, chunk: int = 1000,
                 on_fault: Callable[[BaseException], None] = lambda exc: None, on_ok: Callable[[], None] = lambda: None) -> None:
        self._r = client
        self._wake_prefix = wake_key
        self._block_ms = max(int(block * 1000), 100)
        self._chunk = chunk
        self._on_fault, self._on_ok = on_fault, on_ok
        self._by_stream: dict[str, set[Watch]] = {}
        self._chunk_of: dict[str, _Chunk] = {}
        self._chunks: list[_Chunk] = []

    @property
    def streams(self) -> int:
        return len(self._by_stream)

    def watch(self, streams: dict[str, str]) -> Watch:
        """Follow `streams` (key -> the id after which to read): their entries arrive at the returned watch."""
        w = Watch(self, dict(streams))
        woken = set()
        for key in streams:
            self._by_stream.setdefault(key, set()).add(w)
            if key not in self._chunk_of:
                chunk = next((c for c in self._chunks if len(c.streams) < self._chunk), None)
                if chunk is None:
                    chunk = _Chunk(f"{self._wake_prefix}:{len(self._chunks)}")
                    self._chunks.append(chunk)
                chunk.streams.add(key)
                self._chunk_of[key] = chunk
                woken.add(id(chunk))
                if chunk.task is None or chunk.task.done():
                    chunk.task = asyncio.create_task(self._run(chunk), name="job stream hub")
                    woken.discard(id(chunk))
        for chunk in self._chunks:
            if id(chunk) in woken and not chunk.waking:
                chunk.waking = True
                asyncio.create_task(self._wake(chunk))  # it blocks on its old set: make it start again
        return w

    def _unwatch(self, w: Watch) -> None:
        for key in w.streams:
            if (ws := self._by_stream.get(key)) is not None:
                ws.discard(w)
                if not ws:
                    del self._by_stream[key]
                    if (chunk := self._chunk_of.pop(key, None)) is not None:
                        chunk.streams.discard(key)

    async def _wake(self, chunk: _Chunk) -> None:
        chunk.waking = False  # a stream added from here on needs a wake of its own
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.xadd(chunk.wake_key, {"w": "1"}, maxlen=10, approximate=True)
                pipe.pexpire(chunk.wake_key, 60_000)
                await pipe.execute()
        except FAULTS as exc:
            self._on_fault(exc)  # the chunk picks the stream up when its block ends instead

    def _position(self, key: str) -> str:
        """A stream's read position: the earliest any of its watches has had delivered."""
        return min((w.streams[key] for w in self._by_stream[key]), key=_id_order)

    async def _run(self, chunk: _Chunk) -> None:
        delay = 0.05
        while chunk.streams:
            positions = {key: self._position(key) for key in chunk.streams}
            try:
                answer = await self._r.xread({**positions, chunk.wake_key: chunk.wake_id}, block=self._block_ms, count=500)
            except FAULTS as exc:
                self._on_fault(exc)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            self._on_ok()
            for stream, entries in answer or ():
                key = stream.decode() if isinstance(stream, bytes) else stream
                last = entries[-1][0]
                last = last.decode() if isinstance(last, bytes) else last
                if key == chunk.wake_key:
                    chunk.wake_id = last
                    continue
                for w in list(self._by_stream.get(key, ())):
                    w.streams[key] = max(w.streams[key], last, key=_id_order)
                    w._deliver(key, entries)

    def background(self) -> list[asyncio.Task[None]]:
        return [c.task for c in self._chunks if c.task is not None]

    def close(self) -> None:
        for task in self.background():
            task.cancel()


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
