"""Notifications (issue 26): their CPU, their outbox lag under load, and what a killed replica loses.

    python -m bench.notify cpu  [--requests N] [--repeat R]   CPU per fresh answer, both sinks on vs off
    python -m bench.notify lag  [--requests N] [--clients C]  outbox lag p99 under bench.load's mix
    python -m bench.notify kill [--seconds S] [--every K]     duplicates and losses with a replica killed every K s

Needs Redis on 127.0.0.1:6379 and wrk (cpu). Each run starts its own nx-27017 (the CRM's MongoDB
stand-in) and a webhook receiver, each in its own process, stopped by pid at the end.

- cpu: two sidecars, one with no sink and one with both (CRM_NOTIFICATIONS_MONGODB_URI and a
  webhook), answer uncached `lead.qualify` (Cache-Control: no-store, no write-back). The CRM double
  here gives every read a new `updated_at`, so every answer is a new event, delivered to both sinks:
  the worst case, a notification per answer. The sidecar's process CPU is read once the outbox is
  empty, so the worker's deliveries are inside the figure.
- lag: bench.load's run (sync and stream routes, hits and misses, 10 % faulted gateway calls) against
  a sidecar with both sinks; the first qualification of each lead and the first prediction of each
  deal notify. Reported: crm_ai_notify_outbox_lag_seconds (event made -> first delivery attempt, from
  its buckets) and the receiver's own clock (event made -> webhook received).
- kill: three `adapter serve` replicas; clients qualify distinct leads round-robin (retrying on
  another replica until one answers 200); every K seconds one replica is SIGKILLed and started
  again. Then the outbox must drain, and each lead that answered must have exactly one CRM document
  and one webhook event id. Lost = leads without; duplicates = leads with more than one.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from adapter.notify.outbox import notify_key
from bench.stack import ROOT, SECRET, Stack, _wait_up, percentile

HOOK_SECRET = "whsec_" + "YmVuY2gtd2ViaG9vay1zZWNyZXQtYmVuY2gtd2ViaG9vaw=="
SIGNING_KEY = "bench-signing-key-" + "b" * 24
PYTHON = sys.executable


# --- the processes ------------------------------------------------------------------------------

class Procs:
    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.files: list[Path] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[name] = proc
        return proc

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for f in self.files:
            f.unlink(missing_ok=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mongo(procs: Procs) -> str:
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bench-nx-"))
    exe = str(Path(PYTHON).parent / "nx-27017")
    procs.start("mongo", [exe, "--data-dir", str(data), "--pid-file", str(data / "pid"), "--log-file", str(data / "log"),
                          "--host", "127.0.0.1", "-p", str(port)])
    deadline = time.monotonic() + 30
    import socket

    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("nx-27017 did not start") from None
            time.sleep(0.1)
    return f"mongodb://127.0.0.1:{port}/bench_crm"


def start_hook(procs: Procs) -> str:
    port = free_port()
    procs.start("hook", [PYTHON, "-m", "bench.notify", "_hook", str(port)])
    url = f"http://127.0.0.1:{port}"
    _wait_up(url + "/stats")
    return url


def notify_env(mongo: str, hook: str) -> dict[str, str]:
    return {"CRM_NOTIFICATIONS_MONGODB_URI": mongo, "WEBHOOK_URLS": hook + "/hook", "WEBHOOK_SECRETS": HOOK_SECRET}


async def drained(redis_url: str, prefix: str, timeout: float = 120) -> None:
    import redis.asyncio as aioredis

    async with aioredis.Redis.from_url(redis_url) as r:
        deadline = time.monotonic() + timeout
        while await r.xlen(notify_key(prefix, "outbox")) or await r.zcard(notify_key(prefix, "retry")):
            if time.monotonic() > deadline:
                raise RuntimeError("the outbox did not drain")
            await asyncio.sleep(0.1)


def histogram_quantile(metrics: str, name: str, q: float) -> tuple[float, int]:
    """Prometheus' histogram_quantile over one histogram's buckets (linear within a bucket), and its count."""
    buckets = []
    for line in metrics.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    total = buckets[-1][1] if buckets else 0
    if not total:
        return float("nan"), 0
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower, int(total)
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-9), int(total)
        lower, below = le, count
    return lower, int(total)


# --- cpu ----------------------------------------------------------------------------------------

def cpu(n: int, repeat: int) -> None:
    from bench.cpu import Load, cpu_seconds, wrk

    procs = Procs()
    seed_file = Path(tempfile.mkstemp(suffix=".json")[1])
    procs.files.append(seed_file)
    try:
        mongo, hook = start_mongo(procs), start_hook(procs)
        ports = {name: free_port() for name in ("gateway", "crm", "off", "on")}
        procs.start("gateway", [PYTHON, "-m", "bench.stack", "gateway", str(ports["gateway"])])
        procs.start("crm", [PYTHON, "-m", "bench.notify", "_crm", str(ports["crm"]), str(seed_file)])
        prefixes = {v: f"notify-cpu-{v}-{uuid.uuid4().hex[:6]}" for v in ("off", "on")}
        for v in ("off", "on"):
            env = {"CONDUCTOR_GATEWAY_URL": f"http://127.0.0.1:{ports['gateway']}", "CRM_BACKEND_URL": f"http://127.0.0.1:{ports['crm']}",
                   "REDIS_URL": "redis://127.0.0.1:6379/0", "CACHE_PREFIX": prefixes[v], "REDIS_SIGNING_KEY": SIGNING_KEY,
                   "RATE_LIMIT_LEAD_QUALIFY": "off", "CRM_WRITE_BACK": "false", "LOG_LEVEL": "info",
                   **(notify_env(mongo, hook) if v == "on" else {})}
            procs.start(v, [PYTHON, "-m", "bench.stack", "sidecar", str(ports[v])], env)
        for name, path in (("gateway", "/health"), ("crm", "/health"), ("off", "/healthz"), ("on", "/healthz")):
            _wait_up(f"http://127.0.0.1:{ports[name]}{path}", deadline=60)
        seed = json.loads(seed_file.read_text())
        body = json.dumps({"lead_id": seed["leads"][0]})
        headers = {"Authorization": f"Bearer {seed['token']}", "Content-Type": "application/json", "Cache-Control": "no-store"}
        results: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(repeat):
            for v in (("off", "on") if i % 2 == 0 else ("on", "off")):
                load = Load(f"http://127.0.0.1:{ports[v]}/api/v1/ai/lead/qualify", method="POST", body=body, headers=headers)
                pid = procs.procs[v].pid
                wrk(load, max(50, n // 10))
                asyncio.run(drained("redis://127.0.0.1:6379/0", prefixes[v]))
                before = cpu_seconds(pid)
                r = wrk(load, n)
                asyncio.run(drained("redis://127.0.0.1:6379/0", prefixes[v]))  # the worker's deliveries count too
                results[v].append((cpu_seconds(pid) - before) / r["answered"] * 1e6)
        stats = httpx.get(hook + "/stats").json()
        metrics = httpx.get(f"http://127.0.0.1:{ports['on']}/metrics").text
        lag, count = histogram_quantile(metrics, "crm_ai_notify_outbox_lag_seconds", 0.99)
        off, on = statistics.median(results["off"]), statistics.median(results["on"])
        print(f"uncached lead.qualify (no write-back), {n} requests x {repeat}, median CPU µs per answer:")
        print(f"  sinks off: {off:,.0f} (runs {', '.join(f'{x:,.0f}' for x in results['off'])})")
        print(f"  both sinks on, every answer a new notification: {on:,.0f} (runs {', '.join(f'{x:,.0f}' for x in results['on'])})")
        print(f"  added per fresh answer: {on - off:,.0f} µs ({(on - off) / off * 100:.0f} %)")
        print(f"  webhook events received {stats['received']} ({stats['distinct']} distinct); outbox lag p99 "
              f"{lag * 1000:.1f} ms over {count} events")
    finally:
        procs.close()


# --- lag ----------------------------------------------------------------------------------------

def lag(total: int, clients: int) -> None:
    from bench import load as bench_load

    procs = Procs()
    try:
        mongo, hook = start_mongo(procs), start_hook(procs)
        prefix = f"notify-load-{uuid.uuid4().hex[:8]}"
        env = {"REDIS_URL": "redis://127.0.0.1:6379/0", "CACHE_PREFIX": prefix, "REDIS_SIGNING_KEY": SIGNING_KEY,
               "RATE_LIMIT_EMAIL_GENERATE": "off", "RATE_LIMIT_LEAD_QUALIFY": "off", "RATE_LIMIT_DEAL_PREDICT": "off",
               **notify_env(mongo, hook)}
        with Stack(env=env, double_env={"DOUBLE_FAULT_RATE": "0.1", "DOUBLE_DEFAULT": "fenced"}) as stack:
            r = asyncio.run(bench_load.run(stack, total, clients))
            asyncio.run(drained("redis://127.0.0.1:6379/0", prefix))
            metrics = httpx.get(stack.url + "/metrics").text
        stats = httpx.get(hook + "/stats").json()
        p99, count = histogram_quantile(metrics, "crm_ai_notify_outbox_lag_seconds", 0.99)
        p50, _ = histogram_quantile(metrics, "crm_ai_notify_outbox_lag_seconds", 0.50)
        print(f"bench.load: {r['requests']} requests, {clients} clients, {r['elapsed']:.1f} s "
              f"({r['requests'] / r['elapsed']:.0f} req/s), lost {len(r['lost'])}, latency p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms")
        print(f"notifications: {count} events; outbox lag (event made -> first attempt, from the histogram's buckets) "
              f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
        print(f"webhook receiver: {stats['received']} received ({stats['distinct']} distinct ids); event made -> received "
              f"p50 {stats['lag_p50_ms']:.1f} ms, p99 {stats['lag_p99_ms']:.1f} ms")
    finally:
        procs.close()


# --- kill ---------------------------------------------------------------------------------------

async def _kill_run(seconds: float, every: float, replicas_n: int, clients: int) -> dict:
    from pymongo import AsyncMongoClient

    procs = Procs()
    seed_file = Path(tempfile.mkstemp(suffix=".json")[1])
    procs.files.append(seed_file)
    try:
        mongo, hook = start_mongo(procs), start_hook(procs)
        gw_port, crm_port = free_port(), free_port()
        procs.start("gateway", [PYTHON, "-m", "bench.stack", "gateway", str(gw_port)], {"DOUBLE_DELAY": "0.05"})
        procs.start("crm", [PYTHON, "-m", "bench.stack", "crm", str(crm_port), str(seed_file)])
        _wait_up(f"http://127.0.0.1:{gw_port}/health")
        _wait_up(f"http://127.0.0.1:{crm_port}/health")
        prefix = f"notify-kill-{uuid.uuid4().hex[:8]}"
        env = {"CONDUCTOR_GATEWAY_URL": f"http://127.0.0.1:{gw_port}", "CRM_BACKEND_URL": f"http://127.0.0.1:{crm_port}",
               "REDIS_URL": "redis://127.0.0.1:6379/0", "CACHE_PREFIX": prefix, "REDIS_SIGNING_KEY": SIGNING_KEY,
               "JOB_TOKEN_SECRET": "k" * 40, "RATE_LIMIT_LEAD_QUALIFY": "off", "CRM_READS_PER_USER": "off",
               "NOTIFY_CLAIM_IDLE_SECONDS": "3", "CACHE_LOCK_TIMEOUT": "3", "LOG_LEVEL": "warning", **notify_env(mongo, hook)}
        ports = [free_port() for _ in range(replicas_n)]

        def start(i: int) -> None:
            procs.start(f"replica-{i}", [PYTHON, "-m", "adapter.cli", "serve", "--port", str(ports[i])], env)

        for i in range(replicas_n):
            start(i)
        for p in ports:
            _wait_up(f"http://127.0.0.1:{p}/healthz", deadline=60)
        seed = json.loads(seed_file.read_text())
        todo = list(seed["leads"])
        answered: set[str] = set()
        auth = {"Authorization": f"Bearer {seed['token']}"}
        stop_at = time.monotonic() + seconds
        kills = 0

        async def killer() -> None:
            nonlocal kills
            turn = 0
            while time.monotonic() + every < stop_at + 0.01:
                await asyncio.sleep(every)
                i = turn % replicas_n
                turn += 1
                procs.procs[f"replica-{i}"].send_signal(signal.SIGKILL)
                procs.procs[f"replica-{i}"].wait()
                kills += 1
                start(i)  # back within a second or two, as an orchestrator would restart it

        async def client(k: int, http: httpx.AsyncClient) -> None:
            turn = k
            while time.monotonic() < stop_at and todo:
                lead = todo.pop()
                for _ in range(50):  # retried on the next replica until one answers
                    turn += 1
                    try:
                        r = await http.post(f"http://127.0.0.1:{ports[turn % replicas_n]}/api/v1/ai/lead/qualify",
                                            json={"lead_id": lead}, headers=auth)
                    except httpx.HTTPError:
                        await asyncio.sleep(0.05)
                        continue
                    if r.status_code == 200:
                        answered.add(lead)
                        break
                    await asyncio.sleep(0.05)

        async with httpx.AsyncClient(timeout=30) as http:
            await asyncio.gather(killer(), *(client(k, http) for k in range(clients)))
            for p in ports:  # every replica up again before waiting for the outbox
                _wait_up(f"http://127.0.0.1:{p}/healthz", deadline=60)
            await drained("redis://127.0.0.1:6379/0", prefix, timeout=180)
        stats = httpx.get(hook + "/stats").json()
        mc: AsyncMongoClient = AsyncMongoClient(mongo)
        try:
            docs = [d async for d in mc.get_default_database()["notifications"].find({})]
        finally:
            await mc.close()
        per_lead: dict[str, int] = {}
        for d in docs:
            per_lead[str(d["entity_id"])] = per_lead.get(str(d["entity_id"]), 0) + 1
        hooks = stats["ids_per_entity"]
        return {"answered": len(answered), "kills": kills, "seconds": seconds,
                "crm_lost": sorted(answered - set(per_lead)), "crm_dups": {k: v for k, v in per_lead.items() if v > 1},
                "crm_extra": sorted(set(per_lead) - answered),
                "hook_lost": sorted(answered - set(hooks)), "hook_dups": {k: v for k, v in hooks.items() if v > 1},
                "redeliveries": stats["received"] - stats["distinct"]}
    finally:
        procs.close()


def kill(seconds: float, every: float, replicas_n: int, clients: int) -> None:
    r = asyncio.run(_kill_run(seconds, every, replicas_n, clients))
    print(f"{replicas_n} replicas, one SIGKILLed every {every:g} s and restarted ({r['kills']} kills in {r['seconds']:g} s); "
          f"{r['answered']} leads qualified (each a Hot/Warm/Cold change: one notification each)")
    print(f"CRM notifications: lost {len(r['crm_lost'])}, duplicate {len(r['crm_dups'])}, without an answer {len(r['crm_extra'])}")
    print(f"webhook events: lost {len(r['hook_lost'])}, duplicate (two ids for one lead) {len(r['hook_dups'])}; "
          f"redeliveries of one id (at-least-once, same webhook-id) {r['redeliveries']}")
    for name in ("crm_lost", "crm_dups", "hook_lost", "hook_dups"):
        if r[name]:
            print(f"  {name}: {list(r[name])[:5]}")


# --- the helper servers -------------------------------------------------------------------------

def _hook(port: int) -> None:
    from litestar import Litestar, Request, get, post

    from bench.stack import _serve

    received: list[tuple[str, str | None, float]] = []

    @post("/hook", status_code=204)
    async def hook(request: Request) -> None:
        body = json.loads(await request.body())
        made = dt.datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")).timestamp()
        received.append((request.headers["webhook-id"], body["data"].get("entity_id"), (time.time() - made) * 1000))

    @get("/stats")
    async def stats() -> dict:
        ids: dict[str, set[str]] = {}
        for msg_id, entity, _ in received:
            ids.setdefault(entity or "", set()).add(msg_id)
        lags = [lag for _, _, lag in received]
        return {"received": len(received), "distinct": len({m for m, _, _ in received}),
                "ids_per_entity": {k: len(v) for k, v in ids.items()},
                "lag_p50_ms": percentile(lags, 50) if lags else 0.0, "lag_p99_ms": percentile(lags, 99) if lags else 0.0}

    _serve(Litestar([hook, stats], logging_config=None), port)


def _crm(port: int, seed_file: str) -> None:
    """bench.stack's CRM double, whose every record read gives the record a new `updated_at`: each fresh
    answer is then a new event (a new record version), the worst case for the notification path."""
    from adapter.doubles.crm import CrmDouble
    from bench.stack import _serve

    class FreshVersions(CrmDouble):
        async def _record(self, request, kind, record_id, changes=None):  # noqa: ANN001, ANN202
            if changes is None and record_id in self.collections.get(kind, {}):
                self.collections[kind][record_id]["updated_at"] = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat()
            return await super()._record(request, kind, record_id, changes)

    crm = FreshVersions(secret=SECRET)
    seed = crm.seed()
    Path(seed_file).write_text(json.dumps({"token": crm.token(seed["alice"], expires_in=86400), "leads": seed["leads"],
                                           "deals": seed["deals"]}))
    _serve(crm.app, port)


def main() -> None:
    if sys.argv[1:2] == ["_hook"]:
        return _hook(int(sys.argv[2]))
    if sys.argv[1:2] == ["_crm"]:
        return _crm(int(sys.argv[2]), sys.argv[3])
    parser = argparse.ArgumentParser(prog="python -m bench.notify")
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--requests", type=int, default=2000)
    c.add_argument("--repeat", type=int, default=3)
    g = sub.add_parser("lag")
    g.add_argument("--requests", type=int, default=20_000)
    g.add_argument("--clients", type=int, default=200)
    k = sub.add_parser("kill")
    k.add_argument("--seconds", type=float, default=60)
    k.add_argument("--every", type=float, default=10)
    k.add_argument("--replicas", type=int, default=3)
    k.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    if args.what == "cpu":
        cpu(args.requests, args.repeat)
    elif args.what == "lag":
        lag(args.requests, args.clients)
    else:
        kill(args.seconds, args.every, args.replicas, args.clients)
    return None


if __name__ == "__main__":
    main()
