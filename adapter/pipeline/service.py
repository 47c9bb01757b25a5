"""The steps of one AI task that every caller shares: the CRM check, render and key (`prepare`),
admission, validation and repair (`validated`), and the write-back.

answers.py puts them together, with the cache's rules, into the one way to get an answer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ..tasks import Registry, Task
from .cache import ResultCache, cache_key
from ..upstreams.crm import CrmClient
from ..errors import AdapterError, InvalidAgentOutput
from ..upstreams.gateway import GatewayClient, ProviderPlan
from ..metrics import Metrics
from ..notify.notifier import Notifier
from ..storage.keys import CacheKey
from ..storage.ratelimit import CRM_READS, RateLimiter
from ..settings import Settings
from ..tasks.prompting import repair_input
from ..tasks.reading import OutputInvalid, rules
from ..tracing import Tracing

log = structlog.get_logger("adapter.service")


@dataclass(frozen=True, slots=True)
class InConversation:
    """A question asked inside a Conductor conversation (a thread's turn): the run names it, so the
    Conductor replays its history; `keep` appends the validated answer to it. Kept by the one call
    that made the answer, after validation: never for an invalid answer, never by a repair call
    (repairs name no conversation), never once per caller that joined the call."""

    conversation_id: str
    keep: Callable[[Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A question ready for the model: the caller may read its record, and it has its cache key."""

    task: Task
    record_id: str
    agent_input: str
    key: CacheKey
    user: str = ""  # whose budget its model call spends ("" for a job taken over: nobody's)
    # The caller's token, for the write-back: held in memory by whoever asks, never stored or logged
    # (None for a log taken over from another replica, which never had it).
    authorization: str | None = None
    conversation: InConversation | None = None  # a thread's turn: the conversation its run names


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


class AiService:
    def __init__(
        self,
        *,
        tasks: Registry,
        gateway: GatewayClient,
        crm: CrmClient,
        cache: ResultCache,
        settings: Settings,
        metrics: Metrics | None = None,
        limiter: RateLimiter | None = None,
        today: Callable[[], dt.date] = _today,
        tracing: Tracing | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.tracing = tracing or Tracing()
        self.metrics = metrics or Metrics()
        self.limiter = limiter
        self.tasks = tasks
        self.gateway = gateway
        self.crm = crm
        self.cache = cache
        self.settings = settings
        self._today = today
        # Notifications (adapter/notify): told of each record read and each fresh answer, nothing else.
        self.notifier = notifier or Notifier.off(settings)

    async def prepare(self, task: Task, request: Any, authorization: str, user: str = "", *,
                      background: bool = False) -> Prepared:
        """Read the record as the caller (the backend's refusal ends it here), render the input, key it.

        The one key derivation of both paths: the cache is consulted only after this. The read
        spends a token of the user's CRM_READS_PER_USER bucket (`background`: wait for one).
        """
        record_id = getattr(request, task.id_field)
        await self.admit_read(user, background=background)
        with self.tracing.span("crm.lookup", **{"crm.record.kind": task.record_kind, "crm.record.id": record_id}):
            record = await self.crm.get_record(task.record_kind, record_id, authorization)
        self.notifier.remember(task, record_id, record)
        agent_input = task.render(record, request, self._today())
        return Prepared(task, record_id, agent_input, self.key_for(task, record_id, agent_input), user, authorization)

    def key_for(self, task: Task, record_id: str, agent_input: str) -> CacheKey:
        """The cache key of this question (`prepare` derives it; a log taken over, which keeps the rendered
        input but never the caller's token, derives it here too: `prepared_again`)."""
        return cache_key(self.settings.cache_prefix, task.name, task.agent_id, task.version, record_id, agent_input)

    def prepared_again(self, task: Task, record_id: str, agent_input: str, key: CacheKey | None = None,
                       user: str = "") -> Prepared:
        """A question a replica took over: its rendered input was kept (the record is not read again,
        nobody's token is at hand), its key derived as `prepare` derives it."""
        return Prepared(task, record_id, agent_input, key or self.key_for(task, record_id, agent_input), user, None)

    async def admit(self, task_name: str, user: str) -> None:
        """Spend the user's token for a model call (raises RateLimited)."""
        if self.limiter is not None and user:
            try:
                await self.limiter.take(task_name, user)
            except AdapterError:
                self.metrics.rate_limited.labels(task_name).inc()
                raise

    async def admit_read(self, user: str, *, background: bool = False) -> None:
        """Spend the user's token for a CRM record read: an interactive request is refused (RateLimited),
        background work waits, leaving a quarter of the bucket to the user's interactive requests."""
        if self.limiter is None or not user:
            return
        if background:
            await self.limiter.wait(CRM_READS, user, reserve=self.limiter.reserve_for(CRM_READS),
                                    on_wait=self.metrics.rate_limited.labels(CRM_READS).inc)
            return
        try:
            await self.limiter.take(CRM_READS, user)
        except AdapterError:
            self.metrics.rate_limited.labels(CRM_READS).inc()
            raise

    async def write_back(self, prepared: Prepared, result: Any, x_cache: str = "MISS") -> str | None:
        """The task's write-back of an answer onto its record: ok, failed or skipped.

        None for a task without one. Only a fresh answer is written: a cached one was written when it
        was made, and a stale one must not overwrite what the CRM holds now. With the caller's own
        token, so the backend still decides; a failure never fails the answer.
        """
        task, record_id, authorization = prepared.task, prepared.record_id, prepared.authorization
        if task.write_back is None:
            return None
        reason = ("CRM_WRITE_BACK is off" if not self.settings.crm_write_back
                  else f"{x_cache.lower()} answer" if x_cache in ("HIT", "STALE")
                  else "job taken over by another replica: the creator's token is never stored" if authorization is None
                  else "the answer could not be read back" if result is None
                  else None)
        if reason is not None:
            self.metrics.write_backs.labels("skipped").inc()
            log.info("crm.write_back", record_id=record_id, task=task.name, outcome="skipped", reason=reason)
            return "skipped"
        try:
            with self.tracing.span("crm.write_back", **{"crm.record.id": record_id}):
                await self.crm.patch_record(task.record_kind, record_id, authorization, task.write_back(result))  # type: ignore[arg-type]
        except AdapterError as exc:
            log.warning("crm.write_back", record_id=record_id, task=task.name, outcome="failed", reason=exc.detail,
                        status=exc.status)
            self.metrics.write_backs.labels("failed").inc()
            return "failed"
        log.info("crm.write_back", record_id=record_id, task=task.name, outcome="ok")
        self.metrics.write_backs.labels("ok").inc()
        return "ok"

    def gateway_span(self, task: Task, attempt: int, plan: ProviderPlan, *, stream: bool = False):  # noqa: ANN201
        """One agent call: attempt 1 is the answer, later ones repair it (the gateway's own retries are its client spans).

        The provider is the one the call starts on; a fallback inside it shows in the metrics and `X-AI-Provider`.
        """
        return self.tracing.span("gateway.call", **{
            "gateway.agent": task.agent_id, "gateway.attempt": attempt, "gateway.repair": attempt > 1,
            "gateway.provider": plan.current or "default", "gateway.stream": stream})

    async def validated(self, task: Task, record_id: str, agent_input: str, text: str,
                        on_repair: Callable[[int], None] | None = None, *, plan: ProviderPlan | None = None) -> Any:
        """Validate the model's text; output breaking the contract gets `agent_repair_attempts` repair calls.

        Guidance breaches are logged and counted here, once per answer the model gave; never repaired.
        Repairs use the provider that answered (`plan`), and the result names it.
        """
        plan = plan or self.gateway.plan()
        errors: list[str] = []
        for attempt in range(1 + self.settings.agent_repair_attempts):
            if attempt:
                if on_repair is not None:
                    on_repair(attempt)
                # Contract errors only: guidance never reaches the repair prompt (OutputInvalid has none).
                with self.gateway_span(task, attempt + 1, plan):
                    text = await self.gateway.execute(task.agent_id, repair_input(agent_input, text, errors), plan)
            try:
                verdict = task.validate(text, record_id, task.agent_id)
            except OutputInvalid as exc:
                errors = exc.errors
                self.metrics.agent_output.labels(task.agent_id, "invalid").inc()
                log.warning("agent.output_invalid", agent=task.agent_id, attempt=attempt + 1, errors=errors)
                continue
            if verdict.corrected:
                self.metrics.agent_output.labels(task.agent_id, "corrected").inc()
                log.info("agent.classification_corrected", agent=task.agent_id)
            if verdict.normalised:
                self.metrics.agent_output.labels(task.agent_id, "normalised").inc()
                log.info("agent.output_normalised", agent=task.agent_id, changes=list(verdict.normalised))
            if verdict.warnings:
                for rule in rules(verdict.warnings):
                    self.metrics.agent_guidance.labels(task.agent_id, rule).inc()
                log.info("agent.guidance", agent=task.agent_id, rules=rules(verdict.warnings),
                         details=[b.detail for b in verdict.warnings])
            if attempt:
                log.info("agent.output_repaired", agent=task.agent_id, attempts=attempt + 1)
            self.metrics.agent_output.labels(task.agent_id, "repaired" if attempt else "valid").inc()
            verdict.result.provider = plan.current
            # The fresh-answer point: before the answer is stored, so a stored answer has its events in the outbox.
            await self.notifier.answered(task, record_id, verdict.result)
            return verdict.result
        attempts = 1 + self.settings.agent_repair_attempts
        self.metrics.agent_output.labels(task.agent_id, "failed").inc()
        raise InvalidAgentOutput(
            f"agent {task.agent_id} answered invalid output {attempts} time(s); last problem: {'; '.join(errors)}",
            errors=errors,
        )
