"""Open event streams: at most MAX_STREAMS_PER_USER per user, and MAX_STREAMS on this replica.

Every SSE response (a task's stream, a job's or a batch's events) takes a place before it opens,
counted against the user it acts for: the bearer's `Caller.user`, or the user a job or batch
token names (tokens.py), so EventSource readers count like the rest. Beyond the user's limit
the answer is 429; beyond the replica's, 503 (another replica may have room), both with
Retry-After. The place is given back when the request ends, however it ends: the request's
middleware calls `release` (app.py), so a stream whose body never started (the client left
first, or the handler failed after taking it) gives its place back too.

The counts are this replica's: a stream holds this replica's memory and file descriptors,
and a replica that dies takes its streams with it, so no shared count can go stale.
"""

from __future__ import annotations

from typing import Any

import structlog
from litestar.types import Scope
from prometheus_client import Counter

from ..errors import StreamsFull, TooManyAtOnce
from ..settings import Settings

log = structlog.get_logger("adapter.streams")
_SLOT = "adapter.stream_slot"
# Streams end when their job does (a model answers in seconds to minutes) or their reader leaves.
RETRY_AFTER = 5
# Descriptors that are neither a client's stream nor an upstream pool's: the listening socket,
# Redis connections, log and module files, the event loop's own.
OTHER_FDS = 256


class StreamSlots:
    def __init__(self, per_user: int, total: int, refused: Counter | None = None) -> None:
        self.per_user = per_user
        self.total = total
        self.open_streams = 0
        self._by_user: dict[str, int] = {}
        self._refused = refused

    def take(self, scope: Scope, user: str) -> None:
        """A place for this request's stream, released when the request ends; or 429 / 503 naming the limit."""
        if scope.get(_SLOT) is not None:  # type: ignore[misc]
            return
        held = self._by_user.get(user, 0)
        if held >= self.per_user:
            self._refuse("MAX_STREAMS_PER_USER")
            raise TooManyAtOnce(f"this user has {held} event streams open; at most {self.per_user} at a time "
                                "(MAX_STREAMS_PER_USER): close one first", retry_after=RETRY_AFTER)
        if self.open_streams >= self.total:
            self._refuse("MAX_STREAMS")
            raise StreamsFull(f"this replica has {self.open_streams} event streams open, its limit (MAX_STREAMS); "
                              "retry (another replica may have room)", retry_after=RETRY_AFTER)
        self._by_user[user] = held + 1
        self.open_streams += 1
        scope[_SLOT] = (self, user)  # type: ignore[literal-required]

    def _release(self, user: str) -> None:
        self.open_streams -= 1
        left = self._by_user.get(user, 1) - 1
        if left > 0:
            self._by_user[user] = left
        else:
            self._by_user.pop(user, None)

    def held_by(self, user: str) -> int:
        return self._by_user.get(user, 0)

    def _refuse(self, limit: str) -> None:
        if self._refused is not None:
            self._refused.labels(limit).inc()


def release(scope: Scope) -> None:
    """Give back the place this request's stream took, if it took one (idempotent)."""
    slot: Any = scope.pop(_SLOT, None)  # type: ignore[misc]
    if slot is not None:
        slots, user = slot
        slots._release(user)


def stream_limit(settings: Settings) -> tuple[int, int | None]:
    """MAX_STREAMS, lowered to what the process's file-descriptor limit leaves for client streams, and that limit.

    Each open stream holds one descriptor (its client's socket); the upstream pools may hold up
    to GATEWAY_MAX_CONNECTIONS + CRM_MAX_CONNECTIONS + PROXY_MAX_CONNECTIONS more, and the
    process a few hundred of its own. The soft limit is first raised towards the hard one
    (as nginx's worker_rlimit_nofile does) when it is lower than all that; whatever is left
    caps MAX_STREAMS, so a full replica answers 503 instead of failing to accept() or open a file.
    """
    try:
        import resource
    except ImportError:  # not a POSIX system: no limit to read
        return settings.max_streams, None
    reserve = settings.gateway_max_connections + settings.crm_max_connections + settings.proxy_max_connections + OTHER_FDS
    wanted = settings.max_streams + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return settings.max_streams, None
    # Never below a quarter of the descriptors: pools are rarely all full at once.
    return min(settings.max_streams, max(soft - reserve, soft // 4)), soft
