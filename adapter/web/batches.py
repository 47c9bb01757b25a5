"""Batch runs: one task over many records (`POST /api/v1/ai/batches`), followed like a job.

Bad input is refused whole (400 naming the field) before anything runs; a user with
MAX_BATCHES_PER_USER batches running gets 429. A batch is read with its events_url's token, or
by the bearer of the user who created it (the verified `sub` with CRM_JWT_SECRET set, else the
same token); only its creator may cancel it. Once it has ended, it (and its token) lasts
JOB_RETENTION_SECONDS, then it is gone (404).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream
from msgspec import Meta

from ..errors import BadRequest, Forbidden, NotFound
from ..models import Inbound, Problem
from ..pipeline.batches import PREFIX, Batches, counts_of
from ..pipeline.jobs import Jobs
from ..storage.event_log import Batch
from ..tasks import Registry
from .access import Access, authorized
from .auth import CALLER, Caller
from .jobs import not_yet_restored
from .openapi import batch_events_responses, batch_responses
from .requests import require_json
from .sse import last_event_id, sse_response
from .streams import StreamSlots
from .tokens import JobTokens

_OBJECT_ID = re.compile(r"[0-9a-fA-F]{24}")  # fullmatch: `$` would also match before a final newline
ItemStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# failed: the replica shut down without Redis to hand the batch to (items not done never ran).
BatchStatus = Literal["queued", "running", "completed", "cancelled", "failed"]


class BatchCounts(msgspec.Struct, kw_only=True):
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    cached: Annotated[int, Meta(description="succeeded items answered from the cache (no model call)")]


class BatchItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    status: ItemStatus
    cached: bool = False
    result: Annotated[dict[str, Any] | None, Meta(description="the task's result, as its synchronous route answers it")] = None
    error: Problem | None = None


class BatchView(msgspec.Struct, kw_only=True):
    batch_id: str
    task: str
    status: BatchStatus
    total: int
    counts: BatchCounts
    cancel_requested: bool
    expires_at: dt.datetime
    items: list[BatchItem]


class BatchCreated(msgspec.Struct, kw_only=True):
    batch_id: str
    status: BatchStatus
    total: int
    events_url: str
    expires_at: dt.datetime


def _expires(job: Batch, settings: Any) -> dt.datetime:
    """Until when the batch's token works: its BATCH_MAX_SECONDS deadline, or JOB_RETENTION_SECONDS after it ended."""
    deadline = job.expires - settings.job_retention_seconds
    if (ended := job.ended_at) is not None:
        deadline = min(deadline, ended + settings.job_retention_seconds)
    return dt.datetime.fromtimestamp(deadline, dt.UTC).replace(microsecond=0)


def checked(tasks: Registry, data: Any, max_items: int) -> tuple[Any, list[str], dict[str, Any]]:
    """The task, ids and options of a batch request, or BadRequest naming the first bad field."""
    task = tasks.get(data.task)
    if task is None:
        raise BadRequest(f"invalid request body: `task`: no task {data.task!r}; one of {', '.join(tasks)}", field="task")
    ids: list[str] = data.ids
    if not ids:
        raise BadRequest("invalid request body: `ids`: give at least one record id", field="ids")
    if len(ids) > max_items:
        raise BadRequest(f"invalid request body: `ids`: {len(ids)} ids; at most {max_items} per batch (BATCH_MAX_ITEMS)",
                         field="ids")
    seen: dict[str, int] = {}
    for i, record_id in enumerate(ids):
        if not _OBJECT_ID.fullmatch(record_id):
            raise BadRequest(f"invalid request body: `ids[{i}]`: {record_id[:40]!r} is not a MongoDB ObjectId "
                             "(24 hexadecimal characters)", field=f"ids[{i}]")
        if (first := seen.setdefault(record_id.lower(), i)) != i:
            raise BadRequest(f"invalid request body: `ids[{i}]`: a duplicate of `ids[{first}]`", field=f"ids[{i}]")
    options: dict[str, Any] = data.options
    if task.id_field in options:
        raise BadRequest(f"invalid request body: `options.{task.id_field}`: the records' ids go in `ids`",
                         field=f"options.{task.id_field}")
    try:
        msgspec.convert({task.id_field: ids[0], **options}, task.request_type)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        name = where.rstrip("`").lstrip(".") if where else ""
        if not name and (named := re.search(r"field `([^`]+)`", message)):
            name = named.group(1)
        field = f"options.{name}" if name else "options"
        raise BadRequest(f"invalid request body: `{field}`: {message}", field=field) from None
    return task, ids, options


def batch_view(job: Batch, settings: Any, cancel_requested: bool, status: str | None = None) -> BatchView:
    latest: dict[str, bytes] = {}
    for ev in job.events:
        if ev.event == "item":
            latest[msgspec.json.decode(ev.data)["id"]] = ev.data
    items = []
    for record_id in job.ids:
        raw = latest.get(record_id)
        item = msgspec.json.decode(raw) if raw else {"id": record_id, "status": "queued"}
        if status is None or item["status"] == status:
            # The item event's JSON as written: the result inside it is not decoded and encoded again.
            items.append(msgspec.Raw(raw) if raw else BatchItem(id=record_id, status="queued"))
    counts = counts_of(job.ids, {k: msgspec.json.decode(v) for k, v in latest.items()})
    state = job.status if job.status in ("queued", "running", "completed", "cancelled", "failed") else "running"
    return BatchView(batch_id=job.id, task=job.task, status=state, total=len(job.ids),  # type: ignore[arg-type]
                     counts=BatchCounts(**counts), cancel_requested=cancel_requested, expires_at=_expires(job, settings),
                     items=items)  # type: ignore[arg-type]


def batch_routers(tasks: Registry) -> list[Router]:
    names = Literal[tuple(tasks)]  # type: ignore[valid-type]
    BatchRequest = msgspec.defstruct("BatchRequest", [  # noqa: N806
        ("task", Annotated[names, Meta(description="the task every item runs")]),
        ("ids", Annotated[list[str], Meta(description="record ids (MongoDB ObjectIds), no duplicates; at most BATCH_MAX_ITEMS")]),
        ("options", Annotated[dict[str, Any], Meta(description="the task request's fields other than the record id, "
                                                               "the same for every item")], msgspec.field(default_factory=dict)),
    ], bases=(Inbound,), kw_only=True, module=__name__)

    async def create_batch(data: Any, request: Request, jobs: Jobs, batches: Batches, tokens: JobTokens,
                           caller: Caller) -> Response[BatchCreated]:
        # Litestar has checked the shape (an unknown task is its enum error, naming `task`);
        # what a schema cannot say (ids' form, duplicates, the task's own options) is checked here.
        task, ids, options = checked(tasks, data, jobs.settings.batch_max_items)
        job = await batches.create(task, ids, options, caller.authorization, caller.user)
        expires = _expires(job, jobs.settings)
        # The events_url works as long as the batch may run, and JOB_RETENTION_SECONDS once it has ended (`authorized`).
        token, _ = tokens.issue(job.id, caller.user, expires=expires)
        created = BatchCreated(batch_id=job.id, status="queued", total=len(ids), expires_at=expires,
                               events_url=f"/api/v1/ai/batches/{job.id}/events?token={token}")
        return Response(created, status_code=202, headers={"Location": f"/api/v1/ai/batches/{job.id}"})

    create_batch.__annotations__ = {"data": JSONBody[BatchRequest], "request": Request, "jobs": NamedDependency[Jobs],  # type: ignore[valid-type]
                                    "batches": NamedDependency[Batches], "tokens": NamedDependency[JobTokens],
                                    "caller": NamedDependency[Caller], "return": Response[BatchCreated]}

    async def creator(log: Any, caller: Caller) -> str:
        if caller.user != log.user:
            raise Forbidden("this batch belongs to another user")
        return caller.user

    read_access = Access("batch", "the batch token (`?token=` from events_url) or the creator's bearer token is required",
                     token_as_bearer=False, bearer=creator)
    cancel_access = Access("batch", "the creator's bearer token is required to cancel a batch", token_as_bearer=False,
                        bearer=creator)

    async def authorized_batch(batch_id: str, request: Request, jobs: Jobs, batches: Batches, tokens: JobTokens, *,
                               creator_only: bool = False) -> tuple[Batch, str]:
        """The batch, if the request carries its token or its creator's bearer; and the user the reader counts as."""
        job = await jobs.find(batch_id) if batch_id.startswith(PREFIX + "_") else None
        # Ended longer than JOB_RETENTION_SECONDS ago: gone, for its token and its creator alike (the
        # token's own expiry is the batch's deadline, hours later).
        settings = jobs.settings
        if job is None and jobs.may_be_live(batch_id, settings.batch_max_seconds + settings.job_lease_seconds):
            raise not_yet_restored("batch", batch_id, settings.job_lease_seconds)
        if not isinstance(job, Batch) or batches.expired(job):
            raise NotFound(f"no batch {batch_id} (unknown, or expired)")
        access = cancel_access if creator_only else read_access
        return job, await authorized(request, job, tokens, access, jobs.settings.crm_jwt_secret, bearer_only=creator_only)

    StatusParam = Annotated[ItemStatus | None, QueryParameter(description="only the items with this status")]  # noqa: N806

    async def get_batch(batch_id: FromPath[str], request: Request, jobs: NamedDependency[Jobs],
                        batches: NamedDependency[Batches], tokens: NamedDependency[JobTokens],
                        status: Any = None) -> BatchView:
        job, _ = await authorized_batch(batch_id, request, jobs, batches, tokens)
        return batch_view(job, jobs.settings, await batches.cancel_requested(job), status)

    get_batch.__annotations__ = {**get_batch.__annotations__, "status": StatusParam, "return": BatchView}

    async def cancel_batch(batch_id: FromPath[str], request: Request, jobs: NamedDependency[Jobs],
                           batches: NamedDependency[Batches], tokens: NamedDependency[JobTokens]) -> Response[BatchView]:
        job, _ = await authorized_batch(batch_id, request, jobs, batches, tokens, creator_only=True)
        await batches.cancel(job)
        return Response(batch_view(job, jobs.settings, await batches.cancel_requested(job)), status_code=202)

    async def batch_events(batch_id: FromPath[str], request: Request, jobs: NamedDependency[Jobs],
                           batches: NamedDependency[Batches], tokens: NamedDependency[JobTokens],
                           streams: NamedDependency[StreamSlots]) -> Stream:
        job, user = await authorized_batch(batch_id, request, jobs, batches, tokens)
        streams.take(request.scope, user)  # 429 MAX_STREAMS_PER_USER, 503 MAX_STREAMS
        after = last_event_id(request.headers.get("last-event-id"), request.query_params.get("lastEventId"))
        return sse_response(job, jobs, after)

    starting = Router(path="/api/v1/ai", guards=[require_json], dependencies=CALLER, tags=["ai-batches"], route_handlers=[
        post("/batches", status_code=202, responses=batch_responses(create=True),
             summary="Start a batch: one task over many records; its events_url works with EventSource")(create_batch)])
    reading = Router(path="/api/v1/ai/batches", tags=["ai-batches"], route_handlers=[
        get("/{batch_id:str}", responses=batch_responses(),
            summary="A batch's state: counts, and each item's status with its result or problem")(get_batch),
        delete("/{batch_id:str}", status_code=202, responses=batch_responses(),
               summary="Cancel a batch: running items finish, queued ones never start")(cancel_batch),
        get("/{batch_id:str}/events", responses=batch_events_responses(),
            summary="The batch's events as SSE (item, progress, done); resumes after Last-Event-ID")(batch_events)])
    return [starting, reading]
