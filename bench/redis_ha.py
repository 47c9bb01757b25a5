"""Issue 24's figures: the sidecar on Sentinel and Cluster, many jobs on one runner, many followed jobs.

    python -m bench.redis_ha failover  [--jobs 40]        # Sentinel: SIGKILL the master while jobs stream
    python -m bench.redis_ha reshard   [--jobs 40]        # Cluster: move 5,000 slots while jobs stream
    python -m bench.redis_ha takeovers [--jobs 5000]      # N jobs on one replica, each followed from another
    python -m bench.redis_ha followers [--jobs 5000]      # N distinct jobs followed on one replica (and 50)
    python -m bench.redis_ha cpu       [--requests 3000]  # CPU per cache hit: single Redis, Sentinel, Cluster

Every Redis (a server, a Sentinel set-up, a Cluster) is started here on loopback ports, as the
tests start theirs (tests/helpers.py), and stopped by pid; so are the `adapter serve` replicas.
The gateway and CRM doubles run in this process. Output: a JSON line per run (and `--json FILE`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import redis as redis_sync

from adapter.doubles.crm import CrmDouble
from adapter.doubles.gateway import GatewayDouble
from bench.stack import percentile
from tests.helpers import ClusterSet, Reader, RedisProcess, SentinelSet, metric, replica_cluster, serving, stream_through


def _counts(lines: list[dict[str, Any]], event: str) -> int:
    return sum(1 for line in lines if line.get("event") == event)


def _connections(redis_url_ports: list[int], pids: dict[str, int]) -> dict[str, dict[str, int]]:
    """Connections each replica holds on the Redis servers, by the name each client gives itself (connect.py)."""
    out: dict[str, dict[str, int]] = {name: {} for name in pids}
    by_pid = {str(pid): name for name, pid in pids.items()}
    for port in redis_url_ports:
        with redis_sync.Redis(port=port) as r:
            for c in r.client_list():
                role, _, pid = (c.get("name") or "").rpartition("-")
                if pid in by_pid:
                    out[by_pid[pid]][role] = out[by_pid[pid]].get(role, 0) + 1
    return out


def _proc(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"rss_mb": round(rss / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


async def _disrupted(kind: str, jobs: int, lease: float) -> dict[str, Any]:
    gateway, crm = GatewayDouble(default="tokens", stream_tokens=60, token_interval=0.1), CrmDouble()
    seed = crm.seed()
    seed["token"] = crm.token(seed["alice"])
    with tempfile.TemporaryDirectory() as workdir:
        topology = SentinelSet(Path(workdir)) if kind == "failover" else ClusterSet(Path(workdir))
        try:
            topology.start()
            if isinstance(topology, SentinelSet):
                def disrupt() -> None:
                    t0 = time.monotonic()
                    topology.wait_failover(topology.kill_master())
                    result["failover_s"] = round(time.monotonic() - t0, 2)
            else:
                def disrupt() -> None:
                    t0 = time.monotonic()
                    topology.reshard(5000, 0, 1, timeout=600)
                    result["reshard_s"] = round(time.monotonic() - t0, 2)
            result: dict[str, Any] = {"bench": kind, "jobs": jobs, "lease_s": lease}
            async with AsyncExitStack() as stack:
                gw = await stack.enter_async_context(serving(gateway.app))
                cr = await stack.enter_async_context(serving(crm.app))
                replicas, client = await stack.enter_async_context(replica_cluster(
                    2, gateway_url=gw, crm_url=cr, redis_url=topology.url, lease=lease, prefix="bench-ha", logged=()))
                out = await stream_through(disrupt, urls=[r.url for r in replicas], client=client, crm=crm, owner=seed["alice"],
                                           token=seed["token"], jobs=jobs, timeout=120)
                lines = [line for r in replicas for line in r.lines]
            result.update(hung_readers=out.hung, events_lost=out.lost, events_repeated=out.repeated,
                          longest_gap_s=round(out.longest_gap, 2), sync_by_status={str(k): v for k, v in out.sync.items()},
                          takeovers=_counts(lines, "job.taken_over"), job_model_calls=sum("Streaming lead" in p for _, p in gateway.prompts),
                          lease_renewals_failed=_counts(lines, "job.lease_renewal_failed"),
                          replica_errors=[{k: str(v)[-400:] for k, v in line.items() if k in ("event", "path", "exception", "error")}
                                          for line in lines
                                          if line.get("level") in ("error", "critical") or "Traceback" in str(line.get("event"))][:10])
            return result
        finally:
            topology.stop()


async def _many(jobs: int, lease: float, *, follow_only: bool) -> dict[str, Any]:
    """`jobs` jobs running on replica A, each read by one EventSource on replica B (B follows them all).
    The model is held until every job is created and every reader connected (so all `jobs` run at
    once for as long as that takes, their leases renewed by A), then streams 10 tokens 2 s apart;
    each token is its send time, so a reader on B gives the delay from the model's token (A writes
    it at once) to B's SSE frame."""
    gateway, crm = GatewayDouble(default="tokens", stream_tokens=10, token_interval=2.0), CrmDouble()
    gateway.gate = asyncio.Event()
    seed = crm.seed()
    seed["token"] = crm.token(seed["alice"], expires_in=3600)
    redis = RedisProcess()
    redis.start()
    try:
        async with AsyncExitStack() as stack:
            gw = await stack.enter_async_context(serving(gateway.app))
            cr = await stack.enter_async_context(serving(crm.app))
            replicas, client = await stack.enter_async_context(replica_cluster(
                2, gateway_url=gw, crm_url=cr, redis_url=redis.url, lease=lease, prefix="bench-many", logged=(),
                GATEWAY_MAX_CONNECTIONS=jobs + 100, GATEWAY_MAX_CONCURRENCY=jobs + 100, MAX_STREAMS=jobs + 100))
            a, b = replicas
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=jobs + 200)))
            auth = {"Authorization": f"Bearer {seed['token']}"}
            made: list[dict[str, Any]] = []
            refused: dict[str, int] = {}
            sem = asyncio.Semaphore(100)

            async def create(i: int) -> None:
                lead = crm.add_lead(seed["alice"], name=f"Streaming lead {i:05d}")
                async with sem:
                    try:
                        r = await client.post(a.url + "/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": lead}},
                                              headers=auth)
                        outcome = str(r.status_code)
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                if outcome == "202":
                    made.append(r.json())
                else:
                    refused[outcome] = refused.get(outcome, 0) + 1

            t0 = time.monotonic()
            await asyncio.gather(*(create(i) for i in range(jobs)))
            created_s = time.monotonic() - t0
            readers = [Reader([b.url], job["events_url"]) for job in made]
            tasks = [asyncio.create_task(r.run(client, timeout=900)) for r in readers]
            t1 = time.monotonic()
            for r in readers:  # every reader connected, with the job's first events (the model still held)
                await r.until(lambda r=r: len(r.events) >= 1, 600, "every reader connected")
            connected_s = time.monotonic() - t1
            pids = {"runner": a.proc.pid, "follower": b.proc.pid}
            mid = {"connections": _connections([redis.port], pids), "follower_proc": _proc(b.proc.pid), "runner_proc": _proc(a.proc.pid),
                   "held_s": round(time.monotonic() - t0, 1), "readers_connected_s": round(connected_s, 1)}
            gateway.gate.set()
            done, _ = await asyncio.wait(tasks, timeout=600)
            delays = [e.wall - float(e.json["text"]) for r in readers for e in r.events if e.event == "delta"]
            lines = [line for r in replicas for line in r.lines]
            return {"bench": "followers" if follow_only else "takeovers", "jobs": jobs, "lease_s": lease, "created_s": round(created_s, 1),
                    "created": len(made), "refused": refused,
                    "hung_readers": sum(1 for t in tasks if t not in done or t.exception() is not None),
                    "takeovers": _counts(lines, "job.taken_over"), "ownership_lost": _counts(lines, "job.ownership_lost"),
                    "lease_renewals_failed": _counts(lines, "job.lease_renewal_failed"),
                    "lease_renewals_late": _counts(lines, "job.lease_renewal_late"),
                    "longest_renewal_gap_s": max([float(line.get("since_renewed_s", 0)) for line in lines
                                                  if line.get("event") == "job.lease_renewal_late"] or [0.0]),
                    "job_model_calls": sum("Streaming lead" in p for _, p in gateway.prompts), **mid,
                    "delay_ms": {"p50": round(percentile(delays, 50) * 1000, 1), "p99": round(percentile(delays, 99) * 1000, 1),
                                 "samples": len(delays)} if delays else None}
    finally:
        redis.stop()


def _cpu(requests: int, repeat: int) -> dict[str, Any]:
    from bench import cpu

    with tempfile.TemporaryDirectory() as workdir:
        single, sentinels, cluster = RedisProcess(), SentinelSet(Path(workdir) / "s"), ClusterSet(Path(workdir) / "c")
        (Path(workdir) / "s").mkdir()
        (Path(workdir) / "c").mkdir()
        servers = cpu.Servers()
        try:
            single.start()
            sentinels.start()
            cluster.start()
            servers.start("gateway", "gateway", {})
            servers.start("crm", "crm", {}, str(servers.seed_file))
            urls = {"single": single.url, "sentinel": sentinels.url, "cluster": cluster.url}
            for name, url in urls.items():
                servers.start(name, "sidecar", {**cpu.sidecar_env(servers), "REDIS_URL": url})
            for name in servers.procs:
                cpu._wait_up(servers.url(name) + ("/health" if name in ("gateway", "crm") else "/healthz"), deadline=60)
            seed = json.loads(servers.seed_file.read_text())
            body = json.dumps({"lead_id": seed["leads"][0]})
            headers = {"Authorization": f"Bearer {seed['token']}", "Content-Type": "application/json"}
            for name in urls:
                httpx.post(servers.url(name) + "/api/v1/ai/lead/qualify", content=body, headers=headers, timeout=30).raise_for_status()
            runs: dict[str, list[float]] = {name: [] for name in urls}
            for i in range(repeat):
                order = list(urls) if i % 2 == 0 else list(urls)[::-1]
                for name in order:
                    load = cpu.Load(servers.url(name) + "/api/v1/ai/lead/qualify", method="POST", body=body, headers=headers)
                    runs[name].append(cpu.measure(servers.pid(name), load, requests)["us"])
            med = {name: sorted(v)[len(v) // 2] for name, v in runs.items()}
            return {"bench": "cpu", "requests": requests, "repeat": repeat, "us_per_hit_median": med, "runs": runs,
                    "vs_single_pct": {n: round((med[n] / med["single"] - 1) * 100, 1) for n in ("sentinel", "cluster")}}
        finally:
            servers.close()
            cluster.stop()
            sentinels.stop()
            single.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_ha")
    parser.add_argument("what", choices=["failover", "reshard", "takeovers", "followers", "cpu"])
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--lease", type=float, default=10.0, help="JOB_LEASE_SECONDS of the replicas")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="append the result here")
    args = parser.parse_args()
    if args.what in ("failover", "reshard"):
        result = asyncio.run(_disrupted(args.what, args.jobs or 40, args.lease))
    elif args.what in ("takeovers", "followers"):
        result = asyncio.run(_many(args.jobs or 5000, args.lease, follow_only=args.what == "followers"))
    else:
        result = _cpu(args.requests, args.repeat)
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
