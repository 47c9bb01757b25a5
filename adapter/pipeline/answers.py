"""One way to get an answer: `Answers.ask`, for the synchronous routes, jobs, batches (and next, thread turns).

`ask(prepared, mode=..., priority=..., delivery=...)` owns the whole policy, in this order:
the cache lookup (a fresh answer is a hit), single flight (joining a call in the air is free),
admission (the user's rate limit: an interactive caller is refused, background work waits), the
gateway call with its provider fallback, validation and repair, stale-if-error (a model-side fault
within the grace serves the stale answer), the answer's warnings and provider, the task's
write-back, and the fresh-answer hook point (`on_fresh`: whatever else a fresh answer sets off).

Callers differ only in how they deliver (`Delivery`): the synchronous route renders the `Answer`;
a job streams progress (`event`), learns as soon as the cache decided (`decided`: its 202 or its
stream's headers go out then) and emits `result` and `done` before the write-back (`answered`); a
batch item waits for its user's budget (`priority="background"`) and yields to interactive calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import structlog

from ..errors import UpstreamTimeout
from ..tasks import Task
from ..tasks.reading import rules
from ..upstreams.resilience import BACKGROUND, Background
from .cache import STALE_ON, Kept, Mode, XCache
from .service import AiService, Prepared

log = structlog.get_logger("adapter.service")
_encode = msgspec.json.Encoder().encode
Priority = Literal["interactive", "background"]


@dataclass(frozen=True, slots=True)
class Policy:
    """What the cache does for one ask. The request's `cache` mode picks one (`POLICIES`)."""

    lookup: bool  # a fresh stored answer is served (HIT)
    store: bool  # the fresh answer is kept for the next caller
    share: bool  # single flight: identical questions in the air make one model call (also across replicas)
    stale: bool  # stale-if-error: a stored answer within the grace stands in for a model-side fault


POLICIES: dict[str, Policy] = {
    "default": Policy(lookup=True, store=True, share=True, stale=True),
    "no-cache": Policy(lookup=False, store=True, share=True, stale=False),
    "no-store": Policy(lookup=False, store=False, share=False, stale=False),
}
# A thread's turn: its answer depends on the conversation so far, so nothing is looked up or kept;
# an identical turn in the air is still joined, and the user's rate limit still applies.
TURN = Policy(lookup=False, store=False, share=True, stale=False)


@dataclass(slots=True)
class Answer:
    """An answer as served: `web` renders it, a job streams it, a batch records it. Decoded once."""

    task: Task
    body: bytes  # the encoded result, as stored and as the synchronous route answers it
    result: Any  # the decoded result (None only for a stored body that no longer decodes)
    x_cache: XCache
    age: int | None = None
    warnings: list[str] = field(default_factory=list)  # the guidance rules it breaches (X-Agent-Warnings)
    write_back: str | None = None  # ok, failed or skipped; None for a task without one

    @property
    def provider(self) -> str | None:
        return getattr(self.result, "provider", None) if self.result is not None else None

    @property
    def cached(self) -> bool:
        return self.x_cache in ("HIT", "STALE")

    @property
    def headers(self) -> dict[str, str]:
        """X-Cache, Age, X-AI-Provider, X-Agent-Warnings and X-CRM-Write-Back."""
        headers = {"X-Cache": self.x_cache}
        if self.age is not None:
            headers["Age"] = str(self.age)
        if self.provider:
            headers["X-AI-Provider"] = self.provider
        if self.warnings:
            headers["X-Agent-Warnings"] = ", ".join(self.warnings)
        if self.write_back is not None:
            headers["X-CRM-Write-Back"] = self.write_back
        return headers

    @property
    def event(self) -> bytes:
        """A stream's `result` data: the body, plus `warnings` (the X-Agent-Warnings list) when there are any."""
        if not self.warnings:
            return self.body
        # The body is a JSON object we encoded: close it with one more member instead of re-encoding it.
        return self.body[:-1] + b',"warnings":' + _encode(self.warnings) + b"}"

    @classmethod
    def of(cls, task: Task, body: bytes, result: Any, x_cache: XCache, age: int | None = None) -> Answer:
        """The answer a body stands for: decoded here only when nobody has its result yet (a hit
        decodes in the cache's check; a fresh answer is the result itself). Guidance is recomputed
        rather than stored: a pure function of the result, the same on a hit, a stale answer, a
        coalesced caller and another replica's job, whatever the cache's entries hold."""
        if result is None:
            result = task.reread(body)
        warnings = rules(task.guidance(result)) if result is not None else []
        return cls(task, body, result, x_cache, age, warnings)


class Delivery:
    """How a caller takes the answer's progress; the synchronous route takes none of it."""

    streams = False  # the model's progress is worth streaming (a job's events): the gateway is asked for a stream
    traced = False  # the cache decision is a span of its own (a request's trace; a job's run is its span)

    def decided(self, x_cache: XCache) -> None:
        """The cache decided (a hit, a call joined, or one admitted); the answer is not there yet."""

    def event(self, name: str, data: Any) -> None:
        """Progress: `status` {state, message}, `delta` {text}."""

    def answered(self, answer: Answer) -> None:
        """The answer, before the write-back and the fresh-answer hook."""


class Traced(Delivery):
    traced = True


SYNC = Traced()  # the synchronous route's
# What else a fresh answer sets off, after the write-back: awaited in order, errors logged. Notifications are not
# here: this runs after the answer is stored (and for each caller that joined the call), so a replica dying in
# between would lose the event; theirs is written where the answer is validated, before it is stored
# (AiService.validated -> notifier.answered, adapter/notify/notifier.py).
FreshHook = Callable[[Prepared, Answer], Awaitable[None]]


class Answers:
    def __init__(self, service: AiService) -> None:
        self.service = service
        self.cache = service.cache
        self.settings = service.settings
        self.metrics = service.metrics
        self.on_fresh: list[FreshHook] = []

    async def ask(self, prepared: Prepared, *, mode: Mode | Policy = "default", priority: Priority = "interactive",
                  delivery: Delivery = SYNC, resumed: bool = False, owned: bool = False, deadline: float | None = None,
                  admitted: bool = False) -> Answer:
        """The answer to a prepared question, under the cache policy of `mode` (or a `Policy`: `TURN`).

        `resumed`: asked again by a replica that took a log over (the dead runner's cross-process lock
        on the question is not waited out). `owned`: a log's runner owns the call it makes (it stops with
        the runner). `deadline`: seconds for the whole answer (a job's JOB_MAX_SECONDS), a model-side fault
        past which a stale answer may still serve. `admitted`: the caller already asked `hit` and `admit`
        (a job does, so that its 202 says HIT or MISS, and a 429 comes before any job exists).
        """
        policy = POLICIES[mode] if isinstance(mode, str) else mode
        if priority == "background":
            # Its model call yields to interactive ones at the bulkhead, until an interactive request
            # joins that very call (resilience.Background): set in the caller's own task.
            BACKGROUND.set(Background())
        if delivery.traced:
            with self.service.tracing.span("cache", **{"cache.task": prepared.task.name,
                                                       "cache.mode": mode if isinstance(mode, str) else "policy"}) as span:
                answer = await self._ask(prepared, policy, priority, delivery, resumed, owned, deadline, admitted)
                span.set_attribute("cache.result", answer.x_cache)  # HIT, MISS, STALE or BYPASS
        else:
            answer = await self._ask(prepared, policy, priority, delivery, resumed, owned, deadline, admitted)
        return await self.deliver(prepared, answer, delivery)

    async def hit(self, prepared: Prepared, mode: Mode | Policy = "default") -> Answer | None:
        """A fresh stored answer, where the policy looks one up."""
        policy = POLICIES[mode] if isinstance(mode, str) else mode
        ttl = self.settings.ttl_for(prepared.task)
        if policy.lookup and (kept := await self.cache.get(prepared.key)) is not None and self.cache.is_fresh(kept, ttl):
            return Answer.of(prepared.task, kept.body, kept.result, "HIT", self.cache.age(kept))
        return None

    async def admit(self, prepared: Prepared, priority: Priority = "interactive") -> None:
        """Admission for a model call: free when one for the same question is in the air here (it is joined)."""
        if not self.cache.in_flight(prepared.key):
            await self._admit(prepared, priority)

    async def deliver(self, prepared: Prepared, answer: Answer, delivery: Delivery = SYNC) -> Answer:
        """Hand the answer over, then its write-back and the fresh-answer hook point."""
        self.metrics.cache.labels(prepared.task.name, answer.x_cache.lower()).inc()
        delivery.answered(answer)
        await self._hooks(prepared, answer)
        return answer

    async def _ask(self, prepared: Prepared, policy: Policy, priority: Priority, delivery: Delivery, resumed: bool,
                   owned: bool, deadline: float | None, admitted: bool) -> Answer:
        task, key, cache = prepared.task, prepared.key, self.cache
        ttl = self.settings.ttl_for(task)
        stale: Kept | None = None
        looked = policy.lookup and not admitted
        if looked and (kept := await cache.get(key)) is not None:
            if cache.is_fresh(kept, ttl):
                delivery.decided("HIT")
                return Answer.of(task, kept.body, kept.result, "HIT", cache.age(kept))
            if policy.stale and cache.is_usable_stale(kept, ttl):
                stale = kept
        made: list[Any] = []  # the result this caller's own call made: served without decoding its body

        async def compute() -> bytes:
            result = await self._produce(prepared, delivery)
            made.append(result)
            return _encode(result)

        async def admit() -> None:
            await self._admit(prepared, priority)

        x_cache: XCache
        try:
            async with _within(deadline):
                if not policy.share:
                    if not admitted:
                        await admit()
                    delivery.decided("BYPASS")
                    body, x_cache = await compute(), "BYPASS"
                else:
                    flight = None if admitted else await cache.take_off(key, ttl, admit, recheck=policy.lookup)
                    if isinstance(flight, Kept):
                        delivery.decided("HIT")
                        return Answer.of(task, flight.body, flight.result, "HIT", cache.age(flight))
                    delivery.decided("MISS")
                    body = await cache.ride(key, ttl, compute, flight, coordinate=not resumed, keep=policy.store,
                                            owned=owned, on_join=lambda: delivery.event("status", _SHARING))
                    x_cache = "MISS"
        except STALE_ON as exc:
            if policy.stale and not looked and (kept := await cache.get(key)) is not None and cache.is_usable_stale(kept, ttl):
                stale = kept  # not looked up before the call (a job's start did): looked up now
            if stale is None:
                raise
            log.info("answer.stale", task=task.name, reason=exc.slug, age_s=cache.age(stale))
            return Answer.of(task, stale.body, stale.result, "STALE", cache.age(stale))
        return Answer.of(task, body, made[0] if made else None, x_cache)

    async def _admit(self, prepared: Prepared, priority: Priority) -> None:
        """A model call spends a token of the user's budget. Interactive: refused at once (RateLimited).
        Background: waits for one, leaving a quarter of the budget to the user's interactive requests."""
        service, name, user = self.service, prepared.task.name, prepared.user
        if priority == "interactive":
            await service.admit(name, user)
            return
        limiter = service.limiter
        if limiter is None or not user:
            return
        await limiter.wait(name, user, reserve=limiter.reserve_for(name), on_wait=self.metrics.rate_limited.labels(name).inc)

    async def _produce(self, prepared: Prepared, delivery: Delivery) -> Any:
        """The model's validated result: the gateway call (streamed for a delivery that shows progress),
        with its provider fallback, then validation and repair."""
        service, task = self.service, prepared.task
        gateway = service.gateway
        plan = gateway.plan()
        # A thread's turn names its conversation: the Conductor replays the history into the run.
        conversation_id = prepared.conversation.conversation_id if prepared.conversation is not None else None
        if delivery.streams:
            async with gateway.guarded():
                delivery.event("status", {"state": "running", "message": "starting the agent"})
                with service.gateway_span(task, 1, plan, stream=True):
                    text = await gateway.stream_run(task.agent_id, prepared.agent_input, plan, delivery.event,
                                                    conversation_id=conversation_id)
            delivery.event("status", {"state": "validating", "message": "validating the agent's answer"})
        else:
            with service.gateway_span(task, 1, plan):
                text = await gateway.execute(task.agent_id, prepared.agent_input, plan, conversation_id=conversation_id)

        def repairing(attempt: int) -> None:
            delivery.event("status", {"state": "running", "message": f"repairing invalid output (attempt {attempt + 1})"})

        # Repairs name no conversation (service.validated): nothing but a validated answer reaches its history.
        result = await service.validated(task, prepared.record_id, prepared.agent_input, text, on_repair=repairing, plan=plan)
        if prepared.conversation is not None:
            # Inside the call: one append per answer made, whoever joined it; an append that fails fails the turn.
            await prepared.conversation.keep(result)
        return result

    async def _hooks(self, prepared: Prepared, answer: Answer) -> None:
        """The task's write-back (its outcome goes with the answer), then the fresh-answer hook point."""
        if prepared.conversation is None:  # a thread's turn is a draft in a conversation: never written onto the record
            answer.write_back = await self.service.write_back(prepared, answer.result, answer.x_cache)
        if answer.cached:
            return
        for hook in self.on_fresh:
            try:
                await hook(prepared, answer)
            except Exception as exc:  # what a fresh answer sets off never fails the answer
                log.error("answer.hook_failed", task=prepared.task.name, hook=getattr(hook, "__qualname__", repr(hook)),
                          exc_info=exc)


_SHARING = {"state": "running", "message": "an identical request is already asking the agent: sharing its answer"}


@asynccontextmanager
async def _within(deadline: float | None) -> AsyncIterator[None]:
    """The answer's deadline; past it, an UpstreamTimeout (which stale-if-error may answer)."""
    if deadline is None:
        yield
        return
    try:
        async with asyncio.timeout(deadline):
            yield
    except TimeoutError:
        raise UpstreamTimeout("job", deadline, "job-timeout") from None
