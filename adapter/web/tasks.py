"""The CRM-shaped AI routes (synchronous) and the AI health report."""

from __future__ import annotations

import asyncio
import time

import jwt
import structlog
from collections.abc import Awaitable
from typing import Any

from litestar import Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import SerializationException
from litestar.params import JSONBody
from litestar.handlers.base import BaseRouteHandler

from ..tasks.registry import AGENT_IDS
from ..pipeline.cache import Mode, Outcome
from ..errors import BadRequest, Unauthenticated, UnsupportedMediaType
from ..models import (
    AiHealth,
    DealPredictRequest,
    DealPredictResult,
    DependencyState,
    EmailGenerateRequest,
    EmailGenerateResult,
    LeadQualifyRequest,
    LeadQualifyResult,
)
from ..storage.ratelimit import user_key
from ..pipeline.service import AiService

log = structlog.get_logger("adapter.routes")
from .openapi import CACHE_HEADERS, WARNINGS_HEADER, WRITE_BACK_HEADER, ai_responses


async def require_bearer(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """A bearer token must be there; the CRM backend verifies it on every request.

    Async on purpose: Litestar runs a sync guard in a worker thread, which cost a
    cache hit more than a tenth of its time.

    With CRM_JWT_SECRET set, an expired or badly signed token is refused here, before
    any upstream call, and its verified `sub` names the user for rate limiting.
    """
    authorization = connection.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("an `Authorization: Bearer <token>` header is required")
    secret = connection.app.state.settings.crm_jwt_secret
    sub = None
    if secret:
        try:
            claims = jwt.decode(token.strip(), secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the bearer token has expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the bearer token is not valid: {exc}") from None
        sub = str(claims["sub"])
    connection.scope["adapter.user"] = user_key(authorization, sub)  # type: ignore[typeddict-unknown-key]


async def require_json(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """A body route takes a JSON object: say so (415) for another media type, and say what is wrong
    with an empty or malformed body before Litestar's own parser words it in its internal terms.

    The decoded body is cached on the request, so the handler's `data` is not decoded twice.
    """
    if connection.scope.get("method") not in ("POST", "PUT", "PATCH") or not isinstance(connection, Request):
        return
    media_type = connection.headers.get("content-type", "").partition(";")[0].strip().lower()
    # No Content-Type at all is taken as JSON (raw clients); a declared other type is refused.
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"the request body must be `application/json`, not `{media_type}`",
                                   headers={"Accept-Post": "application/json"})
    if not (await connection.body()).strip():
        raise BadRequest("invalid request body: the body is empty; send a JSON object")
    try:
        await connection.json()
    except SerializationException as exc:
        raise BadRequest(f"invalid request body: not valid JSON: {_json_error(str(exc), len(await connection.body()))}") from None


def _json_error(message: str, size: int) -> str:
    # msgspec says "Input data was truncated" or "JSON is malformed: invalid character (byte 0)".
    return f"it ends at byte {size} before the JSON value is complete" if "truncated" in message else message


def user_of(request: Request) -> str:
    return request.scope.get("adapter.user", "")  # type: ignore[return-value]


def cache_mode(request: Request) -> Mode:
    directives = {d.strip().split("=", 1)[0].lower() for d in request.headers.get("cache-control", "").split(",")}
    if "no-store" in directives:
        return "no-store"
    if "no-cache" in directives or "max-age=0" in request.headers.get("cache-control", "").replace(" ", ""):
        return "no-cache"
    return "default"


def respond(outcome: Outcome, **extra: str) -> Response[Any]:
    headers = {"X-Cache": outcome.x_cache, **extra}
    if outcome.age is not None:
        headers["Age"] = str(outcome.age)
    return Response(outcome.body, media_type="application/json", headers=headers)


async def _run(service: AiService, task: str, data: Any, request: Request) -> Response[Any]:
    authorization = request.headers["authorization"]
    outcome = await service.run(task, data, authorization, cache_mode(request), user_of(request))
    service.metrics.cache.labels(task, outcome.x_cache.lower()).inc()
    warned = service.response_headers(task, outcome.body)  # X-AI-Provider, X-Agent-Warnings
    if task != "lead.qualify":
        return respond(outcome, **warned)
    # Only a fresh answer is written back: a cached one was written when it was made,
    # and a stale one must not overwrite what the CRM holds now.
    if not service.settings.crm_write_back:
        write_back, reason = "skipped", "CRM_WRITE_BACK is off"
    elif outcome.x_cache in ("HIT", "STALE"):
        write_back, reason = "skipped", f"{outcome.x_cache.lower()} answer"
    else:
        write_back, reason = await service.write_back(data.lead_id, authorization, outcome.body), None
    if reason:
        service.metrics.write_backs.labels("skipped").inc()
        log.info("crm.write_back", lead_id=data.lead_id, outcome="skipped", reason=reason)
    return respond(outcome, **{"X-CRM-Write-Back": write_back}, **warned)


@post("/email/generate", status_code=200, guards=[require_bearer], response_headers=[*CACHE_HEADERS, WARNINGS_HEADER], responses=ai_responses("email.generate"), summary="Generate three sales-email variations for a lead")
async def email_generate(data: JSONBody[EmailGenerateRequest], request: Request, service: NamedDependency[AiService]) -> Response[EmailGenerateResult]:
    return await _run(service, "email.generate", data, request)


@post("/lead/qualify", status_code=200, guards=[require_bearer], response_headers=[*CACHE_HEADERS, WARNINGS_HEADER, WRITE_BACK_HEADER], responses=ai_responses("lead.qualify"), summary="Qualify a lead (BANT score and classification)")
async def lead_qualify(data: JSONBody[LeadQualifyRequest], request: Request, service: NamedDependency[AiService]) -> Response[LeadQualifyResult]:
    return await _run(service, "lead.qualify", data, request)


@post("/deal/predict", status_code=200, guards=[require_bearer], response_headers=[*CACHE_HEADERS, WARNINGS_HEADER], responses=ai_responses("deal.predict"), summary="Predict a deal's outcome and health")
async def deal_predict(data: JSONBody[DealPredictRequest], request: Request, service: NamedDependency[AiService]) -> Response[DealPredictResult]:
    return await _run(service, "deal.predict", data, request)


async def _probe(call: Awaitable[Any], url: str | None = None) -> tuple[DependencyState, Any]:
    t0 = time.perf_counter()
    try:
        value = await call
    except Exception as exc:  # a probe reports any failure; it never raises
        return DependencyState(status="down", url=url, detail=f"{type(exc).__name__}: {exc}"[:300]), None
    return DependencyState(status="up", url=url, latency_ms=round((time.perf_counter() - t0) * 1000, 2)), value


@get("/health", summary="State of the gateway, the CRM backend, the cache and the three agents")
async def ai_health(service: NamedDependency[AiService]) -> AiHealth:
    s = service.settings
    (gateway, _), (listing, listed), (crm, _), cache = await asyncio.gather(
        _probe(service.gateway.health(), s.conductor_gateway_url),
        _probe(service.gateway.agent_ids()),
        _probe(service.crm.health(), s.crm_backend_url),
        service.cache.store.state(),
    )
    if gateway.status == "up" and listing.status == "down":
        gateway = DependencyState(status="degraded", url=gateway.url, latency_ms=gateway.latency_ms, detail=f"GET /api/agents failed: {listing.detail}")
    agents = {agent: bool(listed and agent in listed) for agent in AGENT_IDS}
    circuits = {"conductor-gateway": service.gateway.breaker.state, "crm-backend": service.crm.breaker.state}
    healthy = gateway.status == crm.status == cache.status == "up" and all(agents.values()) \
        and set(circuits.values()) == {"closed"}
    return AiHealth(status="ok" if healthy else "degraded", gateway=gateway, crm_backend=crm, cache=cache, agents=agents,
                    circuits=circuits, gateway_calls_in_flight=service.gateway.bulkhead.in_flight)


def from_state(name: str) -> Provide:
    """A dependency on what the lifespan put in the app's state under `name`."""

    def provide(state: State) -> Any:
        return state[name]

    return Provide(provide, sync_to_thread=False)


ai_router = Router(
    path="/api/v1/ai",
    route_handlers=[email_generate, lead_qualify, deal_predict, ai_health],
    guards=[require_json],
    tags=["ai"],
)
SERVICE = {name: from_state(name) for name in ("service", "jobs", "tokens")}
