"""Jobs for the browser's EventSource: start one for any task, read its state, follow its events.

The `task` enum and the result's schema are made from the task registry, so a new task's jobs
are documented and validated like the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Union

import msgspec
from litestar.di import NamedDependency
from litestar import Request, Response, Router, get, post
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from ..errors import BadRequest, JobLogUnavailable, NotFound
from ..models import Inbound, JobCreated, Problem
from ..pipeline.jobs import Jobs
from ..storage.event_log import Job
from ..tasks import Registry
from .access import Access, authorized
from .auth import CALLER, Caller
from .openapi import job_events_responses, job_responses
from .requests import cache_mode, require_json
from .sse import last_event_id, sse_response
from .streams import StreamSlots
from .tokens import JobTokens


def job_shapes(tasks: Registry) -> tuple[type, type]:
    """`JobRequest` (a task name and its request's fields) and `JobView`, for these tasks."""
    names = Literal[tuple(tasks)]  # type: ignore[valid-type]
    results = tuple(t.result_type for t in tasks.values())
    request = msgspec.defstruct("JobRequest", [("task", names), ("input", dict[str, Any])], bases=(Inbound,),
                                kw_only=True, module=__name__)
    # A dataclass, not a Struct: msgspec cannot type an untagged union of Structs, and the result
    # is embedded as already-validated JSON (msgspec.Raw) anyway.
    view = dataclasses.make_dataclass("JobView", [
        ("job_id", str), ("task", names), ("status", Literal["queued", "running", "succeeded", "failed"]),
        ("result", Union[(*results, None)], dataclasses.field(default=None)),  # noqa: UP007
        ("error", Problem | None, dataclasses.field(default=None)),
    ], kw_only=True)
    view.__module__ = __name__
    return request, view


def not_yet_restored(kind: str, log_id: str, lease: float) -> JobLogUnavailable:
    """Redis has no log for an id that says it may still be running (storage/ids.py): Redis restarted empty,
    or lost it in a failover, and its runner restores it within a lease. A 404 would end an EventSource."""
    return JobLogUnavailable(f"{kind} {log_id} is not in the job log store (Redis) although it may still be running: "
                             f"Redis may have restarted or failed over, and the replica running it restores its log "
                             f"within JOB_LEASE_SECONDS ({lease:g} s); retry shortly")


def job_routers(tasks: Registry) -> list[Router]:
    JobRequest, JobView = job_shapes(tasks)  # noqa: N806

    async def create_job(data: Any, request: Request, jobs: Jobs, tokens: JobTokens, caller: Caller) -> Response[JobCreated]:
        task = tasks[data.task]
        try:
            body = msgspec.convert(data.input, task.request_type)
        except msgspec.ValidationError as exc:
            message, _, where = str(exc).partition(" - at `$")
            field = "input" + where.rstrip("`") if where else "input"
            raise BadRequest(f"invalid request body: `{field}`: {message}", field=field) from None
        job, x_cache = await jobs.start(task, body, caller.authorization, cache_mode(request), caller.user)
        token, expires = tokens.issue(job.id, caller.user)
        created = JobCreated(job_id=job.id, status=job.status, expires_at=expires,  # type: ignore[arg-type]
                             events_url=f"/api/v1/ai/jobs/{job.id}/events?token={token}")
        return Response(created, status_code=202, headers={"X-Cache": x_cache, "Location": f"/api/v1/ai/jobs/{job.id}"})

    create_job.__annotations__ = {"data": JSONBody[JobRequest], "request": Request, "jobs": NamedDependency[Jobs], "tokens": NamedDependency[JobTokens],  # type: ignore[valid-type]
                                  "caller": NamedDependency[Caller], "return": Response[JobCreated]}

    async def authorized_job(job_id: str, request: Request, jobs: Jobs, tokens: JobTokens) -> tuple[Job, str]:
        """The job, if the request carries its job token or a bearer token the CRM accepts for its record;
        and the user the reader counts as (the token's creator, or the bearer's `Caller.user`)."""
        job = await jobs.find(job_id)
        if job is None and jobs.may_be_live(job_id, jobs.settings.job_max_seconds + jobs.settings.job_lease_seconds):
            raise not_yet_restored("job", job_id, jobs.settings.job_lease_seconds)
        if not isinstance(job, Job):  # none, or a batch's log (read at /api/v1/ai/batches)
            raise NotFound(f"no job {job_id} (unknown, or expired)")

        async def record_reader(log: Any, caller: Caller) -> str:
            # A user token: whoever the backend lets read the record may read the job about it.
            await jobs.check_reader(log, caller.authorization, caller.user)
            return caller.user

        access = Access("job", "a job token (`?token=` from events_url) or the caller's bearer token is required",
                        token_as_bearer=True, bearer=record_reader)
        return job, await authorized(request, job, tokens, access, jobs.settings.crm_jwt_secret)

    async def get_job(job_id: str, request: Request, jobs: Jobs, tokens: JobTokens) -> Any:
        job, _ = await authorized_job(job_id, request, jobs, tokens)
        return JobView(job_id=job.id, task=job.task, status=job.status,
                       result=msgspec.Raw(job.result) if job.result else None,
                       error=msgspec.Raw(job.error) if job.error else None)

    get_job.__annotations__ = {"job_id": FromPath[str], "request": Request, "jobs": NamedDependency[Jobs], "tokens": NamedDependency[JobTokens],
                               "return": JobView}

    async def job_events_route(job_id: FromPath[str], request: Request, jobs: NamedDependency[Jobs],
                               tokens: NamedDependency[JobTokens], streams: NamedDependency[StreamSlots]) -> Stream:
        job, user = await authorized_job(job_id, request, jobs, tokens)
        streams.take(request.scope, user)  # 429 MAX_STREAMS_PER_USER, 503 MAX_STREAMS
        after = last_event_id(request.headers.get("last-event-id"), request.query_params.get("lastEventId"))
        drop = request.query_params.get("drop_after")
        # Demo only, and only on the first connection: the browser's reconnect then resumes for real.
        drop_after = int(drop) if request.app.state.demo and drop and drop.isascii() and drop.isdigit() and len(drop) < 10 \
            and not after else None
        return sse_response(job, jobs, after, drop_after)

    starting = Router(path="/api/v1/ai", guards=[require_json], dependencies=CALLER, tags=["ai-streams"], route_handlers=[
        post("/jobs", status_code=202, responses=job_responses(create=True),
             summary="Start a job; its events_url works with the browser's EventSource")(create_job)])
    # Read with a job token (EventSource cannot send headers) or the caller's bearer token: no Caller.
    reading = Router(path="/api/v1/ai/jobs", tags=["ai-streams"], route_handlers=[
        get("/{job_id:str}", responses=job_responses(),
            summary="A job's state and, once finished, its result or error")(get_job),
        get("/{job_id:str}/events", responses=job_events_responses(),
            summary="The job's events as SSE; resumes after Last-Event-ID")(job_events_route)])
    return [starting, reading]
