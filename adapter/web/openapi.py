"""The OpenAPI document: what the routes declare (problem responses, headers), and what Litestar
cannot say from the handlers alone, applied once to the generated document (`finish`): headers
on every response, each task's examples, links. `/schema/openapi.json` serves the finished
document and `adapter openapi` prints it (so the committed copy includes it).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example, Link, OpenAPI, OpenAPIHeader, OpenAPIType, Schema

from ..models import BatchSseEvent, Problem, SseEvent

if TYPE_CHECKING:
    from ..tasks import Registry, Task

PROBLEM = "application/problem+json"
# A thread's follow-up message, as the document states it (web/threads.py checks it and words its 400s
# itself, so the rule is stated here rather than in the request struct): some text that is not white
# space, and no control character but tab and line breaks.
_TEXT = "\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f"
MESSAGE_PATTERN = f"^[^{_TEXT}]*[^\\s{_TEXT}][^{_TEXT}]*$"

CACHE_HEADERS = [
    ResponseHeader(name="X-Cache", documentation_only=True, required=False,
                   description="HIT, MISS, STALE (served because the agent failed) or BYPASS (Cache-Control: no-store)"),
    ResponseHeader(name="Age", documentation_only=True, required=False,
                   description="Seconds since the cached answer was produced (HIT and STALE only)"),
    ResponseHeader(name="X-AI-Provider", documentation_only=True, required=False,
                   description="The provider that produced the answer, when CONDUCTOR_AI_PROVIDER names one or more "
                               "(after a fallback, the second); the same as the body's `provider`"),
]


def warnings_description(task: Task) -> str:
    """X-Agent-Warnings of one task's route: the rule ids its module declares (the registry's, never a list here)."""
    if not task.guidance_rules:
        return "The persona guidance rules the answer does not follow; this task's persona has none, so it is always absent"
    return (f"The persona guidance rules the answer does not follow, comma-separated ({', '.join(task.guidance_rules)}). "
            "The answer meets the contract and stands; absent when there are none")


def write_back_description(task: Task) -> str:
    """X-CRM-Write-Back of one task's route: what its module says the PATCH sets, onto its record kind."""
    return (f"ok: {task.writes_back} were PATCHed onto the {task.record_kind}; failed: that PATCH failed (the answer stands); "
            "skipped: a cached or stale answer, or CRM_WRITE_BACK is off")


# What the routes declare; `finish` writes each task's own description into its route's copy.
WARNINGS_HEADER = ResponseHeader(name="X-Agent-Warnings", documentation_only=True, required=False,
                                 description="The persona guidance rules the answer does not follow, comma-separated")
WRITE_BACK_HEADER = ResponseHeader(name="X-CRM-Write-Back", documentation_only=True, required=False,
                                   description="The outcome of the write-back PATCH onto the record: ok, failed or skipped")
TASK_HEADERS = {"X-Agent-Warnings": warnings_description, "X-CRM-Write-Back": write_back_description}


# The per-user limits a 429 may name (its detail names the setting).
TASK_RATE = "the task's model calls (RATE_LIMIT_<TASK>; cache hits are free)"
CRM_READS = "CRM record reads (CRM_READS_PER_USER)"
USER_STREAMS = "open event streams (MAX_STREAMS_PER_USER)"
USER_BATCHES = "running batches (MAX_BATCHES_PER_USER): start another once one has ended"
STREAMS_FULL = "this replica has MAX_STREAMS event streams open"
STREAMS_503 = "This replica has MAX_STREAMS event streams open; another replica may have room (see Retry-After)"


def problem(description: str) -> ResponseSpec:
    return ResponseSpec(Problem, description=description, media_type=PROBLEM, generate_examples=False)


def limited(*limits: str) -> ResponseSpec:
    """The 429 of a route and the limits it may hit; rate limits (per window) add RateLimit-*."""
    windowed = any(TASK_RATE in limit or CRM_READS in limit for limit in limits)
    named = limits[0] if len(limits) == 1 else f"{', '.join(limits[:-1])} or {limits[-1]}"
    return problem(f"A per-user limit is reached: {named}. See Retry-After"
                   + (" (and RateLimit-* for a rate limit)" if windowed else ""))


def ai_responses(task: Task) -> dict[int, ResponseSpec]:
    record = task.record_kind
    return {
        400: problem("Invalid body (empty, not JSON, unknown field, malformed id, wrong type) or query parameter; "
                     "errors[] says what and where"),
        401: problem("No bearer token, or the CRM backend refused it"),
        403: problem(f"The CRM backend does not let the caller read this {record}"),
        404: problem(f"The CRM backend has no such {record}"),
        408: problem("The body did not arrive within BODY_TIMEOUT_SECONDS"),
        413: problem("The body is larger than MAX_BODY_BYTES"),
        415: problem("The body is not application/json"),
        429: limited(TASK_RATE, CRM_READS),
        431: problem("The request headers are larger than MAX_HEADER_BYTES"),
        502: problem("CRM backend unavailable, agent missing, agent failed, the gateway refused the call "
                     "(gateway-error: its own or the Conductor API's validation message), or invalid agent output after repair"),
        503: problem("Conductor Gateway unavailable, its circuit open, too many agent calls in flight, "
                     "or the CRM backend's circuit open (see Retry-After)"),
        504: problem("An upstream did not answer in time"),
    }


SSE_DESCRIPTION = (
    "Server-sent events. A `retry:` hint first, then events with consecutive `id:`s: "
    "`status` {state: queued|running|validating, message}, `delta` {text}, `result` (the synchronous route's body, "
    "plus `warnings`: the X-Agent-Warnings list, when there are any), "
    "`error` (a problem object), and `done` {status: succeeded|failed, cached} always last. "
    "A `: ping` comment is sent while nothing else is."
)
SSE_RESPONSE = ResponseSpec(SseEvent, description=SSE_DESCRIPTION, media_type="text/event-stream", generate_examples=False)
BATCH_SSE_RESPONSE = ResponseSpec(BatchSseEvent, media_type="text/event-stream", generate_examples=False, description=(
    "Server-sent events. A `retry:` hint first, then events with consecutive `id:`s: `status` (queued, running, "
    "resumed on another replica), per item `item` (running, then succeeded, failed or cancelled) and `progress` (the "
    "counts), and `done` {status: completed|cancelled|failed, counts, ended_at} always last (the batch and its token "
    "last JOB_RETENTION_SECONDS after ended_at). A `: ping` comment is sent while nothing else is."))


def stream_responses(task: Task) -> dict[int, ResponseSpec]:
    responses = ai_responses(task)
    return {**responses, 200: SSE_RESPONSE, 429: limited(USER_STREAMS, TASK_RATE, CRM_READS),
            503: problem(f"{responses[503].description.removesuffix(' (see Retry-After)')}, or {STREAMS_FULL} "
                         "(see Retry-After)")}


LOG_503 = ("Redis, which holds the job logs, failed, or has no log for an id that may still be running (a restart or "
           "failover its runner repairs within JOB_LEASE_SECONDS): retry (see Retry-After)")
LOG_NOT_TAKEN = "Redis, which holds the job logs, did not take the new log within 5 s: nothing was started (see Retry-After)"


def batch_responses(create: bool = False) -> dict[int, ResponseSpec]:
    if create:
        return {400: problem("Bad input, refused whole before anything runs: an unknown task, no ids or more than "
                             "BATCH_MAX_ITEMS, a malformed or duplicate id, an unknown or invalid option (the field is named)"),
                401: problem("No bearer token, or CRM_JWT_SECRET refused it"),
                408: problem("The body did not arrive within BODY_TIMEOUT_SECONDS"),
                413: problem("The body is larger than MAX_BODY_BYTES"), 415: problem("The body is not application/json"),
                429: limited(USER_BATCHES),
                431: problem("The request headers are larger than MAX_HEADER_BYTES"),
                503: problem(f"This replica is shutting down, or {LOG_NOT_TAKEN[0].lower()}{LOG_NOT_TAKEN[1:]}")}
    return {400: problem("An invalid query parameter (`status` must be an item status)"),
            401: problem("Neither the batch token nor a bearer token"),
            403: problem("The token is invalid, expired or for another batch, or the bearer is not the batch's creator"),
            404: problem("No such batch, or it ended more than JOB_RETENTION_SECONDS ago"),
            503: problem(LOG_503)}


def batch_events_responses() -> dict[int, ResponseSpec]:
    return {**batch_responses(), 200: BATCH_SSE_RESPONSE, 429: limited(USER_STREAMS),
            503: problem(f"{STREAMS_503.removesuffix(' (see Retry-After)')}; or {LOG_503[0].lower()}{LOG_503[1:]}")}


def job_responses(create: bool = False) -> dict[int, ResponseSpec]:
    if create:
        return {400: problem("Invalid body or input (the field is named)"), 401: problem("No bearer token, or the CRM refused it"),
                403: problem("The CRM backend does not let the caller read the record"),
                404: problem("No such record"), 408: problem("The body did not arrive within BODY_TIMEOUT_SECONDS"),
                413: problem("The body is larger than MAX_BODY_BYTES"), 415: problem("The body is not application/json"),
                429: limited(TASK_RATE, CRM_READS),
                431: problem("The request headers are larger than MAX_HEADER_BYTES"),
                502: problem("CRM backend unavailable"),
                503: problem(f"A circuit is open, or {LOG_NOT_TAKEN[0].lower()}{LOG_NOT_TAKEN[1:]}"),
                504: problem("CRM backend timeout")}
    return {401: problem("Neither a job token nor a bearer token"), 403: problem("The token is invalid, expired or for another job, "
            "or the CRM backend does not let the caller read the record"), 404: problem("No such job, or it expired"),
            429: limited(f"{CRM_READS}, read with a bearer token"), 503: problem(LOG_503)}


def job_events_responses() -> dict[int, ResponseSpec]:
    return {**job_responses(), 200: SSE_RESPONSE, 429: limited(USER_STREAMS, f"{CRM_READS}, read with a bearer token"),
            503: problem(f"{STREAMS_503.removesuffix(' (see Retry-After)')}; or {LOG_503[0].lower()}{LOG_503[1:]}")}


METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _header(description: str, *, required: bool = False, integer: bool = False) -> OpenAPIHeader:
    return OpenAPIHeader(schema=Schema(type=OpenAPIType.INTEGER if integer else OpenAPIType.STRING),
                         description=description, required=required)


REQUEST_ID = _header("The caller's X-Request-ID when it is well formed, else a new one; sent to both upstreams too",
                     required=True)
RETRY_AFTER = _header("Seconds to wait before trying again", required=True, integer=True)
# Sent when a rate limit (so many per window) refused the request; a concurrency limit (open
# streams, running batches) has no window, and sends Retry-After alone.
RATE_LIMIT = {
    "RateLimit-Limit": _header("Requests allowed per window for this user and limit (rate limits only)", integer=True),
    "RateLimit-Remaining": _header("Requests left in the window (rate limits only)", integer=True),
    "RateLimit-Reset": _header("Seconds until a request is allowed again (rate limits only)", integer=True),
    "RateLimit-Policy": _header("The policy: `<limit>;w=<seconds>` (rate limits only)"),
}

def examples(tasks: Registry) -> tuple[dict[str, dict], dict[str, dict]]:
    """Request and response examples by path: each task's own, for its sync and stream routes, and a job's."""
    requests: dict[str, dict] = {}
    responses: dict[str, dict] = {}
    for task in tasks.values():
        path = "/api/v1/ai" + task.path
        requests[path] = requests[path + "/stream"] = dict(task.request_example)
        responses[path] = dict(task.result_example)
    first = next(iter(tasks.values()))
    requests["/api/v1/ai/jobs"] = {"task": first.name, "input": dict(first.request_example)}
    options = {k: v for k, v in first.request_example.items() if k != first.id_field}
    requests["/api/v1/ai/batches"] = {"task": first.name, "ids": [first.request_example[first.id_field]], "options": options}
    if threaded := next((t for t in tasks.values() if t.threads), None):
        requests["/api/v1/ai/threads"] = {"task": threaded.name, "input": dict(threaded.request_example)}
        requests["/api/v1/ai/threads/{thread_id}/turns"] = {"message": "make the casual one shorter"}
    responses["/api/v1/ai/jobs"] = {
        "job_id": "aijob_5b1f0c3e9d2a4f6b8c7d1e2f3a4b5c6d", "status": "queued",
        "events_url": "/api/v1/ai/jobs/aijob_5b1f0c3e9d2a4f6b8c7d1e2f3a4b5c6d/events?token=eyJhbGciOi...",
        "expires_at": "2026-11-23T23:15:00Z"}
    return requests, responses


def finish(schema: OpenAPI, tasks: Registry) -> OpenAPI:
    REQUEST_EXAMPLES, RESPONSE_EXAMPLES = examples(tasks)  # noqa: N806
    by_path = {"/api/v1/ai" + t.path: t for t in tasks.values()}
    operation_ids = {}
    for path, item in (schema.paths or {}).items():
        for method in METHODS:
            if (op := getattr(item, method, None)) is not None:
                operation_ids[(method, path)] = op.operation_id
    for path, item in (schema.paths or {}).items():
        for method in METHODS:
            op = getattr(item, method, None)
            if op is None:
                continue
            for code, response in (op.responses or {}).items():
                headers = dict(response.headers or {})
                headers["X-Request-ID"] = REQUEST_ID
                if code in {"429", "503"}:
                    headers["Retry-After"] = RETRY_AFTER
                if code == "429":
                    headers.update(RATE_LIMIT)
                if (task := by_path.get(path)) is not None:
                    for name, describe in TASK_HEADERS.items():
                        if (header := headers.get(name)) is not None:  # a copy: the routes share the declared one
                            headers[name] = copy.copy(header)
                            headers[name].description = describe(task)
                response.headers = headers
                body = (response.content or {}).get("application/json")
                if code in {"200", "202"} and body is not None and path in RESPONSE_EXAMPLES:
                    body.examples = {"example": Example(summary="A validated answer", value=RESPONSE_EXAMPLES[path])}
            if op.request_body is not None and path in REQUEST_EXAMPLES:
                for media in (op.request_body.content or {}).values():
                    media.examples = {"example": Example(summary="A seeded record of the demo", value=REQUEST_EXAMPLES[path])}
    created = schema.paths["/api/v1/ai/jobs"].post.responses["202"]  # type: ignore[index,union-attr]
    job = "$response.body#/job_id"
    created.links = {
        "GetJob": Link(operation_id=operation_ids[("get", "/api/v1/ai/jobs/{job_id}")], parameters={"job_id": job},
                       description="The job's state and result (polling)"),
        "JobEvents": Link(operation_id=operation_ids[("get", "/api/v1/ai/jobs/{job_id}/events")], parameters={"job_id": job},
                          description="The job's events as SSE (the events_url carries a job token for EventSource)"),
    }
    started = schema.paths["/api/v1/ai/batches"].post.responses["202"]  # type: ignore[index,union-attr]
    batch = "$response.body#/batch_id"
    started.links = {
        "GetBatch": Link(operation_id=operation_ids[("get", "/api/v1/ai/batches/{batch_id}")], parameters={"batch_id": batch},
                         description="The batch's counts and items (polling; `?status=` filters)"),
        "BatchEvents": Link(operation_id=operation_ids[("get", "/api/v1/ai/batches/{batch_id}/events")],
                            parameters={"batch_id": batch},
                            description="The batch's events as SSE (the events_url carries a batch token for EventSource)"),
        "CancelBatch": Link(operation_id=operation_ids[("delete", "/api/v1/ai/batches/{batch_id}")],
                            parameters={"batch_id": batch}, description="Cancel it: running items finish, queued ones never start"),
    }
    if (turn := (schema.components.schemas or {}).get("TurnRequest")) is not None:
        message = turn.properties["message"]  # type: ignore[index]
        message.min_length, message.pattern = 1, MESSAGE_PATTERN  # type: ignore[union-attr]
        turn.additional_properties = False  # an Inbound struct: an unknown field is a 400
    if "/api/v1/ai/threads" in (schema.paths or {}):
        thread = "$response.body#/thread_id"
        follow = {
            "GetThread": Link(operation_id=operation_ids[("get", "/api/v1/ai/threads/{thread_id}")],
                              parameters={"thread_id": thread}, description="The thread with all its turns"),
            "ContinueThread": Link(operation_id=operation_ids[("post", "/api/v1/ai/threads/{thread_id}/turns")],
                                   parameters={"thread_id": thread}, description="Its next turn"),
            "DeleteThread": Link(operation_id=operation_ids[("delete", "/api/v1/ai/threads/{thread_id}")],
                                 parameters={"thread_id": thread}, description="Delete it, in the Conductor too"),
        }
        schema.paths["/api/v1/ai/threads"].post.responses["201"].links = follow  # type: ignore[index,union-attr]
        turns = schema.paths["/api/v1/ai/threads/{thread_id}/turns"].post.responses["201"]  # type: ignore[index,union-attr]
        turns.links = {name: Link(operation_id=link.operation_id, parameters={"thread_id": "$request.path.thread_id"},
                                  description=link.description) for name, link in follow.items()}
    return schema
