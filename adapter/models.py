"""Wire shapes of the sidecar's own API (the CRM-shaped contract)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# MongoDB ObjectId: checked here because the CRM backend answers 500 for any other form.
# msgspec applies the pattern with re.search, where `$` also matches before a final "\n": the
# length bounds leave no room for one. (`\Z` would say it too, but the pattern is also the
# OpenAPI document's, read by ECMAScript regex engines, which have no `\Z`.)
ObjectId = Annotated[
    str,
    Meta(pattern="^[0-9a-fA-F]{24}$", min_length=24, max_length=24, description="MongoDB ObjectId: 24 hexadecimal characters",
         examples=["65f1c0ffee0000000000a001"]),
]
Percent = Annotated[int, Meta(ge=0, le=100)]


class Inbound(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A request body: an unknown field is refused (400 naming it), never ignored."""


Provider = Annotated[str | None, Meta(description="The AI provider that produced the answer (one of CONDUCTOR_AI_PROVIDER); "
                                                  "null when the gateway chose its default")]


class JobCreated(msgspec.Struct, kw_only=True):
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    events_url: str
    expires_at: dt.datetime


class SseEvent(msgspec.Struct, kw_only=True):
    """One server-sent event as it arrives: `data` is JSON text (see each event's description)."""

    event: Annotated[Literal["status", "delta", "result", "error", "done"], Meta(
        description="status {state, message}; delta {text}; result: the synchronous route's body "
                    "(plus `warnings`, the X-Agent-Warnings list, when there are any); "
                    "error: a problem object; done {status, cached}, always last")]
    data: Annotated[str, Meta(description="the event's JSON payload")]
    id: Annotated[str, Meta(pattern="^[1-9][0-9]*$", description="consecutive from 1; resume with Last-Event-ID")]


class BatchSseEvent(msgspec.Struct, kw_only=True):
    """One server-sent event of a batch: `data` is JSON text (see each event's description)."""

    event: Annotated[Literal["status", "item", "progress", "done"], Meta(
        description="status {state, message}; item {id, status: running|succeeded|failed|cancelled, cached, "
                    "result (the task's synchronous body) | error (a problem object)}; progress {queued, running, "
                    "succeeded, failed, cancelled, cached}; done {status: completed|cancelled|failed, counts, ended_at: "
                    "when it ended (the batch is kept JOB_RETENTION_SECONDS after)}, always last")]
    data: Annotated[str, Meta(description="the event's JSON payload")]
    id: Annotated[str, Meta(pattern="^[1-9][0-9]*$", description="consecutive from 1; resume with Last-Event-ID")]


class FieldError(msgspec.Struct, kw_only=True, omit_defaults=True):
    field: str | None = None
    message: str


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = None


class DependencyState(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: Literal["up", "down", "degraded"]
    url: str | None = None
    backend: str | None = None
    latency_ms: float | None = None
    detail: str | None = None


class AiHealth(msgspec.Struct, kw_only=True):
    status: Literal["ok", "degraded"]
    gateway: DependencyState
    crm_backend: DependencyState
    cache: DependencyState
    agents: dict[str, bool]
    circuits: dict[str, Literal["closed", "open", "half_open"]]
    gateway_calls_in_flight: int


class Liveness(msgspec.Struct, kw_only=True):
    status: Literal["ok", "ready"]
    cache: str | None = None
