"""Configuration, the `adapter` command and the committed contract."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys

import pytest

from adapter.settings import ConfigError, Settings
from tests.helpers import DEAL_AGENT, LEAD_AGENT, ROOT, TEST_SIGNING_KEY, closed_port_url, free_port, run_adapter, run_adapter_async, serving


def test_defaults():
    s = Settings.from_env({})
    assert (s.adapter_host, s.adapter_port) == ("127.0.0.1", 8080)
    assert s.conductor_gateway_url == "http://localhost:5006" and s.crm_backend_url == "http://localhost:8001"
    assert s.redis_url is None and s.conductor_ai_provider is None


def test_values_are_typed_and_empty_means_unset():
    s = Settings.from_env({"ADAPTER_PORT": "9000", "GATEWAY_READ_TIMEOUT": "1.5", "REDIS_URL": "", "AGENT_REPAIR_ATTEMPTS": "2"})
    assert s.adapter_port == 9000 and s.gateway_read_timeout == 1.5 and s.redis_url is None and s.agent_repair_attempts == 2


@pytest.mark.parametrize(("env", "variable"), [
    ({"ADAPTER_PORT": "eighty"}, "ADAPTER_PORT"),
    ({"ADAPTER_PORT": "70000"}, "ADAPTER_PORT"),
    ({"CONDUCTOR_GATEWAY_URL": "localhost:5006"}, "CONDUCTOR_GATEWAY_URL"),
    ({"CRM_BACKEND_URL": "http://crm/?x=1"}, "CRM_BACKEND_URL"),
    ({"REDIS_URL": "http://redis"}, "REDIS_URL"),
    ({"GATEWAY_READ_TIMEOUT": "0"}, "GATEWAY_READ_TIMEOUT"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"CONDUCTOR_CWD": "relative/dir"}, "CONDUCTOR_CWD"),  # the gateway would refuse every run
    ({"CONDUCTOR_AI_PROVIDER": "claude;gemini"}, "CONDUCTOR_AI_PROVIDER"),
])
def test_invalid_values_name_the_variable_in_one_line(env, variable):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert variable in str(info.value) and "\n" not in str(info.value)


def test_invalid_configuration_stops_serve_with_one_line():
    done = run_adapter("serve", env={"ADAPTER_PORT": "nope"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["adapter: invalid configuration: ADAPTER_PORT: must be a whole number, got 'nope'"]


def test_committed_openapi_matches_the_app():
    done = run_adapter("openapi")
    assert done.returncode == 0, done.stderr
    committed = ROOT / "openapi" / "openapi.json"
    assert committed.exists(), "openapi/openapi.json is missing: run `adapter openapi > openapi/openapi.json`"
    assert json.loads(done.stdout) == json.loads(committed.read_text()), (
        "the app's OpenAPI document differs from openapi/openapi.json; regenerate it with "
        "`adapter openapi > openapi/openapi.json` and review the diff")


async def test_check_passes_with_everything_up(gateway, crm, redis_url):

    async with serving(gateway.app) as gw, serving(crm.app) as backend:
        code, out, err = await run_adapter_async("check", env={"CONDUCTOR_GATEWAY_URL": gw, "CRM_BACKEND_URL": backend,
                                                                "REDIS_URL": redis_url, "REDIS_SIGNING_KEY": TEST_SIGNING_KEY})
    assert code == 0, err
    from adapter.tasks import TASKS

    assert err == "" and out.count("the gateway knows agent") == len(TASKS) and "Redis at" in out


async def test_check_names_each_dependency_that_is_down(gateway):

    gateway.unknown_agents.add(DEAL_AGENT)
    async with serving(gateway.app) as gw:
        code, out, err = await run_adapter_async("check", env={
            "CONDUCTOR_GATEWAY_URL": gw, "CRM_BACKEND_URL": closed_port_url(),
            "REDIS_URL": closed_port_url().replace("http", "redis")})
    lines = err.strip().splitlines()
    assert code == 1
    assert len(lines) == 4 and all(line.startswith("FAIL  ") for line in lines)
    assert any("CRM backend unreachable" in line for line in lines)
    assert any("Redis unreachable" in line for line in lines)
    assert any(f"does not know agent {DEAL_AGENT}" in line for line in lines)
    # What `serve` would refuse is named too: Redis without the key that checks what it reads back.
    assert any(line.startswith("FAIL  REDIS_SIGNING_KEY: must be set") for line in lines)


async def test_check_with_the_gateway_down():

    code, _, err = await run_adapter_async("check", env={"CONDUCTOR_GATEWAY_URL": closed_port_url(), "REDIS_URL": ""})
    assert code == 1 and "Conductor Gateway unreachable" in err and "agent list unreachable" in err


def test_check_reports_bad_configuration_in_one_line():
    done = run_adapter("check", env={"CRM_BACKEND_URL": "nope"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "CRM_BACKEND_URL" in done.stderr


async def test_sigterm_lets_in_flight_requests_finish(gateway, crm, seed):
    import asyncio
    import signal

    import httpx


    gateway.gate = asyncio.Event()
    port = free_port()
    async with serving(gateway.app) as gw, serving(crm.app) as backend:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "adapter.cli", "serve", "--port", str(port), cwd=ROOT, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "CONDUCTOR_GATEWAY_URL": gw, "CRM_BACKEND_URL": backend, "REDIS_URL": "", "LOG_FORMAT": "json"})
        async for line in proc.stderr:  # JSON log lines; this one means it listens
            if b"Application startup complete" in line:
                break
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            in_flight = asyncio.create_task(client.post("/api/v1/ai/lead/qualify", json={"lead_id": seed["leads"][0]},
                                                        headers={"Authorization": f"Bearer {seed['token']}"}))
            await gateway.calls.reach(1)  # the request is now waiting on the model
            proc.send_signal(signal.SIGTERM)
            gateway.gate.set()
            response = await in_flight
        logs = (await proc.stderr.read()).decode()
        code = await proc.wait()
    assert response.status_code == 200 and decode_json(response.content)["agent"] == LEAD_AGENT
    # uvicorn finishes the request, runs the lifespan shutdown, then re-raises SIGTERM as its exit status.
    assert code == -signal.SIGTERM, logs
    assert "Application shutdown complete" in logs and "Traceback" not in logs


async def test_serve_with_workers_runs_that_many_processes_and_warns_without_redis():
    import asyncio
    import re
    import signal

    import httpx


    port = free_port()
    proc, seen = await serve_workers(port, 2)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
    logs = "".join(seen) + rest.decode()
    workers = set(re.findall(r"Started server process \[(\d+)\]", logs))
    assert len(workers) == 2 and str(proc.pid) not in workers, logs
    warnings = [json.loads(line) for line in logs.splitlines() if "workers.without_redis" in line]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning" and warnings[0]["workers"] == 2, logs
    assert "Traceback" not in logs


async def test_a_worker_killed_unasked_stops_the_others_and_the_parent_exits_non_zero():
    """Fleet trial (issue 27): after `kill -9` of one worker the parent drained the other and exited 0,
    so the orchestrator saw a clean exit. A worker that dies unasked must make the parent exit 1."""
    import asyncio
    import contextlib
    import re
    import signal

    proc, seen = await serve_workers(free_port(), 2)
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", "".join(seen))]
        assert len(workers) == 2, seen
        victim, survivor = workers
        os.kill(victim, signal.SIGKILL)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
        code = proc.returncode
    finally:
        for pid in [proc.pid, *workers]:  # whatever happened above, nothing outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.returncode is None:
            await asyncio.wait_for(proc.wait(), 10)
    logs = "".join(seen) + rest.decode()
    assert code == 1, logs
    with pytest.raises(ProcessLookupError):  # the survivor was stopped and reaped by the parent
        os.kill(survivor, 0)
    died = [json.loads(line) for line in logs.splitlines() if "workers.worker_died" in line]
    assert len(died) == 1 and died[0]["pid"] == victim and died[0]["exit_code"] == -signal.SIGKILL, logs


async def serve_workers(port: int, count: int) -> tuple[asyncio.subprocess.Process, list[str]]:
    """`adapter serve --workers count` without Redis, once every worker has started (60 s at most):
    the parent process and the log lines read so far. The caller stops it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapter.cli", "serve", "--port", str(port), "--workers", str(count), cwd=ROOT,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "REDIS_URL": "", "LOG_FORMAT": "json"})
    seen: list[str] = []

    async def until_all_started() -> None:
        async for line in proc.stderr:
            seen.append(line.decode())
            if sum("Application startup complete" in s for s in seen) == count:
                return

    try:
        await asyncio.wait_for(until_all_started(), 60)
    except BaseException:  # nothing outlives a start that failed: the parent and every worker it started
        for pid in [proc.pid, *map(int, re.findall(r"Started server process \[(\d+)\]", "".join(seen)))]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()
        raise
    return proc, seen


def decode_json(raw: bytes) -> dict:
    return json.loads(raw)


def test_readme_documents_every_setting():
    import msgspec

    from adapter.settings import PER_TASK
    from adapter.tasks import TASKS

    readme = (ROOT / "README.md").read_text()
    # Per-task settings are documented by pattern, and by every name the registry gives them.
    names = [f.encode_name for f in msgspec.structs.fields(Settings) if f.encode_name not in PER_TASK]
    names += [f"{field}_<TASK>" for field in PER_TASK] + [f"{field}_{t.env_suffix}" for field in PER_TASK for t in TASKS.values()]
    missing = [name for name in names if f"`{name}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
