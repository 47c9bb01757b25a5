"""The sidecar's process CPU per request, path by path, beside the floor, in one run.

    python -m bench.cpu [--requests N] [--repeat R] [--baseline DIR] [--litellm PATH]

Throughput on a shared machine measures the neighbours as much as the server. What a
server spends itself is its process CPU per request: utime + stime from /proc/<pid>/stat
before and after a fixed number of requests, the load generator (wrk, one thread,
8 connections) in its own process. Every server runs in its own process (uvicorn,
uvloop, httptools); the doubles answer with no delay.

Rows: Litestar's hello world (the floor), `GET /healthz`, a cache hit (CRM lookup +
Redis GET), an uncached `lead.qualify` with the write-back PATCH and without, the
pass-through `GET /api/v1/leads/{id}`, a stream (CPU per SSE event), the CRM double
answering the lookup itself, and LiteLLM's proxy on a hit and a miss when it is
installed (CPU of its process tree).

Every row is also shown as a ratio to the floor: each run's figure over the floor's in the same
round (the machine's load moves both), the median of those ratios.

`--profile ROW` then samples this checkout's sidecar with py-spy while that row's load runs once
more (`--py-spy PATH`), writes the collapsed stacks (`--profile-out`) and prints the frames that
hold the most samples, inclusive.

`--baseline DIR` also runs the sidecar of another checkout (say `git archive` of main
unpacked in DIR), with the optional accelerators it did not use hidden, and alternates
the two row by row so both see the same machine. Each figure is the median of R runs,
with the spread (min-max) beside it.

wrk stops after N answers; the requests still in flight then (at most 8) are served
but not counted, an error below 0.5 % at the default N.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.stack import ROOT, _wait_up

TICK = os.sysconf("SC_CLK_TCK")
CONNECTIONS = 8
BASE_PORT = 18301
LITELLM_DEFAULT = "/tmp/litellm-venv/bin/litellm"
# Optional accelerators this branch added; a baseline checkout ran without them.
ACCELERATORS = "hiredis,aiohttp,httpx_aiohttp"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its descendants (LiteLLM may fork workers)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)
    return total


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


LUA = """
wrk.method = {method}
{headers}
{body}
{unique}
-- globals, not locals: done() reads them with thread:get
answered, bad, events = 0, 0, 0
local limit = {limit}
local count_events = {count_events}
response = function(status, headers, body)
  answered = answered + 1
  if status >= 300 then bad = bad + 1 end
  if count_events then
    local _, c = string.gsub("\\n" .. body, "\\nevent: ", "")
    events = events + c
  end
  if answered == limit then
    -- a thread's stop() does not end wrk before -d: tell the parent, which sends SIGINT
    io.stdout:write("LIMIT\\n")
    io.stdout:flush()
    wrk.thread:stop()
  end
end
local threads = {{}}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency, requests)
  local a, b, e = 0, 0, 0
  for _, t in ipairs(threads) do a = a + t:get("answered"); b = b + t:get("bad"); e = e + t:get("events") end
  io.write(string.format("BENCH answered=%d bad=%d events=%d\\n", a, b, e))
end
"""


@dataclass
class Load:
    """One kind of request, as wrk sends it."""
    url: str
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    events: bool = False  # count SSE events in each answer
    unique: bool = False  # `@N@` in the body becomes a new number each request: every request a cache miss


def wrk(load: Load, n: int, timeout: float = 120.0) -> dict[str, float]:
    """Send n requests on CONNECTIONS connections; answers' count, events, p50/p99 (ms), rps."""
    script = LUA.format(method=json.dumps(load.method),
                        headers="\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in load.headers.items()),
                        body=f"wrk.body = {json.dumps(load.body)}" if load.body is not None and not load.unique else "",
                        unique="" if not load.unique else
                        ("local k = 0\nrequest = function()\n  k = k + 1\n  return wrk.format(nil, nil, nil, string.gsub("
                         f"{json.dumps(load.body)}, '@N@', tostring(k) .. '-' .. tostring(math.random(1e9))))\nend"),
                        limit=n, count_events="true" if load.events else "false")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        # -d bounds the run should the server stall; after n answers the script asks for SIGINT,
        # on which wrk stops and reports (its handler ends the run early).
        proc = subprocess.Popen(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{int(timeout)}s", "--latency", "-s", f.name, load.url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stdout:  # type: ignore[union-attr]  # ends at the marker, or when wrk exits by itself
                if line.startswith("LIMIT"):
                    proc.send_signal(signal.SIGINT)
                    break
            rest, err = proc.communicate(timeout=30)
        except BaseException:
            proc.kill()
            proc.wait(timeout=10)
            raise
    finally:
        os.unlink(f.name)
    out = rest
    if proc.returncode != 0 or "BENCH" not in out:
        raise RuntimeError(f"wrk failed on {load.method} {load.url}: {err.strip()}")
    counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", re.search(r"^BENCH .*$", out, re.M).group(0)))
    if counts["bad"]:
        raise RuntimeError(f"{counts['bad']} non-2xx answers from {load.method} {load.url}:\n{out}")

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"answered": counts["answered"], "events": counts["events"], "p50": ms("50"), "p99": ms("99"),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}


def measure(pid: int, load: Load, n: int) -> dict[str, float]:
    """CPU per request (or per event) of process `pid` while wrk sends n requests."""
    wrk(load, max(50, n // 10))  # warm-up: pools filled, code paths and caches hot
    before = cpu_seconds(pid)
    r = wrk(load, n)
    spent = cpu_seconds(pid) - before
    per = r["events"] if load.events else r["answered"]
    return {**r, "us": spent / max(per, 1) * 1e6, "per_stream": r["events"] / max(r["answered"], 1)}


def profiled(pid: int, load: Load, n: int, py_spy: str, out: str, top: int = 60) -> list[tuple[float, str]]:
    """Sample process `pid` with py-spy (no pauses: --nonblocking) while wrk sends n requests.

    Only samples where the process was on a CPU count (py-spy's default drops idle ones). Inclusive
    share per frame (function and file, line numbers merged), the largest first.
    """
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", out, "--rate", "500",
                            "--nonblocking"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = spy.stdout.readline()  # type: ignore[union-attr]  # "py-spy> Sampling process ...": attached (or it failed and exits)
        if "Sampling" not in first:
            raise RuntimeError(f"py-spy did not attach: {first.strip()} {spy.communicate(timeout=30)[1].strip()}")
        wrk(load, n)
    finally:
        spy.send_signal(signal.SIGINT)
        spy.communicate(timeout=60)
    return collapsed_summary(Path(out).read_text(), top)


def collapsed_summary(text: str, top: int = 60) -> list[tuple[float, str]]:
    """(percent of samples, frame) for the frames on the most sampled stacks, inclusive."""
    seen_in: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        frames = {re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";")}
        for frame in frames:
            seen_in[frame] = seen_in.get(frame, 0) + int(count)
    ranked = sorted(seen_in.items(), key=lambda kv: -kv[1])
    skip = ("<frozen runpy>", "bench/stack.py", "uvicorn/server.py", "asyncio/runners.py", "uvicorn/_compat.py", "<module>")
    return [(round(100 * c / total, 1), f) for f, c in ranked if not any(s in f for s in skip)][:top]


class Servers:
    """Each server in its own process; stopped by pid at the end, whatever happened."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.seed_file = Path(tempfile.mkstemp(suffix=".json")[1])
        self.files = [self.seed_file]

    def start(self, name: str, role: str, env: dict[str, str], *extra: str) -> None:
        port = self.ports[name] = BASE_PORT + len(self.ports)
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "bench.stack", role, str(port), *extra],
                                            env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def close(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for f in self.files:
            f.unlink(missing_ok=True)


def sidecar_env(servers: Servers, **extra: str) -> dict[str, str]:
    return {"CONDUCTOR_GATEWAY_URL": servers.url("gateway"), "CRM_BACKEND_URL": servers.url("crm"),
            "REDIS_URL": "redis://127.0.0.1:6379/0", "CACHE_PREFIX": f"cpu-{uuid.uuid4().hex[:8]}",
            "REDIS_SIGNING_KEY": "bench-signing-key-" + "b" * 24,  # as `adapter serve` needs it (a baseline ignores it)
            "RATE_LIMIT_LEAD_QUALIFY": "off", "LOG_LEVEL": "info", **extra}


ROWS = [  # (key, label)
    ("hello", "Litestar hello world, same server settings (the floor)"),
    ("healthz", "GET /healthz"),
    ("hit", "cache hit: CRM lookup + Redis GET"),
    ("uncached_wb", "uncached lead.qualify: CRM lookup + gateway execute + write-back PATCH"),
    ("uncached", "uncached lead.qualify, CRM_WRITE_BACK=false"),
    ("passthrough", "pass-through GET /api/v1/leads/{id}"),
    ("stream", "stream lead.qualify (per SSE event)"),
    ("crm_direct", "the CRM double answering the same lookup"),
    ("litellm_hit", "LiteLLM proxy, cache hit (its process)"),
    ("litellm_miss", "LiteLLM proxy, cache miss (its process)"),
]


def run(n: int = 3000, repeat: int = 3, baseline: str | None = None, litellm: str | None = LITELLM_DEFAULT,
        stream_tokens: int = 50, rows: set[str] | None = None, baseline_block: str = ACCELERATORS,
        profile: list[str] | None = None, py_spy: str = "py-spy", profile_out: str = "/tmp/bench-cpu-{row}.txt",
        ) -> dict[str, dict[str, list[dict[str, float]]]]:
    """{row: {variant: [one result per repeat]}}; variants are "after" (this checkout) and, with a baseline, "before".

    Profiled rows add `{"profile": {"file": ..., "top": [(share, frame), ...]}}` under their "after" variant's key `_profile`.
    """
    servers = Servers()
    variants = {"after": {}}
    if baseline:
        variants["before"] = {"BENCH_ADAPTER_ROOT": str(Path(baseline).resolve()), "BENCH_BLOCK_MODULES": baseline_block}
    litellm_ok = bool(litellm and Path(litellm).exists()) and (not rows or bool(rows & {"litellm_hit", "litellm_miss"}))
    try:
        servers.start("gateway", "gateway", {"DOUBLE_TOKENS": str(stream_tokens)})
        servers.start("crm", "crm", {}, str(servers.seed_file))
        servers.start("hello", "hello", {})
        for v, venv in variants.items():
            servers.start(f"{v}:wb", "sidecar", {**sidecar_env(servers), **venv})
            servers.start(f"{v}:nowb", "sidecar", {**sidecar_env(servers, CRM_WRITE_BACK="false"), **venv})
        if litellm_ok:
            from bench.run import LiteLLM  # the same LiteLLM set-up as bench.run's comparison

            peers = LiteLLM(litellm, BASE_PORT + 50, BASE_PORT + 51)
            servers.procs.update(peers.procs)
            servers.ports.update(peers.ports)
            servers.files.append(peers.config)
        for name in servers.procs:
            path = {"gateway": "/health", "crm": "/health", "hello": "/", "openai": "/v1/models",
                    "litellm": "/health/liveliness"}.get(name, "/healthz")
            _wait_up(servers.url(name) + path, deadline=180 if name == "litellm" else 60)
        seed = json.loads(servers.seed_file.read_text())
        token, lead = seed["token"], seed["leads"][0]
        auth = {"Authorization": f"Bearer {token}"}
        qualify = json.dumps({"lead_id": lead})
        jsonauth = {**auth, "Content-Type": "application/json"}
        for v in variants:  # fill the cache for the hit rows
            r = httpx.post(f"{servers.url(f'{v}:wb')}/api/v1/ai/lead/qualify", content=qualify, headers=jsonauth, timeout=30)
            r.raise_for_status()

        def sidecar(v: str, path: str, **kw: object) -> tuple[int, Load]:
            name = f"{v}:nowb" if kw.pop("nowb", False) else f"{v}:wb"
            return servers.pid(name), Load(servers.url(name) + path, **kw)  # type: ignore[arg-type]

        plan: dict[str, dict[str, tuple[int, Load]]] = {
            "hello": {"after": (servers.pid("hello"), Load(servers.url("hello") + "/"))},
            "crm_direct": {"after": (servers.pid("crm"), Load(f"{servers.url('crm')}/api/v1/leads/{lead}", headers=auth))},
        }
        for v in variants:
            plan.setdefault("healthz", {})[v] = sidecar(v, "/healthz")
            plan.setdefault("hit", {})[v] = sidecar(v, "/api/v1/ai/lead/qualify", method="POST", body=qualify, headers=jsonauth)
            plan.setdefault("uncached_wb", {})[v] = sidecar(v, "/api/v1/ai/lead/qualify", method="POST", body=qualify,
                                                            headers={**jsonauth, "Cache-Control": "no-store"})
            plan.setdefault("uncached", {})[v] = sidecar(v, "/api/v1/ai/lead/qualify", method="POST", body=qualify, nowb=True,
                                                         headers={**jsonauth, "Cache-Control": "no-store"})
            plan.setdefault("passthrough", {})[v] = sidecar(v, f"/api/v1/leads/{lead}", headers=auth)
            plan.setdefault("stream", {})[v] = sidecar(v, "/api/v1/ai/lead/qualify/stream?cache=no-store", method="POST",
                                                       body=qualify, headers=jsonauth, events=True, nowb=True)
        if litellm_ok:
            key = {"Content-Type": "application/json", "Authorization": f"Bearer {peers.master}"}
            same = json.dumps({"model": "double", "messages": [{"role": "user", "content": "qualify lead " + lead}]})
            httpx.post(f"{servers.url('litellm')}/v1/chat/completions", content=same, headers=key, timeout=60).raise_for_status()
            plan["litellm_hit"] = {"after": (servers.pid("litellm"), Load(servers.url("litellm") + "/v1/chat/completions",
                                                                            method="POST", body=same, headers=key))}
            # A miss: a new prompt each request, as bench.run measures it.
            miss = json.dumps({"model": "double", "messages": [{"role": "user", "content": "qualify lead @N@"}]})
            plan["litellm_miss"] = {"after": (servers.pid("litellm"), Load(servers.url("litellm") + "/v1/chat/completions",
                                                                             method="POST", body=miss, headers=key, unique=True))}
        results: dict[str, dict[str, list[dict[str, float]]]] = {}
        for i in range(repeat):
            for key, _label in ROWS:
                if rows and key not in rows:
                    continue
                # Alternate which variant goes first, so neither always runs on a warmer machine.
                order = list(plan.get(key, {}).items())
                for v, (pid, load) in order if i % 2 == 0 else order[::-1]:
                    scale = 5 if load.events else 1  # each stream is many events and two upstream exchanges
                    results.setdefault(key, {}).setdefault(v, []).append(measure(pid, load, max(50, n // scale)))
        for key in profile or ():
            pid, load = plan[key]["after"]
            out = profile_out.format(row=key)
            results.setdefault("_profile", {})[key] = [{"file": out, "top": profiled(pid, load, max(500, n), py_spy, out)}]  # type: ignore[list-item]
        return results
    finally:
        servers.close()


def table(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    def med(runs: list[dict[str, float]], k: str) -> float:
        return statistics.median(r[k] for r in runs)

    def ratio(runs: list[dict[str, float]]) -> str:
        # Each run over the floor of the same round (rounds alternate, so the i-th run of a row is round i).
        floors = results.get("hello", {}).get("after")
        if not floors or not runs:
            return ""
        return f"{statistics.median(r['us'] / f['us'] for r, f in zip(runs, floors)):.1f}×"

    compare = any("before" in v for v in results.values())
    head = ["path", *(["CPU µs before", "CPU µs after", "× floor before", "× floor after"] if compare else ["CPU µs/req", "× floor"]),
            "spread µs", "p50 ms", "p99 ms", "req/s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key, label in ROWS:
        if key not in results:
            continue
        runs = results[key]
        after = runs["after"]
        name = label + (f" ({med(after, 'per_stream'):.0f} events a stream)" if key == "stream" else "")
        cells = [name]
        if compare:
            cells.append(f"{med(runs['before'], 'us'):,.0f}" if "before" in runs else "")
        cells.append(f"**{med(after, 'us'):,.0f}**")
        if compare:
            cells.append(ratio(runs.get("before", [])))
        cells.append(f"**{ratio(after)}**")
        spread = [f"{min(r['us'] for r in rs):,.0f}-{max(r['us'] for r in rs):,.0f}" for rs in (runs.get("before"), after) if rs]
        cells += [" / ".join(spread), f"{med(after, 'p50'):.2f}", f"{med(after, 'p99'):.2f}", f"{med(after, 'rps'):,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    hit, peer = results.get("hit", {}).get("after"), results.get("litellm_hit", {}).get("after")
    if hit and peer:
        lines += ["", f"A cache hit costs {med(peer, 'us') / med(hit, 'us'):.1f} times less CPU than LiteLLM's proxy on a hit."]
    for key, [prof] in results.get("_profile", {}).items():  # type: ignore[misc]
        lines += ["", f"Profile of `{key}` (after), py-spy, share of on-CPU samples, inclusive ({prof['file']}):", ""]
        lines += [f"    {share:5.1f}%  {frame}" for share, frame in prof["top"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per row and run (streams: a fifth)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the table shows the median")
    parser.add_argument("--baseline", help="another checkout whose sidecar runs beside this one (before/after)")
    parser.add_argument("--litellm", default=LITELLM_DEFAULT, help="LiteLLM's `litellm` command; rows skipped when missing")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--baseline-block", default=ACCELERATORS,
                        help="modules hidden from the baseline's sidecar (those it did not use); '' for none")
    parser.add_argument("--rows", help="comma-separated subset of: " + ", ".join(k for k, _ in ROWS))
    parser.add_argument("--profile", help="comma-separated rows to sample with py-spy afterwards (this checkout's sidecar)")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy", help="the py-spy command")
    parser.add_argument("--profile-out", default="/tmp/bench-cpu-{row}.txt", help="where the collapsed stacks go ({row})")
    args = parser.parse_args()
    t0 = time.monotonic()
    results = run(args.requests, args.repeat, args.baseline, args.litellm,
                  rows=set(args.rows.split(",")) if args.rows else None, baseline_block=args.baseline_block,
                  profile=args.profile.split(",") if args.profile else None, py_spy=args.py_spy, profile_out=args.profile_out)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"Sidecar CPU per request (utime+stime of its process), {args.requests} requests per row, wrk -t1 -c{CONNECTIONS}, "
          f"median of {args.repeat} runs ({time.monotonic() - t0:.0f} s)\n")
    print(table(results))


if __name__ == "__main__":
    main()
