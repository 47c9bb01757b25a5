"""A bounded load run: many clients, sync and stream routes, hits and misses, faulted gateway calls.

    python -m bench.load [REQUESTS] [CLIENTS]      (defaults 20000 and 200; needs Redis on 127.0.0.1:6379)

Every request must get a response and every stream must end with `done`: the
run counts the ones that do not as lost. It stops by itself: each client makes
REQUESTS / CLIENTS requests, each with a 120 s timeout.
"""

from __future__ import annotations

import asyncio
import collections
import random
import sys
import time
import uuid

import httpx

from bench.stack import Stack, percentile

TASKS = [("/api/v1/ai/lead/qualify", "lead_id", "leads"), ("/api/v1/ai/email/generate", "lead_id", "leads"),
         ("/api/v1/ai/deal/predict", "deal_id", "deals")]


async def run(stack: Stack, total: int, clients: int) -> dict:
    auth = {"Authorization": f"Bearer {stack.seed['token']}"}
    pools = {"leads": stack.seed["leads"][:300], "deals": stack.seed["deals"][:300]}
    statuses: collections.Counter[str] = collections.Counter()
    caches: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    lost: list[str] = []
    streams = {"started": 0, "done": 0}
    rss: list[int] = []
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=stack.url, timeout=120, limits=limits) as client:
        async def one(rng: random.Random) -> None:
            path, field, pool = rng.choice(TASKS)
            body = {field: rng.choice(pools[pool])}
            fresh = rng.random() < 0.15  # a share of misses on records already cached
            t0 = time.perf_counter()
            try:
                if rng.random() < 0.3:
                    streams["started"] += 1
                    url = path + "/stream" + ("?cache=no-cache" if fresh else "")
                    async with client.stream("POST", url, json=body, headers=auth) as r:
                        status = r.status_code
                        caches[r.headers.get("x-cache", "-")] += 1
                        text = b"".join([chunk async for chunk in r.aiter_bytes()])
                    if status == 200:
                        if b"event: done" not in text:
                            lost.append(f"stream without done: {text[-200:]!r}")
                        else:
                            streams["done"] += 1
                    else:
                        streams["done"] += 1  # refused before the stream opened: a problem response, nothing to finish
                else:
                    r = await client.post(path, json=body, headers={**auth, **({"Cache-Control": "no-cache"} if fresh else {})})
                    status = r.status_code
                    caches[r.headers.get("x-cache", "-")] += 1
            except (httpx.HTTPError, asyncio.TimeoutError) as exc:
                lost.append(f"{type(exc).__name__}: {exc}")
                return
            latencies.append((time.perf_counter() - t0) * 1000)
            statuses[f"{status // 100}xx"] += 1
            statuses[str(status)] += 1

        async def worker(n: int, seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(n):
                await one(rng)

        async def sample_memory(stop: asyncio.Event) -> None:
            while not stop.is_set():
                rss.append(stack.rss_kib())
                try:
                    await asyncio.wait_for(stop.wait(), 1)
                except TimeoutError:
                    pass

        start_rss = stack.rss_kib()
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(stop))
        t0 = time.perf_counter()
        per = total // clients
        await asyncio.gather(*(worker(per, i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
        stop.set()
        await sampler
        # Jobs still running after their clients left must still finish: wait for the sidecar to go idle.
        for _ in range(120):
            metrics = (await client.get("/metrics")).text
            running = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("crm_ai_running_jobs "))
            if running == 0:
                break
            await asyncio.sleep(0.5)
        end_rss = stack.rss_kib()
    return {"requests": per * clients, "answered": len(latencies), "elapsed": elapsed, "statuses": statuses,
            "x_cache": caches, "lost": lost, "streams": streams, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "rss_start": start_rss, "rss_end": end_rss, "rss_peak": max(rss or [end_rss]),
            "running_jobs_after": running}


def main(total: int, clients: int) -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:6379/0", "CACHE_PREFIX": f"load-{uuid.uuid4().hex[:8]}",
           "RATE_LIMIT_EMAIL_GENERATE": "off", "RATE_LIMIT_LEAD_QUALIFY": "off", "RATE_LIMIT_DEAL_PREDICT": "off"}
    with Stack(env=env, double_env={"DOUBLE_FAULT_RATE": "0.1", "DOUBLE_DEFAULT": "fenced"}) as stack:
        r = asyncio.run(run(stack, total, clients))
    print(f"{r['requests']} requests from {clients} concurrent clients in {r['elapsed']:.1f} s "
          f"({r['requests'] / r['elapsed']:.0f} req/s); 10 % of gateway calls faulted")
    print(f"answered {r['answered']}, lost {len(r['lost'])}; streams started {r['streams']['started']}, "
          f"ended with done or a problem {r['streams']['done']}; jobs still running afterwards {r['running_jobs_after']:.0f}")
    print("statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items())))
    print("X-Cache: " + ", ".join(f"{k} {v}" for k, v in sorted(r["x_cache"].items())))
    print(f"latency p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms")
    print(f"sidecar RSS: start {r['rss_start'] / 1024:.1f} MiB, peak {r['rss_peak'] / 1024:.1f} MiB, end {r['rss_end'] / 1024:.1f} MiB")
    for line in r["lost"][:5]:
        print("  lost:", line)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000, int(sys.argv[2]) if len(sys.argv) > 2 else 200)
