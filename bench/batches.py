"""A big batch against the doubles with a fixed model delay: wall time, sidecar CPU per item, model
calls, and what it does to interactive requests running beside it.

    python -m bench.batches [--items 500] [--cached 100] [--delay 0.05] [--interactive 200]

Each server runs in its own process (bench.stack). `--cached` of the items are asked once on the
synchronous route first, so the batch finds them in the cache; the model calls the batch makes are
read from the sidecar's own metrics (`crm_ai_gateway_calls_total`) and must equal the distinct
uncached items. Interactive latency: `--interactive` synchronous `deal.predict` calls (no-cache, one
at a time, a different task so the batch's cache cannot help them), first with no batch running,
then while the batch runs, p50 and p99 of each.
"""

from __future__ import annotations

import argparse
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.stack import Stack, percentile

INTERACTIVE_HEADERS = {"Cache-Control": "no-cache"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def gateway_calls(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(r'^crm_ai_gateway_calls_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))


def interactive(client: httpx.Client, deals: list[str], n: int, auth: dict[str, str]) -> list[float]:
    took = []
    for i in range(n):
        t0 = time.perf_counter()
        r = client.post("/api/v1/ai/deal/predict", json={"deal_id": deals[i % len(deals)]}, headers={**auth, **INTERACTIVE_HEADERS})
        took.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--cached", type=int, default=100)
    parser.add_argument("--delay", type=float, default=0.05, help="the model's answer time, seconds")
    parser.add_argument("--interactive", type=int, default=200)
    args = parser.parse_args()
    env = {"RATE_LIMIT_LEAD_QUALIFY": "off", "RATE_LIMIT_DEAL_PREDICT": "off", "CRM_WRITE_BACK": "false",
           "REDIS_URL": "redis://127.0.0.1:6379/0", "CACHE_PREFIX": f"bench-batch-{int(time.time())}",
           "GATEWAY_MAX_CONCURRENCY": "8", "LOG_LEVEL": "warning"}
    with Stack(env=env, ports=(18201, 18202, 18203), double_env={"DOUBLE_DELAY": str(args.delay)}) as stack, \
            httpx.Client(base_url=stack.url, timeout=120) as client:
        auth = {"Authorization": f"Bearer {stack.seed['token']}"}
        leads = stack.seed["leads"][: args.items]
        deals = stack.seed["deals"]
        for lead in leads[: args.cached]:
            assert client.post("/api/v1/ai/lead/qualify", json={"lead_id": lead}, headers=auth).status_code == 200
        quiet = interactive(client, deals, args.interactive, auth)

        pid = stack.procs[2].pid
        calls0, cpu0, t0 = gateway_calls(client), cpu_seconds(pid), time.perf_counter()
        created = client.post("/api/v1/ai/batches", json={"task": "lead.qualify", "ids": leads}, headers=auth)
        assert created.status_code == 202, created.text
        batch = created.json()
        # The interactive calls run beside the batch, in a thread of their own; this one follows the
        # batch's events to its `done` (reading them is cheap; polling the whole view is not).
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=stack.url, timeout=120) as other:
            busy_calls = pool.submit(interactive, other, deals, args.interactive, auth)
            with httpx.stream("GET", stack.url + batch["events_url"], timeout=600) as events:
                for line in events.iter_lines():
                    if line == "event: done":
                        break
            wall = time.perf_counter() - t0
            cpu = cpu_seconds(pid) - cpu0
            busy = busy_calls.result()
        view = client.get(f"/api/v1/ai/batches/{batch['batch_id']}", headers=auth).json()
        calls = gateway_calls(client) - calls0 - args.interactive
    counts = view["counts"]
    print(f"{args.items}-item lead.qualify batch, BATCH_CONCURRENCY=4 (default), model delay {args.delay * 1000:.0f} ms, "
          f"GATEWAY_MAX_CONCURRENCY=8, Redis cache; {args.cached} items cached beforehand\n")
    print(f"| figure | value |\n|---|---:|")
    print(f"| wall time | {wall:.2f} s |")
    print(f"| sidecar CPU per item, from the POST to `done` (the interactive calls made meanwhile included) | {cpu / args.items * 1e6:,.0f} µs |")
    print(f"| model calls made by the batch | {calls:.0f} |")
    print(f"| distinct uncached items | {args.items - args.cached} |")
    print(f"| counts | {counts} |")
    print(f"| interactive deal.predict p50 / p99, no batch | {percentile(quiet, 50):.1f} / {percentile(quiet, 99):.1f} ms |")
    print(f"| interactive deal.predict p50 / p99, during the batch | {percentile(busy, 50):.1f} / {percentile(busy, 99):.1f} ms |")


if __name__ == "__main__":
    main()
