"""Errors a person can act on: what was wrong and where, for bodies, queries, configuration and start-up."""

from __future__ import annotations

import socket
import subprocess

import pytest
from structlog.testing import capture_logs

from adapter.app import create_app
from adapter.settings import ConfigError, Settings
from tests.helpers import QUALIFY, ROOT, closed_port_url, decode, make_settings, run_adapter, running


def problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return decode(response)


@pytest.mark.parametrize(("body", "says"), [
    (b"", "the body is empty"),
    (b"   ", "the body is empty"),
    (b'{"lead_id": ', "not valid JSON: it ends at byte 12"),
    (b'{"lead_id" 1}', "not valid JSON: JSON is malformed"),
])
async def test_empty_and_malformed_bodies_say_what_is_wrong(client, auth, body, says):
    r = await client.post(QUALIFY, content=body, headers={**auth, "Content-Type": "application/json"})
    p = problem(r, 400)
    assert p["detail"].startswith("invalid request body: ") and says in p["detail"], p
    assert "'data'" not in p["detail"] and p["errors"] and says in p["errors"][0]["message"]
    assert p["type"].endswith("invalid-request") and p["title"] == "Invalid request"


async def test_a_bad_query_parameter_is_reported_as_one(client, auth, seed):
    r = await client.post("/api/v1/ai/lead/qualify/stream?cache=bogus", json={"lead_id": seed["leads"][0]}, headers=auth)
    p = problem(r, 400)
    assert p["detail"].startswith("invalid query parameter: `cache`") and "body" not in p["detail"]
    assert p["errors"] == [{"field": "cache", "message": "Invalid enum value 'bogus'"}]


@pytest.mark.parametrize("path", [QUALIFY, "/api/v1/ai/email/generate", "/api/v1/ai/lead/qualify/stream", "/api/v1/ai/jobs"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
async def test_json_routes_refuse_other_media_types_with_415(client, auth, seed, path, content_type):
    r = await client.post(path, content=b'{"lead_id": "%s"}' % seed["leads"][0].encode(),
                          headers={**auth, "Content-Type": content_type})
    p = problem(r, 415)
    assert "application/json" in p["detail"] and content_type.split(";")[0] in p["detail"]


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "application/merge-patch+json", None])
async def test_json_and_no_declared_type_are_accepted(client, auth, seed, content_type):
    headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
    r = await client.post(QUALIFY, content=b'{"lead_id": "%s"}' % seed["leads"][0].encode(), headers=headers)
    assert r.status_code == 200, r.text


async def test_a_job_read_without_credentials_is_401_as_the_readme_says(client, auth, seed):
    created = decode(await client.post("/api/v1/ai/jobs", headers=auth, json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][0]}}))
    r = await client.get(f"/api/v1/ai/jobs/{created['job_id']}")
    p = problem(r, 401)
    assert r.headers["www-authenticate"] == "Bearer" and "token" in p["detail"]
    table = (ROOT / "README.md").read_text()
    assert "| 401 " in table and "job" in table.split("| 401 ", 1)[1].split("\n", 1)[0]


def test_every_bad_variable_is_reported_in_words():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"ADAPTER_PORT": "eighty", "RATE_LIMIT_LEAD_QUALIFY": "lots", "LOG_LEVEL": "loud",
                           "GATEWAY_READ_TIMEOUT": "0", "JOB_TOKEN_SECRET": "short-secret", "CRM_BACKEND_URL": "crm:8000",
                           "REDIS_URL": "http://redis"})
    problems = dict(p.split(": ", 1) for p in info.value.problems)
    assert problems == {
        "ADAPTER_PORT": "must be a whole number, got 'eighty'",
        "RATE_LIMIT_LEAD_QUALIFY": "must be `<requests>/<seconds>` (for example 20/60) or `off`, got 'lots'",
        "LOG_LEVEL": "must be one of debug, info, warning, error, got 'loud'",
        "GATEWAY_READ_TIMEOUT": "must be a number more than 0, got '0'",
        "JOB_TOKEN_SECRET": "must be at least 32 characters long",  # a secret's value is never echoed
        "CRM_BACKEND_URL": "must be an absolute http(s) URL, got 'crm:8000'",
        "REDIS_URL": "must be a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL",
    }
    assert "\n" not in str(info.value) and "regex" not in str(info.value)


def test_serve_reports_every_bad_variable_on_one_line():
    done = run_adapter("serve", env={"ADAPTER_PORT": "nope", "RATE_LIMIT_DEAL_PREDICT": "x/y"})
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "ADAPTER_PORT: must be a whole number" in line and "RATE_LIMIT_DEAL_PREDICT: must be `<requests>/<seconds>`" in line


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_taken_port_is_one_line_naming_the_way_out(command):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = run_adapter(command, "--port", str(port), env={"REDIS_URL": "", "LOG_FORMAT": "json"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"adapter: cannot start: port {port} on 127.0.0.1 is already in use; choose another with --port or ADAPTER_PORT "
        "(make demo PORT=...)"]
    assert done.stdout == ""


def test_make_demo_takes_a_port():
    # --no-print-directory: under `make test` this make is nested and would add "Entering directory" lines.
    make = ["make", "--no-print-directory", "-n", "demo"]
    done = subprocess.run([*make, "PORT=8123"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 0 and "adapter demo --port 8123" in done.stdout
    plain = subprocess.run(make, capture_output=True, text=True, cwd=ROOT, timeout=30)
    [command] = [line for line in plain.stdout.splitlines() if "adapter demo" in line]
    assert command.rstrip().endswith("adapter demo")


async def test_a_redis_that_is_not_there_is_one_warning_at_start_up():
    app = create_app(make_settings(REDIS_URL=closed_port_url().replace("http", "redis") + "/0"))
    with capture_logs() as logs:
        async with running(app):
            pass  # no request at all
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["cache.redis_unavailable"]
    assert "Connection" in warnings[0]["error"] or "refused" in warnings[0]["error"].lower()
