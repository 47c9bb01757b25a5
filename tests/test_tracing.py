"""OpenTelemetry traces, recorded by the SDK's in-memory exporter: the span tree of real calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from adapter import tracing
from adapter.app import create_app
from tests.helpers import LEAD_AGENT, QUALIFY, asgi_client, decode, make_settings, running

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(gateway, crm, exporter):
    """A traced sidecar; yields (client, headers each upstream received)."""

    @asynccontextmanager
    async def start(**overrides) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, list[dict[str, str]]]]]:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        received: dict[str, list[dict[str, str]]] = {"gateway": [], "crm": []}

        def recording(app, name):
            async def wrapped(scope, receive, send):
                if scope["type"] == "http":
                    received[name].append({k.decode(): v.decode() for k, v in scope["headers"]})
                await app(scope, receive, send)
            return wrapped

        async with asgi_client(recording(gateway.app, "gateway"), "http://gateway.test") as gw, \
                asgi_client(recording(crm.app, "crm"), "http://crm.test") as backend:
            app = create_app(make_settings(**overrides), gateway_http=gw, crm_http=backend, tracer_provider=provider)
            async with running(app) as client:
                yield client, received
            assert not getattr(gw, "_is_instrumented_by_opentelemetry", False)  # handed-in clients are left as they were
        provider.shutdown()

    return start


def tree(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    """Children by parent span name."""
    by_id = {s.context.span_id: s for s in spans}
    children: dict[str, list[ReadableSpan]] = {}
    for s in spans:
        parent = by_id.get(s.parent.span_id) if s.parent else None
        children.setdefault(parent.name if parent else "<root>", []).append(s)
    return children


def named(spans, name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def traceparent_of(span: ReadableSpan) -> str:
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"


async def test_one_qualify_call_gives_the_expected_span_tree(traced, exporter, seed, auth):
    async with traced() as (client, received):
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]},
                              headers={**auth, "traceparent": TRACEPARENT, "X-Request-ID": "trace-test-1"})
    assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    children = tree(spans)

    [server] = children["<root>"]  # the caller's span is remote: ours is the local root, in the caller's trace
    assert server.name == f"POST {QUALIFY}" and server.kind == SpanKind.SERVER
    assert server.attributes["request.id"] == "trace-test-1" and server.attributes["http.route"] == QUALIFY
    assert f"{server.context.trace_id:032x}" == CALLER_TRACE and f"{server.parent.span_id:016x}" == CALLER_SPAN
    assert {s.context.trace_id for s in spans} == {server.context.trace_id}

    assert sorted(s.name for s in children[server.name]) == ["cache", "crm.lookup", "crm.write_back"]
    [lookup] = named(spans, "crm.lookup")
    assert lookup.attributes["crm.record.kind"] == "lead" and lookup.attributes["crm.record.id"] == seed["leads"][0]
    [cache] = named(spans, "cache")
    assert cache.attributes["cache.result"] == "MISS" and cache.attributes["cache.task"] == "lead.qualify"
    [call] = children["cache"]
    assert call.name == "gateway.call"
    assert (call.attributes["gateway.agent"], call.attributes["gateway.attempt"], call.attributes["gateway.repair"],
            call.attributes["gateway.provider"]) == (LEAD_AGENT, 1, False, "default")

    # Each upstream request is an httpx client span, and its traceparent reached that upstream.
    # (The gateway call also deletes the agent instance the run left behind: a DELETE under the same span.)
    assert sorted(method_of(h) for h in children["gateway.call"]) == ["DELETE", "POST"]
    for parent, method, upstream in (("crm.lookup", "GET", "crm"), ("gateway.call", "POST", "gateway"), ("crm.write_back", "PATCH", "crm")):
        [http] = [h for h in children[parent] if method_of(h) == method]
        assert http.kind == SpanKind.CLIENT
        assert traceparent_of(http) in [h.get("traceparent") for h in received[upstream]]


async def test_repairs_are_numbered_gateway_calls_and_a_cache_hit_calls_nothing(traced, exporter, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "wrong_shape", "json")
    async with traced(CONDUCTOR_AI_PROVIDER="gemini") as (client, _):
        first = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
        exporter.clear()
        second = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
        hit = exporter.get_finished_spans()
    assert first.status_code == second.status_code == 200
    assert [s.attributes["cache.result"] for s in named(hit, "cache")] == ["HIT"] and not named(hit, "gateway.call")


async def test_repair_attempts_carry_their_number_and_provider(traced, exporter, seed, auth, gateway):
    gateway.push(LEAD_AGENT, "wrong_shape", "json")
    async with traced(CONDUCTOR_AI_PROVIDER="gemini") as (client, _):
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert r.status_code == 200, r.text
    calls = named(exporter.get_finished_spans(), "gateway.call")
    assert [(c.attributes["gateway.attempt"], c.attributes["gateway.repair"], c.attributes["gateway.provider"]) for c in calls] \
        == [(1, False, "gemini"), (2, True, "gemini")]


async def test_a_job_run_is_a_span_with_its_streamed_gateway_call(traced, exporter, seed, auth):
    async with traced() as (client, received):
        created = decode(await client.post("/api/v1/ai/jobs", headers={**auth, "traceparent": TRACEPARENT},
                                           json={"task": "deal.predict", "input": {"deal_id": seed["deals"][0]}}))
        async with client.stream("GET", created["events_url"]) as events:
            text = "".join([chunk async for chunk in events.aiter_text()])
    assert "event: done" in text
    spans = exporter.get_finished_spans()
    token = created["events_url"].split("token=")[1]
    assert not [s for s in spans if any(token in str(v) for v in s.attributes.values())], "a job token reached a trace"
    [run] = named(spans, "job.run")
    assert run.attributes["job.id"] == created["job_id"] and run.attributes["job.task"] == "deal.predict"
    assert f"{run.context.trace_id:032x}" == CALLER_TRACE  # the job belongs to the request that started it
    [call] = [s for s in spans if s.parent and s.parent.span_id == run.context.span_id]
    assert call.name == "gateway.call" and call.attributes["gateway.stream"] is True
    assert any(h.get("traceparent", "").startswith(f"00-{CALLER_TRACE}-") for h in received["gateway"])


async def test_a_proxied_request_is_traced_and_the_backend_gets_one_traceparent(traced, exporter, auth, seed):
    async with traced() as (client, received):
        r = await client.get(f"/api/v1/leads/{seed['leads'][0]}?page=2&api_key=s3cret", headers={**auth, "traceparent": TRACEPARENT})
    assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    [server] = tree(spans)["<root>"]
    assert server.name == "GET proxy" and f"{server.context.trace_id:032x}" == CALLER_TRACE
    [http] = tree(spans)[server.name]
    sent = [h for h in received["crm"] if "traceparent" in h]
    assert [h["traceparent"] for h in sent] == [traceparent_of(http)]  # ours replaces the caller's, once
    assert not [s for s in spans if any("s3cret" in str(v) for v in s.attributes.values())]
    assert any("page=2&api_key=REDACTED" in str(v) for v in http.attributes.values())


def test_off_unless_otel_variables_ask_for_it():
    assert not tracing.enabled_by({})
    assert not tracing.enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})  # compose writes empty optional values
    assert tracing.enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.enabled_by({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert tracing.enabled_by({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.enabled_by({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not tracing.enabled_by({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    on = tracing.Tracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SERVICE_NAME": "x"})
    assert on.on and on.provider.resource.attributes["service.name"] == "x"
    on.provider.shutdown()


async def test_off_there_is_nothing_to_pay_for(client, seed, auth, monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    app = create_app(make_settings())
    assert not any("OpenTelemetry" in type(p).__name__ for p in app.plugins)
    async with running(app):
        service = app.state.service
        assert service.tracing.span("x") is service.tracing.span("y")  # one shared no-op, nothing allocated
        assert not getattr(service.crm._http, "_is_instrumented_by_opentelemetry", False)


def method_of(span: ReadableSpan) -> str:
    # The instrumentations speak the stable HTTP conventions only when OTEL_SEMCONV_STABILITY_OPT_IN says so.
    return span.attributes.get("http.request.method", span.attributes.get("http.method"))
