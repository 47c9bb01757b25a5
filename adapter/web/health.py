"""The AI health report: the gateway, the CRM backend, the cache, and the agent of every task."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

from litestar import Router, get
from litestar.datastructures import State
from litestar.di import NamedDependency

from ..models import AiHealth, DependencyState
from ..pipeline.service import AiService
from ..settings import redact_url


async def _probe(call: Awaitable[Any], url: str | None = None) -> tuple[DependencyState, Any]:
    t0 = time.perf_counter()
    try:
        value = await call
    except Exception as exc:  # a probe reports any failure; it never raises
        return DependencyState(status="down", url=url, detail=f"{type(exc).__name__}: {exc}"[:300]), None
    return DependencyState(status="up", url=url, latency_ms=round((time.perf_counter() - t0) * 1000, 2)), value


@get("/health", summary="State of the gateway, the CRM backend, the cache and each task's agent")
async def ai_health(service: NamedDependency[AiService], state: State) -> AiHealth:
    # One report in flight at a time, shared by every request that arrives meanwhile: the route takes no
    # token and each report is three upstream calls, so a flood of callers would otherwise fill the pools
    # the AI routes need. A request that arrives after a report finished gets a fresh one.
    flight: asyncio.Future[AiHealth] | None = state.get(_IN_FLIGHT)
    if flight is None or flight.done() or flight.get_loop() is not asyncio.get_running_loop():
        flight = state[_IN_FLIGHT] = asyncio.ensure_future(_report(service))
    return await asyncio.shield(flight)  # one caller leaving does not cancel the others' report


_IN_FLIGHT = "ai_health_in_flight"


async def _report(service: AiService) -> AiHealth:
    s = service.settings
    (gateway, _), (listing, listed), (crm, _), cache = await asyncio.gather(
        _probe(service.gateway.health(), redact_url(s.conductor_gateway_url)),
        _probe(service.gateway.agent_ids()),
        _probe(service.crm.health(), redact_url(s.crm_backend_url)),
        service.cache.store.state(),
    )
    if gateway.status == "up" and listing.status == "down":
        gateway = DependencyState(status="degraded", url=gateway.url, latency_ms=gateway.latency_ms, detail=f"GET /api/agents failed: {listing.detail}")
    agents = {agent: bool(listed and agent in listed) for agent in service.tasks.agent_ids}
    circuits = {"conductor-gateway": service.gateway.breaker.state, "crm-backend": service.crm.breaker.state}
    healthy = gateway.status == crm.status == cache.status == "up" and all(agents.values()) \
        and set(circuits.values()) == {"closed"}
    return AiHealth(status="ok" if healthy else "degraded", gateway=gateway, crm_backend=crm, cache=cache, agents=agents,
                    circuits=circuits, gateway_calls_in_flight=service.gateway.bulkhead.in_flight)


health_router = Router(path="/api/v1/ai", route_handlers=[ai_health], tags=["ai"])
