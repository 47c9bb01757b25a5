"""The gateway's job stream read over aiohttp directly (our own client) reads what httpx-sse reads."""

from __future__ import annotations

import httpx
import pytest

from adapter.doubles.gateway import GatewayDouble
from adapter.errors import AgentFailed
from adapter.upstreams import transport
from adapter.upstreams.gateway import GatewayClient, ProviderPlan
from adapter.upstreams.sse_read import Lines, sse_data
from tests.helpers import LEAD_AGENT, make_settings, serving


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


async def test_sse_data_splits_lines_across_chunks_as_httpx_sse_does():
    parts = (b": keep-alive\r", b"\ndata: {\"a\":", b" 1}\r\n\r\nevent: x\ndata:", b"one\ndata: two\n\n",
             b"data: \xc3", b"\xa9\n\n", b"data: never dispatched\n")
    got = [d async for d in sse_data(_chunks(*parts))]
    assert got == ['{"a": 1}', "one\ntwo", "\u00e9"]


def test_a_line_in_many_chunks_is_joined_once():
    lines = Lines()
    assert all(lines.feed("x" * 10) == [] for _ in range(1000))
    assert lines.feed("\r") == [] and lines.feed("\ny\n") == ["x" * 10_000, "y"]


async def _run(http: httpx.AsyncClient, double: GatewayDouble, behaviours: tuple[str, ...]):
    double.push(LEAD_AGENT, *behaviours)
    client = GatewayClient(http, make_settings())
    seen: list[tuple[str, object]] = []
    try:
        # A token's text is its send time (the double's, for benchmarks): compared by shape.
        text = await client.stream_run(LEAD_AGENT, "a lead", ProviderPlan(),
                                       lambda name, data: seen.append((name, "<token>" if name == "delta" else data)))
    except AgentFailed as exc:
        return ("failed", str(exc)), seen
    return ("text", text), seen


@pytest.mark.parametrize("behaviours", [("fenced",), ("tokens",), ("stream_error",), ("cut", "fenced"), ("no_result", "json"),
                                        ("vanished", "json")])
async def test_the_direct_read_gives_what_httpx_sse_gives(behaviours):
    double = GatewayDouble(stream_tokens=3, job_linger=0.5)
    async with serving(double.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as plain:
            expected = await _run(plain, double, behaviours)
        ours = transport.client(base_url=url, timeout=httpx.Timeout(10), limits=httpx.Limits(max_connections=4))
        async with ours:
            assert transport.direct(ours) and not transport.direct(plain)
            got = await _run(ours, double, behaviours)
    assert got == expected
    assert got[0][0] == ("failed" if behaviours == ("stream_error",) else "text")
