"""Thread routes: `/api/v1/ai/threads` (pipeline/threads.py holds what they do, and why).

The tasks with threads (`Task.threads`) make the `task` enum, the result union and the record
query parameters (`lead_id`, `deal_id`): a task module that allows threads gets them here with no
new code.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Annotated, Any, Literal, Union

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.di import NamedDependency
from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from ..errors import BadRequest
from ..models import Inbound
from ..pipeline.jobs import Jobs
from ..pipeline.threads import RecordRef, Threads
from ..tasks import Registry
from .auth import CALLER, Caller
from .dependencies import from_state
from .openapi import CRM_READS, SSE_RESPONSE, STREAMS_FULL, TASK_RATE, USER_STREAMS, limited, problem
from .requests import require_json
from .sse import sse_response
from .streams import StreamSlots

# C0 and C1 controls, DEL included; tab, line feed and carriage return are text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
LOCATION = ResponseHeader(name="Location", documentation_only=True, required=True, description="The thread's URL")


def checked_message(message: str, limit: int) -> str:
    """A follow-up message the model may get: not empty, at most THREAD_MESSAGE_MAX characters, no control character."""
    if not message.strip():
        raise BadRequest("invalid request body: `message` is empty", field="message")
    if len(message) > limit:
        raise BadRequest(f"invalid request body: `message` is {len(message)} characters long; at most {limit} "
                         "(THREAD_MESSAGE_MAX)", field="message")
    if (bad := _CONTROL.search(message)) is not None:
        raise BadRequest(f"invalid request body: `message` holds the control character U+{ord(bad.group()):04X} at "
                         f"position {bad.start()}", field="message")
    return message


class TurnRequest(Inbound):
    message: Annotated[str, msgspec.Meta(
        description="What to change in the last answer: at most THREAD_MESSAGE_MAX (2000) characters, not empty, "
                    "no control character but tab and line breaks", examples=["make the casual one shorter"])]


def thread_shapes(tasks: Registry) -> tuple[type, type, type, type, type]:
    """`ThreadRequest`, and the documented shapes of a turn, a thread, a summary and a page, for these tasks."""
    threaded = [t for t in tasks.values() if t.threads]
    names = Literal[tuple(t.name for t in threaded)]  # type: ignore[valid-type]
    request = msgspec.defstruct("ThreadRequest", [("task", names), ("input", dict[str, Any])], bases=(Inbound,),
                                kw_only=True, module=__name__)
    results = Union[tuple(t.result_type for t in threaded)]  # noqa: UP007
    # Dataclasses, as jobs' JobView: msgspec cannot type an untagged union of Structs (what is served is
    # the pipeline's own encoding, with the result embedded as validated JSON).
    turn = dataclasses.make_dataclass("ThreadTurn", [
        ("turn_id", str), ("message", str | None), ("result", results), ("warnings", list[str]),
        ("provider", str | None), ("agent_version", str | None), ("created_at", str)], kw_only=True)
    thread = dataclasses.make_dataclass("Thread", [
        ("thread_id", str), ("task", names), ("record", RecordRef), ("input", dict[str, Any]), ("created_at", str),
        ("updated_at", str), ("turns", list[turn])], kw_only=True)  # type: ignore[valid-type]
    summary = dataclasses.make_dataclass("ThreadSummary", [
        ("thread_id", str), ("task", names), ("record", RecordRef), ("created_at", str), ("updated_at", str),
        ("turn_count", int)], kw_only=True)
    page = dataclasses.make_dataclass("ThreadPage", [("threads", list[summary]), ("next_cursor", str | None)],  # type: ignore[valid-type]
                                      kw_only=True)
    for shape in (turn, thread, summary, page):
        shape.__module__ = __name__
    return request, turn, thread, summary, page


def _responses(*, body: bool = False, thread: bool = True, model_call: bool = False) -> dict[int, ResponseSpec]:
    out = {
        401: problem("No bearer token, or CRM_JWT_SECRET or the CRM backend refused it"),
        403: problem("The thread is another user's, or the CRM backend no longer lets the caller read its record"),
        404: problem("No such thread (or it was deleted), or the CRM backend has no such record" if thread
                     else "The CRM backend has no such record"),
        429: limited(TASK_RATE, CRM_READS) if model_call else limited(CRM_READS),
        502: problem("CRM backend or the Conductor's conversation store unavailable"
                     + (", agent failed, or invalid agent output after repair (no turn is kept)" if model_call else "")),
        503: problem("Conductor Gateway unavailable or a circuit open (see Retry-After)"),
        504: problem("An upstream did not answer in time"),
    }
    if body:
        out |= {400: problem("Invalid body: an unknown task or one without threads, invalid input, or a message that is "
                             "empty, too long (THREAD_MESSAGE_MAX) or holds control characters; the field is named"),
                408: problem("The body did not arrive within BODY_TIMEOUT_SECONDS"),
                413: problem("The body is larger than MAX_BODY_BYTES"), 415: problem("The body is not application/json")}
    if not thread and not body:
        out[400] = problem("Invalid query parameter: not exactly one record id (`lead_id`, `deal_id`), a malformed id, "
                           "`limit` outside 1-100, or a `cursor` this sidecar did not give; the parameter is named")
    if model_call and thread:
        out[409] = problem("The thread holds THREAD_MAX_TURNS turns")
    elif model_call:
        out[409] = problem("The caller holds THREAD_MAX_PER_RECORD threads about this record")
    return out


def _stream_responses() -> dict[int, ResponseSpec]:
    return {**_responses(body=True, model_call=True), 200: SSE_RESPONSE,
            429: limited(USER_STREAMS, TASK_RATE, CRM_READS),
            503: problem(f"Conductor Gateway unavailable or a circuit open, or {STREAMS_FULL} (see Retry-After)")}


def thread_routers(tasks: Registry) -> list[Router]:
    if not any(t.threads for t in tasks.values()):
        return []
    ThreadRequest, Turn, Thread, _, Page = thread_shapes(tasks)  # noqa: N806
    kinds = sorted({t.record_kind for t in tasks.values() if t.threads})

    async def create_thread(data: Any, threads: Threads, caller: Caller) -> Response[Any]:
        task = threads.task_named(data.task)
        assert task is not None  # the enum holds only tasks with threads
        try:
            body = msgspec.convert(data.input, task.request_type)
        except msgspec.ValidationError as exc:
            message, _, where = str(exc).partition(" - at `$")
            field = "input" + where.rstrip("`") if where else "input"
            raise BadRequest(f"invalid request body: `{field}`: {message}", field=field) from None
        view = await threads.create(task, body, caller.authorization, caller.user)
        return Response(msgspec.json.encode(view), status_code=201, media_type="application/json",
                        headers={"Location": f"/api/v1/ai/threads/{view.thread_id}"})

    create_thread.__annotations__ = {"data": JSONBody[ThreadRequest], "threads": NamedDependency[Threads], "caller": NamedDependency[Caller], "return": Response[Thread]}

    async def list_threads(request: Request, threads: Threads, caller: Caller, limit: int = 20,
                           cursor: str | None = None, **records: str | None) -> Response[Any]:
        given = [(kind, records[f"{kind}_id"]) for kind in kinds if records.get(f"{kind}_id")]
        if len(given) != 1:
            raise BadRequest("invalid query parameter: exactly one of " + ", ".join(f"`{k}_id`" for k in kinds)
                             + " names the record whose threads are listed", field=f"{kinds[0]}_id")
        kind, record_id = given[0]
        page = await threads.listing(kind, record_id, caller.authorization, caller.user, limit=limit, cursor=cursor)
        return Response(msgspec.json.encode(page), media_type="application/json")

    object_id = {"pattern": "^[0-9a-fA-F]{24}$", "min_length": 24, "max_length": 24}
    list_threads.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, annotation=NamedDependency[Threads]),
        inspect.Parameter("caller", inspect.Parameter.KEYWORD_ONLY, annotation=NamedDependency[Caller]),
        inspect.Parameter("limit", inspect.Parameter.KEYWORD_ONLY, default=20, annotation=Annotated[
            int, QueryParameter(ge=1, le=100, description="threads per page (1-100)")]),
        inspect.Parameter("cursor", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            str | None, QueryParameter(max_length=200, description="the previous page's next_cursor")]),
        *(inspect.Parameter(f"{kind}_id", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            str | None, QueryParameter(description=f"the {kind} whose threads are listed", **object_id)]) for kind in kinds),
    ], return_annotation=Response[Page])
    # Litestar reads the parameters from the signature and their types from the annotations.
    list_threads.__annotations__ = {p.name: p.annotation for p in list_threads.__signature__.parameters.values()} | {
        "return": Response[Page]}

    async def get_thread(thread_id: str, threads: Threads, caller: Caller) -> Response[Any]:
        view = await threads.get(thread_id, caller.authorization, caller.user)
        return Response(msgspec.json.encode(view), media_type="application/json")

    get_thread.__annotations__ = {"thread_id": FromPath[str], "threads": NamedDependency[Threads], "caller": NamedDependency[Caller], "return": Response[Thread]}

    async def continue_thread(thread_id: str, data: TurnRequest, threads: Threads, caller: Caller) -> Response[Any]:
        message = checked_message(data.message, threads.settings.thread_message_max)
        turn = await threads.continue_(thread_id, message, caller.authorization, caller.user)
        return Response(turn, status_code=201, media_type="application/json",
                        headers={"Location": f"/api/v1/ai/threads/{thread_id}"})

    continue_thread.__annotations__ = {"thread_id": FromPath[str], "data": JSONBody[TurnRequest], "threads": NamedDependency[Threads], "caller": NamedDependency[Caller],
                                       "return": Response[Turn]}

    async def stream_turn(thread_id: str, data: TurnRequest, request: Request, threads: Threads, caller: Caller) -> Stream:
        message = checked_message(data.message, threads.settings.thread_message_max)
        jobs: Jobs = request.app.state.jobs
        streams: StreamSlots = request.app.state.streams
        # The stream's place first (429 MAX_STREAMS_PER_USER, 503 MAX_STREAMS), as the task stream routes.
        streams.take(request.scope, caller.user)
        job = await threads.stream_turn(thread_id, message, caller.authorization, caller.user, describe=jobs.describe,
                                        lifetime=jobs.settings.job_max_seconds + jobs.settings.job_retention_seconds)
        return sse_response(job, jobs, 0)

    stream_turn.__annotations__ = {"thread_id": FromPath[str], "data": JSONBody[TurnRequest], "request": Request,
                                   "threads": NamedDependency[Threads], "caller": NamedDependency[Caller], "return": Stream}

    async def delete_thread(thread_id: FromPath[str], threads: NamedDependency[Threads], caller: NamedDependency[Caller]) -> None:
        await threads.delete(thread_id, caller.authorization, caller.user)

    layer = {"path": "/api/v1/ai/threads", "guards": [require_json], "tags": ["ai-threads"],
             "dependencies": {**CALLER, "threads": from_state("threads")}}
    return [Router(**layer, route_handlers=[
        post("/", status_code=201, responses=_responses(body=True, thread=False, model_call=True),
             response_headers=[LOCATION], summary="Start a thread: read the record, run the first turn")(create_thread),
        get("/", responses=_responses(thread=False),
            summary="The caller's threads about one record, newest first, a page at a time")(list_threads),
        get("/{thread_id:str}", responses=_responses(), summary="A thread with all its turns")(get_thread),
        post("/{thread_id:str}/turns", status_code=201, responses=_responses(body=True, model_call=True),
             response_headers=[LOCATION], summary="Continue a thread: the agent sees its history and the record now")(
            continue_thread),
        post("/{thread_id:str}/turns/stream", status_code=200, responses=_stream_responses(),
             response_description="text/event-stream of status, delta, then the turn as result (or error), and done",
             summary="Continue a thread as server-sent events (fetch clients)")(stream_turn),
        delete("/{thread_id:str}", status_code=204, responses=_responses(),
               summary="Delete a thread, in the Conductor too")(delete_thread),
    ])]
