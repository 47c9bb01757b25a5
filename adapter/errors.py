"""Domain exceptions. They carry data only; `adapter.problems` turns them into responses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class AdapterError(Exception):
    status: int = 500
    slug: str = "internal-error"
    title: str = "Internal error"

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


class Unauthenticated(AdapterError):
    status, slug, title = 401, "unauthenticated", "Authentication required"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class HeadersTooLarge(AdapterError):
    status, slug, title = 431, "headers-too-large", "Request headers too large"


class UnsupportedMediaType(AdapterError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class RequestTimeout(AdapterError):
    """The client did not send its request (headers or body) in time; the connection is closed after the answer."""

    status, slug, title = 408, "request-timeout", "Request timeout"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Connection": "close"})


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


class GatewayUnavailable(AdapterError):
    status, slug, title = 503, "gateway-unavailable", "Conductor Gateway unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class GatewayCircuitOpen(GatewayUnavailable):
    slug, title = "gateway-circuit-open", "Conductor Gateway circuit open"


class GatewayBusy(GatewayUnavailable):
    slug, title = "gateway-busy", "Too many agent calls in flight"


class CrmBusy(AdapterError):
    """Every pass-through connection to the CRM backend stayed in use while this request waited for one."""

    status, slug, title = 503, "crm-busy", "CRM backend connections busy"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class CrmCircuitOpen(AdapterError):
    status, slug, title = 503, "crm-circuit-open", "CRM backend circuit open"

    def __init__(self, detail: str, *, retry_after: int) -> None:
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


class ShuttingDown(AdapterError):
    """This replica is draining before it stops: ask another one (the balancer sends the retry elsewhere)."""

    status, slug, title = 503, "shutting-down", "Replica shutting down"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


def to_record(exc: AdapterError) -> dict:
    """Plain data for an error, so another process can raise the same one."""
    return {
        "cls": type(exc).__name__, "status": exc.status, "slug": exc.slug, "title": exc.title,
        "detail": exc.detail, "headers": exc.headers, "errors": exc.errors,
    }


def from_record(record: dict) -> AdapterError:
    cls = globals().get(record.get("cls", ""), AdapterError)
    if not (isinstance(cls, type) and issubclass(cls, AdapterError)):
        cls = AdapterError
    exc = cls.__new__(cls)
    AdapterError.__init__(exc, record["detail"], headers=record.get("headers"), errors=record.get("errors", ()))
    exc.status, exc.slug, exc.title = record["status"], record["slug"], record["title"]
    return exc
