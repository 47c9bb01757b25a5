"""The Grafana dashboard's panels, drawn from a short run: `python -m bench.dashboard [--seconds 150] [--out PNG]`.

No Grafana runs here, so this draws what it would show. Two `adapter serve` replicas share Redis in
front of the gateway and CRM doubles (served in this process, so the run can steer the model); a
real Prometheus (Debian's `prometheus` package) scrapes both every second. The run mixes what each
panel is about: hits and misses, repairs, guidance warnings, provider fallbacks, rate-limit refusals,
jobs read on the other replica, a batch, a gateway outage long enough to open the circuit, one
replica killed with kill -9 mid-job (a takeover) and one stopped with SIGTERM mid-job (a handover),
each restarted. Then every panel's queries (deploy/grafana) are asked of Prometheus over the run
and drawn with matplotlib, which is not a dependency of the project: `pip install matplotlib` into
the venv for this script.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis as redis_sync

from adapter import servers
from adapter.doubles.crm import CrmDouble
from adapter.doubles.gateway import GatewayDouble
from deploy import grafana

ROOT = Path(__file__).resolve().parent.parent
LEAD, EMAIL, DEAL = "LeadQualifier_CRM_Agent", "EmailAssistant_CRM_Agent", "DealPredictor_CRM_Agent"
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval for a 1 s scrape: four scrapes and more


class Replica:
    def __init__(self, name: str, port: int, env: dict[str, str], logs: Path) -> None:
        self.name, self.port, self.env, self.logs = name, port, env, logs
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        log = open(self.logs / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "adapter.cli", "serve", "--port", str(self.port)], cwd=ROOT,
                                     env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                try:
                    if (await client.get(self.url + "/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start; see {self.logs}")

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    async def exited(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
            await asyncio.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


async def read_events(client: httpx.AsyncClient, urls: list[str], path: str, timeout: float = 60) -> int:
    """An EventSource, reduced: read to `done`, reconnecting with Last-Event-ID to the next replica."""
    last, turn, deadline = None, 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last} if last else {})}
        try:
            async with client.stream("GET", urls[turn % len(urls)] + path, headers=headers, timeout=httpx.Timeout(5, read=30)) as r:
                event = None
                async for line in r.aiter_lines():
                    if line.startswith("id: "):
                        last = line[4:]
                    elif line.startswith("event: "):
                        event = line[7:]
                    elif line == "" and event == "done":
                        return int(last or 0)
        except httpx.HTTPError:
            pass
        turn += 1
        await asyncio.sleep(0.2)
    return -1


async def run(seconds: float, out: Path) -> None:
    gateway, crm = GatewayDouble(default="fenced", delay=0.05, token_interval=0.01), CrmDouble()
    seed = crm.seed()
    leads = seed["leads"] + [crm.add_lead(seed["alice"], name=f"Lead {i}", company=f"Company {i}", job_title="VP Sales")
                             for i in range(60)]
    deals = seed["deals"] + [crm.add_deal(seed["alice"], title=f"Deal {i}", value=1000.0 * i, stage="proposal") for i in range(30)]
    auth = {"Authorization": f"Bearer {crm.token(seed['alice'], expires_in=3600)}"}
    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    prefix = f"bench-dash-{uuid.uuid4().hex[:8]}"
    redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    gw_sock, crm_sock = servers.bind("127.0.0.1", 0), servers.bind("127.0.0.1", 0)
    doubles = [servers.server(gateway.app, quiet=True), servers.server(crm.app, quiet=True)]
    serving = [asyncio.create_task(s.serve(sockets=[k])) for s, k in zip(doubles, (gw_sock, crm_sock), strict=True)]
    env = {**os.environ, "REDIS_URL": redis_url, "CACHE_PREFIX": prefix, "JOB_TOKEN_SECRET": "d" * 40,
           "CONDUCTOR_GATEWAY_URL": servers.url_of(gw_sock), "CRM_BACKEND_URL": servers.url_of(crm_sock),
           "CONDUCTOR_AI_PROVIDER": "claude,gemini", "RATE_LIMIT_LEAD_QUALIFY": "off", "RATE_LIMIT_EMAIL_GENERATE": "off",
           "RATE_LIMIT_DEAL_PREDICT": "20/60", "CIRCUIT_MIN_CALLS": "10", "CIRCUIT_WINDOW_SECONDS": "10",
           "CIRCUIT_RESET_SECONDS": "10",
           "JOB_LEASE_SECONDS": "2", "SHUTDOWN_GRACE_SECONDS": "1", "JOB_MAX_SECONDS": "30", "UPSTREAM_RETRIES": "0",
           "LOG_LEVEL": "warning", "LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)}
    replicas = [Replica(f"replica-{i}", _free_port(), env, work) for i in range(2)]
    prometheus = None
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        prom_port = _free_port()
        config = work / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n  - job_name: crm-ai-sidecar\n"
            "    static_configs:\n" + "".join(f"      - targets: ['127.0.0.1:{r.port}']\n        labels: {{namespace: bench, pod: {r.name}}}\n"
                                              for r in replicas))
        prometheus = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                                      stdout=open(work / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
        start = time.time()
        events: list[tuple[float, float, str]] = []  # (from, to, what) seconds into the run
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:
            stop = asyncio.Event()
            calm = asyncio.Event()  # set while a replica is killed or stopped: the model's script is for that job alone
            rng = random.Random(7)

            async def wait_calm() -> None:
                while calm.is_set() and not stop.is_set():
                    await asyncio.sleep(0.1)

            def live() -> list[Replica]:
                return [r for r in replicas if r.alive] or replicas

            async def probes() -> None:  # what the kubelet's readiness probe does
                while not stop.is_set():
                    for r in live():
                        try:
                            await client.get(r.url + "/readyz", timeout=3)
                        except httpx.HTTPError:
                            pass
                    await asyncio.sleep(2)

            async def user(n: int) -> None:
                while not stop.is_set():
                    await wait_calm()
                    r = rng.choice(live())
                    roll = rng.random()
                    try:
                        if roll < 0.55:
                            headers = {**auth, **({"Cache-Control": "no-cache"} if rng.random() < 0.3 else {})}
                            await client.post(r.url + "/api/v1/ai/lead/qualify", json={"lead_id": rng.choice(leads[:40])}, headers=headers)
                        elif roll < 0.75:
                            context = "our free pilot programme" if rng.random() < 0.3 else "follow-up after the demo"
                            await client.post(r.url + "/api/v1/ai/email/generate", headers=auth,
                                              json={"lead_id": rng.choice(leads[:20]), "context": context, "tone": "casual"})
                        else:
                            await client.post(r.url + "/api/v1/ai/deal/predict", json={"deal_id": rng.choice(deals)}, headers=auth)
                        await client.get(r.url + f"/api/v1/leads/{rng.choice(leads)}", headers=auth)  # the pass-through
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(rng.uniform(0.05, 0.3))

            async def jobs() -> None:  # a job started on one replica, read on the other
                while not stop.is_set():
                    await asyncio.sleep(2)
                    await wait_calm()
                    await one_job(tokens=True)

            async def one_job(*, tokens: bool, on: Replica | None = None) -> tuple[Replica, asyncio.Task[int]] | None:
                runner = on or rng.choice(live())
                if tokens:
                    gateway.push(LEAD, "tokens")
                try:
                    r = await client.post(runner.url + "/api/v1/ai/jobs", headers={**auth, "Cache-Control": "no-cache"},
                                          json={"task": "lead.qualify", "input": {"lead_id": rng.choice(leads)}})
                except httpx.HTTPError:
                    return None
                if r.status_code != 202:
                    return None
                others = [x.url for x in replicas if x is not runner] + [runner.url]
                return runner, asyncio.create_task(read_events(client, others, r.json()["events_url"]))

            async def model_moods() -> None:  # repairs and provider fallbacks, now and then
                while not stop.is_set():
                    await asyncio.sleep(1.5)
                    await wait_calm()
                    agent = rng.choice([LEAD, EMAIL, DEAL])
                    gateway.push(agent, rng.choice(["garbage", "run_failed", "wrong_shape"]), "fenced")

            background = [asyncio.create_task(t) for t in (probes(), jobs(), model_moods(), *(user(i) for i in range(6)))]
            at = lambda: time.time() - start  # noqa: E731
            await asyncio.sleep(seconds * 0.15)
            batch = await client.post(live()[0].url + "/api/v1/ai/batches", headers=auth,
                                      json={"task": "lead.qualify", "ids": leads[20:60]})
            events.append((at(), at() + 1, "batch of 40"))
            await asyncio.sleep(seconds * 0.15)
            t0 = at()
            gateway.default = "error_500"  # the Conductor refuses every run: 502s, then the circuit opens
            await asyncio.sleep(seconds * 0.2)
            gateway.default = "fenced"
            events.append((t0, at(), "gateway outage"))
            await asyncio.sleep(seconds * 0.1)
            # A replica killed mid-job: the other takes the job over when its lease lapses.
            victim = replicas[1]
            calm.set()
            await asyncio.sleep(1)  # what was asked before ends
            gateway.script.clear()
            gateway.token_interval = 0.05
            started = await one_job(tokens=True, on=victim)
            await asyncio.sleep(0.5)
            t0 = at()
            victim.signal(signal.SIGKILL)
            await victim.exited()
            events.append((t0, at() + 1, "kill -9"))
            if started:
                await started[1]
            await victim.start()
            gateway.token_interval = 0.01
            calm.clear()
            await asyncio.sleep(seconds * 0.1)
            # A replica stopped (SIGTERM) mid-job: it hands the job over after its 1 s grace.
            leaving = replicas[0]
            calm.set()
            await asyncio.sleep(1)
            gateway.script.clear()
            gateway.push(LEAD, "never_ends", "fenced")
            started = await one_job(tokens=False, on=leaving)
            await asyncio.sleep(0.5)
            t0 = at()
            leaving.signal(signal.SIGTERM)
            await leaving.exited()
            events.append((t0, at() + 1, "SIGTERM"))
            if started:
                await started[1]
            await leaving.start()
            calm.clear()
            await asyncio.sleep(max(seconds - at(), 5))
            stop.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            end = time.time()
            await asyncio.sleep(3)  # the last scrapes
            results = await query_panels(client, f"http://127.0.0.1:{prom_port}", start, end)
        draw(results, events, out, round(end - start), batch.status_code)
        print(f"wrote {out} ({len(results)} panels; logs in {work})")
    finally:
        for r in replicas:
            r.signal(signal.SIGKILL)
        for r in replicas:
            await r.exited(5)
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        for s in doubles:
            s.should_exit = True
        await asyncio.gather(*serving, return_exceptions=True)
        with redis_sync.Redis.from_url(redis_url) as r:
            keys = list(r.scan_iter(f"{prefix}:*"))
            if keys:
                r.delete(*keys)


async def query_panels(client: httpx.AsyncClient, prometheus: str, start: float, end: float) -> list[dict]:
    out = []
    for panel in grafana.dashboard()["panels"]:
        if panel["type"] == "row":
            out.append({"row": panel["title"]})
            continue
        series = []
        for target in panel["targets"]:
            query = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", ".*")
            r = await client.get(prometheus + "/api/v1/query_range", params={"query": query, "start": start, "end": end, "step": 2})
            r.raise_for_status()
            for result in r.json()["data"]["result"]:
                legend = target["legendFormat"]
                for key, value in result["metric"].items():
                    legend = legend.replace("{{" + key + "}}", value)
                points = [(float(t) - start, float(v)) for t, v in result["values"]]
                series.append((legend.replace("{{", "").replace("}}", ""), points))
        out.append({"panel": panel, "series": series})
    return out


def draw(results: list[dict], events: list[tuple[float, float, str]], out: Path, seconds: int, batch_status: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: list[list[dict]] = []  # panels grouped by their grid line
    y = None
    for item in results:
        if "row" in item:
            continue
        gy = item["panel"]["gridPos"]["y"]
        if gy != y:
            lines.append([])
            y = gy
        lines[-1].append(item)
    fig = plt.figure(figsize=(24, 3.3 * len(lines)), dpi=70)
    grid = fig.add_gridspec(len(lines), 24, hspace=0.55, wspace=1.2)
    colours = {"gateway outage": "#f4cccc", "kill -9": "#cccccc", "SIGTERM": "#cfe2f3", "batch of 40": "#d9ead3"}
    for i, line in enumerate(lines):
        for item in line:
            panel = item["panel"]
            g = panel["gridPos"]
            ax = fig.add_subplot(grid[i, g["x"]:g["x"] + g["w"]])
            for t0, t1, what in events:
                ax.axvspan(t0, t1, color=colours.get(what, "#eeeeee"), alpha=0.8, lw=0)
            shown = sorted(item["series"], key=lambda s: -max((v for _, v in s[1] if v == v), default=0))[:8]
            for legend, points in shown:
                xs, ys = zip(*points) if points else ((), ())
                ax.plot(xs, ys, lw=1.3, label=legend[:48], drawstyle="steps-post" if panel["type"] == "state-timeline" else "default")
            unit = panel["fieldConfig"]["defaults"].get("unit")
            if panel["type"] == "state-timeline":
                ax.set_yticks([0, 1, 2], ["closed", "half-open", "open"])
            elif unit == "percentunit":
                ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
            elif unit in ("s", "reqps"):
                ax.set_ylabel({"s": "seconds", "reqps": "per second"}[unit], fontsize=8)
            ax.set_title(panel["title"], fontsize=10, loc="left")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if shown:
                ax.legend(fontsize=6, loc="upper left", framealpha=0.6)
            else:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="grey")
    handles = [matplotlib.patches.Patch(color=c, label=w) for w, c in colours.items()]
    fig.legend(handles=handles, loc="upper right", ncol=4, fontsize=9)
    fig.suptitle(f"CRM AI sidecar (deploy/grafana/crm-ai-sidecar.json) drawn from a {seconds} s run of `python -m bench.dashboard`: "
                 f"2 replicas, Redis, Prometheus scraping every 1 s (the batch answered {batch_status}); x: seconds into the run",
                 fontsize=12, x=0.01, ha="left")
    fig.savefig(out, bbox_inches="tight")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.out))


if __name__ == "__main__":
    main()
