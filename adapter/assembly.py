"""The app's parts, started in order at start-up and stopped in the reverse order at shutdown.

1. `Upstreams`: the clients of the Conductor Gateway, the CRM backend and the proxied CRM routes
   (opened here unless handed in; handed-in clients are the caller's to close), traced.
2. `Storage`: the cache store (Redis, or memory in one process), the rate limiter, the running
   batches' quota and, with Redis, the event log (storage/redis_log.py).
3. `Notifications` (adapter/notify/wiring.py): the outbox, the sinks, the notifier and this replica's
   delivery worker; nothing without a sink. Stopped after Pipeline, before Storage closes Redis.
4. `Pipeline`: the AI service, the cache's rules, `Answers`, the jobs and the batches. It hands the
   event log its kinds of log (`RedisLog.start`), and at shutdown stops every background task it
   runs, and waits for them, before Storage closes the pools they use (adapter/stopping.py).
5. `Serving`: what the web layer holds for requests: the open-stream places, the job tokens, the proxy.

Each part puts what handlers and tests reach into the app's state (`service`, `answers`, `jobs`,
`batches`, `threads`, `streams`, `tokens`, `proxy`); `Assembly.lifespan` is the app's one lifespan.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import httpx
import structlog
from litestar import Litestar
from litestar.datastructures import State

from .metrics import Metrics
from .notify.wiring import Notifications
from .pipeline.answers import Answers
from .pipeline.batches import Batches
from .pipeline.cache import ResultCache
from .pipeline.jobs import Jobs
from .pipeline.service import AiService
from .pipeline.threads import Threads
from .settings import RedisTarget, Settings, redact_url
from .stopping import cancel_and_wait
from .storage.memory import MemoryStore
from .storage.quota import RunningBatches
from .storage.ratelimit import CRM_READS, Policy, RateLimiter
from .storage.redis_log import RedisLog, replica_id
from .storage.redis_store import FAULTS, RedisStore, redis_client
from .storage.signing import Signer, Tampering
from .storage.store import Store
from .tasks import Registry
from .tracing import Tracing
from .upstreams import crm, gateway, transport
from .upstreams.conversations import ConversationsClient
from .web import problems
from .web.forwarding import Forwarding
from .web.proxy import Proxy
from .web.streams import StreamSlots, stream_limit
from .web.tokens import JobTokens

log = structlog.get_logger("adapter.http")
STOP_TIMEOUT = 5.0  # seconds shutdown waits for the background tasks it cancelled, before closing their clients


class Part(Protocol):
    async def start(self, state: State) -> None: ...

    async def stop(self) -> None: ...


class Assembly:
    """Parts started in order, stopped in reverse: a part stops only after every part started after it."""

    def __init__(self, *parts: Part) -> None:
        self.parts = parts

    @asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        started: list[Part] = []
        try:
            for part in self.parts:
                await part.start(app.state)
                started.append(part)
            yield
        finally:
            # Every started part stops, even when one before it failed to: the first failure is raised after.
            failure: BaseException | None = None
            for part in reversed(started):
                try:
                    await part.stop()
                except BaseException as exc:  # noqa: BLE001 -- raised below, once the rest has stopped
                    failure = failure or exc
            if failure is not None:
                raise failure


class Upstreams:
    def __init__(self, settings: Settings, tracing: Tracing, *, gateway_http: httpx.AsyncClient | None,
                 crm_http: httpx.AsyncClient | None, proxy_http: httpx.AsyncClient | None) -> None:
        self._settings, self._tracing = settings, tracing
        self._given = (gateway_http, crm_http, proxy_http)
        self._opened: list[httpx.AsyncClient] = []
        self.gateway_http = self.crm_http = self.proxy_http = None  # type: ignore[assignment]

    async def start(self, state: State) -> None:
        try:
            await self._start()
        except BaseException:
            await self._close()  # what it opened before the failure
            raise

    async def _start(self) -> None:
        s = self._settings
        gateway_http, crm_http, proxy_http = self._given
        # Both upstream clients send over aiohttp's pool (upstreams/transport.py): httpcore was a third
        # of a cache hit's CPU. httpx-sse reads the gateway's streams through it unchanged.
        self.gateway_http = gateway_http or await self._open(transport.client(
            base_url=s.conductor_gateway_url, timeout=gateway.client_timeout(s),
            limits=httpx.Limits(max_connections=s.gateway_max_connections, max_keepalive_connections=s.gateway_keepalive_connections,
                                keepalive_expiry=s.upstream_keepalive_expiry)))
        self.crm_http = crm_http or await self._open(transport.client(
            base_url=s.crm_backend_url, timeout=crm.client_timeout(s),
            limits=httpx.Limits(max_connections=s.crm_max_connections, max_keepalive_connections=s.crm_max_connections,
                                keepalive_expiry=s.upstream_keepalive_expiry)))
        self.proxy_http = proxy_http or crm_http or await self._open(Proxy.client(s))
        for client in self.clients:  # client spans and traceparent to both upstreams
            self._tracing.instrument(client)

    async def _open(self, client: httpx.AsyncClient) -> httpx.AsyncClient:
        opened = await client.__aenter__()
        self._opened.append(opened)
        return opened

    @property
    def clients(self) -> set[httpx.AsyncClient]:
        return {c for c in (self.gateway_http, self.crm_http, self.proxy_http) if c is not None}

    async def stop(self) -> None:
        for client in self.clients:
            self._tracing.uninstrument(client)
        self._tracing.shutdown()
        await self._close()

    async def _close(self) -> None:
        while self._opened:
            await self._opened.pop().__aexit__(None, None, None)


def redis_signer(settings: Settings) -> Signer:
    """REDIS_SIGNING_KEY (and the previous one, while rotating); unset, a key of this app alone.

    `adapter serve` refuses Redis without the setting (cli.py): replicas must share the key. An app
    built in process (the tests, the benchmarks' single sidecar) reads back only what it wrote.
    """
    if settings.redis_signing_key is None:
        return Signer.random()
    return Signer(settings.redis_signing_key, settings.redis_signing_key_previous)


async def _probe_redis(store: RedisStore, target: RedisTarget) -> None:
    """A Redis that is not there is one warning at start-up, not a surprise at the first request.

    On a connection of its own: the store's pool starts as it would without the probe.
    """
    probe = redis_client(target)
    try:
        await probe.ping()
    except FAULTS as exc:
        store.fault(exc)
    finally:
        await probe.aclose()


class Storage:
    def __init__(self, settings: Settings, metrics: Metrics, tasks: Registry, *, store: Store | None,
                 clock: Callable[[], float], sleep: Callable[[float], Awaitable[object]]) -> None:
        self._settings, self._metrics, self._tasks = settings, metrics, tasks
        self._given, self._clock, self._sleep = store, clock, sleep
        self.tampering = Tampering(lambda kind: metrics.tampered.labels(kind).inc())
        self.store: Store = store  # type: ignore[assignment]
        self.log: RedisLog | None = None
        self.limiter: RateLimiter | None = None
        self.quota: RunningBatches | None = None

    @property
    def redis(self) -> RedisStore | None:
        return self.store if isinstance(self.store, RedisStore) else None

    async def start(self, state: State) -> None:
        s, metrics = self._settings, self._metrics
        if self._given is None:
            self.store = (
                RedisStore(redis_client(s.redis), prefix=s.cache_prefix, lock_ttl=s.cache_lock_timeout,
                           retry_log_interval=s.cache_retry_interval, signer=redis_signer(s), tampering=self.tampering,
                           target=s.redis)
                if s.redis is not None else MemoryStore(s.cache_memory_max_entries, self._clock)
            )
        self.limiter = RateLimiter(
            {**{t.name: Policy.parse(s.rate_limit_for(t), setting=f"RATE_LIMIT_{t.env_suffix}") for t in self._tasks.values()},
             CRM_READS: Policy.parse(s.crm_reads_per_user, setting="CRM_READS_PER_USER", what="CRM record reads", shared=False)},
            prefix=s.cache_prefix, store=self.redis, clock=self._clock, sleep=self._sleep)
        # A batch counts as running until it ends, or at the latest until its deadline (plus a lease for a takeover).
        self.quota = RunningBatches(s.max_batches_per_user, lifetime=s.batch_max_seconds + s.job_lease_seconds,
                                    prefix=s.cache_prefix, store=self.redis, clock=self._clock)
        if self.redis is not None:
            self.log = RedisLog(self.redis, s.job_max_seconds + s.job_retention_seconds, lease=s.job_lease_seconds,
                                metrics=metrics)
        store = self.store
        metrics.watch_store(store.backend, lambda: getattr(store, "degraded", None) is None)
        log.info("startup", gateway=redact_url(s.conductor_gateway_url), crm=redact_url(s.crm_backend_url),
                 cache=store.backend, **({"redis": s.redis.shown, "redis_mode": s.redis.mode} if s.redis is not None else {}))
        if self.redis is not None and s.redis is not None:
            await _probe_redis(self.redis, s.redis)

    async def stop(self) -> None:
        if self.log is not None:
            await self.log.aclose()
        if self._given is None:
            await self.store.aclose()  # type: ignore[attr-defined]


class Pipeline:
    def __init__(self, settings: Settings, metrics: Metrics, tracing: Tracing, tasks: Registry, upstreams: Upstreams,
                 storage: Storage, notifications: Notifications, *, clock: Callable[[], float]) -> None:
        self._settings, self._metrics, self._tracing, self._tasks = settings, metrics, tracing, tasks
        self._upstreams, self._storage, self._notifications, self._clock = upstreams, storage, notifications, clock

    async def start(self, state: State) -> None:
        s, metrics, tasks, storage = self._settings, self._metrics, self._tasks, self._storage
        self.cache = ResultCache(storage.store, s.cache_stale_grace, self._clock,
                                 on_coalesced=lambda key: metrics.cache.labels(key.task, "coalesced").inc(),
                                 readers={t.name: t.reread for t in tasks.values()}, tampering=storage.tampering)
        self.service = service = AiService(
            tasks=tasks, gateway=gateway.GatewayClient(self._upstreams.gateway_http, s, metrics, clock=self._clock),
            crm=crm.CrmClient(self._upstreams.crm_http, s, clock=self._clock, metrics=metrics),
            cache=self.cache, settings=s, metrics=metrics, limiter=storage.limiter, tracing=self._tracing,
            notifier=self._notifications.notifier,
        )
        self.answers = Answers(service)
        self.jobs = Jobs(self.answers, describe=problems.problem_json, clock=self._clock, mirror=storage.log)
        self.batches = Batches(self.jobs, clock=self._clock, quota=storage.quota)
        # Threads keep their history in the Conductor, through the gateway's client (pipeline/threads.py).
        state.threads = self.threads = Threads(self.answers, ConversationsClient(self._upstreams.gateway_http, s),  # type: ignore[arg-type]
                                               storage.store, tasks)
        if storage.log is not None:
            storage.log.start(self.jobs.kinds)  # takeovers are dispatched by kind from here on
        self.batches.start_sweeper()
        state.service, state.answers, state.jobs, state.batches = service, self.answers, self.jobs, self.batches
        metrics.watch_jobs(lambda: self.jobs.running)
        metrics.running_batches.set_function(lambda: self.batches.running)
        metrics.prime(tasks)
        metrics.watch_breaker("conductor-gateway", lambda: service.gateway.breaker.state)
        metrics.watch_breaker("crm-backend", lambda: service.crm.breaker.state)
        metrics.gateway_in_flight.set_function(lambda: service.gateway.bulkhead.in_flight)

    async def stop(self) -> None:
        # First at shutdown, and awaited: a task still running when the Redis pools close would
        # open a connection nobody closes (a cancel can be lost on Python 3.11: adapter/stopping.py).
        left = await cancel_and_wait(lambda: [*self.cache.background(), *self.jobs.background(), *self.batches.background(),
                                              *self.threads.background()], timeout=STOP_TIMEOUT)
        if left:
            log.warning("shutdown.tasks_left", tasks=sorted(t.get_name() for t in left), waited_s=STOP_TIMEOUT)
        self.cache.cancel_flights()
        self.jobs.cancel_all()
        self.batches.stop()


class Serving:
    """What the web layer holds for requests: open-stream places, job tokens, the CRM proxy."""

    def __init__(self, settings: Settings, metrics: Metrics, upstreams: Upstreams) -> None:
        self._settings, self._metrics, self._upstreams = settings, metrics, upstreams

    async def start(self, state: State) -> None:
        s = self._settings
        max_streams, fd_limit = stream_limit(s)
        if max_streams < s.max_streams:
            log.warning("streams.capped", max_streams=max_streams, fd_limit=fd_limit,
                        detail=f"MAX_STREAMS={s.max_streams} lowered to what the file-descriptor limit leaves "
                               "after the upstream pools; raise `ulimit -n` (nofile) to open more")
        state.streams = StreamSlots(s.max_streams_per_user, max_streams, self._metrics.limit_refusals)
        state.tokens = JobTokens(s.job_token_secret, s.job_token_ttl, previous=s.job_token_secret_previous)
        state.proxy = (Proxy(self._upstreams.proxy_http, Forwarding(s.forwarders))  # type: ignore[arg-type]
                       if s.crm_proxy_fallthrough else None)

    async def stop(self) -> None:
        return None


def assemble(settings: Settings, metrics: Metrics, tracing: Tracing, tasks: Registry, *,
             gateway_http: httpx.AsyncClient | None = None, crm_http: httpx.AsyncClient | None = None,
             proxy_http: httpx.AsyncClient | None = None, store: Store | None = None,
             clock: Callable[[], float] = time.time, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> Assembly:
    upstreams = Upstreams(settings, tracing, gateway_http=gateway_http, crm_http=crm_http, proxy_http=proxy_http)
    storage = Storage(settings, metrics, tasks, store=store, clock=clock, sleep=sleep)
    notifications = Notifications(settings, metrics, storage, consumer=replica_id(), clock=clock)
    pipeline = Pipeline(settings, metrics, tracing, tasks, upstreams, storage, notifications, clock=clock)
    return Assembly(upstreams, storage, notifications, pipeline, Serving(settings, metrics, upstreams))
