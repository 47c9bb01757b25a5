"""Notifications as the app opens them: the outbox, the sinks, the notifier and the worker.

`Notifications` is one of the app's parts (adapter/assembly.py): started after Storage (it writes to
its Redis) and before Pipeline (whose AiService tells the notifier); stopped after Pipeline (no more
answers, so no more events) and before Storage closes the Redis pools its worker uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import structlog

from ..metrics import Metrics
from ..stopping import cancel_and_wait
from ..settings import ConfigError, Settings, redact_url
from ..storage.signing import Signer, Tampering
from .notifier import Notifier
from .outbox import MemoryOutbox, RedisOutbox
from .sinks import CrmNotifications, Webhook, webhook_session
from .worker import Worker

log = structlog.get_logger("adapter.notify")
STOP_TIMEOUT = 5.0  # seconds shutdown waits for the worker it cancelled, before its clients close


def configured(settings: Settings) -> bool:
    return bool(settings.crm_notifications_mongodb_uri or settings.webhook_targets[0])


async def open_notifications(settings: Settings, stack: AsyncExitStack, metrics: Metrics, *, redis: object | None,
                             signer: Signer | None, tampering: Tampering, consumer: str,
                             clock: Callable[[], float] = time.time) -> tuple[Notifier, Worker | None]:
    """Nothing at all without a sink; else the outbox (Redis's when there is one) and a worker on this replica."""
    if not configured(settings):
        return Notifier.off(settings), None
    if redis is not None and signer is not None:
        outbox: RedisOutbox | MemoryOutbox = RedisOutbox(redis, prefix=settings.cache_prefix, signer=signer,  # type: ignore[arg-type]
                                                         tampering=tampering, claim_idle=settings.notify_claim_idle_seconds,
                                                         clock=clock)
    else:
        outbox = MemoryOutbox(clock=clock)
    sinks = {}
    if settings.crm_notifications_mongodb_uri:
        crm = CrmNotifications(settings.crm_notifications_mongodb_uri, timeout=settings.webhook_timeout)
        stack.push_async_callback(crm.aclose)
        sinks[crm.name] = crm
    urls, keys = settings.webhook_targets
    if urls:
        http = webhook_session(settings.webhook_timeout, settings.upstream_keepalive_expiry)
        stack.push_async_callback(http.close)
        for url in urls:
            hook = Webhook(url, keys, http, clock)
            sinks[hook.name] = hook
    log.info("notify.configured", durable=outbox.durable, sinks=sorted(sinks),
             **({"mongodb": redact_url(settings.crm_notifications_mongodb_uri)} if settings.crm_notifications_mongodb_uri else {}))
    return Notifier(outbox, settings, metrics, clock=clock), Worker(outbox, sinks, settings, metrics, consumer, clock=clock)


def check_notifications(settings: Settings, tasks: object) -> None:
    """NOTIFY_TRIGGERS_OFF must name triggers (a typo would leave one on that the operator meant off);
    webhooks need a secret (every delivery is signed)."""
    from .triggers import BATCH_FINISHED

    urls, keys = settings.webhook_targets
    if urls and not keys:
        raise ConfigError("WEBHOOK_SECRETS: at least one `whsec_` secret is needed when WEBHOOK_URLS is set (every delivery is signed)")
    known = {t.name for task in tasks.values() for t in task.triggers} | {BATCH_FINISHED}  # type: ignore[attr-defined]
    if wrong := sorted(settings.notify_off - known):
        raise ConfigError(f"NOTIFY_TRIGGERS_OFF: {', '.join(wrong)} is no trigger (triggers: {', '.join(sorted(known))})")


class Notifications:
    """The app's part for notifications: `notifier` for the pipeline, and this replica's delivery worker."""

    def __init__(self, settings: Settings, metrics: Metrics, storage: Any, *, consumer: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings, self._metrics, self._storage, self._consumer, self._clock = settings, metrics, storage, consumer, clock
        self._stack = AsyncExitStack()
        self.notifier = Notifier.off(settings)
        self.worker: Worker | None = None

    async def start(self, state: Any) -> None:
        redis = self._storage.redis  # the RedisStore, or None in one process
        self.notifier, self.worker = await open_notifications(
            self._settings, self._stack, self._metrics, redis=redis.redis if redis is not None else None,
            signer=redis.signer if redis is not None else None, tampering=self._storage.tampering,
            consumer=self._consumer, clock=self._clock)
        if self.worker is not None:
            self.worker.start()

    async def stop(self) -> None:
        if self.worker is not None:
            left = await cancel_and_wait(self.worker.background, timeout=STOP_TIMEOUT)
            if left:
                log.warning("shutdown.tasks_left", tasks=sorted(t.get_name() for t in left), waited_s=STOP_TIMEOUT)
        await self._stack.aclose()
