"""No Docker engine runs here: the Dockerfile and compose file are checked by reading them."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

from adapter.app import create_app
from adapter.cli import build_parser
from adapter.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTING_NAMES = {f.encode_name for f in msgspec.structs.fields(Settings)}
DEFAULTS = Settings.from_env({})
# The dependencies' wire contracts (shared/context/upstreams.md): container port and health path.
UPSTREAM_PORTS = {"conductor-gateway": 5006, "crm-backend": 8000, "redis": 6379, "conductor-api": 8000}


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def app_paths() -> set[str]:
    return {route.path for route in create_app(DEFAULTS).routes}


def health_path(command: list[str] | str) -> str:
    text = command if isinstance(command, str) else " ".join(command)
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)", text)
    assert match, f"no local health URL in {text!r}"
    return match.group(2)


def test_dockerfile_is_multi_stage_slim_and_not_root():
    steps = dockerfile()
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) >= 2 and "slim" in froms[-1]
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_health_check_and_command_are_real():
    steps = dict(dockerfile())
    health = steps["HEALTHCHECK"]
    assert health_path(health) == "/healthz" and "/healthz" in app_paths()
    assert ":8080/" in health and steps["EXPOSE"].split()[0] == str(DEFAULTS.adapter_port)
    command = json.loads(steps["CMD"])
    assert command[0] == "adapter"
    args = build_parser().parse_args(command[1:])  # exits (fails the test) on an unknown command or flag
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == int(steps["EXPOSE"].split()[0])
    for assignment in shlex.split(steps["ENV"]):
        assert assignment.split("=", 1)[0] in SETTING_NAMES | {"PYTHONUNBUFFERED"}


def test_wheel_carries_the_agent_definitions(tmp_path):
    # The image installs the wheel, not the source tree: the personas must travel inside it.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for agent in ("EmailAssistant_CRM_Agent", "LeadQualifier_CRM_Agent", "DealPredictor_CRM_Agent"):
        assert f"adapter/_agents/{agent}/persona.md" in names and f"adapter/_agents/{agent}/definition.yaml" in names


def test_compose_sidecar_environment_is_what_the_settings_read():
    env = compose()["services"]["crm-ai-sidecar"]["environment"]
    unknown = set(env) - SETTING_NAMES
    assert not unknown, f"compose sets variables the sidecar never reads: {unknown}"
    concrete = {k: v for k, v in env.items() if "${" not in str(v)}
    Settings.from_env({k: str(v) for k, v in concrete.items()})  # every literal value is valid


def test_compose_urls_point_at_services_on_their_ports():
    services = compose()["services"]
    env = services["crm-ai-sidecar"]["environment"]
    for variable in ("CONDUCTOR_GATEWAY_URL", "CRM_BACKEND_URL", "REDIS_URL"):
        target = urlsplit(env[variable])
        assert target.hostname in services, f"{variable} points at {target.hostname}, not a compose service"
        assert target.port == UPSTREAM_PORTS[target.hostname], f"{variable}: wrong port for {target.hostname}"
        published = [p.split(":")[-1] for p in services[target.hostname].get("ports", [])]
        assert str(target.port) in published, f"{target.hostname} does not listen on {target.port}"


def test_compose_ports_and_health_checks_agree_with_the_app():
    services = compose()["services"]
    sidecar = services["crm-ai-sidecar"]
    assert sidecar["ports"] == [f"{DEFAULTS.adapter_port}:{DEFAULTS.adapter_port}"]
    assert health_path(sidecar["healthcheck"]["test"]) in app_paths()
    assert f":{DEFAULTS.adapter_port}/" in " ".join(sidecar["healthcheck"]["test"])
    if "command" in sidecar:
        build_parser().parse_args(sidecar["command"][1:])


def test_compose_has_health_checks_and_ordered_start():
    services = compose()["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services and rule == {"condition": "service_healthy"}, (name, dependency)
    assert set(services["crm-ai-sidecar"]["depends_on"]) == {"redis", "conductor-gateway", "crm-backend"}
    assert services["conductor-gateway"]["environment"]["CONDUCTOR_API_URL"] == "http://conductor-api:8000"
    assert any(v.endswith(":ro") and "conductor-agents" in v for v in services["conductor-api"]["volumes"])


@pytest.mark.parametrize("service", ["crm-backend", "conductor-gateway", "conductor-api"])
def test_upstream_health_checks_use_their_health_routes(service):
    assert health_path(compose()["services"][service]["healthcheck"]["test"]) == "/health"
