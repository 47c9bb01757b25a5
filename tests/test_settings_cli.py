"""Configuration, the `adapter` command and the committed contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.settings import ConfigError, Settings

ROOT = Path(__file__).resolve().parent.parent


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
])
def test_invalid_values_name_the_variable_in_one_line(env, variable):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert variable in str(info.value) and "\n" not in str(info.value)


def run_adapter(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapter.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_invalid_configuration_stops_serve_with_one_line():
    done = run_adapter("serve", env={"ADAPTER_PORT": "nope"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["adapter: invalid configuration: ADAPTER_PORT: Expected `int`, got `str`"]


def test_committed_openapi_matches_the_app():
    done = run_adapter("openapi")
    assert done.returncode == 0, done.stderr
    committed = ROOT / "openapi" / "openapi.json"
    assert committed.exists(), "openapi/openapi.json is missing: run `adapter openapi > openapi/openapi.json`"
    assert json.loads(done.stdout) == json.loads(committed.read_text()), (
        "the app's OpenAPI document differs from openapi/openapi.json; regenerate it with "
        "`adapter openapi > openapi/openapi.json` and review the diff")
