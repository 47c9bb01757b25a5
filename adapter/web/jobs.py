"""Streaming variants of the AI routes, and jobs for the browser's EventSource."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from ..tasks.registry import TASKS
from ..pipeline.cache import Mode
from ..errors import BadRequest, CrmRefused, Forbidden, NotFound, Unauthenticated
from ..pipeline.jobs import Job, Jobs
from ..models import DealPredictRequest, EmailGenerateRequest, JobCreated, JobRequest, JobView, LeadQualifyRequest
from .sse import job_events, last_event_id
from .tokens import JobTokens
from .tasks import cache_mode, require_bearer, require_json, user_of
from .openapi import SSE_RESPONSE, job_responses, stream_responses

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer


def _sse(job: Job, jobs: Jobs, after: int, drop_after: int | None = None, **headers: str) -> Stream:
    s = jobs.settings
    events = job_events(job, after=after, heartbeat=s.sse_heartbeat_seconds, retry_ms=s.sse_retry_ms,
                        open_streams=jobs.service.metrics.open_streams, drop_after=drop_after,
                        closing=jobs.closing)
    return Stream(events,
                  media_type="text/event-stream", headers={**SSE_HEADERS, "X-Job-ID": job.id, **headers})


# SSE clients (httpx-sse, the browser's EventSource) send `Cache-Control: no-store`/`no-cache`
# to keep intermediaries from caching the stream itself, so on stream routes that header
# says nothing about the result cache: the `cache` query parameter does.
CacheParam = Annotated[Mode, QueryParameter(description="default, no-cache (fresh answer, stored) or no-store (fresh, not stored)")]


async def _stream(jobs: Jobs, task: str, data: Any, request: Request, cache: Mode) -> Stream:
    # The CRM check and the body's validation happen before the stream opens: they answer as problems.
    job, x_cache = await jobs.start(task, data, request.headers["authorization"], cache, user_of(request))
    jobs.service.metrics.cache.labels(task, x_cache.lower()).inc()
    return _sse(job, jobs, 0, **{"X-Cache": x_cache})


@post("/email/generate/stream", status_code=200, guards=[require_bearer], responses=stream_responses("email.generate"),
      response_description="text/event-stream of status, delta, result, error and done events", summary="Stream email generation")
async def email_generate_stream(data: JSONBody[EmailGenerateRequest], request: Request, jobs: NamedDependency[Jobs],
        cache: CacheParam = "default") -> Stream:
    return await _stream(jobs, "email.generate", data, request, cache)


@post("/lead/qualify/stream", status_code=200, guards=[require_bearer], responses=stream_responses("lead.qualify"),
      response_description="text/event-stream of status, delta, result, error and done events", summary="Stream lead qualification")
async def lead_qualify_stream(data: JSONBody[LeadQualifyRequest], request: Request, jobs: NamedDependency[Jobs],
        cache: CacheParam = "default") -> Stream:
    return await _stream(jobs, "lead.qualify", data, request, cache)


@post("/deal/predict/stream", status_code=200, guards=[require_bearer], responses=stream_responses("deal.predict"),
      response_description="text/event-stream of status, delta, result, error and done events", summary="Stream deal prediction")
async def deal_predict_stream(data: JSONBody[DealPredictRequest], request: Request, jobs: NamedDependency[Jobs],
        cache: CacheParam = "default") -> Stream:
    return await _stream(jobs, "deal.predict", data, request, cache)


@post("/jobs", status_code=202, guards=[require_bearer], responses=job_responses(create=True),
      summary="Start a job; its events_url works with the browser's EventSource")
async def create_job(data: JSONBody[JobRequest], request: Request, jobs: NamedDependency[Jobs],
                     tokens: NamedDependency[JobTokens]) -> Response[JobCreated]:
    task = TASKS[data.task]
    try:
        body = msgspec.convert(data.input, task.request_type)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        field = "input" + where.rstrip("`") if where else "input"
        raise BadRequest(f"invalid request body: `{field}`: {message}", field=field) from None
    job, x_cache = await jobs.start(data.task, body, request.headers["authorization"], cache_mode(request), user_of(request))
    jobs.service.metrics.cache.labels(data.task, x_cache.lower()).inc()
    token, expires = tokens.issue(job.id)
    created = JobCreated(job_id=job.id, status=job.status, expires_at=expires,
                         events_url=f"/api/v1/ai/jobs/{job.id}/events?token={token}")
    return Response(created, status_code=202, headers={"X-Cache": x_cache, "Location": f"/api/v1/ai/jobs/{job.id}"})


async def authorized_job(job_id: str, request: Request, jobs: Jobs, tokens: JobTokens) -> Job:
    """The job, if the request carries its job token or a bearer token the CRM accepts for its record."""
    job = await jobs.find(job_id)
    if job is None:
        raise NotFound(f"no job {job_id} (unknown, or expired)")
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    token = request.query_params.get("token") or (bearer.strip() if scheme.lower() == "bearer" else "")
    if not token:
        raise Unauthenticated("a job token (`?token=` from events_url) or the caller's bearer token is required")
    scoped = tokens.job_of(token)
    if scoped == job.id:
        return job
    if scoped is not None:
        raise Forbidden("this job token is for another job")
    if not bearer or token != bearer.strip():
        raise Forbidden("the job token is invalid or expired")
    # A user token: whoever the backend lets read the record may read the job about it.
    kind = TASKS[job.task].record_kind
    try:
        await jobs.service.crm.get_record(kind, job.record_id, f"Bearer {token}")
    except CrmRefused:
        raise Forbidden(f"the CRM backend does not let this caller read the job's {kind}") from None
    return job


@get("/jobs/{job_id:str}", responses=job_responses(), summary="A job's state and, once finished, its result or error")
async def get_job(job_id: FromPath[str], request: Request, jobs: NamedDependency[Jobs], tokens: NamedDependency[JobTokens]) -> JobView:
    job = await authorized_job(job_id, request, jobs, tokens)
    return JobView(job_id=job.id, task=job.task, status=job.status,  # type: ignore[arg-type]
                   result=msgspec.Raw(job.result) if job.result else None,  # type: ignore[arg-type]
                   error=msgspec.Raw(job.error) if job.error else None)  # type: ignore[arg-type]


@get("/jobs/{job_id:str}/events", responses={**job_responses(), 200: SSE_RESPONSE},
     summary="The job's events as SSE; resumes after Last-Event-ID")
async def job_events_route(job_id: FromPath[str], request: Request, jobs: NamedDependency[Jobs],
                           tokens: NamedDependency[JobTokens]) -> Stream:
    job = await authorized_job(job_id, request, jobs, tokens)
    after = last_event_id(request.headers.get("last-event-id"), request.query_params.get("lastEventId"))
    drop = request.query_params.get("drop_after")
    # Demo only, and only on the first connection: the browser's reconnect then resumes for real.
    drop_after = int(drop) if request.app.state.demo and drop and drop.isdigit() and not after else None
    return _sse(job, jobs, after, drop_after)


streams_router = Router(
    path="/api/v1/ai",
    route_handlers=[email_generate_stream, lead_qualify_stream, deal_predict_stream, create_job, get_job, job_events_route],
    guards=[require_json],
    tags=["ai-streams"],
)
