"""Pass-through to the CRM backend: fidelity, streaming memory, forwarding headers, host safety."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from contextlib import asynccontextmanager

import httpx
import pytest

from adapter.app import create_app
from adapter.web.proxy import Proxy
from tests.echo_backend import EchoBackend
from tests.helpers import asgi_client, assert_problem, closed_port_url, decode, make_settings, serving

MB = 1024 * 1024


@pytest.fixture
def echo() -> EchoBackend:
    return EchoBackend()


@pytest.fixture(params=["httpx", "production"])
def sidecar(request, echo, gateway, crm):
    """The sidecar over TCP in front of the echo backend; yields (client, base url).

    Every test here runs twice: on a plain httpx client handed in, and on the client the app
    builds for itself (`Proxy.client`, httpx's API over aiohttp), read timeout 1 s on both.
    """

    @asynccontextmanager
    async def start(backend_url: str | None = None, **overrides):
        async with serving(echo) as echo_url, (
                httpx.AsyncClient(base_url=backend_url or echo_url, timeout=httpx.Timeout(5, read=1)) if request.param == "httpx"
                else Proxy.client(make_settings(crm_backend_url=backend_url or echo_url, proxy_read_timeout=1))) as proxy_http, \
                asgi_client(gateway.app, "http://gateway.test") as gw, asgi_client(crm.app, "http://crm.test") as backend:
            app = create_app(make_settings(**overrides), gateway_http=gw, crm_http=backend, proxy_http=proxy_http)
            async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
                yield client, url

    return start


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "PUT", "DELETE"])
async def test_methods_bodies_queries_and_statuses_pass_through(sidecar, echo, method):
    body = b'{"name": "Acme"}' if method in {"POST", "PATCH", "PUT"} else None
    async with sidecar() as (client, _):
        r = await client.request(method, "/api/v1/companies/42?page=2&q=a%20b", content=body,
                                 headers={"Content-Type": "application/json"} if body else {})
    assert r.status_code == 200
    seen = decode(r)
    assert seen["method"] == method and seen["path"] == "/api/v1/companies/42" and seen["query"] == "page=2&q=a%20b"
    assert seen["size"] == len(body or b"")
    if body:
        assert seen["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422, 500, 503])
async def test_backend_errors_pass_through_untouched(sidecar, status):
    async with sidecar() as (client, _):
        r = await client.get(f"/status/{status}")
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert decode(r)["path"] == f"/status/{status}"  # the backend's body, not a problem of ours


async def test_hop_by_hop_dropped_and_forwarding_headers_set(sidecar, echo):
    async with sidecar() as (client, url):
        r = await client.get("/api/v1/leads", headers={
            "Connection": "keep-alive, X-Private", "X-Private": "secret", "Keep-Alive": "timeout=5", "TE": "trailers",
            "Proxy-Authorization": "Basic abc", "Upgrade": "h2c", "X-Forwarded-For": "203.0.113.9",
            "X-Request-ID": "trace-42", "Authorization": "Bearer user-token"})
    sent = {k.lower(): v for k, v in echo.seen[-1]["headers"]}
    for header in ("x-private", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert header not in sent, header
    assert sent["connection"] != "keep-alive, X-Private"  # ours to the backend, not the client's
    assert sent["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert sent["x-forwarded-proto"] == "http" and sent["x-forwarded-host"] == url.removeprefix("http://")
    assert sent["x-request-id"] == "trace-42" and r.headers["x-request-id"] == "trace-42"
    assert sent["authorization"] == "Bearer user-token"
    assert sent["host"].startswith("127.0.0.1:")  # the backend's own host
    # Response side: the backend's hop-by-hop headers stay behind, every Set-Cookie line survives.
    assert "x-hop" not in r.headers and "keep-alive" not in r.headers
    assert r.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"] and r.headers["x-backend"] == "echo"


async def test_fifty_megabytes_stream_both_ways_without_buffering(sidecar, echo):
    size = 50 * MB

    async def upload():
        block = b"y" * MB
        for _ in range(50):
            yield block

    async with sidecar() as (client, _):
        tracemalloc.start()
        try:
            up = await client.post("/upload", content=upload(), headers={"Content-Length": str(size)})
            received = 0
            async with client.stream("GET", f"/download/{size}") as down:
                async for chunk in down.aiter_raw():
                    received += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert up.status_code == 200 and decode(up)["size"] == size
    assert down.status_code == 200 and received == size
    # Client, sidecar and backend all run in this process; together they never held 10 MB.
    assert peak < 10 * MB, f"peak traced memory {peak / MB:.1f} MB"


@pytest.mark.parametrize(("target", "reaches_backend_as"), [
    ("http://evil.example/steal", "/steal"),  # absolute form: only its path is used
    ("//evil.example/steal", "//evil.example/steal"),  # a path, not a network-path reference
    ("/%2e%2e/%2e%2e/etc/passwd", None),  # dot segments, plain or encoded, are refused (400), never resolved
    ("/..%2f..%2fadmin", None),
    ("/api/../../x", None),
    ("/x/../api/v1/ai/lead/qualify", None),  # would skip the sidecar's own route after resolution
    ("/a/.well-known/..x/b.", "/a/.well-known/..x/b."),  # dots inside a segment are just characters
    ("*", None),  # asterisk form: refused
])
async def test_request_targets_never_leave_the_backend(sidecar, echo, target, reaches_backend_as):
    async with sidecar() as (_, url):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {target} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
    status = int(raw.split(b" ", 2)[1])
    if reaches_backend_as is None:
        assert status == 400 and b"application/problem+json" in raw and echo.seen == []
        return
    assert status == 200, raw[:300]
    [seen] = echo.seen
    sent = {k.lower(): v for k, v in seen["headers"]}
    assert seen["raw_path"] == reaches_backend_as
    assert sent["host"].startswith("127.0.0.1:") and sent["x-forwarded-host"] == "evil.example"


async def test_backend_down_is_502(sidecar):
    async with sidecar(backend_url=closed_port_url()) as (client, _):
        r = await client.get("/api/v1/leads")
    assert_problem(r, 502, "crm-unavailable")


async def test_backend_slow_is_504(sidecar, echo):
    echo.delay = 5
    async with sidecar() as (client, _):
        r = await client.get("/api/v1/leads")
    assert_problem(r, 504, "crm-timeout")


async def test_fallthrough_can_be_turned_off(sidecar, echo):
    async with sidecar(crm_proxy_fallthrough="false") as (client, _):
        r = await client.get("/api/v1/leads")
    assert_problem(r, 404, "not-found")
    assert echo.seen == []


async def test_sidecar_routes_are_not_proxied(sidecar, echo):
    async with sidecar() as (client, _):
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.post("/api/v1/ai/lead/qualify", json={"lead_id": "0" * 24})).status_code == 401
    assert echo.seen == []


async def test_cors_for_the_angular_dev_server(sidecar, echo):
    origin = {"Origin": "http://localhost:4200"}
    async with sidecar(cors_allow_origins="http://localhost:4200") as (client, _):
        preflight = await client.options("/api/v1/ai/jobs", headers={
            **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
        ai = await client.post("/api/v1/ai/lead/qualify", json={"lead_id": "0" * 24}, headers=origin)
        proxied = await client.get("/api/v1/leads", headers=origin)
        stranger = await client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert preflight.status_code in (200, 204)
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:4200"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert ai.headers["access-control-allow-origin"] == "http://localhost:4200"
    assert "x-request-id" in ai.headers["access-control-expose-headers"].lower()
    assert proxied.headers.get_list("access-control-allow-origin") == ["http://localhost:4200"]  # ours only, once
    assert "access-control-allow-origin" not in stranger.headers


async def test_no_cors_headers_unless_configured(sidecar):
    async with sidecar() as (client, _):
        r = await client.get("/healthz", headers={"Origin": "http://localhost:4200"})
    assert "access-control-allow-origin" not in r.headers
