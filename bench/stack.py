"""Run the doubles and the sidecar as separate uvicorn processes, as they would be deployed.

`python -m bench.stack ROLE PORT [args]` runs one of them; `Stack` starts all three
and tears them down. Seed data (a token, lead and deal ids) goes to a JSON file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-bench-secret-bench-secret!"


def _serve(app, port: int, keepalive: int = 5) -> None:
    # The doubles keep uvicorn's 5 s default, like the real FastAPI upstreams; the sidecar runs as `adapter serve` does.
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning", loop="uvloop", http="httptools",
                timeout_keep_alive=keepalive, proxy_headers=False)


def main() -> None:
    role, port = sys.argv[1], int(sys.argv[2])
    if role == "gateway":
        from adapter.doubles.gateway import GatewayDouble

        env = os.environ
        double = GatewayDouble(default=env.get("DOUBLE_DEFAULT", "json"), delay=float(env.get("DOUBLE_DELAY", "0")),
                               stream_tokens=int(env.get("DOUBLE_TOKENS", "0")),
                               token_interval=float(env.get("DOUBLE_TOKEN_INTERVAL", "0")),
                               fault_rate=float(env.get("DOUBLE_FAULT_RATE", "0")), seed=int(env.get("DOUBLE_SEED", "7")))
        _serve(double.app, port)
    elif role == "crm":
        from adapter.doubles.crm import CrmDouble

        crm = CrmDouble(secret=SECRET)
        seed = crm.seed()
        extra = [crm.add_lead(seed["alice"], name=f"Lead {i}", company=f"Company {i}", job_title="VP Sales") for i in range(2000)]
        deals = [crm.add_deal(seed["alice"], title=f"Deal {i}", value=1000.0 * i, stage="proposal") for i in range(300)]
        Path(sys.argv[3]).write_text(json.dumps({"token": crm.token(seed["alice"], expires_in=86400), "leads": seed["leads"] + extra,
                                                  "deals": seed["deals"] + deals}))
        _serve(crm.app, port)
    elif role == "hello":
        # The floor: Litestar's hello world under the same server settings as the sidecar.
        from litestar import Litestar, get

        @get("/")
        async def hello() -> dict[str, str]:
            return {"hello": "world"}

        _serve(Litestar([hello], logging_config=None), port)
    elif role == "sidecar":
        # BENCH_ADAPTER_ROOT runs another checkout's sidecar (a before/after comparison in one run);
        # BENCH_BLOCK_MODULES hides optional accelerators (hiredis) that checkout did not have.
        if root := os.environ.get("BENCH_ADAPTER_ROOT"):
            sys.path.insert(0, root)
        for name in filter(None, os.environ.get("BENCH_BLOCK_MODULES", "").split(",")):
            sys.modules[name] = None  # type: ignore[assignment]  # `import name` now raises ImportError
        from adapter import logs, servers
        from adapter.app import create_app
        from adapter.settings import Settings

        # The benchmarks load the sidecar as one user: its per-user bounds (CRM_READS_PER_USER 20/s,
        # MAX_STREAMS_PER_USER 20, MAX_BATCHES_PER_USER 2) would be what they measured. A benchmark may still set them.
        for name, value in {"CRM_READS_PER_USER": "off", "MAX_STREAMS_PER_USER": "100000", "MAX_BATCHES_PER_USER": "10000"}.items():
            os.environ.setdefault(name, value)
        settings = Settings.from_env()
        logs.configure(settings.log_level, "json")  # as `adapter serve` logs to a pipe; stderr is /dev/null here
        # Served as `adapter serve` serves it (its own protocol: client limits, lingering close, drain),
        # so the figures are production's, not plain uvicorn's.
        sock = servers.bind("127.0.0.1", port)
        servers.server(create_app(settings), graceful=settings.shutdown_grace_seconds, keepalive=settings.keepalive_seconds,
                       loop="auto", quiet=True).run(sockets=[sock])


class Stack:
    def __init__(self, env: dict[str, str] | None = None, ports: tuple[int, int, int] = (18101, 18102, 18103),
                 double_env: dict[str, str] | None = None) -> None:
        self.gw_port, self.crm_port, self.app_port = ports
        self.env = env or {}
        self.double_env = double_env or {}
        self.procs: list[subprocess.Popen] = []
        self.seed_file = Path(tempfile.mkstemp(suffix=".json")[1])

    def __enter__(self) -> Stack:
        base = {**os.environ, "PYTHONPATH": str(ROOT)}
        sidecar_env = {**base, "CONDUCTOR_GATEWAY_URL": self.gateway_url, "CRM_BACKEND_URL": self.crm_url, **self.env}
        for role, port, extra, env in (("gateway", self.gw_port, [], {**base, **self.double_env}), ("crm", self.crm_port, [str(self.seed_file)], base),
                                       ("sidecar", self.app_port, [], sidecar_env)):
            self.procs.append(subprocess.Popen([sys.executable, "-m", "bench.stack", role, str(port), *extra], env=env, cwd=ROOT,
                                               stderr=subprocess.DEVNULL))
        for url in (self.gateway_url + "/health", self.crm_url + "/health", self.url + "/healthz"):
            _wait_up(url)
        self.seed = json.loads(self.seed_file.read_text())
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=30)
        self.seed_file.unlink(missing_ok=True)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gw_port}"

    @property
    def crm_url(self) -> str:
        return f"http://127.0.0.1:{self.crm_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app_port}"

    def rss_kib(self, index: int = 2) -> int:
        for line in Path(f"/proc/{self.procs[index].pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return -1


def _wait_up(url: str, deadline: float = 30.0) -> None:
    # Benchmarks, not tests: a start-up poll with a deadline is the honest tool here.
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def lead_qualify_input(record: dict) -> str:
    """What the sidecar sends the gateway for this lead (its task module renders it)."""
    import datetime as dt

    from adapter.tasks import TASKS

    return TASKS["lead.qualify"].render(record, None, dt.date.today())


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


if __name__ == "__main__":
    main()
