"""Real `adapter serve` replicas and a browser-like SSE reader, for the multi-process tests and bench/takeover.

Every wait is bounded: a `Replica` reports its log lines as they come (the test awaits
the line it needs, never a sleep), and a `Reader` reports each event it receives.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    # If the test runner itself is killed (a CI timeout), the replica goes too: no orphan keeps a port.
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Changes:
    """Something that grows (log lines, events); `until` waits for a condition on it, with a deadline."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, condition: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what} not reached within {timeout} s")
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return value


class Replica(Changes):
    """One `adapter serve` process; its JSON log lines are collected as they are written."""

    def __init__(self, name: str, port: int, env: dict[str, str]) -> None:
        super().__init__()
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LOG_FORMAT": "json", **self.env}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "adapter.cli", "serve", "--port", str(self.port), cwd=ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent)
        self._reader = asyncio.create_task(self._read())
        # The socket is bound before the lifespan logs `startup`: from then on connections queue in its backlog.
        await self.until(lambda: self.logged("startup") or self.proc.returncode is not None, timeout, f"{self.name} start-up")
        if self.proc.returncode is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.lines[-5:]}")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": raw.decode(errors="replace").rstrip()}
            self.lines.append(line)
            self.changed()
        self.changed()

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [line for line in self.lines
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())]

    async def saw(self, event: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        return (await self.until(lambda: self.logged(event, **fields), timeout, f"{self.name} logging {event}"))[0]

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)

    async def exited(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self) -> None:
        """Clean-up: SIGKILL by pid if still running, and reap it."""
        if self.proc is None:
            return
        self.kill()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        finally:
            if self._reader is not None:
                self._reader.cancel()


@dataclass
class Event:
    id: int
    event: str
    data: str
    at: float  # time.monotonic() when it arrived
    wall: float = 0.0  # time.time() when it arrived (to compare with timestamps another process wrote)

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Reader(Changes):
    """A browser's EventSource, reduced: reconnects with Last-Event-ID, to the next replica, until `done`."""

    urls: list[str]
    path: str
    first: int = 0
    events: list[Event] = field(default_factory=list)
    pings: int = 0
    connections: list[tuple[str, int | str]] = field(default_factory=list)  # (replica url, status or error)

    def __post_init__(self) -> None:
        Changes.__init__(self)

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].event == "done"

    async def run(self, client: httpx.AsyncClient, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        turn = self.first
        while not self.done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no `done` within {timeout} s; got {[e.id for e in self.events]}, "
                                   f"connections {self.connections}")
            url = self.urls[turn % len(self.urls)]
            headers = {"Accept": "text/event-stream"}
            if self.events:
                headers["Last-Event-ID"] = str(self.events[-1].id)
            try:
                async with client.stream("GET", url + self.path, headers=headers,
                                         timeout=httpx.Timeout(5, read=max(deadline - time.monotonic(), 0.1))) as response:
                    self.connections.append((url, response.status_code))
                    if response.status_code == 200:
                        await self._consume(response)
            except (httpx.TransportError, httpx.StreamError) as exc:
                self.connections.append((url, type(exc).__name__))
            if not self.done:
                turn += 1  # like a balancer: the next connection lands on another replica
                self.changed()
        return self.events

    async def _consume(self, response: httpx.Response) -> None:
        block: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line == "":
                if "id" in block:
                    self.events.append(Event(int(block["id"]), block.get("event", "message"), block.get("data", ""),
                                             time.monotonic(), time.time()))
                    self.changed()
                    if self.done:
                        return
                block = {}
            elif line.startswith(":"):
                self.pings += 1
                self.changed()
            else:
                name, _, value = line.partition(":")
                block[name] = value[1:] if value.startswith(" ") else value

    def check_sequence(self) -> None:
        """Consecutive ids from 1, no gap, no repeat, ending in `done`; no replica refused it (a 404, say)."""
        refused = [(url, status) for url, status in self.connections if isinstance(status, int) and status != 200]
        assert not refused, refused
        ids = [e.id for e in self.events]
        assert ids == list(range(1, len(ids) + 1)), ids
        assert self.done and sum(e.event == "done" for e in self.events) == 1
