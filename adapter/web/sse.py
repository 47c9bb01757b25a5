"""Server-sent events out of a job's log: ids, a retry hint first, heartbeats while silent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from litestar.response import Stream
from prometheus_client import Gauge

from ..pipeline.jobs import Jobs
from ..storage.event_log import Event, Log

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer


def sse_response(job: Log, jobs: Jobs, after: int, drop_after: int | None = None, **headers: str) -> Stream:
    """The log's events from `after` on, as a text/event-stream response."""
    s = jobs.settings
    events = job_events(job, after=after, heartbeat=s.sse_heartbeat_seconds, retry_ms=s.sse_retry_ms,
                        open_streams=jobs.service.metrics.open_streams, drop_after=drop_after,
                        closing=jobs.closing)
    return Stream(events, media_type="text/event-stream", headers={**SSE_HEADERS, "X-Job-ID": job.id, **headers})


def frame(ev: Event) -> bytes:
    # Our JSON is compact (no newlines), so one `data:` line carries the whole event.
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (ev.id, ev.event.encode(), ev.data)


async def job_events(job: Log, *, after: int, heartbeat: float, retry_ms: int, open_streams: Gauge,
                     drop_after: int | None = None, closing: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """Every event after `after`, live, through `done`. A client that leaves just stops reading.

    `drop_after` (demo only) hangs up after that many events, as a flaky network would.
    `closing` (set when the replica shuts down) ends the response cleanly after the events
    already there: the browser's EventSource then reconnects with Last-Event-ID elsewhere.
    """
    open_streams.inc()
    sent = 0
    try:
        yield b"retry: %d\n\n" % retry_ms
        while True:
            if closing is not None and closing.is_set():
                return
            events = await job.after(after, heartbeat)
            if events is None:
                yield b": ping\n\n"  # keeps proxies and the browser from giving up on a thinking model
                continue
            for ev in events:
                yield frame(ev)
                after = ev.id
                sent += 1
                if drop_after is not None and sent >= drop_after and ev.event != "done":
                    return
            if job.finished and after >= len(job.events):
                return
    finally:
        open_streams.dec()


def last_event_id(header: str | None, query: str | None) -> int:
    """Where a reconnecting client resumes: `Last-Event-ID`, or `lastEventId` for polyfills.

    Only a small ASCII number counts: `str.isdigit` also takes `²` and other scripts' digits, which
    `int` refuses, and `int` refuses more than 4,300 digits; either was a 500. Anything else is no
    resume point, as any other text there is.
    """
    for value in (header, query):
        if value and (value := value.strip()).isascii() and value.isdigit() and len(value) <= _ID_DIGITS:
            return int(value)
    return 0


# Event ids count a job's events: far fewer than 10**18.
_ID_DIGITS = 18
