"""The sidecar's process CPU per request, run as `adapter serve` runs it (its own server limits included).

    python -m bench.cpu [N] [--root DIR]

The doubles run as in bench.stack; the sidecar is `python -m adapter.cli serve` from DIR (default:
this checkout; another checkout compares versions), with the environment of this command (so
`OTEL_TRACES_EXPORTER=console` measures tracing on). Per kind of request: utime+stime of the
sidecar process from /proc/<pid>/stat over N sequential requests from this process, after 200
warm-up requests. Kinds: a cache hit of lead qualification, and a proxied GET.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from bench.stack import ROOT, Stack, _wait_up

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def measure(n: int, root: Path) -> dict[str, float]:
    with Stack(env={"RATE_LIMIT_LEAD_QUALIFY": "off"}) as stack:
        port = stack.app_port + 10
        env = {**os.environ, "PYTHONPATH": str(root), "CONDUCTOR_GATEWAY_URL": stack.gateway_url, "CRM_BACKEND_URL": stack.crm_url,
               "RATE_LIMIT_LEAD_QUALIFY": "off", "LOG_FORMAT": "json", "REDIS_URL": ""}
        sidecar = subprocess.Popen([sys.executable, "-m", "adapter.cli", "serve", "--port", str(port)], cwd=root, env=env,
                                   stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_up(url + "/healthz")
            auth = {"Authorization": f"Bearer {stack.seed['token']}"}
            lead = stack.seed["leads"][0]
            kinds = {
                "cache_hit": lambda c: c.post(f"{url}/api/v1/ai/lead/qualify", json={"lead_id": lead}, headers=auth),
                "proxied_get": lambda c: c.get(f"{url}/api/v1/leads/{lead}", headers=auth),
            }
            out = {}
            with httpx.Client() as client:
                for kind, call in kinds.items():
                    for _ in range(200):
                        assert call(client).status_code == 200
                    before = cpu_seconds(sidecar.pid)
                    for _ in range(n):
                        call(client)
                    out[kind] = round((cpu_seconds(sidecar.pid) - before) / n * 1e6, 1)
            return out
        finally:
            sidecar.terminate()
            sidecar.wait(timeout=30)


if __name__ == "__main__":
    args = sys.argv[1:]
    root = ROOT
    if "--root" in args:
        i = args.index("--root")
        root = Path(args[i + 1]).resolve()
        del args[i:i + 2]
    n = int(args[0]) if args else 3000
    print({"root": str(root), "n": n, "otel": {k: v for k, v in os.environ.items() if k.startswith("OTEL_")},
           "cpu_us_per_request": measure(n, root)})
