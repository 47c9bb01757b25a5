"""deploy/kubernetes, rendered as its users render it (`kubectl kustomize`), checked for what matters
in a fleet: probes that exist on the app, a grace period longer than the drain, settings the app
knows, secrets only by reference, and a NetworkPolicy that admits exactly the upstreams."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

from adapter.app import create_app
from adapter.cli import build_parser
from adapter.settings import Settings
from tests.helpers import ROOT, deploy_tool

KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())
SETTING_NAMES = {f.encode_name for f in msgspec.structs.fields(Settings)}
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "KEY")
DNS = {(53, "UDP"), (53, "TCP")}


@functools.cache
def _render(directory: Path) -> tuple[dict, ...]:
    tool = deploy_tool("kubectl", "kustomize")
    command = [tool, "kustomize", str(directory)] if tool.endswith("kubectl") else [tool, "build", str(directory)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(command)} failed: {done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


@pytest.fixture(params=OVERLAYS)
def rendered(request) -> dict[tuple[str, str], dict]:
    """The overlay's objects by (kind, name)."""
    return {(d["kind"], d["metadata"]["name"]): d for d in _render(KUBERNETES / "overlays" / request.param)}


def sidecar(objects: dict) -> tuple[dict, dict, dict]:
    """The sidecar's Deployment, its pod spec and its container."""
    deployment = objects["Deployment", "crm-ai-sidecar"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = [c for c in pod["containers"] if c["name"] == "sidecar"]
    return deployment, pod, container


def environment(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def settings_of(container: dict) -> Settings:
    """What the sidecar reads from its literal environment (secrets and $(…) values left out)."""
    env = {name: e["value"] for name, e in environment(container).items()
           if "value" in e and "$(" not in e["value"] and name in SETTING_NAMES}
    return Settings.from_env(env)


def container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


@functools.cache
def app_paths() -> frozenset[str]:
    return frozenset(route.path for route in create_app(Settings.from_env({})).routes)


def test_every_overlay_renders_and_sentinel_waits_for_sentinel_support():
    assert OVERLAYS == ["single-redis"]  # `sentinel` once the sidecar speaks Redis Sentinel (README)
    for overlay in OVERLAYS:
        assert _render(KUBERNETES / "overlays" / overlay)


def test_the_command_is_the_apps_and_listens_where_the_probes_look(rendered):
    _, _, container = sidecar(rendered)
    args = build_parser().parse_args(container["args"][1:])  # exits (fails) on an unknown flag
    assert container["args"][0] == "adapter" and args.command == "serve" and args.host == "0.0.0.0"
    assert args.port == container_port(container, "http")


def test_probes_exist_on_the_app_and_wait_longer_than_its_own_probe_timeout(rendered):
    _, _, container = sidecar(rendered)
    paths = {kind: container[f"{kind}Probe"]["httpGet"]["path"] for kind in ("startup", "readiness", "liveness")}
    assert paths["readiness"] == "/readyz" and paths["liveness"] == "/healthz" and paths["startup"] == "/healthz"
    assert set(paths.values()) <= app_paths()
    settings = settings_of(container)
    for kind in ("startup", "readiness", "liveness"):
        probe = container[f"{kind}Probe"]
        assert container_port(container, probe["httpGet"]["port"]) == container_port(container, "http")
        # /readyz asks the gateway with HEALTH_PROBE_TIMEOUT: the kubelet must wait longer than that.
        assert probe["timeoutSeconds"] > settings.health_probe_timeout, kind


def test_rolling_updates_keep_capacity_and_the_grace_period_outlasts_the_drain(rendered):
    deployment, pod, container = sidecar(rendered)
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pre_stop = container["lifecycle"]["preStop"]
    wait = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else int(pre_stop["exec"]["command"][-1])
    assert pre_stop.get("exec", {}).get("command", ["sleep"])[0] == "sleep" and wait >= 5  # the endpoint goes first
    grace = settings_of(container).shutdown_grace_seconds
    # SIGTERM comes after preStop; then running jobs get the grace, in-flight requests the same again,
    # and the hand-over and flush a few seconds (adapter/servers.py, adapter/pipeline/jobs.py).
    assert pod["terminationGracePeriodSeconds"] >= wait + 2 * grace + 5


def test_the_pod_runs_as_the_images_user_without_token_or_writable_root(rendered):
    _, pod, container = sidecar(rendered)
    user = next(arg for op, arg in _dockerfile() if op == "USER").split(":")[0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and str(pod["securityContext"]["runAsUser"]) == user
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_images_are_pinned_to_a_version(rendered):
    for (kind, name), obj in rendered.items():
        if kind == "Deployment":
            for container in obj["spec"]["template"]["spec"]["containers"]:
                assert re.search(r":\d+\.\d+\.\d+", container["image"]), f"{name}: {container['image']} is not a version"


def test_resources_are_sized_from_the_benchmarks(rendered):
    _, _, container = sidecar(rendered)
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert _cpu(requests["cpu"]) <= _cpu(limits["cpu"]) and _mib(requests["memory"]) <= _mib(limits["memory"])
    # bench/RESULTS.md §3: the process's RSS with 1,000 open streams; the request must hold it.
    with_streams = float(re.search(r"with 1,000 open streams ([\d.]+) MiB", (ROOT / "bench" / "RESULTS.md").read_text()).group(1))
    assert _mib(requests["memory"]) >= with_streams
    hpa = rendered["HorizontalPodAutoscaler", "crm-ai-sidecar"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "crm-ai-sidecar"}
    assert hpa["minReplicas"] >= 2 and [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]


def test_every_environment_variable_is_one_the_settings_know(rendered):
    _, _, container = sidecar(rendered)
    env = environment(container)
    # A variable only spliced into another's value ($(REDIS_PASSWORD) in REDIS_URL) is Kubernetes', not ours.
    spliced = {name for e in env.values() for name in re.findall(r"\$\((\w+)\)", e.get("value", ""))}
    unknown = {name for name in env if name not in SETTING_NAMES | spliced and not name.startswith("OTEL_")}
    assert not unknown, f"the Deployment sets variables the sidecar never reads: {unknown}"
    assert spliced <= set(env) and all(list(env).index(n) < list(env).index(user)  # defined before use
                                       for user, e in env.items() for n in re.findall(r"\$\((\w+)\)", e.get("value", "")))
    settings_of(container)  # every literal value is valid


def test_every_secret_is_a_reference(rendered):
    assert not [name for kind, name in rendered if kind == "Secret"], "secrets are created beside the manifests, never shipped"
    for (kind, name), obj in rendered.items():
        if kind != "Deployment":
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            for var, e in environment(container).items():
                if any(word in var for word in SECRET_WORDS):
                    assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"], (name, var)
                if "value" in e and (url := urlsplit(e["value"])).password:
                    assert re.fullmatch(r"\$\(\w+\)", url.password), f"{name}: {var} carries a literal password"
    _, _, container = sidecar(rendered)
    env = environment(container)
    for var in ("JOB_TOKEN_SECRET", "REDIS_SIGNING_KEY", "CRM_JWT_SECRET"):
        assert env[var]["valueFrom"]["secretKeyRef"]["key"], var


def test_urls_point_at_services_and_the_network_policy_admits_exactly_those_ports(rendered):
    _, _, container = sidecar(rendered)
    env = environment(container)
    upstreams = {var: urlsplit(env[var]["value"]) for var in ("CONDUCTOR_GATEWAY_URL", "CRM_BACKEND_URL", "REDIS_URL")}
    policy = rendered["NetworkPolicy", "crm-ai-sidecar"]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    admitted = set()
    for rule in policy["egress"]:
        assert rule.get("to") and rule.get("ports"), "an egress rule without `to` or `ports` admits everything"
        admitted |= {(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]}
    assert admitted == {(url.port, "TCP") for url in upstreams.values()} | DNS
    # A Service the sidecar names must exist where it is defined here (Redis), on the port it names.
    redis = upstreams["REDIS_URL"]
    if ("Service", redis.hostname) in rendered:
        assert redis.port in {p["port"] for p in rendered["Service", redis.hostname]["spec"]["ports"]}
    http = container_port(container, "http")
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {http}


def test_redis_admits_only_the_sidecar_and_shares_its_password_secret(rendered):
    if ("Deployment", "crm-ai-redis") not in rendered:
        pytest.skip("this overlay brings no Redis of its own")
    redis = rendered["Deployment", "crm-ai-redis"]["spec"]["template"]["spec"]
    [server] = redis["containers"]
    password = environment(server)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert server["args"][server["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    _, _, container = sidecar(rendered)
    assert environment(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == password
    policy = rendered["NetworkPolicy", "crm-ai-redis"]["spec"]
    [rule] = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "crm-ai-sidecar"}}}]
    assert [p["port"] for p in rule["ports"]] == [6379] and policy["egress"] == []


def test_service_pdb_and_hpa_select_the_sidecars_pods(rendered):
    deployment, _, container = sidecar(rendered)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = rendered["Service", "crm-ai-sidecar"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert [container_port(container, p["targetPort"]) for p in service["ports"]] == [container_port(container, "http")]
    pdb = rendered["PodDisruptionBudget", "crm-ai-sidecar"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb.get("maxUnavailable", 0) <= 1
    assert rendered["NetworkPolicy", "crm-ai-sidecar"]["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_the_ingress_sends_the_ai_routes_to_the_sidecar_unbuffered_and_patiently(rendered):
    """deploy/kubernetes/ingress is applied on its own: the switch of docs/migration.md."""
    _, _, container = sidecar(rendered)
    switch = {(d["kind"], d["metadata"]["name"]): d for d in _render(KUBERNETES / "ingress")}
    assert list(switch) == [("Ingress", "crm-ai-sidecar")]  # the rollback deletes exactly this one
    ingress = switch["Ingress", "crm-ai-sidecar"]
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    assert path["backend"]["service"]["name"] == "crm-ai-sidecar"
    assert path["pathType"] == "Prefix" and all(p.startswith(path["path"] + "/") for p in app_paths() if p.startswith("/api/v1/ai"))
    port = path["backend"]["service"]["port"]
    service_ports = rendered["Service", "crm-ai-sidecar"]["spec"]["ports"]
    assert any(p.get("name") == port.get("name") or p["port"] == port.get("number") for p in service_ports)
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    settings = settings_of(container)
    # A synchronous AI call may be silent for up to GATEWAY_CALL_TIMEOUT; a stream pings every SSE_HEARTBEAT_SECONDS.
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{timeout}"]) > max(settings.gateway_call_timeout, settings.sse_heartbeat_seconds)


def _dockerfile() -> list[tuple[str, str]]:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line.strip() and not line.startswith("#")
            and " " in line.strip()]


def _cpu(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _mib(value: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(value[:-2]) * units[value[-2:]]
