"""The application factory. Only the entry point calls it; tests hand in their own clients."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import httpx
import structlog
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from litestar import Request, Response
from litestar.exceptions import NotFoundException

from . import __version__
from .context import add_request_id_header, check_header_size, current_request_id, elapsed_ms, request_id
from .metrics import Metrics
from .pipeline.answers import Answers
from .pipeline.batches import Batches
from .pipeline.cache import ResultCache
from .pipeline.jobs import Jobs
from .pipeline.service import AiService
from .pipeline.threads import Threads
from .settings import Settings, redact_url
from .stopping import cancel_and_wait
from .storage.redis_log import RedisLog
from .storage.memory import MemoryStore
from .storage.quota import RunningBatches
from .storage.ratelimit import CRM_READS, Policy, RateLimiter
from .storage.redis_store import FAULTS, RedisStore, redis_client
from .storage.signing import Signer, Tampering
from .storage.store import Store
from .tasks import TASKS, Registry
from .tracing import Tracing, name_after_route
from .upstreams import crm, gateway, transport
from .upstreams.conversations import ConversationsClient
from .web import openapi, problems
from .web.batches import batch_routers
from .web.demo import DemoSession, demo_router
from .web.dependencies import STATE
from .web.forwarding import Forwarding
from .web.health import health_router
from .web.jobs import job_routers
from .web.ops import healthz, readyz
from .web.ops import metrics as metrics_route
from .web.proxy import Forward, Proxy
from .web.streams import StreamSlots, release, stream_limit
from .web.tasks import task_routers
from .web.threads import thread_routers
from .web.tokens import JobTokens

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = structlog.get_logger("adapter.http")
STOP_TIMEOUT = 5.0  # seconds shutdown waits for the background tasks it cancelled, before closing their clients


async def _probe_redis(store: RedisStore, url: str) -> None:
    """A Redis that is not there is one warning at start-up, not a surprise at the first request.

    On a connection of its own: the store's pool starts as it would without the probe.
    """
    probe = redis_client(url)
    try:
        await probe.ping()
    except FAULTS as exc:
        store.fault(exc)
    finally:
        await probe.aclose()


def redis_signer(settings: Settings) -> Signer:
    """REDIS_SIGNING_KEY (and the previous one, while rotating); unset, a key of this app alone.

    `adapter serve` refuses Redis without the setting (cli.py): replicas must share the key. An app
    built in process (the tests, the benchmarks' single sidecar) reads back only what it wrote.
    """
    if settings.redis_signing_key is None:
        return Signer.random()
    return Signer(settings.redis_signing_key, settings.redis_signing_key_previous)


def request_context(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        rid = request_id(scope)
        token = current_request_id.set(rid)
        # Tokens, not bound_contextvars(): that one copies the whole context to save what it overwrites.
        bound = structlog.contextvars.bind_contextvars(request_id=rid)
        try:
            check_header_size(scope, scope["app"].state.settings.max_header_bytes)
            await app(scope, receive, send)
        finally:
            release(scope)  # the open-stream place the request took, however its response ended
            structlog.contextvars.reset_contextvars(**bound)
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
    metrics = Metrics()
    tracing = Tracing(tracer_provider) if tracer_provider is not None else Tracing.from_env(os.environ)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            # Both upstream clients send over aiohttp's pool (upstreams/transport.py): httpcore was a third
            # of a cache hit's CPU. httpx-sse reads the gateway's streams through it unchanged.
            gw = gateway_http or await stack.enter_async_context(transport.client(
                base_url=settings.conductor_gateway_url, timeout=gateway.client_timeout(settings),
                limits=httpx.Limits(max_connections=settings.gateway_max_connections,
                                    max_keepalive_connections=settings.gateway_keepalive_connections,
                                    keepalive_expiry=settings.upstream_keepalive_expiry)))
            backend = crm_http or await stack.enter_async_context(transport.client(
                base_url=settings.crm_backend_url, timeout=crm.client_timeout(settings),
                limits=httpx.Limits(max_connections=settings.crm_max_connections, max_keepalive_connections=settings.crm_max_connections,
                                    keepalive_expiry=settings.upstream_keepalive_expiry)))
            tampering = Tampering(lambda kind: metrics.tampered.labels(kind).inc())
            cache_store = store
            if cache_store is None:
                cache_store = (
                    RedisStore(redis_client(settings.redis_url), prefix=settings.cache_prefix,
                               lock_ttl=settings.cache_lock_timeout, retry_log_interval=settings.cache_retry_interval,
                               signer=redis_signer(settings), tampering=tampering)
                    if settings.redis_url else MemoryStore(settings.cache_memory_max_entries, clock)
                )
                stack.push_async_callback(cache_store.aclose)
            passthrough = proxy_http or crm_http or await stack.enter_async_context(Proxy.client(settings))
            stack.callback(tracing.shutdown)
            for client in {gw, backend, passthrough}:  # client spans and traceparent to both upstreams
                tracing.instrument(client)
                stack.callback(tracing.uninstrument, client)
            app.state.proxy = Proxy(passthrough, Forwarding(settings.forwarders)) if settings.crm_proxy_fallthrough else None
            cache = ResultCache(cache_store, settings.cache_stale_grace, clock,
                                on_coalesced=lambda key: metrics.cache.labels(key.task, "coalesced").inc(),
                                readers={t.name: t.reread for t in tasks.values()}, tampering=tampering)
            redis_store = cache_store if isinstance(cache_store, RedisStore) else None
            limiter = RateLimiter(
                {**{t.name: Policy.parse(settings.rate_limit_for(t), setting=f"RATE_LIMIT_{t.env_suffix}") for t in tasks.values()},
                 CRM_READS: Policy.parse(settings.crm_reads_per_user, setting="CRM_READS_PER_USER", what="CRM record reads", shared=False)},
                prefix=settings.cache_prefix, store=redis_store, clock=clock, sleep=sleep)
            service = AiService(
                tasks=tasks, gateway=gateway.GatewayClient(gw, settings, metrics, clock=clock),
                crm=crm.CrmClient(backend, settings, clock=clock, metrics=metrics),
                cache=cache, settings=settings, metrics=metrics, limiter=limiter, tracing=tracing,
            )
            app.state.service = service
            app.state.threads = Threads(service, ConversationsClient(gw, settings), cache_store, tasks)
            mirror = None
            if isinstance(cache_store, RedisStore):
                mirror = RedisLog(cache_store, settings.job_max_seconds + settings.job_retention_seconds,
                                  lease=settings.job_lease_seconds, metrics=metrics)
                stack.push_async_callback(mirror.aclose)
            app.state.answers = answers = Answers(service)
            app.state.jobs = Jobs(answers, describe=problems.problem_json, clock=clock, mirror=mirror)
            # A batch counts as running until it ends, or at the latest until its deadline (plus a lease for a takeover).
            running = RunningBatches(settings.max_batches_per_user, lifetime=settings.batch_max_seconds + settings.job_lease_seconds,
                                     prefix=settings.cache_prefix, store=redis_store, clock=clock)
            app.state.batches = batches = Batches(app.state.jobs, clock=clock, quota=running)
            if mirror is not None:
                mirror.start(app.state.jobs.kinds)  # takeovers dispatched by kind, from here on
            max_streams, fd_limit = stream_limit(settings)
            if max_streams < settings.max_streams:
                log.warning("streams.capped", max_streams=max_streams, fd_limit=fd_limit,
                            detail=f"MAX_STREAMS={settings.max_streams} lowered to what the file-descriptor limit leaves "
                                   "after the upstream pools; raise `ulimit -n` (nofile) to open more")
            app.state.streams = StreamSlots(settings.max_streams_per_user, max_streams, metrics.limit_refusals)
            batches.start_sweeper()
            stack.callback(batches.stop)
            metrics.watch_jobs(lambda: app.state.jobs.running)
            metrics.running_batches.set_function(lambda: batches.running)
            metrics.watch_store(cache_store.backend, lambda: getattr(cache_store, "degraded", None) is None)
            metrics.prime(tasks)
            metrics.watch_breaker("conductor-gateway", lambda: service.gateway.breaker.state)
            metrics.watch_breaker("crm-backend", lambda: service.crm.breaker.state)
            metrics.gateway_in_flight.set_function(lambda: service.gateway.bulkhead.in_flight)
            app.state.tokens = JobTokens(settings.job_token_secret, settings.job_token_ttl,
                                         previous=settings.job_token_secret_previous)
            stack.callback(app.state.jobs.cancel_all)
            log.info("startup", gateway=redact_url(settings.conductor_gateway_url), crm=redact_url(settings.crm_backend_url),
                     cache=cache_store.backend, **({"redis": redact_url(settings.redis_url)} if settings.redis_url else {}))
            if isinstance(cache_store, RedisStore) and settings.redis_url:
                await _probe_redis(cache_store, settings.redis_url)
            stack.callback(cache.cancel_flights)

            async def stop_background() -> None:
                # First at shutdown, and awaited: a task still running when the Redis pools close would
                # open a connection nobody closes (a cancel can be lost on Python 3.11: adapter/stopping.py).
                left = await cancel_and_wait(lambda: [*cache.background(), *app.state.jobs.background(), *batches.background(),
                                                     *app.state.threads.background()],
                                             timeout=STOP_TIMEOUT)
                if left:
                    log.warning("shutdown.tasks_left", tasks=sorted(t.get_name() for t in left), waited_s=STOP_TIMEOUT)

            stack.push_async_callback(stop_background)
            yield

    app = Litestar(
        route_handlers=[*task_routers(tasks), *job_routers(tasks), *batch_routers(tasks), *thread_routers(tasks), health_router, healthz, readyz, metrics_route,
                        *([demo_router] if demo else [])],
        state=State({"metrics": metrics, "settings": settings, "demo": demo}),
        request_max_body_size=settings.max_body_bytes,
        dependencies=STATE,
        lifespan=[lifespan],
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
    return app
