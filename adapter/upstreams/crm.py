"""Client of the CRM backend: the records, read with the caller's own token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from ..context import outbound_headers
from ..errors import CrmCircuitOpen, CrmRefused, CrmUnavailable, UpstreamTimeout
from ..metrics import Metrics
from .resilience import CircuitBreaker, retrying
from ..settings import Settings
from .http import detail_of, transport_error
from .transport import Reply, exchange

UPSTREAM = "CRM backend"
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
# How a request sent on a connection the server had already closed fails: before any response byte.
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def client_timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(connect=settings.crm_connect_timeout, read=settings.crm_read_timeout, write=30.0, pool=5.0)


class CrmClient:
    def __init__(self, http: httpx.AsyncClient, settings: Settings, clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        self._http = http  # ours (transport.Upstream) sends over aiohttp directly; any other httpx client, through httpx
        self._metrics = metrics or Metrics()
        self._settings = settings
        self._slots = asyncio.Semaphore(settings.crm_max_connections)
        self.breaker = CircuitBreaker.of("crm-backend", settings, clock)

    async def get_record(self, kind: str, record_id: str, authorization: str) -> dict[str, Any]:
        """The record as the caller may see it; the backend's refusal becomes ours.

        `kind` is a task's `record_kind` (lower-case letters and digits, as `Task` checks): the
        collection `/api/v1/<kind>s/`, whichever kinds the tasks read."""
        response = await self._call("GET", f"/api/v1/{kind}s/{record_id}", authorization)
        try:
            record = _decode(response.content)
        except msgspec.DecodeError:
            record = None
        except RecursionError:  # msgspec's word for absurd nesting (http.UNREADABLE): the backend's fault, not a 500
            raise CrmUnavailable(f"the {UPSTREAM} answered GET /api/v1/{kind}s/{record_id} with a record nesting arrays "
                                 "and objects too deep to read") from None
        if not isinstance(record, dict):
            raise CrmUnavailable(f"the {UPSTREAM} answered GET /api/v1/{kind}s/{record_id} with a body that is not a record")
        return record

    async def patch_record(self, kind: str, record_id: str, authorization: str, changes: dict[str, Any]) -> None:
        await self._call("PATCH", f"/api/v1/{kind}s/{record_id}", authorization, body=_encode(changes))

    async def health(self) -> None:
        response = await self._http.get("/health", headers=outbound_headers(), timeout=self._settings.health_probe_timeout)
        response.raise_for_status()

    async def _call(self, method: str, path: str, authorization: str, body: bytes | None = None) -> Reply:
        if not self.breaker.admit():
            raise CrmCircuitOpen(self.breaker.describe(UPSTREAM), retry_after=self.breaker.retry_after())
        t0 = time.perf_counter()
        outcome = "cancelled"
        try:
            response = await self._attempt(method, path, authorization, body)
            outcome = "ok" if response.status_code < 400 else str(response.status_code)
        except (CrmUnavailable, UpstreamTimeout) as exc:
            outcome = "timeout" if isinstance(exc, UpstreamTimeout) else "unavailable"
            self.breaker.failed()
            raise
        except BaseException:
            self.breaker.released()
            raise
        finally:
            self._metrics.crm_calls.labels(method, outcome).inc()
            self._metrics.crm_seconds.labels(method).observe(time.perf_counter() - t0)
        # The backend's refusals (401/403/404) say it is healthy.
        self.breaker.succeeded()
        if response.status_code >= 400:
            passed = {k: v for k, v in response.headers.items() if k.lower() == "www-authenticate"}
            if response.status_code == 401 and not passed:
                passed = {"WWW-Authenticate": "Bearer"}  # RFC 6750 wants it; the real backend's handler drops it
            raise CrmRefused(response.status_code, detail_of(response), passed)
        return response

    async def _attempt(self, method: str, path: str, authorization: str, body: bytes | None) -> Reply:
        headers = {"Authorization": authorization, "Accept": "application/json", **outbound_headers()}
        if body is not None:
            headers["Content-Type"] = "application/json"

        async def send() -> Reply:
            return await exchange(self._http, method, path, content=body, headers=headers)

        s = self._settings
        budget = {"connect": s.upstream_retries, "stale": 1 if method in IDEMPOTENT else 0}

        def retry_on(exc: Exception) -> bool:
            # A failure to connect: the request never reached the backend. And the backend drops
            # keep-alive connections after an unhandled 500 without saying so: a lookup sent on such
            # a connection fails before any response byte. That one is retried once, like nginx's
            # `proxy_next_upstream error`; the pool has already discarded the dead connection.
            kind = "connect" if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) else \
                "stale" if isinstance(exc, STALE_CONNECTION) else None
            if kind is None or budget[kind] == 0:
                return False
            budget[kind] -= 1
            return True

        try:
            async with asyncio.timeout(s.crm_call_timeout), self._slots:
                response = await retrying(send, attempts=2 + s.upstream_retries, base=s.retry_base_delay, cap=s.retry_max_delay,
                                          retry_on=retry_on)
        except (TimeoutError, httpx.TransportError) as exc:
            raise transport_error(exc, upstream=UPSTREAM, unavailable=CrmUnavailable, slug="crm-timeout",
                                  read_timeout=self._http.timeout.read, call_timeout=s.crm_call_timeout) from None
        if response.status_code >= 500:
            raise CrmUnavailable(f"the {UPSTREAM} answered {response.status_code} to {method} {path}")
        return response
