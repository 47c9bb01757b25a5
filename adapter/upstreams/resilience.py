"""Containment for the slow, costly, unreliable upstreams: retries, circuit breakers, a bulkhead."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Literal, TypeVar

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
    """Closed, then open after `threshold` consecutive failures; after `reset` seconds one probe goes through."""

    def __init__(self, name: str, *, threshold: int, reset: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.threshold = threshold
        self.reset = reset
        self._clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self._clock() - self.opened_at >= self.reset else "open"

    def retry_after(self) -> int:
        if self.opened_at is None:
            return 0
        return max(1, int(self.reset - (self._clock() - self.opened_at) + 0.999))

    def admit(self) -> bool:
        """May a call go through now? In half-open state only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def succeeded(self) -> None:
        if self.opened_at is not None:
            log.info("circuit.closed", upstream=self.name)
        self.failures, self.opened_at, self._probing = 0, None, False

    def failed(self) -> None:
        self.failures += 1
        if self._probing or self.failures >= self.threshold:
            if self.opened_at is None or self._probing:
                log.warning("circuit.opened", upstream=self.name, failures=self.failures, cool_down_s=self.reset)
            self.opened_at, self._probing = self._clock(), False

    def released(self) -> None:
        """The admitted call ended without a verdict (cancelled, or a refusal that says nothing of health)."""
        self._probing = False


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
