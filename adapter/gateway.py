"""Client of the Conductor Gateway (synchronous agent calls, discovery, health)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import structlog
from httpx_sse import SSEError, aconnect_sse

from .context import outbound_headers
from .errors import (
    AdapterError,
    AgentFailed,
    AgentMissing,
    GatewayBusy,
    GatewayCircuitOpen,
    GatewayProtocolError,
    GatewayUnavailable,
    UpstreamTimeout,
)
from .metrics import Metrics
from .resilience import Bulkhead, CircuitBreaker, retrying
from .upstream import detail_of, transport_error
from .settings import Settings

log = structlog.get_logger("adapter.gateway")
UPSTREAM = "Conductor Gateway"


class _Task(msgspec.Struct):
    """The Conductor task document; every field optional, unknown ones ignored."""

    status: str | None = None
    result: Any = None
    stdout: str | None = None
    stderr: str | None = None
    error: str | None = None
    exit_code: int | None = None


class _Execute(msgspec.Struct):
    status: str | None = None
    result: _Task | None = None
    detail: Any = None


_decode_execute = msgspec.json.Decoder(_Execute).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def client_timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(connect=settings.gateway_connect_timeout, read=settings.gateway_read_timeout, write=30.0, pool=10.0)


class _Refused503(Exception):
    """The gateway's 503 (its database is down): it did not start the agent, so a retry is safe."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__("503")
        self.response = response


def _not_started(exc: Exception) -> bool:
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, _Refused503))


class GatewayClient:
    def __init__(self, http: httpx.AsyncClient, settings: Settings, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._http = http
        self._settings = settings
        self._metrics = metrics or Metrics()
        self.breaker = CircuitBreaker("conductor-gateway", threshold=settings.circuit_failure_threshold,
                                      reset=settings.circuit_reset_seconds, clock=clock)
        self.bulkhead = Bulkhead(settings.gateway_max_concurrency, settings.gateway_queue_timeout)

    @asynccontextmanager
    async def guarded(self) -> AsyncIterator[None]:
        """Circuit breaker and bulkhead around one agent run (a synchronous call or a whole stream)."""
        if not self.breaker.admit():
            raise GatewayCircuitOpen(
                f"the {UPSTREAM} failed {self.breaker.failures} times in a row; calls are paused",
                retry_after=self.breaker.retry_after())
        if not await self.bulkhead.acquire():
            self.breaker.released()
            raise GatewayBusy(f"{self.bulkhead.limit} agent calls are in flight (GATEWAY_MAX_CONCURRENCY); "
                              f"none finished within {self.bulkhead.wait:g} s (GATEWAY_QUEUE_TIMEOUT)")
        try:
            yield
        except (GatewayUnavailable, UpstreamTimeout, GatewayProtocolError):
            self.breaker.failed()
            raise
        except BaseException:
            self.breaker.released()  # not the gateway's fault (cancelled, invalid output, ...)
            raise
        else:
            self.breaker.succeeded()
        finally:
            self.bulkhead.release()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def attempt() -> httpx.Response:
            response = await self._http.request(method, path, **kwargs)
            if response.status_code == 503:
                raise _Refused503(response)
            return response

        try:
            return await retrying(attempt, attempts=1 + self._settings.upstream_retries, base=self._settings.retry_base_delay,
                                  cap=self._settings.retry_max_delay, retry_on=_not_started)
        except _Refused503 as refused:
            return refused.response

    def _failure(self, exc: Exception) -> AdapterError:
        return transport_error(exc, upstream=UPSTREAM, unavailable=GatewayUnavailable, slug="gateway-timeout",
                               read_timeout=self._http.timeout.read, call_timeout=self._settings.gateway_call_timeout)

    def _body(self, **prompt: str) -> dict[str, Any]:
        # Stateless, with a fresh conversation each time: one answer must not leak
        # into the next lead's (newer gateways also refuse calls without these ids).
        body: dict[str, Any] = {
            **prompt,
            "context_mode": "stateless",
            "instance_id": f"crm-ai-{uuid.uuid4().hex}",
            "conversation_id": f"crm-ai-{uuid.uuid4().hex}",
        }
        if self._settings.conductor_cwd:
            body["cwd"] = self._settings.conductor_cwd
        if self._settings.conductor_ai_provider:
            body["ai_provider"] = self._settings.conductor_ai_provider
        return body

    async def execute(self, agent_id: str, input_text: str) -> str:
        """Run the agent once and return the model's text."""
        async with self.guarded():
            return await self._execute(agent_id, input_text)

    async def _execute(self, agent_id: str, input_text: str) -> str:
        t0 = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(self._settings.gateway_call_timeout):
                response = await self._send(
                    "POST", f"/api/agents/{agent_id}/execute", content=_encode(self._body(input_text=input_text)),
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
            log.info("gateway.call", agent=agent_id, outcome=outcome, ms=round(seconds * 1000, 1))
        return _text_of(agent_id, response)

    async def start_stream(self, agent_id: str, input_text: str) -> str:
        """Start a streamed run; the gateway's job id."""
        try:
            response = await self._send(
                "POST", "/api/v1/stream-execute", content=_encode(self._body(agent_id=agent_id, input=input_text)),
                headers={"Content-Type": "application/json", **outbound_headers()},
                timeout=self._http.timeout.read if self._http.timeout.read else 30.0)
        except httpx.TransportError as exc:
            raise self._failure(exc) from None
        if response.status_code >= 500:
            raise GatewayUnavailable(f"the {UPSTREAM} answered {response.status_code}: {detail_of(response)}")
        try:
            answer = _decode_any(response.content)
        except msgspec.DecodeError:
            answer = None
        # A failed start comes back as 200 `[{"error": ...}, 500]`: only a job id means "started".
        if isinstance(answer, dict) and isinstance(answer.get("job_id"), str) and answer["job_id"]:
            self._metrics.gateway_calls.labels(agent_id, "stream_started").inc()
            return answer["job_id"]
        self._metrics.gateway_calls.labels(agent_id, "stream_start_failed").inc()
        reason = _start_error(answer) or f"status {response.status_code}, no job id"
        raise GatewayUnavailable(f"the {UPSTREAM} could not start the job: {reason}")

    async def stream_events(self, job_id: str) -> AsyncIterator[tuple[str, Any]]:
        """The job's (event, data) pairs until the gateway closes the stream.

        The stream may be silent for minutes while the model thinks, so only the read
        timeout is lifted; the job's own deadline bounds the whole run.
        """
        timeout = httpx.Timeout(self._http.timeout.connect, read=None, write=30.0, pool=10.0)
        try:
            async with aconnect_sse(self._http, "GET", f"/api/v1/stream/{job_id}", timeout=timeout,
                                    headers=outbound_headers()) as source:
                status = source.response.status_code
                if status == 404:  # someone else read the job, or it finished: it is gone for good
                    raise GatewayProtocolError(f"the {UPSTREAM} no longer has job {job_id}")
                if status != 200:
                    await source.response.aread()
                    raise GatewayUnavailable(f"the {UPSTREAM} answered {status} for the job's stream")
                async for sse in source.aiter_sse():
                    try:
                        envelope = _decode_any(sse.data)
                    except msgspec.DecodeError:
                        continue
                    if isinstance(envelope, dict) and isinstance(envelope.get("event"), str):
                        yield envelope["event"], envelope.get("data")
        except (httpx.TransportError, SSEError) as exc:
            raise GatewayUnavailable(f"the {UPSTREAM}'s stream broke off: {type(exc).__name__}") from None

    async def agent_ids(self) -> set[str]:
        response = await self._http.get("/api/agents", headers=outbound_headers(), timeout=self._settings.health_probe_timeout)
        response.raise_for_status()
        listed = _decode_any(response.content)
        if not isinstance(listed, list):
            raise ValueError("GET /api/agents did not answer a list")
        return {str(a.get(k)) for a in listed if isinstance(a, dict) for k in ("agent_id", "id", "name") if a.get(k)}

    async def health(self) -> None:
        response = await self._http.get("/health", headers=outbound_headers(), timeout=self._settings.health_probe_timeout)
        response.raise_for_status()


def _start_error(answer: Any) -> str | None:
    if isinstance(answer, list) and answer and isinstance(answer[0], dict):
        return str(answer[0].get("error") or answer[0])[:300]
    if isinstance(answer, dict):
        return str(answer.get("error") or answer.get("detail") or "")[:300] or None
    return None


def _text_of(agent_id: str, response: httpx.Response) -> str:
    status = response.status_code
    if status == 404:
        raise AgentMissing(agent_id)
    if status >= 500:
        raise GatewayUnavailable(f"the {UPSTREAM} answered {status}: {detail_of(response)}")
    if status != 200:
        raise GatewayProtocolError(f"the {UPSTREAM} refused the call with {status}: {detail_of(response)}")
    try:
        answer = _decode_execute(response.content)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise GatewayProtocolError(f"the {UPSTREAM} answered 200 with a body that is not its execute document") from None
    task = answer.result
    if task is None:
        raise GatewayProtocolError(f"the {UPSTREAM} answered 200 without a task document")
    if answer.status == "error" or task.status in {"error", "failed"} or (task.exit_code or 0) != 0:
        reason = task.error or task.stderr or (task.result if isinstance(task.result, str) else None) or "no reason given"
        raise AgentFailed(f"agent {agent_id} failed: {reason[:300]}")
    text = task.result if task.result not in (None, "") else task.stdout
    if isinstance(text, (dict, list)):  # some Conductor versions hand back parsed JSON
        return _encode(text).decode()
    return text if isinstance(text, str) else ""
