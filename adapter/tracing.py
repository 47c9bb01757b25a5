"""OpenTelemetry traces: off unless the standard OTEL_* variables ask for them.

On, the SDK and its instrumentations do the work: Litestar's OpenTelemetry plugin (the ASGI
instrumentation) makes one server span per request, proxied ones included, and accepts the
caller's W3C `traceparent`; the httpx instrumentation makes a client span per upstream request
and sends `traceparent` to the gateway and the CRM backend. The pipeline adds a few spans of
its own with `tracing.span(...)`: the CRM lookup, the cache, each gateway call, the write-back,
a job's run.

Off (no OTEL_* variable), nothing is imported, instrumented or wrapped: `span()` hands back one
shared no-op context manager.

    OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT   turn traces on (OTLP over HTTP)
    OTEL_TRACES_EXPORTER=otlp|console|none                             or name the exporter
    OTEL_SDK_DISABLED=true                                             keeps them off regardless
    OTEL_SERVICE_NAME (default crm-ai-sidecar), OTEL_RESOURCE_ATTRIBUTES, OTEL_PROPAGATORS, ...
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import httpx
    from litestar.plugins import PluginProtocol
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span
    from litestar.types import Scope

SERVICE_NAME = "crm-ai-sidecar"
T = TypeVar("T")


class _NoSpan:
    """What `span()` yields when tracing is off: attribute calls cost nothing."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass


_OFF = contextlib.nullcontext(_NoSpan())  # reusable: nullcontext keeps no state


def enabled_by(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return any(environ.get(name, "").strip() for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """The app's tracer, or nothing. Made once by create_app; the service and jobs hold it."""

    def __init__(self, provider: TracerProvider | None = None, *, owned: bool = False) -> None:
        self.provider = provider
        self._owned = owned
        self._tracer = provider.get_tracer("adapter") if provider is not None else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Tracing:
        if not enabled_by(environ):
            return cls()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        # Resource.create adds OTEL_RESOURCE_ATTRIBUTES; the service name is OTEL_SERVICE_NAME or ours.
        resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "").strip() or SERVICE_NAME})
        provider = TracerProvider(resource=resource)
        if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
            exporter: Any = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers, timeout: from the OTEL_EXPORTER_OTLP_* variables
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, owned=True)

    @property
    def on(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Span | _NoSpan]:
        """A child of the current span; attributes that are None are left out."""
        if self._tracer is None:
            return _OFF
        return self._tracer.start_as_current_span(name, attributes={k: v for k, v in attributes.items() if v is not None})

    async def run(self, name: str, work: Awaitable[T], **attributes: Any) -> T:
        """`await work` inside a span: for a background task's whole life (a job's run)."""
        with self.span(name, **attributes):
            return await work

    def plugins(self) -> list[PluginProtocol]:
        """The server span for every request (Litestar's plugin wraps the router: proxied paths too)."""
        if not self.on:
            return []
        from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

        from .context import request_id

        def details(scope: Scope) -> tuple[str, dict[str, Any]]:
            # The route is not known yet: semantic conventions name the span by the method alone,
            # and `name_after_route` renames it once routing is done.
            return str(scope.get("method", "HTTP")), {}

        def hook(span: Span, scope: dict[str, Any]) -> None:
            if span.is_recording():
                span.set_attribute("request.id", request_id(scope))  # type: ignore[arg-type]
                _redact(span)

        return [OpenTelemetryPlugin(OpenTelemetryConfig(
            tracer_provider=self.provider, exclude_spans=["receive", "send"], scope_span_details_extractor=details,
            server_request_hook_handler=hook))]

    def instrument(self, client: httpx.AsyncClient) -> None:
        """Client spans and `traceparent` on every request this client sends."""
        if self.on and not getattr(client, "_is_instrumented_by_opentelemetry", False):
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

            async def redact(span: Span, _: Any) -> None:
                _redact(span)

            HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.provider, request_hook=redact)

    def uninstrument(self, client: httpx.AsyncClient) -> None:
        if self.on and getattr(client, "_is_instrumented_by_opentelemetry", False):
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

            HTTPXClientInstrumentor.uninstrument_client(client)

    def shutdown(self) -> None:
        """Flush and stop a provider made here; one handed in is its owner's to stop."""
        if self._owned and self.provider is not None:
            self.provider.shutdown()


def name_after_route(scope: Scope) -> None:
    """Once routing is done: `POST /api/v1/ai/<kind>/<verb>`, or `GET proxy` for a pass-through."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.is_recording():
        return
    route = "proxy" if scope.get("adapter.proxied") else scope.get("path_template")
    if route:
        span.update_name(f"{scope.get('method', 'HTTP')} {route}")
        span.set_attribute("http.route", route)


# Query values that are credentials (a job's `?token=`, keys a proxied backend may take) stay out of traces.
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token|api_key|apikey|key|password|secret|signature|sig|code)=)[^&#]*")
_URL_ATTRIBUTES = ("http.url", "url.full", "url.query", "http.target")
# The caller's URL is hostile text of any length: a trace keeps this much of it, and redacts only that.
URL_ATTRIBUTE_MAX = 8 * 1024


def _redact(span: Span) -> None:
    attributes = getattr(span, "attributes", None) or {}
    for key in _URL_ATTRIBUTES:
        value = attributes.get(key)
        if isinstance(value, str) and "=" in value:
            query, value = key == "url.query", value[:URL_ATTRIBUTE_MAX]
            cleaned = _SECRET_QUERY.sub(r"\1REDACTED", ("?" + value) if query else value)
            span.set_attribute(key, cleaned[1:] if query else cleaned)
