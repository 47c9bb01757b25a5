"""Wire shapes of the sidecar's own API (the CRM-shaped contract)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# MongoDB ObjectId: checked here because the CRM backend answers 500 for any other form.
ObjectId = Annotated[
    str,
    Meta(pattern="^[0-9a-fA-F]{24}$", description="MongoDB ObjectId: 24 hexadecimal characters", examples=["65f1c0ffee0000000000a001"]),
]
Percent = Annotated[int, Meta(ge=0, le=100)]
Tone = Literal["professional", "formal", "casual", "direct"]
VariationType = Literal["formal", "casual", "direct"]
Classification = Literal["Hot", "Warm", "Cold"]


class _Inbound(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class EmailGenerateRequest(_Inbound):
    lead_id: ObjectId
    context: Annotated[str, Meta(min_length=1, max_length=2000)] = "initial outreach"
    tone: Tone = "professional"


class LeadQualifyRequest(_Inbound):
    lead_id: ObjectId


class DealPredictRequest(_Inbound):
    deal_id: ObjectId


class EmailVariation(msgspec.Struct, kw_only=True):
    type: VariationType
    subject: Annotated[str, Meta(min_length=1, max_length=60)]
    body: Annotated[str, Meta(min_length=1)]
    tone: Annotated[str, Meta(min_length=1)]


Provider = Annotated[str | None, Meta(description="The AI provider that produced the answer (one of CONDUCTOR_AI_PROVIDER); "
                                                  "null when the gateway chose its default")]


class EmailGenerateResult(msgspec.Struct, kw_only=True):
    lead_id: str
    agent: str
    variations: Annotated[list[EmailVariation], Meta(min_length=3, max_length=3)]
    provider: Provider = None


class Bant(msgspec.Struct, kw_only=True):
    budget: str
    authority: str
    need: str
    timeline: str


class LeadQualifyResult(msgspec.Struct, kw_only=True):
    lead_id: str
    agent: str
    score: Percent
    classification: Classification
    reasoning: str
    next_actions: list[str]
    bant: Bant
    provider: Provider = None


class DealPredictResult(msgspec.Struct, kw_only=True):
    deal_id: str
    agent: str
    win_probability: Percent
    health_score: Percent
    predicted_close_date: dt.date | None
    risk_factors: list[str]
    recommended_actions: list[str]
    reasoning: str
    provider: Provider = None


TaskName = Literal["email.generate", "lead.qualify", "deal.predict"]
AnyResult = EmailGenerateResult | LeadQualifyResult | DealPredictResult


class JobRequest(_Inbound):
    task: TaskName
    input: dict[str, Any] = msgspec.field(name="input")


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


@dataclasses.dataclass(kw_only=True)
class JobView:
    """A dataclass, not a Struct: msgspec cannot type an untagged union of Structs,
    and the result is embedded as already-validated JSON (msgspec.Raw) anyway."""

    job_id: str
    task: TaskName
    status: Literal["queued", "running", "succeeded", "failed"]
    result: AnyResult | None = None
    error: Problem | None = None
