"""OpenAPI descriptions shared by the routes: problem responses and headers."""

from __future__ import annotations

from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec

from ..models import Problem

PROBLEM = "application/problem+json"

CACHE_HEADERS = [
    ResponseHeader(name="X-Cache", documentation_only=True, required=False,
                   description="HIT, MISS, STALE (served because the agent failed) or BYPASS (Cache-Control: no-store)"),
    ResponseHeader(name="Age", documentation_only=True, required=False,
                   description="Seconds since the cached answer was produced (HIT and STALE only)"),
]


def problem(description: str) -> ResponseSpec:
    return ResponseSpec(Problem, description=description, media_type=PROBLEM, generate_examples=False)


def ai_responses(task: str) -> dict[int, ResponseSpec]:
    record = "deal" if task.startswith("deal") else "lead"
    return {
        400: problem("Invalid body: unknown field, malformed id or wrong type (the field is named)"),
        401: problem("No bearer token, or the CRM backend refused it"),
        403: problem(f"The CRM backend does not let the caller read this {record}"),
        404: problem(f"The CRM backend has no such {record}"),
        502: problem("CRM backend unavailable, agent missing, agent failed, or invalid agent output after repair"),
        503: problem("Conductor Gateway unavailable (see Retry-After)"),
        504: problem("An upstream did not answer in time"),
    }
