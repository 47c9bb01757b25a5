"""The routes of every AI task, made from the task registry by one handler factory each.

For each task: `POST /api/v1/ai/<kind>/<verb>` (the validated answer) and `.../stream`
(the same answer as server-sent events, run as a job). A task module adds both.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar.di import NamedDependency
from litestar import Request, Response, Router, post
from litestar.datastructures import ResponseHeader, State
from litestar.handlers import HTTPRouteHandler
from litestar.params import JSONBody, QueryParameter
from litestar.response import Stream

from ..pipeline.answers import Answers
from ..pipeline.cache import Mode
from ..pipeline.jobs import Jobs
from ..tasks import Registry, Task
from .auth import CALLER, Caller
from .openapi import CACHE_HEADERS, WARNINGS_HEADER, WRITE_BACK_HEADER, ai_responses, stream_responses
from .requests import cache_mode, json_body
from .sse import sse_response
from .streams import StreamSlots

# SSE clients (httpx-sse, the browser's EventSource) send `Cache-Control: no-store`/`no-cache`
# to keep intermediaries from caching the stream itself, so on stream routes that header
# says nothing about the result cache: the `cache` query parameter does.
CacheParam = Annotated[Mode, QueryParameter(description="default, no-cache (fresh answer, stored) or no-store (fresh, not stored)")]


def _named(fn: Any, name: str, annotations: dict[str, Any]) -> Any:
    # The handler's name makes its OpenAPI operationId (path words, then the name); its
    # annotations are real types, so Litestar reads the task's request and result structs.
    fn.__name__ = fn.__qualname__ = name
    fn.__annotations__ = annotations
    return fn


def sync_route(task: Task) -> HTTPRouteHandler:
    async def handler(data: Any, request: Request, state: State, caller: Caller) -> Response[Any]:
        answers: Answers = state.answers
        prepared = await answers.service.prepare(task, data, caller.authorization, caller.user)
        answer = await answers.ask(prepared, mode=cache_mode(request))
        return Response(answer.body, media_type="application/json", headers=answer.headers)

    headers: list[ResponseHeader] = [*CACHE_HEADERS, WARNINGS_HEADER, *([WRITE_BACK_HEADER] if task.write_back else [])]
    return post(task.path, status_code=200, response_headers=headers, responses=ai_responses(task), summary=task.summary)(
        _named(handler, task.name.replace(".", "_"), {
            "data": JSONBody[task.request_type], "request": Request, "state": State, "caller": NamedDependency[Caller],
            "return": Response[task.result_type]}))  # type: ignore[name-defined]


def stream_route(task: Task) -> HTTPRouteHandler:
    async def handler(data: Any, request: Request, state: State, caller: Caller, cache: Mode = "default") -> Stream:
        jobs: Jobs = state.jobs
        streams: StreamSlots = state.streams
        # The stream's place first (429 MAX_STREAMS_PER_USER, 503 MAX_STREAMS): a user at their limit starts
        # no work. The CRM check and the body's validation happen before the stream opens: they answer as problems.
        streams.take(request.scope, caller.user)
        job, x_cache = await jobs.start(task, data, caller.authorization, cache, caller.user)
        return sse_response(job, jobs, 0, **{"X-Cache": x_cache})

    return post(task.path + "/stream", status_code=200, responses=stream_responses(task),
                response_description="text/event-stream of status, delta, result, error and done events",
                summary=task.stream_summary)(
        _named(handler, task.name.replace(".", "_") + "_stream", {
            "data": JSONBody[task.request_type], "request": Request, "state": State, "caller": NamedDependency[Caller],
            "cache": CacheParam, "return": Stream}))


def task_routers(tasks: Registry) -> list[Router]:
    """Every task's sync route (tag `ai`) and stream route (tag `ai-streams`); each acts for a `Caller`.

    Per request, a route resolves one dependency (`caller`) and no guard: the JSON check is the layer's
    `before_request` hook (a guard gets a copy of the handler each call), and the objects the lifespan
    opened once (answers, jobs, stream places) come from `state`, not from dependencies (two or more
    dependencies are resolved in an anyio task group per request: about 5 % of a cache hit).
    """
    layer = {"path": "/api/v1/ai", "before_request": json_body, "dependencies": CALLER}
    return [Router(route_handlers=[sync_route(t) for t in tasks.values()], tags=["ai"], **layer),
            Router(route_handlers=[stream_route(t) for t in tasks.values()], tags=["ai-streams"], **layer)]
