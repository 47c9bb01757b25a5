"""No Docker engine runs here: the Dockerfile and compose file are checked by reading them."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import zipfile
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

from adapter.app import create_app
from adapter.cli import build_parser
from adapter.settings import Settings
from tests.helpers import DEAL_AGENT, EMAIL_AGENT, LEAD_AGENT, ROOT

SETTING_NAMES = {f.encode_name for f in msgspec.structs.fields(Settings)}
DEFAULTS = Settings.from_env({})
# The dependencies' wire contracts (shared/context/upstreams.md): container port and health path.
UPSTREAM_PORTS = {"conductor-gateway": 5006, "crm-backend": 8000, "redis": 6379, "crm-redis": 6379, "conductor-api": 8000}


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently (a merge once left two REDIS_SIGNING_KEY lines)."""

    def construct_mapping(self, node, deep=False):
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.value != "<<"]
        assert len(keys) == len(set(keys)), f"duplicate keys at line {node.start_mark.line + 1}: {sorted(keys)}"
        return super().construct_mapping(node, deep)


def compose() -> dict:
    return yaml.load((ROOT / "docker-compose.yml").read_text(), Loader=_StrictLoader)


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
    for agent in (EMAIL_AGENT, LEAD_AGENT, DEAL_AGENT):
        assert f"adapter/_agents/{agent}/persona.md" in names and f"adapter/_agents/{agent}/definition.yaml" in names


def test_compose_sidecar_environment_is_what_the_settings_read():
    env = compose()["services"]["crm-ai-sidecar"]["environment"]
    unknown = {k for k in set(env) - SETTING_NAMES if not k.startswith("OTEL_")}  # OpenTelemetry reads its own
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
        service = services[target.hostname]
        listening = [str(p).split(":")[-1] for p in service.get("ports", [])] + [str(p) for p in service.get("expose", [])]
        assert str(target.port) in listening, f"{target.hostname} does not listen on {target.port}"


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


# --- properties an operator relies on (issue 16) ----------------------------------------------

# What each image ships: python:*-slim has no curl, redis:*-alpine has redis-cli.
HEALTH_BINARIES = {"python", "redis-cli"}


def _published(service: dict) -> list[tuple[str, str]]:
    """(host interface, container port) of each published port; '' means every interface."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            out.append((entry.get("host_ip", ""), str(entry["target"])))
            continue
        parts = str(entry).split(":")
        out.append((parts[0] if len(parts) == 3 else "", parts[-1]))
    return out


def test_compose_resolves_host_docker_internal_on_linux():
    for name, service in compose()["services"].items():
        if "host.docker.internal" in yaml.safe_dump(service.get("environment", {})):
            assert "host.docker.internal:host-gateway" in service.get("extra_hosts", []), \
                f"{name} reaches host.docker.internal, which a Linux engine resolves only with extra_hosts"


def test_compose_health_checks_need_no_missing_binary():
    for name, service in compose()["services"].items():
        test = service["healthcheck"]["test"]
        assert isinstance(test, list) and test[0] == "CMD", f"{name}: exec form, no shell needed"
        assert test[1] in HEALTH_BINARIES, f"{name}'s health check runs {test[1]!r}, which its image may not ship"
        if test[1] == "python":
            compile(test[3], f"{name}-healthcheck", "exec")  # the one-liner is valid Python


def test_compose_publishes_only_the_sidecar_and_never_redis_unauthenticated():
    services = compose()["services"]
    for name, service in services.items():
        if name == "crm-ai-sidecar":
            continue
        for interface, _ in _published(service):
            assert interface in {"127.0.0.1", "::1", "[::1]"}, f"{name} is published on every interface"
    redis = services["redis"]
    if _published(redis):
        assert "--requirepass" in " ".join(map(str, redis.get("command", []))), "Redis is published without a password"


def test_compose_redis_requires_the_password_the_sidecar_uses():
    """Issue 22: one Redis without a password, shared with the backend, let a neighbour decide answers."""
    services = compose()["services"]
    redis = services["redis"]
    command = redis["command"]
    assert command[:2] == ["redis-server", "--requirepass"], "the sidecar's Redis must require a password"
    password = re.fullmatch(r"\$\{(\w+):\?.+\}", command[2])
    assert password, "the password must come from a required variable, never a literal"
    url = urlsplit(services["crm-ai-sidecar"]["environment"]["REDIS_URL"])
    assert url.password == "${%s}" % password.group(1), "the sidecar must authenticate with the same variable"
    # The health check authenticates too, without putting the password in its arguments.
    assert redis["environment"]["REDISCLI_AUTH"] == "${%s}" % password.group(1)
    assert not _published(redis), "the sidecar's Redis is never published"
    signing = services["crm-ai-sidecar"]["environment"]["REDIS_SIGNING_KEY"]
    assert re.fullmatch(r"\$\{REDIS_SIGNING_KEY:\?.+\}", signing), "the signing key is required, never a literal"


def test_compose_gives_the_crm_backend_its_own_redis():
    services = compose()["services"]
    sidecar_redis = urlsplit(services["crm-ai-sidecar"]["environment"]["REDIS_URL"]).hostname
    for name, service in services.items():
        if name == "crm-ai-sidecar":
            continue
        hosts = {urlsplit(str(v)).hostname for v in service.get("environment", {}).values() if "://" in str(v)}
        assert sidecar_redis not in hosts | set(service.get("depends_on", {})), \
            f"{name} reaches the sidecar's Redis, which only the sidecar may write"
    backend_redis = urlsplit(services["crm-backend"]["environment"]["REDIS_URL"]).hostname
    assert backend_redis != sidecar_redis and backend_redis in services


def test_compose_wires_the_crm_secret_into_the_sidecar():
    services = compose()["services"]
    secret = services["crm-backend"]["environment"]["SECRET_KEY"]
    wired = services["crm-ai-sidecar"]["environment"].get("CRM_JWT_SECRET", "")
    assert re.match(r"\$\{(\w+)", secret).group(1) == re.match(r"\$\{(\w+)", wired).group(1), \
        "the sidecar must verify tokens with the backend's SECRET_KEY (CRM_JWT_SECRET)"


def test_compose_images_are_pinned():
    for name, service in compose()["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        if image.startswith("${"):
            assert ":?" in image, f"{name}: an image variable must be required, not defaulted to a floating tag"
            continue
        assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned to a version"


def test_compose_conductor_api_gets_provider_credentials_and_time_to_start():
    api = compose()["services"]["conductor-api"]
    assert {"ANTHROPIC_API_KEY", "GEMINI_API_KEY"} <= set(api["environment"])
    assert int(api["healthcheck"]["start_period"].rstrip("s")) >= 30


def test_dockerignore_keeps_the_context_small():
    patterns = (ROOT / ".dockerignore").read_text().split()
    # Everything is excluded, then only what the Dockerfile copies comes back.
    assert patterns[patterns.index("*") if "*" in patterns else -1] == "*"
    allowed = {p.lstrip("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = {part for op, arg in dockerfile() if op == "COPY" and "--from" not in arg for part in arg.split()[:-1]}
    assert copied <= allowed, f"the Dockerfile copies {copied - allowed}, which .dockerignore leaves out"
    assert not {".venv", ".git", "tests", "bench"} & allowed
