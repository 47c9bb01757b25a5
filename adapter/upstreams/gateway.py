"""Client of the Conductor Gateway: agent runs (synchronous and streamed), discovery, the agent registry.

What the real gateway does on the wire, and what this module does about it
(measured against its code; see the README's "The real Conductor stack"):

- Every run needs `input_text`, `instance_id`, `conversation_id` and `cwd`, and the
  Conductor API behind it refuses a task without `screenplay_id`. All are sent.
- The gateway retries the Conductor API itself (3 tries, 1 s and 3 s apart), so this
  client retries only what cannot have started a model run: a refused connection, and
  the gateway's 503 "MongoDB connection not available" (once). Anything else it answers
  is final: a 500 carries the Conductor's own refusal and is a 502 here, never a 503.
- A synchronous run leaves an `agent_instances` document behind; it is deleted after.
- The real stream has no tokens: `task_started`, one `status_update`, then `result` or
  `error`. A `result` whose status is error/failed, or whose exit code is not 0, is a
  failed run, never model text.
- A job's stream is readable once: after the run ends, or if our reader drops, the gateway
  answers 404. A stream lost before its outcome is recovered by one synchronous run.
- With several providers (`CONDUCTOR_AI_PROVIDER=claude,gemini`), a run that failed or
  timed out is tried once more on the next one.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx
import msgspec
import structlog
from httpx_sse import SSEError, aconnect_sse

from ..context import outbound_headers
from ..errors import (
    AdapterError,
    AgentFailed,
    AgentMissing,
    GatewayBusy,
    GatewayCircuitOpen,
    GatewayProtocolError,
    GatewayRejected,
    GatewayUnavailable,
    UpstreamTimeout,
)
from ..metrics import Metrics
from .resilience import Bulkhead, CircuitBreaker, retrying
from .http import UNREADABLE, detail_of, transport_error, what_happened
from .sse_read import sse_data
from .transport import Reply, TooLarge, direct, exchange
from ..settings import Settings

log = structlog.get_logger("adapter.gateway")
UPSTREAM = "Conductor Gateway"
# The only 503 that means "nothing was started": the gateway could not even look the agent up.
_DB_DOWN = "MongoDB connection not available"
# Internal addresses in the gateway's error texts (upstream text: hostile). A scheme is read from the start
# of its run of scheme characters only (the lookbehind) and possessively, so each run is read once: reading
# it again from every `\b` in it made `"a." * 8000` take 0.5 s (2.4 s in issue 22's report), 64 KiB 8 s. The
# whole run goes (`x.http://` too).
_URL = re.compile(r"(?<![a-z0-9+.-])[a-z0-9+.-]++://[^\s'\"<>)\]}]++|\b\d{1,3}(?:\.\d{1,3}){3}:\d{2,5}\b", re.IGNORECASE)
# What `_URL` reads of one text: every caller keeps at most 500 characters of what it returns.
URL_SCAN_MAX = 16 * 1024
# The most of one gateway answer read into memory (decoded; a compressed one counts as it inflates).
# A run's text is refused beyond MAX_TEXT (256 KiB) anyway; JSON escapes and a run document holding
# it twice (result and stdout) stay far below this. A longer answer is a 502, read no further.
BODY_MAX = 4 * 1024 * 1024
# How much of a streamed run's progress (its tokens and status messages, each counted with 64 characters
# of overhead) becomes the job's events: each is kept in memory and in Redis for the job's life, and a
# gateway could send any number. Past it, progress is dropped; the run's result still ends the stream.
PROGRESS_MAX = 512 * 1024
# A 500 that is the gateway's own database (pymongo gave up after 30 s), not a refusal: it passes.
_DB_FAULT = re.compile(r"ServerSelectionTimeout|Topology Description|Connection refused|No servers found|"
                       r"connection closed|timed out", re.IGNORECASE)
_FAILED = frozenset({"error", "failed"})

OnEvent = Callable[[str, Any], None]


class _RunDocument(msgspec.Struct):
    """The Conductor's run document inside an execute answer (or a stream's `result`); unknown keys ignored."""

    status: str | None = None
    result: Any = None
    stdout: str | None = None
    stderr: str | None = None
    error: str | None = None
    message: str | None = None
    exit_code: int | None = None


class _Execute(msgspec.Struct):
    status: str | None = None
    result: _RunDocument | None = None
    detail: Any = None


_decode_execute = msgspec.json.Decoder(_Execute).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def client_timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(connect=settings.gateway_connect_timeout, read=settings.gateway_read_timeout, write=30.0, pool=10.0)


class ProviderPlan:
    """The providers one request's runs may use: the first listed and, once, the next.

    Repair calls keep the provider that answered last. An empty plan sends no
    `ai_provider`, leaving the choice to the gateway.
    """

    __slots__ = ("_providers", "_index")

    def __init__(self, providers: Sequence[str] = ()) -> None:
        self._providers = tuple(providers)
        self._index = 0

    @property
    def current(self) -> str | None:
        return self._providers[self._index] if self._providers else None

    def advance(self) -> bool:
        if self._index or len(self._providers) < 2:
            return False
        self._index = 1
        return True


class _Refused503(Exception):
    """The gateway's database is down: it did not start the agent, so one retry is safe."""

    def __init__(self, response: Reply) -> None:
        super().__init__("503")
        self.response = response


class _StreamLost(Exception):
    """The gateway's job stream is gone before its outcome (404, broken off, closed early)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def redacted(text: str, limit: int) -> str:
    """At most `limit` characters of an upstream's text, its internal URLs replaced."""
    return _URL.sub("<internal URL>", text[:URL_SCAN_MAX])[:limit]


def public_detail(response: Reply) -> str:
    """The gateway's `detail`, with the Conductor API's own words unwrapped and no internal URL."""
    detail = detail_of(response)
    # "Conductor API error: {\"detail\": \"... Campo 'screenplay_id' é obrigatório ...\"}"
    head, brace, rest = detail.partition("{")
    if brace:
        try:
            nested = _decode_any(("{" + rest).encode())
        except UNREADABLE:
            nested = None
        if isinstance(nested, dict) and nested.get("detail") is not None:
            inner = nested["detail"]
            detail = f"{head.strip()} {inner if isinstance(inner, str) else _encode(inner).decode()}".strip()
    return redacted(detail, 500)


def run_text(agent_id: str, run: _RunDocument) -> str:
    """The model's text from a finished run; a failed run raises AgentFailed."""
    if (run.status or "").lower() in _FAILED or (run.exit_code or 0) != 0:
        text = run.result if isinstance(run.result, str) else None
        reason = run.error or run.stderr or text or run.message or "no reason given"
        raise AgentFailed(f"agent {agent_id} failed (exit code {run.exit_code}): {redacted(reason, 300)}")
    text = run.result if run.result not in (None, "") else run.stdout
    if isinstance(text, (dict, list)):  # some Conductor versions hand back parsed JSON
        return _encode(text).decode()
    return text if isinstance(text, str) else ""


def listed_agents(answer: Any) -> dict[str, dict[str, Any]]:
    """GET /api/agents by agent id, from either shape the gateway answers.

    From its MongoDB: a list of `{"id": <agent_id>, "name": <definition name>, ...}`;
    older gateways add `agent_id` (and then `id` is a Mongo ObjectId). When its MongoDB
    is empty or down it relays the Conductor API's `{"total", "agents": [...]}`. Only
    ids count: execute finds agents by id, and a listed `name` proves nothing.
    """
    if isinstance(answer, dict) and isinstance(answer.get("agents"), list):
        answer = answer["agents"]
    if not isinstance(answer, list):
        raise ValueError("GET /api/agents answered neither a list nor {total, agents}")
    agents = {}
    for entry in answer:
        if isinstance(entry, dict):
            agent_id = entry.get("agent_id") if "agent_id" in entry else entry.get("id")
            if isinstance(agent_id, str) and agent_id:
                agents[agent_id] = entry
    return agents


class GatewayClient:
    def __init__(self, http: httpx.AsyncClient, settings: Settings, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._http = http
        self._settings = settings
        self._metrics = metrics or Metrics()
        self.breaker = CircuitBreaker.of("conductor-gateway", settings, clock)
        self.bulkhead = Bulkhead(settings.gateway_max_concurrency, settings.gateway_queue_timeout)

    def plan(self) -> ProviderPlan:
        return ProviderPlan(self._settings.providers)

    @asynccontextmanager
    async def guarded(self) -> AsyncIterator[None]:
        """Circuit breaker and bulkhead around one agent run (a synchronous call or a whole stream)."""
        if not self.breaker.admit():
            raise GatewayCircuitOpen(self.breaker.describe(UPSTREAM), retry_after=self.breaker.retry_after())
        if not await self.bulkhead.acquire():
            self.breaker.released()
            raise GatewayBusy(f"{self.bulkhead.limit} agent calls are in flight (GATEWAY_MAX_CONCURRENCY); "
                              f"none finished within {self.bulkhead.wait:g} s (GATEWAY_QUEUE_TIMEOUT)")
        try:
            yield
        except (GatewayUnavailable, GatewayRejected, UpstreamTimeout, GatewayProtocolError):
            self.breaker.failed()
            raise
        except BaseException:
            self.breaker.released()  # not the gateway's fault (cancelled, invalid output, ...)
            raise
        else:
            self.breaker.succeeded()
        finally:
            self.bulkhead.release()

    async def _send(self, method: str, path: str, *, content: bytes, headers: dict[str, str],
                    timeout: float | None = None) -> Reply:
        refused = 0

        async def attempt() -> Reply:
            try:
                response = await exchange(self._http, method, path, content=content, headers=headers, timeout=timeout,
                                          limit=BODY_MAX)
            except TooLarge as exc:
                # The gateway's (hostile) answer could otherwise fill the sidecar's memory before any bound on the text applies.
                raise GatewayProtocolError(f"the {UPSTREAM} answered {exc.status_code} with a body of more than "
                                           f"{BODY_MAX // (1024 * 1024)} MiB; read no further") from None
            if response.status_code == 503 and _DB_DOWN in detail_of(response):
                raise _Refused503(response)
            return response

        def retry_on(exc: Exception) -> bool:
            nonlocal refused
            if isinstance(exc, _Refused503):
                refused += 1
                return refused == 1  # its database may be back; a second 503 is the answer
            # Nothing reached the gateway: no model run can have started.
            return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))

        try:
            return await retrying(attempt, attempts=1 + self._settings.upstream_retries, base=self._settings.retry_base_delay,
                                  cap=self._settings.retry_max_delay, retry_on=retry_on)
        except _Refused503 as exc:
            return exc.response

    def _failure(self, exc: Exception) -> AdapterError:
        return transport_error(exc, upstream=UPSTREAM, unavailable=GatewayUnavailable, slug="gateway-timeout",
                               read_timeout=self._http.timeout.read, call_timeout=self._settings.gateway_call_timeout)

    def _body(self, provider: str | None, conversation_id: str | None = None, **prompt: str) -> dict[str, Any]:
        # Fresh instance and conversation ids per run: the Conductor replays a conversation's
        # history whatever `context_mode` says, and one lead's answer must not leak into the next.
        # Only a thread's turn names its conversation (pipeline/threads.py), to have its history replayed.
        s = self._settings
        body: dict[str, Any] = {
            **prompt,
            "context_mode": "stateless",
            "instance_id": f"crm-ai-{uuid.uuid4().hex}",
            "conversation_id": conversation_id or f"crm-ai-{uuid.uuid4().hex}",
            "screenplay_id": s.conductor_screenplay_id,
            "cwd": s.conductor_cwd,
        }
        if provider:
            body["ai_provider"] = provider
        return body

    # --- synchronous runs ---------------------------------------------------------------

    async def execute(self, agent_id: str, input_text: str, plan: ProviderPlan | None = None, *,
                      conversation_id: str | None = None) -> str:
        """Run the agent (guarded) and return the model's text."""
        async with self.guarded():
            return await self.run(agent_id, input_text, plan or self.plan(), conversation_id=conversation_id)

    async def run(self, agent_id: str, input_text: str, plan: ProviderPlan, *, conversation_id: str | None = None) -> str:
        """Synchronous run(s) for a caller already inside `guarded()`, with the provider fallback."""
        while True:
            try:
                return await self._execute(agent_id, input_text, plan.current, conversation_id)
            except (AgentFailed, UpstreamTimeout) as exc:
                if not self._fall_back(agent_id, plan, exc):
                    raise

    def _fall_back(self, agent_id: str, plan: ProviderPlan, exc: AdapterError) -> bool:
        before = plan.current
        if not plan.advance():
            return False
        self._metrics.provider_fallbacks.labels(agent_id, before, plan.current).inc()
        log.warning("gateway.provider_fallback", agent=agent_id, from_provider=before, to_provider=plan.current,
                    reason=exc.slug)
        return True

    async def _execute(self, agent_id: str, input_text: str, provider: str | None, conversation_id: str | None = None) -> str:
        t0 = time.perf_counter()
        outcome = "error"
        body = self._body(provider, conversation_id, input_text=input_text)
        try:
            async with asyncio.timeout(self._settings.gateway_call_timeout):
                response = await self._send(
                    "POST", f"/api/agents/{agent_id}/execute", content=_encode(body),
                    headers={"Content-Type": "application/json", **outbound_headers()},
                )
            outcome = "ok" if response.status_code == 200 else str(response.status_code)
        except (TimeoutError, httpx.TransportError) as exc:
            outcome = "timeout" if isinstance(exc, (TimeoutError, httpx.TimeoutException)) else "unreachable"
            raise self._failure(exc) from None
        finally:
            seconds = time.perf_counter() - t0
            self._metrics.gateway_calls.labels(agent_id, outcome).inc()
            self._metrics.gateway_seconds.labels(agent_id).observe(seconds)
            log.info("gateway.call", agent=agent_id, outcome=outcome, provider=provider, ms=round(seconds * 1000, 1))
        if response.status_code == 200 and self._settings.conductor_cleanup_instances:
            await self._forget_instance(body["instance_id"])
        return _text_of(agent_id, response)

    async def _forget_instance(self, instance_id: str) -> None:
        """Delete the `agent_instances` document the run left; a failure is logged, never raised."""
        try:
            response = await exchange(self._http, "DELETE", f"/api/agents/instances/{instance_id}?hard=true&cascade=true",
                                      headers=outbound_headers(), timeout=self._settings.health_probe_timeout)
            outcome = "ok" if response.status_code < 300 else "failed"
            reason = None if outcome == "ok" else f"{response.status_code}: {public_detail(response)}"
        except httpx.HTTPError as exc:
            outcome, reason = "failed", type(exc).__name__
        self._metrics.instance_cleanups.labels(outcome).inc()
        if reason:
            log.warning("gateway.instance_cleanup", instance_id=instance_id, outcome=outcome, reason=reason)

    # --- streamed runs --------------------------------------------------------------------

    async def stream_run(self, agent_id: str, input_text: str, plan: ProviderPlan, on_event: OnEvent, *,
                         conversation_id: str | None = None) -> str:
        """A streamed run for a caller already inside `guarded()`; the model's text.

        `on_event(name, data)` gets the progress worth showing: `status` {state, message},
        and `delta` {text} from gateways that stream tokens (the real one does not).
        """
        while True:
            try:
                return await self._stream_once(agent_id, input_text, plan.current, on_event, conversation_id)
            except (AgentFailed, UpstreamTimeout) as exc:
                if not self._fall_back(agent_id, plan, exc):
                    raise
                on_event("status", {"state": "running", "message": f"the run failed; trying provider {plan.current}"})

    async def _stream_once(self, agent_id: str, input_text: str, provider: str | None, on_event: OnEvent,
                           conversation_id: str | None = None) -> str:
        job = await self.start_stream(agent_id, input_text, provider, conversation_id=conversation_id)
        relayed = 0  # progress events passed on, and the characters in them: both bounded (PROGRESS_MAX)
        try:
            async with aclosing(self.stream_events(job)) as events:
                async for name, data in events:
                    if name == "result":
                        return run_text(agent_id, _as_run(data))
                    if name == "error":
                        reason = data.get("error") if isinstance(data, dict) else data
                        raise AgentFailed(f"agent {agent_id} failed: {redacted(str(reason), 300)}")
                    if name == "on_llm_new_token":
                        if (piece := _token_text(data)) is not None and (relayed := relayed + 64 + len(piece)) <= PROGRESS_MAX:
                            on_event("delta", {"text": piece})
                    elif name in ("status_update", "task_started"):
                        message = data.get("message") if isinstance(data, dict) else None
                        # Upstream text, shown to the browser: cut and without internal URLs, as the gateway's errors.
                        message = redacted(str(message or "running"), 300)
                        if (relayed := relayed + 64 + len(message)) <= PROGRESS_MAX:
                            on_event("status", {"state": "running", "message": message})
                    # Every other event (on_chain_start, on_tool_end, ...) is noise to the browser.
            reason = "the stream ended without a result"
        except _StreamLost as lost:
            reason = lost.reason
        # The gateway forgets a job once its one reader is gone, so the outcome cannot be read
        # again: one synchronous run learns it (documented in the README's model-run bound).
        self._metrics.lost_streams.labels(agent_id).inc()
        log.warning("gateway.stream_lost", agent=agent_id, gateway_job=job, reason=reason)
        on_event("status", {"state": "running", "message": "the gateway lost the job's stream; asking the agent once more"})
        return await self._execute(agent_id, input_text, provider, conversation_id)

    async def start_stream(self, agent_id: str, input_text: str, provider: str | None = None, *,
                           conversation_id: str | None = None) -> str:
        """Start a streamed run; the gateway's job id."""
        try:
            response = await self._send(
                "POST", "/api/v1/stream-execute", content=_encode(self._body(provider, conversation_id, agent_id=agent_id, input=input_text)),
                headers={"Content-Type": "application/json", **outbound_headers()},
                timeout=self._http.timeout.read if self._http.timeout.read else 30.0)
        except httpx.TransportError as exc:
            raise self._failure(exc) from None
        if response.status_code >= 500:
            raise _status_error(agent_id, response)
        try:
            answer = _decode_any(response.content)
        except UNREADABLE:
            answer = None
        # A failed start comes back as 200 `[{"error": ...}, 500]`: only a job id means "started".
        if isinstance(answer, dict) and isinstance(answer.get("job_id"), str) and answer["job_id"]:
            self._metrics.gateway_calls.labels(agent_id, "stream_started").inc()
            return answer["job_id"]
        self._metrics.gateway_calls.labels(agent_id, "stream_start_failed").inc()
        reason = redacted(_start_error(answer) or f"status {response.status_code}, no job id", 300)
        if reason.startswith(("400:", "404:")):  # its own validation (no cwd, unknown agent): final
            raise GatewayRejected(f"the {UPSTREAM} refused to start the job: {reason}")
        raise GatewayUnavailable(f"the {UPSTREAM} could not start the job: {reason}")

    async def stream_events(self, job_id: str) -> AsyncIterator[tuple[str, Any]]:
        """The job's (event, data) pairs until the gateway closes the stream.

        The stream may be silent for minutes while the model thinks, so only the read
        timeout is lifted; the job's own deadline bounds the whole run.
        """
        timeout = httpx.Timeout(self._http.timeout.connect, read=None, write=30.0, pool=10.0)
        opened = self._direct_stream if direct(self._http) else self._httpx_stream
        try:
            async with opened(job_id, timeout) as datas:
                async for data in datas:
                    try:
                        envelope = _decode_any(data)
                    except UNREADABLE:
                        continue
                    if isinstance(envelope, dict) and isinstance(envelope.get("event"), str):
                        yield envelope["event"], envelope.get("data")
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._failure(exc) from None
        except (httpx.TransportError, SSEError) as exc:
            raise _StreamLost(f"the job's stream broke off: {what_happened(exc, UPSTREAM)}") from None

    def _stream_refused(self, job_id: str, status: int) -> Exception:
        if status == 404:  # the job ended, or another reader took it: gone for good
            return _StreamLost(f"the {UPSTREAM} no longer has job {job_id} (404)")
        return GatewayUnavailable(f"the {UPSTREAM} answered {status} for the job's stream")

    @asynccontextmanager
    async def _httpx_stream(self, job_id: str, timeout: httpx.Timeout) -> AsyncIterator[AsyncIterator[str]]:
        """The stream's `data` fields through httpx-sse (the tests' clients, a traced client)."""
        async with aconnect_sse(self._http, "GET", f"/api/v1/stream/{job_id}", timeout=timeout,
                                headers=outbound_headers()) as source:
            if source.response.status_code != 200:
                await source.response.aread()
                raise self._stream_refused(job_id, source.response.status_code)
            yield (sse.data async for sse in source.aiter_sse())

    @asynccontextmanager
    async def _direct_stream(self, job_id: str, timeout: httpx.Timeout) -> AsyncIterator[AsyncIterator[str]]:
        """The same over our own client's aiohttp session: the same request (what `aconnect_sse` adds:
        `Accept: text/event-stream`, `Cache-Control: no-store`), the same checks, the same fields."""
        headers = {**outbound_headers(), "Accept": "text/event-stream", "Cache-Control": "no-store"}
        async with self._http.stream(f"/api/v1/stream/{job_id}", headers=headers, timeout=timeout) as response:
            if response.status != 200:
                raise self._stream_refused(job_id, response.status)
            if "text/event-stream" not in response.headers.get("content-type", "").partition(";")[0]:
                raise SSEError("Expected response header Content-Type to contain 'text/event-stream'")
            yield sse_data(response.content.iter_any())

    # --- discovery and the agent registry ------------------------------------------------

    async def agents(self) -> dict[str, dict[str, Any]]:
        """The agents the gateway lists, by id."""
        response = await self._http.get("/api/agents", headers=outbound_headers(), timeout=self._settings.health_probe_timeout)
        response.raise_for_status()
        return listed_agents(_decode_any(response.content))

    async def agent_ids(self) -> set[str]:
        return set(await self.agents())

    async def persona(self, agent_id: str) -> str | None:
        """The persona the gateway holds for an agent; None when it has none."""
        response = await self._http.get(f"/api/agents/{agent_id}/persona", headers=outbound_headers(),
                                        timeout=self._settings.health_probe_timeout)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        answer = _decode_any(response.content)
        content = answer.get("persona_content") if isinstance(answer, dict) else None
        return content if isinstance(content, str) and content else None

    async def create_agent(self, body: dict[str, Any]) -> httpx.Response:
        return await self._http.post("/api/agents", content=_encode(body), timeout=30.0,
                                     headers={"Content-Type": "application/json", **outbound_headers()})

    async def update_agent(self, agent_id: str, body: dict[str, Any]) -> httpx.Response:
        return await self._http.put(f"/api/agents/{agent_id}", content=_encode(body), timeout=30.0,
                                    headers={"Content-Type": "application/json", **outbound_headers()})

    async def health(self) -> None:
        response = await self._http.get("/health", headers=outbound_headers(), timeout=self._settings.health_probe_timeout)
        response.raise_for_status()


def _as_run(data: Any) -> _RunDocument:
    if isinstance(data, dict):
        try:
            return msgspec.convert(data, _RunDocument, strict=False)
        except msgspec.ValidationError:
            pass
    return _RunDocument(result=data)


def _token_text(data: Any) -> str | None:
    # Gateway versions put the token in `data` itself or under one of these keys.
    if isinstance(data, str):
        return data
    if isinstance(data, dict):
        for k in ("token", "text", "chunk", "content"):
            if isinstance(data.get(k), str):
                return data[k]
    return None


def _start_error(answer: Any) -> str | None:
    if isinstance(answer, list) and answer and isinstance(answer[0], dict):
        return str(answer[0].get("error") or answer[0])[:300]
    if isinstance(answer, dict):
        return str(answer.get("error") or answer.get("detail") or "")[:300] or None
    return None


def _status_error(agent_id: str, response: Reply) -> AdapterError:
    status, detail = response.status_code, public_detail(response)
    if status == 404:
        return AgentMissing(agent_id)
    if status == 500 and _DB_FAULT.search(detail) and not detail.startswith("Conductor API error"):
        return GatewayUnavailable(f"the {UPSTREAM} answered 500: its database is unavailable ({detail[:160]})")
    if status == 500 or status in (400, 422):
        # Its own validation, or the Conductor API's refusal relayed inside a 500: asking again
        # gives the same answer. (A 502/504 from a proxy in front of it is transient.)
        return GatewayRejected(f"the {UPSTREAM} answered {status}: {detail}")
    if status >= 500:
        return GatewayUnavailable(f"the {UPSTREAM} answered {status}: {detail}")
    return GatewayProtocolError(f"the {UPSTREAM} refused the call with {status}: {detail}")


def _text_of(agent_id: str, response: Reply) -> str:
    if response.status_code != 200:
        raise _status_error(agent_id, response)
    try:
        answer = _decode_execute(response.content)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise GatewayProtocolError(f"the {UPSTREAM} answered 200 with a body that is not its execute document") from None
    except RecursionError:
        raise GatewayProtocolError(f"the {UPSTREAM} answered 200 with a body nesting arrays and objects too deep "
                                   "to read") from None
    if answer.result is None:
        raise GatewayProtocolError(f"the {UPSTREAM} answered 200 without a run document")
    run = answer.result
    if answer.status == "error" and (run.status or "").lower() not in _FAILED and not run.exit_code:
        run.status = "error"
    return run_text(agent_id, run)
