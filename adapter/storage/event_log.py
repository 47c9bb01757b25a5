"""A log of events in memory, of one kind (a job, a batch; next, a thread's turn), and the state it implies.

Shared by the logs this replica writes (pipeline/) and the copies of other replicas' logs it
follows (log_follower.py): a replayed log rebuilds the same state. Each kind has its own typed
statuses and its own fields; what they share (ids, the wake-up of readers, `done` last) is `Log`.

`Continuation` is what the pipeline hands the Redis log at start-up, one per kind (`Kinds`): who
continues a log this replica took over, who stops when another replica took one from it, and who
ends a copy that cannot go on (expired, tampered). Storage calls it; it never imports the pipeline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import msgspec

from .keys import CacheKey

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

Kind = Literal["job", "batch"]
JOB: Kind = "job"
BATCH: Kind = "batch"
JobStatus = Literal["queued", "running", "succeeded", "failed"]
BatchStatus = Literal["queued", "running", "completed", "cancelled", "failed"]
JobMode = Literal["default", "no-cache", "no-store"]


@dataclass(slots=True)
class Event:
    id: int
    event: str
    data: bytes  # JSON


@dataclass(eq=False, kw_only=True)
class Log:
    """Events with consecutive ids (1, 2, ...), `done` last; every reader is woken by each one."""

    kind: ClassVar[Kind]
    id: str
    task: str
    expires: float
    status: str = "queued"
    events: list[Event] = field(default_factory=list)
    finished: bool = False
    _signal: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        """Wake every reader without an event (shutdown: readers look at why they were woken)."""
        self._signal.set()
        self._signal = asyncio.Event()

    def emit(self, event: str, data: Any) -> Event:
        """Append an event; the log's state follows from its events, so a replayed log rebuilds it."""
        ev = Event(len(self.events) + 1, event, data if isinstance(data, bytes) else _encode(data))
        self.events.append(ev)
        if event == "status" and self.status == "queued" and b'"queued"' not in ev.data:
            self.status = "running"
        elif event == "done":
            self.status = _decode(ev.data)["status"]
            self.finished = True
        else:
            self._fold(ev)
        self.wake()  # every reader once; later waiters get a fresh event to wait on
        return ev

    def _fold(self, ev: Event) -> None:
        """A kind's own events' effect on its state."""

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


@dataclass(eq=False, kw_only=True)
class Job(Log):
    """One question's answer: `status`, `delta`, then `result` or `error`, and `done` {status, cached}."""

    kind: ClassVar[Kind] = JOB
    status: JobStatus = "queued"  # type: ignore[assignment]
    record_id: str
    key: CacheKey | None  # None only for a job logged by the release before CacheKey: derived again on resume
    # What a replica taking the job over needs to ask the model again (never the caller's token).
    agent_input: str = ""
    mode: JobMode = "default"
    result: bytes | None = None
    error: bytes | None = None

    def _fold(self, ev: Event) -> None:
        if ev.event == "result":
            self.result = ev.data
        elif ev.event == "error":
            self.error = ev.data


@dataclass(eq=False, kw_only=True)
class Batch(Log):
    """One task over many records: `status`, per item `item` and `progress`, `done` {status, counts, ended_at}."""

    kind: ClassVar[Kind] = BATCH
    status: BatchStatus = "queued"  # type: ignore[assignment]
    ids: list[str]
    options: dict[str, Any]
    user: str  # whose budget it spends, and who alone may cancel it

    @property
    def ended_at(self) -> float | None:
        """When the batch ended, from its `done` (None while it runs, or for a batch ended before `done` said)."""
        if not self.finished or not self.events or self.events[-1].event != "done":
            return None
        stamp = _decode(self.events[-1].data).get("ended_at")
        return dt.datetime.fromisoformat(stamp).timestamp() if isinstance(stamp, str) else None


class Continuation(Protocol):
    """What the pipeline does with a log of its kind when the Redis log says so."""

    async def resume(self, log: Any) -> None:
        """This replica took the log over (its runner died or handed it over): continue it."""

    def lost(self, log: Any) -> None:
        """Another replica owns the log now: stop running it here (this replica follows it instead)."""

    def end(self, log: Any, exc: Exception) -> None:
        """This replica's copy cannot go on (the log expired, or failed its integrity check): end it for its readers."""


Kinds = Mapping[str, Continuation]
