"""SSE through the sidecar against reading the gateway double directly, in one run.

    python -m bench.streams

1. events/s through one stream: 20,000 unpaced token events;
2. added per-event latency: 2,000 tokens paced 2 ms apart, each token its send time;
3. time to first byte and to the first event;
4. the sidecar's memory with 1,000 concurrent open streams (1,000 distinct jobs, model silent).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec
from httpx_sse import aconnect_sse

from bench.stack import Stack, lead_qualify_input, percentile

decode = msgspec.json.decode


async def direct(stack: Stack, body: dict) -> tuple[list[float], float, float]:
    """(per-token latency ms, events/s, ttfb ms) reading the gateway double directly."""
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=None) as client:
        t0 = time.perf_counter()
        job = (await client.post("/api/v1/stream-execute", json=body)).json()["job_id"]
        lat, n, ttfb = [], 0, None
        async with aconnect_sse(client, "GET", f"/api/v1/stream/{job}") as source:
            async for sse in source.aiter_sse():
                now = time.time()
                ttfb = ttfb or (time.perf_counter() - t0) * 1000
                envelope = decode(sse.data)
                if envelope["event"] == "on_llm_new_token":
                    n += 1
                    lat.append((now - float(envelope["data"]["token"])) * 1000)
        return lat, n / (time.perf_counter() - t0), ttfb


async def through(stack: Stack, lead: str, auth: dict) -> tuple[list[float], float, float, float]:
    """(per-token latency ms, events/s, ttfb ms, first-event ms) through the sidecar."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=None) as client:
        t0 = time.perf_counter()
        lat, n, ttfb, first = [], 0, None, None
        async with client.stream("POST", "/api/v1/ai/lead/qualify/stream?cache=no-store", json={"lead_id": lead}, headers=auth) as r:
            # Whole lines: a read can end inside an event's data line.
            async for line in r.aiter_lines():
                ttfb = ttfb or (time.perf_counter() - t0) * 1000
                now = time.time()
                if line.startswith("data: "):
                    first = first or (time.perf_counter() - t0) * 1000
                    data = decode(line[6:])
                    if isinstance(data, dict) and "text" in data:
                        n += 1
                        lat.append((now - float(data["text"])) * 1000)
        return lat, n / (time.perf_counter() - t0), ttfb, first


async def open_streams(stack: Stack, leads: list[str], auth: dict) -> tuple[int, int]:
    """Open one stream per lead, read its first event on each, report the sidecar's RSS; then hang up."""
    limits = httpx.Limits(max_connections=len(leads) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=stack.url, timeout=None, limits=limits) as client:
        opened = asyncio.Event()
        count = 0

        async def hold(lead: str) -> None:
            nonlocal count
            async with client.stream("POST", "/api/v1/ai/lead/qualify/stream?cache=no-store", json={"lead_id": lead}, headers=auth) as r:
                async for chunk in r.aiter_bytes():
                    if b"event: status" in chunk:
                        count += 1
                        if count == len(leads):
                            opened.set()
                        await asyncio.Event().wait()  # keep the stream open until cancelled

        before = stack.rss_kib()
        tasks = [asyncio.create_task(hold(lead)) for lead in leads]
        try:
            await asyncio.wait_for(opened.wait(), 120)
        except TimeoutError:
            raise RuntimeError(f"only {count} of {len(leads)} streams opened in 120 s") from None
        during = stack.rss_kib()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return before, during


def main() -> None:
    results = {}
    for label, tokens, interval in (("throughput", 20_000, 0.0), ("latency", 2_000, 0.002)):
        with Stack(env={"RATE_LIMIT_LEAD_QUALIFY": "off"},
                   double_env={"DOUBLE_DEFAULT": "tokens", "DOUBLE_TOKENS": str(tokens), "DOUBLE_TOKEN_INTERVAL": str(interval)}) as stack:
            auth = {"Authorization": f"Bearer {stack.seed['token']}"}
            lead = stack.seed["leads"][0]
            with httpx.Client() as c:
                record = c.get(f"{stack.crm_url}/api/v1/leads/{lead}", headers=auth).json()
            body = {"agent_id": "LeadQualifier_CRM_Agent", "input": lead_qualify_input(record),
                    "screenplay_id": "crm-ai-sidecar", "cwd": "/tmp"}  # as the sidecar sends; the gateway wants both
            results[label] = (asyncio.run(direct(stack, body)), asyncio.run(through(stack, lead, auth)))
    # One user opening 1,000 streams: lift the per-user rate limit and the bulkhead (defaults 60/min and 200).
    with Stack(env={"RATE_LIMIT_LEAD_QUALIFY": "off", "GATEWAY_MAX_CONCURRENCY": "2000"},
               double_env={"DOUBLE_DELAY": "600"}) as stack:
        auth = {"Authorization": f"Bearer {stack.seed['token']}"}
        baseline = stack.rss_kib()
        before, during = asyncio.run(open_streams(stack, stack.seed["leads"][:1000], auth))

    (d_lat, d_rate, d_ttfb), (s_lat, s_rate, s_ttfb, s_first) = results["throughput"]
    print(f"events/s through one stream (20,000 tokens, unpaced): direct {d_rate:,.0f}, through the sidecar {s_rate:,.0f}")
    (d_lat, _, d_ttfb), (s_lat, _, s_ttfb, s_first) = results["latency"]
    print("per-event latency, tokens 2 ms apart (ms):  p50     p99")
    print(f"  gateway double read directly        {percentile(d_lat, 50):7.3f} {percentile(d_lat, 99):7.3f}")
    print(f"  through the sidecar                 {percentile(s_lat, 50):7.3f} {percentile(s_lat, 99):7.3f}")
    print(f"  added by the sidecar                {percentile(s_lat, 50) - percentile(d_lat, 50):7.3f} {percentile(s_lat, 99) - percentile(d_lat, 99):7.3f}")
    print(f"time to first byte: direct (POST + GET) {d_ttfb:.2f} ms; sidecar {s_ttfb:.2f} ms (first event {s_first:.2f} ms)")
    print(f"sidecar RSS: idle {baseline / 1024:.1f} MiB, before {before / 1024:.1f} MiB, "
          f"with 1,000 open streams {during / 1024:.1f} MiB (+{(during - before) / 1000:.1f} KiB per stream)")


if __name__ == "__main__":
    main()
