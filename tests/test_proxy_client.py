"""The pass-through through the client the app builds for it (`Proxy.client`).

tests/test_proxy.py runs each of its tests on a plain httpx client and on this one. Here, what
this client (httpx's API over aiohttp) must keep from httpcore is checked on it: the pool wait
that is a 503, the one retry of a stale connection (and none for a request that is not
GET/HEAD/OPTIONS), the client that hangs up mid-upload, the write to a backend that stopped
reading, the redirect rewrite; and what a proxy must not do (keep cookies, add headers).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import httpx
import pytest
from structlog.testing import capture_logs

from adapter.app import create_app
from adapter.web.proxy import Proxy
from tests.echo_backend import EchoBackend
from tests.helpers import (Changes, asgi_client, assert_problem, decode, make_settings, serving,
                           serving_by_name, stale_after_500)

DEADLINE = 10.0


@pytest.fixture
def echo() -> EchoBackend:
    return EchoBackend()


@asynccontextmanager
async def fronted(backend_url: str, gateway, crm, *, pool: float = 5.0, **overrides):
    """The sidecar over TCP whose pass-through is the production client to `backend_url`; yields (client, url)."""
    settings = make_settings(crm_backend_url=backend_url, **overrides)
    async with Proxy.client(settings, pool=pool) as proxy_http, \
            asgi_client(gateway.app, "http://gateway.test") as gw, asgi_client(crm.app, "http://crm.test") as backend:
        app = create_app(settings, gateway_http=gw, crm_http=backend, proxy_http=proxy_http)
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client, url


async def test_a_pool_wait_past_its_bound_is_503_crm_busy(echo, gateway, crm):
    arrived, go = asyncio.Event(), asyncio.Event()

    async def backend(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/hold":
            arrived.set()
            await asyncio.wait_for(go.wait(), DEADLINE)  # holds the only connection until the test lets go
        await echo(scope, receive, send)

    async with serving(backend) as url, fronted(url, gateway, crm, pool=0.2, proxy_max_connections=1) as (client, _):
        held = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(arrived.wait(), DEADLINE)
        busy = await client.get("/api/v1/companies")
        go.set()
        first = await asyncio.wait_for(held, DEADLINE)
        after = await client.get("/api/v1/companies")
    assert_problem(busy, 503, "crm-busy")
    assert "PROXY_MAX_CONNECTIONS" in decode(busy)["detail"] and "0.2 s" in decode(busy)["detail"]
    assert first.status_code == 200 and after.status_code == 200  # the slot came back with the answer
    assert [s["path"] for s in echo.seen] == ["/hold", "/api/v1/companies"]


async def test_a_stale_connection_is_retried_once_for_get_and_never_for_delete(gateway, crm, seed, auth):
    async with stale_after_500(crm.app) as front:
        # One connection: the request after a 500 must reuse the poisoned one.
        async with fronted(front.url, gateway, crm, proxy_max_connections=1) as (client, _):
            assert (await client.get("/api/v1/leads/not-an-id", headers=auth)).status_code == 500
            got = await client.get(f"/api/v1/leads/{seed['leads'][0]}", headers=auth)
            assert (await client.get("/api/v1/leads/not-an-id", headers=auth)).status_code == 500
            deleted = await client.delete(f"/api/v1/leads/{seed['leads'][1]}", headers=auth)
    assert got.status_code == 200 and seed["leads"][0] in got.text
    assert_problem(deleted, 502, "crm-unavailable")  # sent once into the dead connection, not again
    assert front.dropped == 2
    assert seed["leads"][1] in crm.leads


async def test_a_client_gone_mid_upload_abandons_the_upstream_request_and_blames_no_backend(echo, gateway, crm):
    async with serving(echo) as url, fronted(url, gateway, crm) as (client, sidecar_url):
        host, port = sidecar_url.removeprefix("http://").split(":")
        written = Changes()

        def seen(_logger, _name, line):
            written.changed()
            return line

        with capture_logs(processors=[seen]) as logs:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /api/v1/uploads HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            await writer.drain()
            writer.close()  # gone after 1,000 of 100,000 bytes
            await writer.wait_closed()
            # The request's log line: the sidecar has finished with it.
            await written.until(lambda: any(line["event"] == "request" for line in logs), DEADLINE, "the request's log line")
        after = await client.get("/api/v1/companies")  # the pool is whole: the next request goes through
    assert after.status_code == 200
    assert [s["path"] for s in echo.seen] == ["/api/v1/companies"]  # the cut upload never reached the backend's handler
    # The client left (499); the backend did nothing wrong and is not reported as unavailable.
    assert not [line for line in logs if str(line.get("type", "")).rsplit(":", 1)[-1].startswith("crm-")], logs
    assert [line["status"] for line in logs if line["event"] == "request"] == [499]


async def test_a_backend_that_stops_reading_an_upload_is_504_after_the_write_timeout(gateway, crm):
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing: the sidecar's writes fill the socket buffers, then block
        accepted.set()

    server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    size = 64 * 1024 * 1024

    async def upload():
        block = b"z" * (1024 * 1024)
        for _ in range(size // len(block)):
            yield block

    try:
        async with fronted(f"http://127.0.0.1:{port}", gateway, crm, proxy_read_timeout=0.5) as (client, _):
            r = await asyncio.wait_for(client.post("/api/v1/uploads", content=upload(), headers={"Content-Length": str(size)}),
                                       DEADLINE)
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
    assert accepted.is_set()
    assert_problem(r, 504, "crm-timeout")


async def test_a_backend_redirect_points_at_the_sidecar(gateway, crm, seed, auth):
    async with serving(crm.app) as crm_url, fronted(crm_url, gateway, crm) as (client, url):
        plain = await client.get("/api/v1/leads?page=2", headers=auth)
        forwarded = await client.get("/api/v1/leads", headers={**auth, "X-Forwarded-Proto": "https",
                                                               "X-Forwarded-Host": "crm.example.com"})
    assert plain.status_code == 307 and plain.headers["location"] == f"{url}/api/v1/leads/?page=2"
    assert forwarded.headers["location"] == "https://crm.example.com/api/v1/leads/"


async def test_a_cookie_one_caller_was_given_never_goes_with_another_callers_request(echo, gateway, crm):
    # By host name: aiohttp's jar ignores cookies from IP addresses (see test_shared_clients.py).
    async with serving_by_name(echo) as url, fronted(url, gateway, crm) as (_, sidecar_url):
        async with httpx.AsyncClient(base_url=sidecar_url) as alice:
            given = await alice.get("/api/v1/me")
        async with httpx.AsyncClient(base_url=sidecar_url) as bob:
            await bob.get("/api/v1/companies")
            await bob.get("/api/v1/companies", headers={"Cookie": "mine=1"})
    assert given.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]  # Alice got hers
    cookies = [[v for k, v in seen["headers"] if k.lower() == "cookie"] for seen in echo.seen]
    assert cookies == [[], [], ["mine=1"]]  # Bob's requests carry his own cookies only


@pytest.mark.parametrize("declared", [1000, 200_000])  # read whole (≤ 64 KiB) / streamed
async def test_an_answer_the_backend_cuts_short_reaches_the_client_as_short(gateway, crm, declared):
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n0123456789" % declared)
        await writer.drain()
        writer.close()  # 10 of the declared bytes, then gone

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    try:
        async with fronted(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", gateway, crm) as (_, url):
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /api/v1/files/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), DEADLINE)  # the sidecar closes the connection: the body is short
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: %d" % declared in head.lower()
    assert body == b"0123456789"


async def test_a_bodiless_delete_goes_without_a_content_length(echo, gateway, crm):
    async with serving(echo) as url, fronted(url, gateway, crm) as (client, _):
        r = await client.delete("/api/v1/leads/7")
    assert r.status_code == 200
    assert [k for k, _ in echo.seen[-1]["headers"] if k.lower() in ("content-length", "transfer-encoding")] == []


async def test_the_upstream_clients_keep_no_cookies_between_callers(echo):
    """The CRM and gateway clients (`transport.client`) act for every caller in turn: no jar either."""
    from adapter.upstreams import transport

    async with serving_by_name(echo) as url, transport.client(base_url=url, timeout=httpx.Timeout(5.0),
                                                      limits=httpx.Limits(max_connections=4)) as upstream:
        given = await upstream.get("/api/v1/me")  # the echo backend sets two cookies here
        await upstream.get("/api/v1/leads/1", headers={"Authorization": "Bearer someone-else"})
    assert given.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    cookies = [[v for k, v in seen["headers"] if k.lower() == "cookie"] for seen in echo.seen]
    assert cookies == [[], []]
