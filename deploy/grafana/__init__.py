"""The Grafana dashboard for the CRM AI sidecar, generated from code so it stays in step with the metrics.

`python -m deploy.grafana` writes deploy/grafana/crm-ai-sidecar.json (Grafana's JSON model,
importable as it is: Dashboards > New > Import). tests/test_dashboard.py checks that the committed
file is this module's output and that every metric a panel queries is one the sidecar exports.
A few dozen lines of our own rather than a dashboard SDK: the model needs panels, targets and a
grid, and a dependency would outweigh them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "crm-ai-sidecar.json"
UID = "crm-ai-sidecar"
SEL = 'namespace=~"$namespace"'  # every query is scoped to the chosen namespace(s)
RATE = "$__rate_interval"


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 8
    overrides: dict[str, Any] = field(default_factory=dict)


def quantiles(metric: str, by: str, qs: tuple[float, ...] = (0.5, 0.95)) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{SEL}}}[{RATE}])))", f"p{round(q * 100)} {{{{{by}}}}}")
            for q in qs]


def ratio(numerator: str, denominator: str, by: str) -> str:
    return f"sum by ({by}) (rate({numerator}[{RATE}])) / sum by ({by}) (rate({denominator}[{RATE}]))"


ROWS: list[tuple[str, list[Panel]]] = [
    ("Requests", [
        Panel("Request rate by route", [(f"sum by (route) (rate(crm_ai_http_requests_total{{{SEL}}}[{RATE}]))", "{{route}}")],
              unit="reqps"),
        Panel("Errors by route (5xx share)",
              [(ratio(f'crm_ai_http_requests_total{{{SEL}, status=~"5.."}}', f"crm_ai_http_requests_total{{{SEL}}}", "route"),
                "{{route}}")], unit="percentunit",
              description="The availability SLO's numerator: 5xx answers over all answers, per route."),
        Panel("Latency by route", quantiles("crm_ai_http_request_duration_seconds", "route"), unit="s",
              description="Streams and job events last as long as the stream: read their routes apart."),
    ]),
    ("Answers", [
        Panel("Cache hit ratio by task",
              [(ratio(f'crm_ai_cache_events_total{{{SEL}, result=~"hit|stale"}}',
                      f'crm_ai_cache_events_total{{{SEL}, result=~"hit|stale|miss|bypass"}}', "task"), "{{task}}")],
              unit="percentunit", description="Hits and stale answers over every answer that consulted the cache."),
        Panel("Model calls by agent and outcome",
              [(f"sum by (agent, outcome) (rate(crm_ai_gateway_calls_total{{{SEL}}}[{RATE}]))", "{{agent}} {{outcome}}")],
              unit="reqps"),
        Panel("Repairs by agent",
              [(f'sum by (agent, outcome) (rate(crm_ai_agent_output_total{{{SEL}, outcome=~"invalid|repaired|failed"}}[{RATE}]))',
                "{{agent}} {{outcome}}")], unit="reqps",
              description="invalid: an answer that broke the contract; repaired: served after a repair call; failed: 502."),
        Panel("Guidance warnings by agent and rule",
              [(f"sum by (agent, rule) (rate(crm_ai_agent_guidance_total{{{SEL}}}[{RATE}]))", "{{agent}} {{rule}}")],
              unit="reqps"),
        Panel("Provider fallbacks by agent",
              [(f"sum by (agent, from_provider, to_provider) (rate(crm_ai_provider_fallbacks_total{{{SEL}}}[{RATE}]))",
                "{{agent}} {{from_provider}} → {{to_provider}}")], unit="reqps"),
        Panel("Rate-limit refusals by task",
              [(f"sum by (task) (rate(crm_ai_rate_limited_total{{{SEL}}}[{RATE}]))", "{{task}}")], unit="reqps"),
    ]),
    ("Protection", [
        Panel("Circuit state by upstream and replica",
              [(f"max by (upstream, pod) (crm_ai_circuit_state{{{SEL}}})", "{{upstream}} {{pod}}")], kind="state-timeline",
              overrides={"mappings": [{"type": "value", "options": {
                  "0": {"text": "closed", "color": "green"}, "1": {"text": "half-open", "color": "yellow"},
                  "2": {"text": "open", "color": "red"}}}]}),
        Panel("Agent runs in flight by replica",
              [(f"sum by (pod) (crm_ai_gateway_calls_in_flight{{{SEL}}})", "{{pod}}")],
              description="Held bulkhead slots; at GATEWAY_MAX_CONCURRENCY more requests wait, then 503 gateway-busy."),
        Panel("Ready replicas and Redis",
              [(f"sum(crm_ai_ready{{{SEL}}})", "ready replicas"), (f"count(crm_ai_ready{{{SEL}}})", "replicas"),
               (f'min(crm_ai_cache_store_up{{{SEL}, backend="redis"}})', "Redis up (all replicas)")]),
    ]),
    ("Jobs and replicas", [
        Panel("Running jobs and batches, open streams",
              [(f"sum(crm_ai_running_jobs{{{SEL}}}) - sum(crm_ai_running_batches{{{SEL}}})", "jobs"),
               (f"sum(crm_ai_running_batches{{{SEL}}})", "batches"), (f"sum(crm_ai_open_streams{{{SEL}}})", "open streams")]),
        Panel("Takeovers and handovers",
              [(f"sum by (reason) (increase(crm_ai_job_takeovers_total{{{SEL}}}[{RATE}]))", "takeovers ({{reason}})"),
               (f"sum(increase(crm_ai_job_handovers_total{{{SEL}}}[{RATE}]))", "handovers")],
              description="lease_lapsed takeovers mean a replica died mid-job (the CrmAiJobTakeovers alert)."),
        Panel("Follower lag", quantiles("crm_ai_job_follower_lag_seconds", "pod", (0.5, 0.99)), unit="s",
              description="From an event's write to Redis to its read by a replica following the job for its readers."),
    ]),
    ("Upstreams", [
        Panel("CRM backend latency by method", quantiles("crm_ai_crm_call_duration_seconds", "method"), unit="s", width=12),
        Panel("Conductor Gateway latency by agent", quantiles("crm_ai_gateway_call_duration_seconds", "agent"), unit="s", width=12),
    ]),
]


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.overrides.get("mappings"):
        defaults["mappings"] = panel.overrides["mappings"]
    return {
        "id": pid, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "range": True,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (expr, legend) in enumerate(panel.targets)],
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y, x = pid + 1, y + 1, 0
        for panel in row:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(panel, pid, x, y))
            pid, x = pid + 1, x + panel.width
        y += 8
    return {
        "uid": UID, "title": "CRM AI sidecar", "tags": ["crm", "ai", "sidecar"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "description": "Generated by `python -m deploy.grafana` (deploy/grafana/__init__.py): edit the code, not this file.",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {}},
            {"name": "namespace", "label": "Namespace", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(crm_ai_http_requests_total, namespace)", "refId": "namespaces"},
             "definition": "label_values(crm_ai_http_requests_total, namespace)",
             "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "current": {}},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"
