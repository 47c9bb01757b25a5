"""Cache hit against miss, side by side, through the real Redis; and Redis memory per entry.

    python -m bench.cache [N] [CONCURRENCY]

Misses ask about N distinct leads (each a first question); hits repeat one lead.
Both go through the same sidecar process, the CRM lookup included every time.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import httpx
import redis

from bench.stack import Stack, percentile

REDIS = "redis://127.0.0.1:6379/0"


async def measure(url: str, auth: dict, leads: list[str], concurrency: int) -> tuple[list[float], float, dict[str, int]]:
    latencies: list[float] = []
    seen: dict[str, int] = {}
    queue = iter(leads)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def worker() -> None:
            for lead in queue:
                t0 = time.perf_counter()
                r = await client.post("/api/v1/ai/lead/qualify", json={"lead_id": lead}, headers=auth)
                latencies.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
                seen[r.headers["x-cache"]] = seen.get(r.headers["x-cache"], 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return latencies, len(leads) / elapsed, seen


def main(n: int, concurrency: int) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with Stack(env={"REDIS_URL": REDIS, "CACHE_PREFIX": prefix, "RATE_LIMIT_LEAD_QUALIFY": "off", "CRM_WRITE_BACK": "false"}) as stack:
        auth = {"Authorization": f"Bearer {stack.seed['token']}"}
        leads = stack.seed["leads"][:n]
        hot = leads[0]
        asyncio.run(measure(stack.url, auth, [hot] * 200, concurrency))  # warm-up, and caches `hot`
        rows = []
        for label, batch in (("miss", leads[1:n]), ("hit", [hot] * (n - 1))):
            lat, rps, seen = asyncio.run(measure(stack.url, auth, batch, concurrency))
            rows.append((label, percentile(lat, 50), percentile(lat, 99), rps, seen))
        with httpx.Client(base_url=stack.url, headers=auth) as client:  # one entry of each other task
            client.post("/api/v1/ai/email/generate", json={"lead_id": hot})
            client.post("/api/v1/ai/deal/predict", json={"deal_id": stack.seed["deals"][0]})
    print(f"{n - 1} requests per row, {concurrency} concurrent clients, one sidecar process, Redis {REDIS}")
    print(f"{'':6s}{'p50 ms':>10s}{'p99 ms':>10s}{'req/s':>10s}  X-Cache")
    for label, p50, p99, rps, seen in rows:
        print(f"{label:6s}{p50:10.2f}{p99:10.2f}{rps:10.0f}  {seen}")
    with redis.Redis.from_url(REDIS) as r:
        print("Redis memory per cached entry (MEMORY USAGE, bytes):")
        for task in ("lead.qualify", "email.generate", "deal.predict"):
            keys = list(r.scan_iter(f"{prefix}:result:{task}:*", count=1000))
            sizes = [r.memory_usage(k) for k in keys[:200]]
            print(f"  {task:15s} {sum(sizes) / len(sizes):8.0f}  (value {len(r.get(keys[0]))} bytes, {len(keys)} entries)")
        for k in r.scan_iter(f"{prefix}:*", count=1000):
            r.delete(k)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2001, int(sys.argv[2]) if len(sys.argv) > 2 else 16)
