"""Jobs across replicas: takeover time, readers that hang, lost or repeated events, cross-replica latency.

    python -m bench.takeover [--trials 20] [--lease 10] [--grace 1]

Three `adapter serve` replicas share a redis-server started here; the gateway and CRM
doubles run in this process (the bench counts model calls and holds the model).

1. kill -9: a job runs on one replica (the model holding), with a reader on every
   replica; the runner is killed. Takeover time = from the kill to the arrival, at a
   reader, of the `status` event the new owner writes when it resumes the job.
   The killed replica is started again for the next trial.
2. SIGTERM: the same, with `SHUTDOWN_GRACE_SECONDS=--grace`; takeover time is from
   the signal (so it includes the grace) and is also given net of the grace.
   In both, every reader must end with `done` within 60 s (else it hung) and see the
   ids 1..n exactly once (else events were missing or repeated).
3. Per-event latency: one job streaming 300 tokens 10 ms apart, each token its send
   time, read by a reader on the runner and one on another replica.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
import uuid

import httpx

from adapter import servers
from adapter.doubles.crm import CrmDouble
from adapter.doubles.gateway import GatewayDouble
from bench.stack import percentile
from tests.helpers import Reader, Replica, free_port


def start_redis() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # type: ignore[union-attr]
        if "Ready to accept connections" in line:
            break
    proc.stdout.close()  # type: ignore[union-attr]
    return proc, f"redis://127.0.0.1:{port}/0"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.gateway = GatewayDouble(default="tokens", token_interval=0.01)
        self.crm = CrmDouble()
        self.seed = self.crm.seed()
        self.token = self.crm.token(self.seed["alice"])
        self.replicas: list[Replica] = []

    async def replica(self, env: dict[str, str], name: str) -> Replica:
        r = Replica(name, free_port(), env)
        await r.start()
        return r

    async def job(self, client: httpx.AsyncClient, on: Replica) -> dict:
        r = await client.post(on.url + "/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": self.seed["leads"][0]}},
                              headers={"Authorization": f"Bearer {self.token}", "Cache-Control": "no-store"})
        r.raise_for_status()
        return r.json()

    async def trial(self, client: httpx.AsyncClient, env: dict[str, str], index: int, how: str) -> dict:
        runner_at = index % 3
        runner = self.replicas[runner_at]
        self.gateway.gate = asyncio.Event()
        calls = self.gateway.calls.total()
        job = await self.job(client, runner)
        urls = [r.url for r in self.replicas]
        readers = [Reader(urls, job["events_url"], first=i) for i in range(3)]  # one per replica, the runner's included
        tasks = [asyncio.create_task(r.run(client, timeout=60)) for r in readers]
        for r in readers:
            await r.until(lambda r=r: len(r.events) >= 3, 30, "three events")
        t0 = time.monotonic()
        runner.kill() if how == "kill" else runner.terminate()
        others = [r for i, r in enumerate(readers) if i != runner_at]

        def resumed() -> float | None:
            for r in others:
                for e in r.events:
                    if e.event == "status" and json.loads(e.data).get("resumed"):
                        return e.at
            return None

        try:
            resumed_at = await _first(others, resumed, 60)
        finally:
            self.gateway.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        hung = sum(isinstance(x, BaseException) for x in results)
        missing = repeated = 0
        for r in readers:
            ids = [e.id for e in r.events]
            n = max(ids, default=0)
            missing += len(set(range(1, n + 1)) - set(ids))
            repeated += len(ids) - len(set(ids))
        await runner.exited(60)
        self.replicas[runner_at] = await self.replica(env, runner.name)
        return {"takeover_s": resumed_at - t0, "hung": hung, "missing": missing, "repeated": repeated,
                "calls": self.gateway.calls.total() - calls}

    async def latency(self, client: httpx.AsyncClient) -> dict:
        self.gateway.gate = None
        self.gateway.stream_tokens, self.gateway.token_interval = 300, 0.01
        runner = self.replicas[0]
        job = await self.job(client, runner)
        urls = [r.url for r in self.replicas]
        local, remote = Reader(urls, job["events_url"], first=0), Reader(urls, job["events_url"], first=1)
        await asyncio.gather(local.run(client, timeout=60), remote.run(client, timeout=60))
        self.gateway.stream_tokens = 0

        def delays(reader: Reader) -> list[float]:
            return [(e.wall - float(json.loads(e.data)["text"])) * 1000 for e in reader.events if e.event == "delta"]

        a, b = delays(local), delays(remote)
        return {"events": len(a), "runner_p50_ms": statistics.median(a), "runner_p99_ms": percentile(a, 99),
                "other_p50_ms": statistics.median(b), "other_p99_ms": percentile(b, 99),
                "added_p50_ms": statistics.median(b) - statistics.median(a),
                "added_p99_ms": percentile(b, 99) - percentile(a, 99)}

    async def run(self) -> dict:
        redis, redis_url = start_redis()
        try:
            async with _serving(self.gateway.app) as gw, _serving(self.crm.app) as crm, \
                    httpx.AsyncClient(timeout=30) as client:
                env = {"REDIS_URL": redis_url, "CACHE_PREFIX": f"bench-{uuid.uuid4().hex[:6]}", "CONDUCTOR_GATEWAY_URL": gw,
                       "CRM_BACKEND_URL": crm, "JOB_TOKEN_SECRET": "b" * 40, "REDIS_SIGNING_KEY": "s" * 40, "JOB_LEASE_SECONDS": str(self.args.lease),
                       "SHUTDOWN_GRACE_SECONDS": str(self.args.grace), "SSE_HEARTBEAT_SECONDS": "1",
                       "RATE_LIMIT_LEAD_QUALIFY": "off", "CRM_WRITE_BACK": "false"}
                self.replicas = list(await asyncio.gather(*(self.replica(env, f"replica-{i}") for i in range(3))))
                try:
                    out: dict = {"lease_s": self.args.lease, "grace_s": self.args.grace}
                    for how in [h for h in ("kill", "sigterm") if h in self.args.only]:
                        trials = []
                        for i in range(self.args.trials):
                            trials.append(await self.trial(client, env, i, how))
                            print(how, i, trials[-1], file=sys.stderr, flush=True)
                        times = [t["takeover_s"] for t in trials]
                        out[how] = {"trials": len(trials), "takeover_p50_s": statistics.median(times), "takeover_max_s": max(times),
                                    "hung_readers": sum(t["hung"] for t in trials), "missing_events": sum(t["missing"] for t in trials),
                                    "repeated_events": sum(t["repeated"] for t in trials),
                                    "model_calls_per_job": sorted({t["calls"] for t in trials})}
                        if how == "sigterm":
                            out[how]["takeover_net_of_grace_p50_s"] = statistics.median(times) - self.args.grace
                            out[how]["takeover_net_of_grace_max_s"] = max(times) - self.args.grace
                    if "latency" in self.args.only:
                        out["latency"] = await self.latency(client)
                    return out
                finally:
                    for r in self.replicas:
                        await r.stop()
        finally:
            redis.kill()
            redis.wait()


async def _first(readers: list[Reader], found, timeout: float) -> float:
    """Wait until `found()` answers, woken by any of the readers."""
    deadline = time.monotonic() + timeout
    while (value := found()) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reader saw the job resumed")
        waits = [asyncio.create_task(r.until(lambda n=len(r.events), r=r: len(r.events) > n, left)) for r in readers]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()
    return value


class _serving:
    def __init__(self, app) -> None:
        self.app = app

    async def __aenter__(self) -> str:
        self.sock = servers.bind("127.0.0.1", 0)
        self.server = servers.server(self.app, quiet=True, graceful=1.0)
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        return servers.url_of(self.sock)

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await self.task
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--lease", type=float, default=10.0, help="JOB_LEASE_SECONDS of the replicas")
    parser.add_argument("--grace", type=float, default=1.0, help="SHUTDOWN_GRACE_SECONDS of the replicas")
    parser.add_argument("--only", default="kill,sigterm,latency", help="comma-separated parts to run")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(Bench(args).run()), indent=2))


if __name__ == "__main__":
    main()
