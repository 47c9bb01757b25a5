"""Every domain exception of the sidecar. They carry data only; `web/problems.py` is the one
mapping that turns them (and Litestar's own) into RFC 9457 problem responses.

AdapterError                       status, slug, title, detail, headers, errors[]
├── BadRequest                     400 invalid-request (names the field)
├── Unauthenticated                401 (WWW-Authenticate: Bearer)
├── Forbidden                      403
├── NotFound                       404
├── ThreadFull                     409 (THREAD_MAX_TURNS)
├── RequestTimeout                 408 (the client was too slow; Connection: close)
├── UnsupportedMediaType           415
├── RateLimited                    429 (storage/ratelimit.py; Retry-After, RateLimit-*)
│   └── TooManyAtOnce              429 too-many-at-once (a user's open streams or running batches; Retry-After)
├── HeadersTooLarge                431
├── ClientGone                     499 (the client hung up mid-request; nobody reads the answer)
├── CrmRefused                     the CRM backend's own 4xx, passed on
├── CrmUnavailable                 502 crm-unavailable
│   └── CrmCircuitOpen             503 (Retry-After)
├── CrmBusy                        503 (pass-through pool exhausted; Retry-After)
├── GatewayUnavailable             503 (Retry-After)
│   ├── GatewayCircuitOpen
│   ├── GatewayBusy
│   └── SharedCallCancelled        (the job whose model call it joined stopped it)
├── GatewayRejected                502 gateway-error (refused for good: no Retry-After)
├── GatewayProtocolError           502
├── AgentMissing                   502
├── AgentFailed                    502
├── InvalidAgentOutput             502 (after repair)
├── BatchItemLost                  502 (a batch item whose record was never read)
├── UpstreamTimeout                504 (slug per upstream)
├── JobExpired                     410
├── JobLogUnavailable              503 (Retry-After)
├── JobLogTampered                 502 (the job's log in Redis failed its integrity check)
├── ShuttingDown                   503 (this replica drains; Retry-After)
├── StreamsFull                    503 (this replica holds MAX_STREAMS open streams; Retry-After)
└── NotReady                       503 (readiness probe)

`to_record`/`from_record` carry an error to another process (the Redis single flight):
`from_record` rebuilds the same class from the registry of subclasses, never from globals.

Not here, on purpose: signals that never leave their module and never become a response
(`OutputInvalid` starts a repair, `NoJsonObject` feeds it, the gateway client's private
`_Refused503`/`_StreamLost` steer its retries), and start-up failures that stop the process
with one line (`ConfigError`, `CannotListen`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar


class AdapterError(Exception):
    status: int = 500
    slug: str = "internal-error"
    title: str = "Internal error"

    # Every subclass, by name: what `from_record` may rebuild.
    registry: ClassVar[dict[str, type[AdapterError]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        AdapterError.registry[cls.__name__] = cls

    def __init__(
        self,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        errors: Sequence[str] = (),
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.errors = list(errors)


class BadRequest(AdapterError):
    status, slug, title = 400, "invalid-request", "Invalid request"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.field = field


class Forbidden(AdapterError):
    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(AdapterError):
    status, slug, title = 404, "not-found", "Not found"


class ThreadFull(AdapterError):
    """A thread holds THREAD_MAX_TURNS turns: the history every later prompt replays is bounded."""

    status, slug, title = 409, "thread-full", "The thread has its most turns"


class Unauthenticated(AdapterError):
    status, slug, title = 401, "unauthenticated", "Authentication required"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class RateLimited(AdapterError):
    status, slug, title = 429, "rate-limited", "Too many AI requests"


class TooManyAtOnce(RateLimited):
    """One user holds as many open event streams, or running batches, as their limit allows."""

    slug, title = "too-many-at-once", "Too many at once for this user"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class HeadersTooLarge(AdapterError):
    status, slug, title = 431, "headers-too-large", "Request headers too large"


class UnsupportedMediaType(AdapterError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class RequestTimeout(AdapterError):
    """The client did not send its request (headers or body) in time; the connection is closed after the answer."""

    status, slug, title = 408, "request-timeout", "Request timeout"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Connection": "close"})


class ClientGone(AdapterError):
    """The client hung up mid-request (mid-upload on a proxied path): the upstream request is
    abandoned with it. Nobody reads the answer; the status (nginx's 499) is for logs and metrics."""

    status, slug, title = 499, "client-closed-request", "Client closed the request"


class CrmRefused(AdapterError):
    """The CRM backend's own 4xx answer, passed on with its status and detail."""

    _by_status = {
        401: ("unauthenticated", "Authentication required"),
        403: ("forbidden", "Forbidden"),
        404: ("not-found", "Not found"),
    }

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail, headers=headers)
        self.status = status
        self.slug, self.title = self._by_status.get(status, ("crm-rejected", "Rejected by the CRM backend"))


class CrmUnavailable(AdapterError):
    status, slug, title = 502, "crm-unavailable", "CRM backend unavailable"


class CrmCircuitOpen(CrmUnavailable):
    """The CRM backend failed often enough that calls are paused: not asked at all."""

    status, slug, title = 503, "crm-circuit-open", "CRM backend circuit open"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        AdapterError.__init__(self, detail, headers={"Retry-After": str(retry_after)})


class GatewayUnavailable(AdapterError):
    status, slug, title = 503, "gateway-unavailable", "Conductor Gateway unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class GatewayCircuitOpen(GatewayUnavailable):
    slug, title = "gateway-circuit-open", "Conductor Gateway circuit open"


class GatewayBusy(GatewayUnavailable):
    slug, title = "gateway-busy", "Too many agent calls in flight"


class SharedCallCancelled(GatewayUnavailable):
    """The model call this request shared was stopped by the job that made it (handed to another
    replica while this one shut down, or past JOB_MAX_SECONDS): asking again starts a new one."""

    slug, title = "shared-call-cancelled", "The shared agent call was cancelled"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retry_after=1)


class CrmBusy(AdapterError):
    """Every pass-through connection to the CRM backend stayed in use while this request waited for one."""

    status, slug, title = 503, "crm-busy", "CRM backend connections busy"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class GatewayRejected(AdapterError):
    """The gateway (or the Conductor API behind it) refused or failed the call for good.

    A validation message inside a 500 or a 400 ("Campo 'screenplay_id' é obrigatório",
    "CWD não configurado"): asking again gives the same answer, so it is no 503 and
    carries no Retry-After.
    """

    status, slug, title = 502, "gateway-error", "The Conductor Gateway refused the call"


class GatewayProtocolError(AdapterError):
    status, slug, title = 502, "gateway-protocol-error", "Unexpected answer from the Conductor Gateway"


class AgentMissing(AdapterError):
    status, slug, title = 502, "agent-missing", "Agent not available on the gateway"

    def __init__(self, agent: str) -> None:
        super().__init__(f"the Conductor Gateway does not know agent '{agent}'")
        self.agent = agent


class AgentFailed(AdapterError):
    status, slug, title = 502, "agent-failed", "The agent's run failed"


class BatchItemLost(AdapterError):
    """A batch item nobody can run any more: its replica stopped before reading its record."""

    status, slug, title = 502, "batch-item-lost", "The batch lost this item"


class InvalidAgentOutput(AdapterError):
    status, slug, title = 502, "invalid-agent-output", "The agent answered invalid output"


class UpstreamTimeout(AdapterError):
    status, title = 504, "Upstream timeout"

    def __init__(self, upstream: str, seconds: float | None, slug: str) -> None:
        within = f" within {seconds:g} s" if seconds else " in time"
        super().__init__(f"the {upstream} did not answer{within}")
        self.slug = slug


class JobExpired(AdapterError):
    """A job's log ended without `done`: its lifetime ran out, or Redis lost it and nobody restored it."""

    status, slug, title = 410, "job-expired", "Job expired"


class JobLogUnavailable(AdapterError):
    """Redis, which holds the jobs other replicas run, failed: try again shortly."""

    status, slug, title = 503, "job-log-unavailable", "Job log unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


class JobLogTampered(AdapterError):
    """The job's log in Redis failed its check (storage/signing.py): changed outside the sidecar, or
    signed with a key this replica does not accept. Nothing in it is served; the job must be started again."""

    status, slug, title = 502, "job-log-tampered", "Job log failed its integrity check"


class ShuttingDown(AdapterError):
    """This replica is draining before it stops: ask another one (the balancer sends the retry elsewhere)."""

    status, slug, title = 503, "shutting-down", "Replica shutting down"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


class StreamsFull(AdapterError):
    """This replica holds MAX_STREAMS open event streams: another replica (or a later try) answers."""

    status, slug, title = 503, "streams-full", "Too many open event streams"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class NotReady(AdapterError):
    status, slug, title = 503, "not-ready", "Not ready"


def to_record(exc: AdapterError) -> dict:
    """Plain data for an error, so another process can raise the same one."""
    return {
        "cls": type(exc).__name__, "status": exc.status, "slug": exc.slug, "title": exc.title,
        "detail": exc.detail, "headers": exc.headers, "errors": exc.errors,
    }


def from_record(record: dict) -> AdapterError:
    cls = AdapterError.registry.get(record.get("cls", ""), AdapterError)
    exc = cls.__new__(cls)
    AdapterError.__init__(exc, record["detail"], headers=record.get("headers"), errors=record.get("errors", ()))
    exc.status, exc.slug, exc.title = record["status"], record["slug"], record["title"]
    return exc
