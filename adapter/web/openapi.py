"""OpenAPI descriptions shared by the routes: problem responses and headers."""

from __future__ import annotations

from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec

from ..models import Problem, SseEvent

PROBLEM = "application/problem+json"

CACHE_HEADERS = [
    ResponseHeader(name="X-Cache", documentation_only=True, required=False,
                   description="HIT, MISS, STALE (served because the agent failed) or BYPASS (Cache-Control: no-store)"),
    ResponseHeader(name="Age", documentation_only=True, required=False,
                   description="Seconds since the cached answer was produced (HIT and STALE only)"),
    ResponseHeader(name="X-AI-Provider", documentation_only=True, required=False,
                   description="The provider that produced the answer, when CONDUCTOR_AI_PROVIDER names one or more "
                               "(after a fallback, the second); the same as the body's `provider`"),
]
WARNINGS_HEADER = ResponseHeader(
    name="X-Agent-Warnings", documentation_only=True, required=False,
    description="The persona guidance rules the answer does not follow, comma-separated (reasoning-length, "
                "next-actions-count, email-paragraphs, email-pricing, email-spam-words). The answer meets the "
                "contract and stands; absent when there are none")
WRITE_BACK_HEADER = ResponseHeader(
    name="X-CRM-Write-Back", documentation_only=True, required=False,
    description="ok: score and classification were PATCHed onto the lead; failed: that PATCH failed (the answer stands); "
                "skipped: a cached or stale answer, or CRM_WRITE_BACK is off")


def problem(description: str) -> ResponseSpec:
    return ResponseSpec(Problem, description=description, media_type=PROBLEM, generate_examples=False)


def ai_responses(task: str) -> dict[int, ResponseSpec]:
    record = "deal" if task.startswith("deal") else "lead"
    return {
        400: problem("Invalid body (empty, not JSON, unknown field, malformed id, wrong type) or query parameter; "
                     "errors[] says what and where"),
        401: problem("No bearer token, or the CRM backend refused it"),
        403: problem(f"The CRM backend does not let the caller read this {record}"),
        404: problem(f"The CRM backend has no such {record}"),
        408: problem("The body did not arrive within BODY_TIMEOUT_SECONDS"),
        413: problem("The body is larger than MAX_BODY_BYTES"),
        415: problem("The body is not application/json"),
        429: problem("The user's rate limit for this task is spent (cache hits are free); see Retry-After and RateLimit-*"),
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


def stream_responses(task: str) -> dict[int, ResponseSpec]:
    return {**ai_responses(task), 200: SSE_RESPONSE}


def job_responses(create: bool = False) -> dict[int, ResponseSpec]:
    if create:
        return {400: problem("Invalid body or input (the field is named)"), 401: problem("No bearer token, or the CRM refused it"),
                403: problem("The CRM backend does not let the caller read the record"),
                404: problem("No such record"), 408: problem("The body did not arrive within BODY_TIMEOUT_SECONDS"),
                413: problem("The body is larger than MAX_BODY_BYTES"), 415: problem("The body is not application/json"),
                429: problem("The user's rate limit for this task is spent; see Retry-After and RateLimit-*"),
                431: problem("The request headers are larger than MAX_HEADER_BYTES"),
                502: problem("CRM backend unavailable"), 503: problem("A circuit is open (see Retry-After)"),
                504: problem("CRM backend timeout")}
    return {401: problem("Neither a job token nor a bearer token"), 403: problem("The token is invalid, expired or for another job, "
            "or the CRM backend does not let the caller read the record"), 404: problem("No such job, or it expired")}
