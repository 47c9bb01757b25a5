"""Notifications as the app opens them: the outbox, the sinks, the notifier and the worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AsyncExitStack

import structlog

from ..metrics import Metrics
from ..settings import ConfigError, Settings, redact_url
from ..storage.signing import Signer, Tampering
from .notifier import Notifier
from .outbox import MemoryOutbox, RedisOutbox
from .sinks import CrmNotifications, Webhook, webhook_session
from .worker import Worker

log = structlog.get_logger("adapter.notify")


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
