"""The application factory. Only the entry point calls it; tests hand in their own clients."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import httpx
import structlog
from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .assembly import assemble
from .context import add_request_id_header, check_header_size, current_request_id, elapsed_ms, request_id
from .metrics import Metrics
from .notify.wiring import check_notifications
from .settings import Settings
from .storage.store import Store
from .tasks import TASKS, Registry
from .tracing import Tracing, name_after_route
from .web import openapi, problems
from .web.batches import batch_routers
from .web.demo import DemoSession, demo_router
from .web.dependencies import STATE
from .web.health import health_router
from .web.jobs import job_routers
from .web.ops import healthz, readyz
from .web.ops import metrics as metrics_route
from .web.proxy import Forward, proxy_first
from .web.streams import release
from .web.tasks import task_routers
from .web.threads import thread_routers

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = structlog.get_logger("adapter.http")


def request_context(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        rid = request_id(scope)
        # Every log line of the request reads its id from here (logs.add_request_id): nothing is bound in structlog's context.
        token = current_request_id.set(rid)
        try:
            check_header_size(scope, scope["app"].state.settings.max_header_bytes)
            await app(scope, receive, send)
        finally:
            release(scope)  # the open-stream place the request took, however its response ended
            current_request_id.reset(token)

    return middleware


async def _before_send(message: Message, scope: Scope) -> None:
    add_request_id_header(message, scope)
    if message["type"] == "http.response.start":
        scope["adapter.status"] = message["status"]  # type: ignore[typeddict-unknown-key]
    elif message["type"] == "http.response.body" and not message.get("more_body", False):
        ms = elapsed_ms(scope)
        status = scope.get("adapter.status")
        template = scope.get("path_template")
        route = "proxy" if scope.get("adapter.proxied") else template or "unmatched"
        metrics: Metrics = scope["app"].state.metrics
        metrics.request_done(route, scope.get("method", ""), str(status), ms / 1000)
        # The one line per request.
        log.info("request", method=scope.get("method"), path=scope.get("path"), status=status, ms=ms,
                 request_id=request_id(scope))


def fall_through(request: Request, exc: NotFoundException) -> Response:
    """No route of ours: the CRM backend answers, unless CRM_PROXY_FALLTHROUGH is off."""
    proxy = getattr(request.app.state, "proxy", None)
    if proxy is not None and not request.scope.get("adapter.proxied"):
        return Forward(proxy, request, problems.handle)
    return problems.handle(request, exc)


async def _name_span(message: Message, scope: Scope) -> None:
    if message["type"] == "http.response.start":
        name_after_route(scope)


def create_app(
    settings: Settings,
    *,
    gateway_http: httpx.AsyncClient | None = None,
    crm_http: httpx.AsyncClient | None = None,
    proxy_http: httpx.AsyncClient | None = None,
    store: Store | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    demo: DemoSession | None = None,
    tracer_provider: TracerProvider | None = None,
    tasks: Registry = TASKS,
) -> Litestar:
    """Clients handed in are the caller's to close; the ones made here are closed at shutdown.

    `tasks`: the AI tasks served (every route, setting, health entry and OpenAPI operation of a
    task follows from its entry). `sleep`: how batches wait for a user's rate-limit buckets to
    refill (a test that moves `clock` by hand moves time for them with it). Traces: the tracer
    provider handed in, else what the OTEL_* variables ask for (off when none is set).
    """
    tasks = tasks.load(settings.conductor_agents_dir)  # a missing persona stops start-up, not a request
    tasks.check_overrides({"CACHE_TTL_": settings.cache_ttl, "RATE_LIMIT_": settings.rate_limit})
    check_notifications(settings, tasks)  # NOTIFY_TRIGGERS_OFF names triggers; webhooks have a secret
    metrics = Metrics()
    tracing = Tracing(tracer_provider) if tracer_provider is not None else Tracing.from_env(os.environ)
    # Upstream clients, storage, pipeline, serving: started in that order, stopped in reverse (assembly.py).
    parts = assemble(settings, metrics, tracing, tasks, gateway_http=gateway_http, crm_http=crm_http,
                     proxy_http=proxy_http, store=store, clock=clock, sleep=sleep)

    app = Litestar(
        route_handlers=[*task_routers(tasks), *job_routers(tasks), *batch_routers(tasks), *thread_routers(tasks), health_router, healthz, readyz, metrics_route,
                        *([demo_router] if demo else [])],
        state=State({"metrics": metrics, "settings": settings, "demo": demo}),
        request_max_body_size=settings.max_body_bytes,
        dependencies=STATE,
        lifespan=[parts.lifespan],
        middleware=[request_context],
        before_send=[_before_send, *([_name_span] if tracing.on else [])],
        plugins=tracing.plugins(),
        exception_handlers={NotFoundException: fall_through, Exception: problems.handle},
        logging_config=None,
        cors_config=CORSConfig(
            allow_origins=settings.cors_origins, allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "Cache-Control", "Last-Event-ID", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Cache", "Age", "X-AI-Provider", "X-CRM-Write-Back", "X-Agent-Warnings", "X-Job-ID", "Location", "Retry-After",
                            "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy"],
        ) if settings.cors_origins else None,
        openapi_config=OpenAPIConfig(
            title="CRM AI sidecar", version=__version__, path="/schema",
            description="CRM-shaped AI routes served by Conductor Gateway agents, with validated, cached results.",
            render_plugins=[JsonRenderPlugin()],
        ),
    )
    openapi.finish(app.openapi_schema, tasks)  # the generated document is cached: this is what gets served
    if not settings.cors_origins and not tracing.on:
        proxy_first(app)  # a path no route can match goes to the pass-through without routing
    return app
