"""Slow and hostile clients, over raw sockets with bounded waits: what they can hold, and for how long."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest

from adapter.app import create_app
from tests.helpers import asgi_client, decode, make_settings, serving
from tests.echo_backend import EchoBackend

# The bounds under test are short; every wait below is bounded by a multiple of them.
BOUND = 0.5
DEADLINE = 10.0


@asynccontextmanager
async def sidecar(gateway, crm, *, proxy_http: httpx.AsyncClient | None = None, **overrides):
    """The sidecar over real TCP (its own bounded server), with the doubles behind it."""
    settings = make_settings(HEADER_TIMEOUT_SECONDS=BOUND, BODY_TIMEOUT_SECONDS=BOUND, **overrides)
    async with asgi_client(gateway.app, "http://gateway.test") as gw, asgi_client(crm.app, "http://crm.test") as backend:
        app = create_app(settings, gateway_http=gw, crm_http=backend, proxy_http=proxy_http)
        async with serving(app) as url:
            host, port = url.removeprefix("http://").split(":")
            yield host, int(port)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """The whole answer up to the server's close; fails if the server keeps the connection past DEADLINE."""
    raw = await asyncio.wait_for(reader.read(), DEADLINE)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def trickle(writer: asyncio.StreamWriter, pieces, interval: float) -> None:
    """A slow client: one piece per interval, until the server hangs up."""
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(interval)  # the client's pace is the behaviour under test
    except ConnectionError:
        return


async def test_an_idle_connection_gets_408_and_is_closed(gateway, crm):
    async with sidecar(gateway, crm) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        status, headers, body = await read_answer(reader)
        writer.close()
    assert status == 408 and headers["connection"] == "close"
    assert "HEADER_TIMEOUT_SECONDS" in msgspec.json.decode(body)["detail"]


async def test_headers_trickled_line_by_line_get_408(gateway, crm):
    lines = [b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", *[b"X-Slow-%d: y\r\n" % i for i in range(1000)]]
    async with sidecar(gateway, crm) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        sender = asyncio.create_task(trickle(writer, lines, BOUND / 5))
        status, _, body = await read_answer(reader)
        sender.cancel()
        writer.close()
    assert status == 408 and decode(httpx.Response(200, content=body))["type"].endswith("request-timeout")


async def test_the_header_deadline_does_not_cut_a_kept_alive_connection(gateway, crm):
    async with sidecar(gateway, crm) as (host, port), httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        first = await client.get("/healthz")
        await asyncio.sleep(BOUND * 2)  # idle between requests: the keep-alive timeout's business, not ours
        second = await client.get("/healthz")
    assert first.status_code == second.status_code == 200


async def test_a_body_trickled_byte_by_byte_gets_408(gateway, crm, seed):
    body = json.dumps({"lead_id": seed["leads"][0]}).encode()
    head = (f"POST /api/v1/ai/lead/qualify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {seed['token']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    async with sidecar(gateway, crm) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        sender = asyncio.create_task(trickle(writer, [head, *(body[i:i + 1] for i in range(len(body)))], BOUND / 5))
        status, headers, answer = await read_answer(reader)
        sender.cancel()
        writer.close()
    problem = msgspec.json.decode(answer)
    assert status == 408 and headers["connection"] == "close" and "BODY_TIMEOUT_SECONDS" in problem["detail"]
    assert problem["request_id"] == headers["x-request-id"]
    assert gateway.calls == {}  # nothing went upstream


async def test_slow_proxied_uploads_are_cut_off_and_a_pool_wait_is_its_own_503(gateway, crm):
    echo, upload_arrived = EchoBackend(), asyncio.Event()

    async def backend(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/api/v1/uploads":
            upload_arrived.set()  # its headers are through: the upload holds the pool's one connection
        await echo(scope, receive, send)

    async with serving(backend) as echo_url, \
            httpx.AsyncClient(base_url=echo_url, limits=httpx.Limits(max_connections=1),
                              timeout=httpx.Timeout(5, pool=BOUND / 5)) as proxy_http, \
            sidecar(gateway, crm, proxy_http=proxy_http) as (host, port), \
            httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        reader, writer = await asyncio.open_connection(host, port)
        head = b"POST /api/v1/uploads HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n"
        uploader = asyncio.create_task(trickle(writer, [head, *[b"x"] * 1000], BOUND / 10))
        # The upload holds the only pass-through connection: a normal request is told so, honestly.
        await asyncio.wait_for(upload_arrived.wait(), DEADLINE)
        busy = await client.get("/api/v1/companies")
        problem = decode(busy)
        assert busy.status_code == 503 and problem["type"].endswith("crm-busy"), busy.text
        assert busy.headers["retry-after"] and "PROXY_MAX_CONNECTIONS" in problem["detail"] and "60 s" not in problem["detail"]
        # The body deadline ends the upload and gives the connection back.
        status, _, _ = await read_answer(reader)
        uploader.cancel()
        writer.close()
        after = await client.get("/api/v1/companies")
    assert status == 408
    assert after.status_code == 200 and decode(after)["path"] == "/api/v1/companies"


@pytest.mark.parametrize("target", ["/healthz", "/api/v1/companies"])
async def test_oversized_headers_are_refused_while_parsing(gateway, crm, target):
    """The 431 comes while the header block is still arriving: the server never buffers it whole."""
    async with sidecar(gateway, crm, MAX_HEADER_BYTES=4096) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n".encode())
        line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        sent = 0
        try:
            for _ in range(64 * 1024):  # up to 64 MiB, never finished with the blank line
                writer.write(line)
                await writer.drain()
                sent += len(line)
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    break
        except ConnectionError:
            pass
        status, headers, body = await read_answer(reader)
        writer.close()
    assert status == 431 and headers["connection"] == "close"
    assert "MAX_HEADER_BYTES" in msgspec.json.decode(body)["detail"]
    assert sent < 8 * 1024 * 1024, f"the server let {sent} bytes of headers in before answering"


def test_json_logs_carry_tracebacks_as_text():
    code = ("import logging\nfrom adapter import logs\nlogs.configure('info', 'json')\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    logging.getLogger('uvicorn.error').exception('Exception in ASGI application')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    [line] = done.stderr.strip().splitlines()
    entry = json.loads(line)
    assert entry["event"] == "Exception in ASGI application" and entry["level"] == "error"
    assert "exc_info" not in entry
    assert entry["exception"].startswith("Traceback (most recent call last):") and "ZeroDivisionError" in entry["exception"]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_log_lines_during_a_request_carry_its_id(fmt):
    # The request middleware sets context.current_request_id and binds nothing in structlog's context:
    # a structlog line and a standard-library one (uvicorn's, asyncio's) still name the request.
    code = ("import logging, structlog\nfrom adapter import logs\nfrom adapter.context import current_request_id\n"
            f"logs.configure('info', {fmt!r})\ncurrent_request_id.set('rid-7f3a')\n"
            "structlog.get_logger('adapter.http').info('request')\nlogging.getLogger('uvicorn.error').warning('stdlib')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    for line in lines:
        if fmt == "json":
            assert json.loads(line)["request_id"] == "rid-7f3a"
        else:
            assert "request_id" in line and "rid-7f3a" in line
