"""All benchmarks of the sidecar against the doubles and against LiteLLM's proxy, in one run.

    python -m bench.run [--litellm PATH_TO_LITELLM]    -> bench/RESULTS.md

Needs Redis on 127.0.0.1:6379, Debian's wrk, and for the peer comparison a
LiteLLM proxy installed in its own virtual environment:
    python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'
Every server runs in its own process; wrk (one thread, 32 connections) drives them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import uuid
from contextlib import redirect_stdout
from pathlib import Path

from bench.stack import Stack, _wait_up, lead_qualify_input

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS, DURATION = 32, "10s"
LITELLM_PORT, OPENAI_PORT = 18202, 18201


def wrk(url: str, *, body: str | None = None, headers: dict[str, str] | None = None, unique: bool = False,
        method: str = "POST") -> dict[str, float]:
    """Requests/s, p50 and p99 (ms) from wrk; fails on any non-2xx answer."""
    lines = [f'wrk.method = "{method}"']
    for k, v in (headers or {}).items():
        lines.append(f'wrk.headers["{k}"] = {json.dumps(v)}')
    if body is not None and not unique:
        lines.append(f"wrk.body = {json.dumps(body)}")
    if unique:  # a different body per request: every request a cache miss
        lines += ["local n = 0", "request = function()", "  n = n + 1",
                  f"  return wrk.format(nil, nil, nil, string.gsub({json.dumps(body)}, '@N@', tostring(n) .. '-' .. tostring(math.random(1e9))))",
                  "end"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    out = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}", "--latency", "-s", script.name, url],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    if "Non-2xx" in out:
        raise RuntimeError(f"non-2xx answers from {url}:\n{out}")

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": ms("50"), "p99": ms("99")}


def sidecar_runs(stack: Stack) -> dict[str, dict[str, float]]:
    token, lead = stack.seed["token"], stack.seed["leads"][0]
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    import httpx

    record = httpx.get(f"{stack.crm_url}/api/v1/leads/{lead}", headers=auth).json()
    execute = json.dumps({"input_text": lead_qualify_input(record), "context_mode": "stateless", "instance_id": "i", "conversation_id": "c",
                          # what the sidecar sends on every run: the gateway refuses a run without them
                          "screenplay_id": "crm-ai-sidecar", "cwd": "/tmp"})
    body = json.dumps({"lead_id": lead})
    httpx.post(f"{stack.url}/api/v1/ai/lead/qualify", content=body, headers=auth)  # fills the cache for the hit run
    return {
        "crm_direct": wrk(f"{stack.crm_url}/api/v1/leads/{lead}", headers=auth, method="GET"),
        "gateway_direct": wrk(f"{stack.gateway_url}/api/agents/LeadQualifier_CRM_Agent/execute", body=execute,
                              headers={"Content-Type": "application/json"}),
        "sidecar_uncached": wrk(f"{stack.url}/api/v1/ai/lead/qualify", body=body, headers={**auth, "Cache-Control": "no-store"}),
        "sidecar_hit": wrk(f"{stack.url}/api/v1/ai/lead/qualify", body=body, headers=auth),
    }


class LiteLLM:
    """LiteLLM's proxy (Redis cache on) in front of an OpenAI-compatible double, each in its own process."""

    def __init__(self, litellm: str, openai_port: int = OPENAI_PORT, litellm_port: int = LITELLM_PORT) -> None:
        self.config = Path(tempfile.mkstemp(suffix=".yaml")[1])
        self.config.write_text(f"""
model_list:
  - model_name: double
    litellm_params: {{model: openai/double, api_base: "http://127.0.0.1:{openai_port}/v1", api_key: sk-double}}
litellm_settings:
  cache: true
  cache_params: {{type: redis, host: 127.0.0.1, port: 6379, namespace: "bench-{uuid.uuid4().hex[:6]}"}}
""")
        self.master = f"sk-bench-{uuid.uuid4().hex}"
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
               "LITELLM_MASTER_KEY": self.master}
        self.ports = {"openai": openai_port, "litellm": litellm_port}
        self.procs = {"openai": subprocess.Popen([sys.executable, "-m", "bench.openai_double", str(openai_port)], cwd=ROOT,
                                                 stderr=subprocess.DEVNULL),
                      "litellm": subprocess.Popen([litellm, "--config", str(self.config), "--port", str(litellm_port),
                                                   "--num_workers", "1"], env=env, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL)}


def litellm_runs(litellm: str) -> dict[str, dict[str, float]]:
    peers = LiteLLM(litellm)
    try:
        _wait_up(f"http://127.0.0.1:{OPENAI_PORT}/v1/models")
        _wait_up(f"http://127.0.0.1:{LITELLM_PORT}/health/liveliness", deadline=120)
        chat = json.dumps({"model": "double", "messages": [{"role": "user", "content": "qualify lead @N@"}]})
        same = json.dumps({"model": "double", "messages": [{"role": "user", "content": "qualify lead 65f1c0ffee0000000000a001"}]})
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {peers.master}"}
        import httpx

        httpx.post(f"http://127.0.0.1:{LITELLM_PORT}/v1/chat/completions", content=same, headers=headers, timeout=30)
        return {
            "openai_direct": wrk(f"http://127.0.0.1:{OPENAI_PORT}/v1/chat/completions", body=same, headers=headers),
            "litellm_miss": wrk(f"http://127.0.0.1:{LITELLM_PORT}/v1/chat/completions", body=chat, headers=headers, unique=True),
            "litellm_hit": wrk(f"http://127.0.0.1:{LITELLM_PORT}/v1/chat/completions", body=same, headers=headers),
        }
    finally:
        for p in peers.procs.values():
            p.terminate()
            p.wait(timeout=30)
        peers.config.unlink(missing_ok=True)


def row(name: str, r: dict[str, float]) -> str:
    return f"| {name} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--litellm", default="/tmp/litellm-venv/bin/litellm")
    parser.add_argument("--cpu-requests", type=int, default=3000, help="requests per row of the CPU table (bench.cpu)")
    parser.add_argument("--cpu-repeat", type=int, default=3)
    args = parser.parse_args()
    # Write-back off: the direct baseline makes no PATCH either.
    env = {"REDIS_URL": "redis://127.0.0.1:6379/0", "CACHE_PREFIX": f"bench-{uuid.uuid4().hex[:6]}",
           "RATE_LIMIT_LEAD_QUALIFY": "off", "LOG_LEVEL": "info", "CRM_WRITE_BACK": "false"}
    with Stack(env=env) as stack:
        ours = sidecar_runs(stack)
    peers = litellm_runs(args.litellm) if Path(args.litellm).exists() else None
    from bench import cpu

    cpu_results = cpu.run(args.cpu_requests, args.cpu_repeat, litellm=args.litellm)
    sse = io.StringIO()
    with redirect_stdout(sse):
        from bench import streams

        streams.main()
    direct = {k: ours["crm_direct"][k] + ours["gateway_direct"][k] for k in ("p50", "p99")}
    added = {k: ours["sidecar_uncached"][k] - direct[k] for k in ("p50", "p99")}
    lines = [
        "# Benchmark results", "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "- command: `python -m bench.run` (this file is its output); servers each in their own process (uvicorn, uvloop, "
        "httptools), the sidecar as `adapter serve` runs it (JSON logs at info), Redis 7 on loopback;",
        f"  load from `wrk -t1 -c{CONNECTIONS} -d{DURATION} --latency` on the same 2 cores as the servers.", "",
        f"## 1. Uncached calls and cache hits, {CONNECTIONS} concurrent connections", "",
        "| target | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|",
        row("CRM double, GET lead (direct)", ours["crm_direct"]),
        row("gateway double, execute (direct)", ours["gateway_direct"]),
        row("sidecar, lead.qualify uncached (`no-store`: CRM read + gateway call + validation)", ours["sidecar_uncached"]),
        row("sidecar, lead.qualify cache hit (CRM read + Redis GET)", ours["sidecar_hit"]), "",
        f"Added by the sidecar on an uncached call (its latency minus the two direct calls'): **p50 {added['p50']:.2f} ms, "
        f"p99 {added['p99']:.2f} ms** (goal: 1 ms and 3 ms).", "",
    ]
    if peers:
        l_added = {k: peers["litellm_miss"][k] - peers["openai_direct"][k] for k in ("p50", "p99")}
        lines += [f"## 2. The same shape of workload through LiteLLM's proxy (Redis cache on), {CONNECTIONS} connections", "",
                  "| target | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|",
                  row("OpenAI-compatible double (direct)", peers["openai_direct"]),
                  row("LiteLLM proxy, cache miss (a new prompt each request)", peers["litellm_miss"]),
                  row("LiteLLM proxy, cache hit", peers["litellm_hit"]), "",
                  f"Added by LiteLLM on a miss: p50 {l_added['p50']:.2f} ms, p99 {l_added['p99']:.2f} ms.", ""]
    lines += ["## 3. SSE (`python -m bench.streams`)", "", "```", sse.getvalue().strip(), "```", ""]
    lines += [f"## 4. Process CPU per request (`python -m bench.cpu --requests {args.cpu_requests} --repeat {args.cpu_repeat}`)", "",
              f"utime+stime of the serving process over {args.cpu_requests} requests per row (wrk -t1 -c{cpu.CONNECTIONS} in its "
              f"own process), median of {args.cpu_repeat} runs; the stable figure on a shared machine, where req/s is not.", "",
              cpu.table(cpu_results), ""]
    lines += [(ROOT / "bench" / "ANALYSIS.md").read_text()]
    out = ROOT / "bench" / "RESULTS.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    Path(ROOT / "bench" / "results.json").write_text(json.dumps({"sidecar": ours, "litellm": peers, "cpu": cpu_results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
