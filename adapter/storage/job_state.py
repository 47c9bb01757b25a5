"""A job's log in memory: its events, and the state they imply.

Shared by the jobs that run here (pipeline/jobs.py) and the copies other replicas' jobs
are followed into (job_log.py): a replayed log rebuilds the same state.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from .keys import CacheKey

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
Status = Literal["queued", "running", "succeeded", "failed"]


@dataclass(slots=True)
class Event:
    id: int
    event: str
    data: bytes  # JSON


@dataclass(eq=False)
class Job:
    id: str
    task: str
    record_id: str
    key: CacheKey | None  # the question it answers (None for a batch: it answers many)
    expires: float
    status: Status = "queued"
    result: bytes | None = None
    error: bytes | None = None
    events: list[Event] = field(default_factory=list)
    finished: bool = False
    # What a replica taking the job over needs to ask the model again (never the caller's token).
    agent_input: str = ""
    mode: str = "default"
    _signal: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        """Wake every reader without an event (shutdown: readers look at why they were woken)."""
        self._signal.set()
        self._signal = asyncio.Event()

    def emit(self, event: str, data: Any) -> Event:
        """Append an event; the job's state follows from its events, so a replayed log rebuilds it."""
        ev = Event(len(self.events) + 1, event, data if isinstance(data, bytes) else _encode(data))
        self.events.append(ev)
        if event == "status" and self.status == "queued" and b'"queued"' not in ev.data:
            self.status = "running"
        elif event == "result":
            self.result = ev.data
        elif event == "error":
            self.error = ev.data
        elif event == "done":
            self.status = _decode(ev.data)["status"]
            self.finished = True
        # Wake every reader once, then give later waiters a fresh event to wait on.
        self._signal.set()
        self._signal = asyncio.Event()
        return ev

    async def after(self, last_id: int, timeout: float) -> list[Event] | None:
        """Events after `last_id`; waits up to `timeout` for one, `None` if none came."""
        if len(self.events) > last_id or self.finished:
            return self.events[last_id:]
        signal = self._signal
        try:
            await asyncio.wait_for(signal.wait(), timeout)
        except TimeoutError:
            return None
        return self.events[last_id:]
