"""What Litestar cannot say from the handlers alone: headers on every response, examples, links.

Applied once to the app's generated document, which is what `/schema/openapi.json`
serves and `adapter openapi` prints (so the committed copy includes it).
"""

from __future__ import annotations

from litestar.openapi.spec import Example, Link, OpenAPI, OpenAPIHeader, OpenAPIType, Schema

from .doubles.crm import EXAMPLE_DEAL_ID, EXAMPLE_LEAD_ID

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _header(description: str, *, required: bool = False, integer: bool = False) -> OpenAPIHeader:
    return OpenAPIHeader(schema=Schema(type=OpenAPIType.INTEGER if integer else OpenAPIType.STRING),
                         description=description, required=required)


REQUEST_ID = _header("The caller's X-Request-ID when it is well formed, else a new one; sent to both upstreams too",
                     required=True)
RETRY_AFTER = _header("Seconds to wait before trying again", required=True, integer=True)
RATE_LIMIT = {
    "RateLimit-Limit": _header("Requests allowed per window for this user and task", required=True, integer=True),
    "RateLimit-Remaining": _header("Requests left in the window", required=True, integer=True),
    "RateLimit-Reset": _header("Seconds until a request is allowed again", required=True, integer=True),
    "RateLimit-Policy": _header("The policy: `<limit>;w=<seconds>`", required=True),
}

REQUEST_EXAMPLES = {
    "/api/v1/ai/email/generate": {"lead_id": EXAMPLE_LEAD_ID, "context": "follow-up after the demo", "tone": "casual"},
    "/api/v1/ai/lead/qualify": {"lead_id": EXAMPLE_LEAD_ID},
    "/api/v1/ai/deal/predict": {"deal_id": EXAMPLE_DEAL_ID},
    "/api/v1/ai/jobs": {"task": "lead.qualify", "input": {"lead_id": EXAMPLE_LEAD_ID}},
}
for _path in list(REQUEST_EXAMPLES)[:3]:
    REQUEST_EXAMPLES[_path + "/stream"] = REQUEST_EXAMPLES[_path]

_REASONING = ("Maria Silva is VP of Sales at Acme Logistics, a Series C company, so she has budget and authority. "
              "She came through a referral and asked for a demo, which shows a clear need. ") * 2
RESPONSE_EXAMPLES = {
    "/api/v1/ai/lead/qualify": {
        "lead_id": EXAMPLE_LEAD_ID, "agent": "LeadQualifier_CRM_Agent", "score": 78, "classification": "Hot",
        "reasoning": _REASONING.strip(), "next_actions": ["Book a discovery call", "Confirm the budget owner", "Send a case study"],
        "bant": {"budget": "Series C funding", "authority": "VP of Sales", "need": "Asked for a demo", "timeline": "Unknown"}},
    "/api/v1/ai/email/generate": {
        "lead_id": EXAMPLE_LEAD_ID, "agent": "EmailAssistant_CRM_Agent", "variations": [
            {"type": t, "subject": s, "body": "Hi Maria,\n\nA short note about Acme Logistics.\n\nBest", "tone": d}
            for t, s, d in (("formal", "Acme Logistics: a proposal", "Formal"), ("casual", "Quick idea for Acme", "Friendly"),
                            ("direct", "Maria, 20 minutes?", "Brief"))]},
    "/api/v1/ai/deal/predict": {
        "deal_id": EXAMPLE_DEAL_ID, "agent": "DealPredictor_CRM_Agent", "win_probability": 55, "health_score": 68,
        "predicted_close_date": "2027-01-31", "risk_factors": ["Only one decision maker engaged"],
        "recommended_actions": ["Meet the economic buyer"], "reasoning": (_REASONING * 3).strip()},
    "/api/v1/ai/jobs": {"job_id": "aijob_5b1f0c3e9d2a4f6b8c7d1e2f3a4b5c6d", "status": "queued",
                        "events_url": "/api/v1/ai/jobs/aijob_5b1f0c3e9d2a4f6b8c7d1e2f3a4b5c6d/events?token=eyJhbGciOi...",
                        "expires_at": "2026-11-23T23:15:00Z"},
}


def finish(schema: OpenAPI) -> OpenAPI:
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
    return schema
