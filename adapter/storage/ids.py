"""Job and batch ids that say when they were made (issue 24).

`<kind>_<32 hex>`: 12 hex digits of the creation time in milliseconds, the marker `a`, then 19
random hex digits (76 bits). An id the release before made (`uuid4().hex`) has a `4` where the
marker is, so it is never mistaken for one that carries a time.

Why: right after Redis restarts empty, until the runner repairs its log, a replica asked for a
job finds nothing. A 404 would tell an EventSource to stop for good; an id whose time says it may
still be running is answered 503 (`job-log-unavailable`, retry shortly) instead.
"""

from __future__ import annotations

import secrets

_MARK = "a"


def new_id(kind: str, now: float) -> str:
    return f"{kind}_{int(now * 1000) & 0xFFFF_FFFF_FFFF:012x}{_MARK}{secrets.token_hex(10)[:19]}"


def made_at(job_id: str) -> float | None:
    """When the id was made (epoch seconds), or None for an id that does not say (an older release's)."""
    _, _, tail = job_id.partition("_")
    if len(tail) != 32 or tail[12] != _MARK:
        return None
    try:
        return int(tail[:12], 16) / 1000
    except ValueError:
        return None


def may_be_live(job_id: str, now: float, lifetime: float) -> bool:
    """Whether a job with this id could still be running: made less than `lifetime` ago (a little
    slack for clocks apart), and not in the future beyond that slack."""
    made = made_at(job_id)
    return made is not None and now - 60 <= made + lifetime and made <= now + 60
