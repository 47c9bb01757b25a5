"""Stopping background tasks for certain, before the clients they use are closed.

`task.cancel()` is a request, and on Python 3.11 one can be lost: `asyncio.wait_for` returns the
inner result instead of raising when the cancel lands in the turn its inner future completed
(CPython gh-86296, fixed in 3.12). redis-py sends every command through `wait_for` (its socket
timeout), so a job-log writer or a batch runner cancelled at shutdown could carry on with its next
Redis command after the lifespan had closed the pool. redis-py then connects again, nothing ever
closes that connection, and its socket surfaces as a ResourceWarning in whichever later test the
garbage collector happens to run in. So shutdown cancels, waits, and cancels again whatever is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

RECANCEL_EVERY = 0.1  # seconds: a task that lost its cancel is asked again this often


async def cancel_and_wait(tasks: Callable[[], Iterable[asyncio.Task | None]], timeout: float) -> list[asyncio.Task]:
    """Cancel every task `tasks()` names, until all have ended or `timeout` has passed.

    `tasks` is asked again each round: a task cancelled here may start another (a runner's last
    event starts a job-log writer). Returns the tasks still running at the deadline.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    me = asyncio.current_task()
    while True:
        pending = {t for t in tasks() if t is not None and t is not me and not t.done()}
        left = deadline - loop.time()
        if not pending or left <= 0:
            return list(pending)
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=min(left, RECANCEL_EVERY))
