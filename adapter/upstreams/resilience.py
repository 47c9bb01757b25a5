"""Containment for the slow, costly, unreliable upstreams: retries, circuit breakers, a bulkhead."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Literal, TypeVar

import structlog

log = structlog.get_logger("adapter.resilience")
T = TypeVar("T")
State = Literal["closed", "open", "half_open"]
class Background:
    """The mark of work nobody waits for at a screen (a batch's item): it yields to interactive calls,
    until an interactive request comes to share its model call (`promote`): from then on it waits
    as that request would, or the request would wait behind the batch."""

    __slots__ = ("promoted", "_waiting_on")

    def __init__(self) -> None:
        self.promoted = False
        self._waiting_on: asyncio.Event | None = None

    def promote(self) -> None:
        self.promoted = True
        if self._waiting_on is not None:
            self._waiting_on.set()


BACKGROUND: ContextVar[Background | None] = ContextVar("background", default=None)


async def retrying(call: Callable[[], Awaitable[T]], *, attempts: int, base: float, cap: float,
                   retry_on: Callable[[Exception], bool], sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> T:
    """`call`, again after failures `retry_on` accepts, with full-jitter exponential backoff."""
    for attempt in range(attempts):
        try:
            return await call()
        except Exception as exc:
            if attempt == attempts - 1 or not retry_on(exc):
                raise
            delay = random.uniform(0, min(cap, base * 2**attempt))
            log.info("upstream.retry", attempt=attempt + 1, delay_ms=round(delay * 1000), error=type(exc).__name__)
            await sleep(delay)
    raise AssertionError("unreachable")


class CircuitBreaker:
    """Closed; open when too large a share of recent calls failed; after a cool-down, a few probes.

    The verdict is a failure ratio over a sliding time window, with a minimum number of calls,
    as Envoy's outlier detection and resilience4j judge: consecutive failures (the old rule)
    open a busy replica's circuit on a run of bad luck under a few percent of random faults,
    and each replica of a fleet sees only its share of the calls. The window is kept as
    per-second buckets, so recording a call costs the same at 1 call/s and at 1,000.

    Open for `reset` seconds, then half-open: `probes` calls go through (no more at a time);
    that many successes close the circuit, one failure opens it again for another `reset`.
    """

    def __init__(self, name: str, *, min_calls: int, ratio: float, window: float, reset: float, probes: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.min_calls = min_calls
        self.ratio = ratio
        self.window = window
        self.reset = reset
        self.probes = probes
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, calls, failures], oldest first
        self.calls = self.failures = 0  # totals over the window
        self.opened_at: float | None = None
        self._tripped: tuple[int, int] | None = None  # (failures, calls) of the window that opened it
        self._probing = 0  # probes admitted and not yet answered
        self._probed = 0  # probes that succeeded since the circuit went half-open

    @classmethod
    def of(cls, name: str, settings: Any, clock: Callable[[], float] = time.monotonic) -> CircuitBreaker:
        return cls(name, min_calls=settings.circuit_breaker_min_calls, ratio=settings.circuit_failure_ratio,
                   window=settings.circuit_window_seconds, reset=settings.circuit_reset_seconds,
                   probes=settings.circuit_half_open_probes, clock=clock)

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self._clock() - self.opened_at >= self.reset else "open"

    def retry_after(self) -> int:
        if self.opened_at is None:
            return 0
        return max(1, int(self.reset - (self._clock() - self.opened_at) + 0.999))

    def describe(self, upstream: str) -> str:
        """Why calls are paused, in the words of the rule that paused them."""
        if self._tripped is not None:
            failures, calls = self._tripped
            return (f"{failures} of the last {calls} calls to the {upstream} within {self.window:g} s failed "
                    f"(the circuit opens at {self.ratio:.0%} of at least {self.min_calls}); calls are paused")
        return f"the {upstream} failed again while its circuit was being probed; calls are paused"

    def admit(self) -> bool:
        """May a call go through now? In half-open state only `probes` at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and self._probing + self._probed < self.probes:
            self._probing += 1
            return True
        return False

    def succeeded(self) -> None:
        if self.opened_at is not None:
            if self._probing:
                self._probing -= 1
                self._probed += 1
            if self._probed < self.probes:
                return
            log.info("circuit.closed", upstream=self.name, probes=self._probed)
            self.opened_at, self._probing, self._probed, self._tripped = None, 0, 0, None
            self._buckets.clear()
            self.calls = self.failures = 0
            return
        self._record(failed=False)

    def failed(self) -> None:
        if self.opened_at is not None:
            if self._probing:  # a probe failed: another full cool-down
                log.warning("circuit.opened", upstream=self.name, reason="a half-open probe failed", cool_down_s=self.reset)
                self.opened_at, self._probing, self._probed, self._tripped = self._clock(), 0, 0, None
            return  # a call admitted before the circuit opened: its verdict is already in
        self._record(failed=True)
        if self.calls >= self.min_calls and self.failures >= self.ratio * self.calls:
            log.warning("circuit.opened", upstream=self.name, failures=self.failures, calls=self.calls,
                        window_s=self.window, cool_down_s=self.reset)
            self.opened_at, self._tripped = self._clock(), (self.failures, self.calls)
            self._buckets.clear()
            self.calls = self.failures = 0

    def released(self) -> None:
        """The admitted call ended without a verdict (cancelled, or a refusal that says nothing of health)."""
        if self._probing:
            self._probing -= 1

    def _record(self, *, failed: bool) -> None:
        now = self._clock()
        second = int(now)
        buckets = self._buckets
        while buckets and buckets[0][0] <= now - self.window:
            _, calls, failures = buckets.popleft()
            self.calls -= calls
            self.failures -= failures
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        self.calls += 1
        if failed:
            bucket[2] += 1
            self.failures += 1


class Bulkhead:
    """At most `limit` calls in flight; the rest wait at most `wait` seconds.

    Background calls (BACKGROUND set: a batch's items) go last: they wait, without a deadline,
    while an interactive call is waiting, and never take the last quarter of the slots, so an
    interactive request finds a slot at once even while a big batch runs. A background call an
    interactive request joined (promoted) waits as an interactive one.
    """

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self._slots = asyncio.Semaphore(limit)
        self.headroom = max(1, limit // 4) if limit > 1 else 0
        self._interactive_waiting = 0
        self._freed = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return self.limit - self._slots._value  # noqa: SLF001 - the semaphore's count is the truth

    async def acquire(self) -> bool:
        background = BACKGROUND.get()
        if background is not None and not background.promoted:
            background._waiting_on = self._freed  # noqa: SLF001 - so that promote() wakes this wait
            try:
                while not background.promoted and (self._interactive_waiting or self.in_flight >= self.limit - self.headroom):
                    self._freed.clear()
                    await self._freed.wait()
            finally:
                background._waiting_on = None  # noqa: SLF001
            if not background.promoted:
                await self._slots.acquire()  # free at once: nothing can take it between the check and here
                return True
        self._interactive_waiting += 1
        try:
            async with asyncio.timeout(self.wait):
                await self._slots.acquire()
        except TimeoutError:
            return False
        finally:
            self._interactive_waiting -= 1
            self._freed.set()
        return True

    def release(self) -> None:
        self._slots.release()
        self._freed.set()
