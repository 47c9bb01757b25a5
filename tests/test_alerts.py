"""deploy/prometheus/alerts.yml, unit-tested with `promtool test rules` on synthetic series: each alert
fires when it should and stays quiet when it should not.

promtool compares an alert's annotations too: the expected ones are the rule's own, with
`{{ $labels.x }}` filled in from the expected labels (the rules use no other template)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

import pytest
import yaml

from tests.helpers import ROOT, deploy_tool

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
NS = 'namespace="crm"'
AI = 'route="/api/v1/ai/lead/qualify",method="POST"'


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}


@dataclass
class Case:
    name: str
    series: dict[str, str]
    alert: str
    at: str
    fires: list[dict[str, str]] = field(default_factory=list)  # the alerts' own labels (the rule's are added)
    interval: str = "1m"


def requests(ok: str, failed: str, route: str = AI) -> dict[str, str]:
    return {f'crm_ai_http_requests_total{{{NS},{route},status="200"}}': ok,
            f'crm_ai_http_requests_total{{{NS},{route},status="502"}}': failed}


def latency(fast: str, total: str, route: str = 'route="/api/v1/ai/lead/qualify"') -> dict[str, str]:
    return {f'crm_ai_http_request_duration_seconds_bucket{{{NS},{route},le="60.0"}}': fast,
            f'crm_ai_http_request_duration_seconds_count{{{NS},{route}}}': total}


def answers(agent: str, valid: str, repaired: str, guidance: str = "0x108") -> dict[str, str]:
    return {f'crm_ai_agent_output_total{{{NS},agent="{agent}",outcome="valid"}}': valid,
            f'crm_ai_agent_output_total{{{NS},agent="{agent}",outcome="repaired"}}': repaired,
            f'crm_ai_agent_output_total{{{NS},agent="{agent}",outcome="failed"}}': "0x108",
            f'crm_ai_agent_guidance_total{{{NS},agent="{agent}",rule="email-spam-words"}}': guidance}


LEAD = "LeadQualifier_CRM_Agent"
CRM = {"namespace": "crm"}
POD = 'namespace="crm",pod="crm-ai-sidecar-1"'
POD_LABELS = {"namespace": "crm", "pod": "crm-ai-sidecar-1"}

CASES = [
    # --- availability: 1 % error budget --------------------------------------------------------------
    Case("20 % of AI requests fail for 70 minutes: page", requests("0+80x80", "0+20x80"),
         "CrmAiErrorBudgetBurnFast", "70m", [CRM]),
    Case("5 % of AI requests fail: no page", requests("0+95x80", "0+5x80"), "CrmAiErrorBudgetBurnFast", "70m"),
    Case("one bad 5-minute spike in an hour: no page", requests("0+100x60 6000x5", "0x60 0+100x5"),
         "CrmAiErrorBudgetBurnFast", "65m"),
    Case("the pass-through failing is no AI error", requests("0+100x80", "0+100x80", 'route="/api/v1/{path:path}",method="GET"'),
         "CrmAiErrorBudgetBurnFast", "70m"),
    Case("8 % of AI requests fail for 7 hours: ticket", requests("0+92x84", "0+8x84"), "CrmAiErrorBudgetBurnSlow", "7h", [CRM],
         interval="5m"),
    Case("8 % is no page", requests("0+92x84", "0+8x84"), "CrmAiErrorBudgetBurnFast", "7h", interval="5m"),
    Case("4 % of AI requests fail for 7 hours: no ticket", requests("0+96x84", "0+4x84"), "CrmAiErrorBudgetBurnSlow", "7h",
         interval="5m"),
    # --- latency: 95 % within 60 s --------------------------------------------------------------------
    Case("80 % of synchronous AI requests take over 60 s: page", latency("0+2x80", "0+10x80"),
         "CrmAiLatencyBudgetBurnFast", "70m", [CRM]),
    Case("streams last long by design: no page", latency("0x80", "0+10x80", 'route="/api/v1/ai/lead/qualify/stream"'),
         "CrmAiLatencyBudgetBurnFast", "70m"),
    Case("40 % slow for 7 hours: ticket, no page", latency("0+6x84", "0+10x84"), "CrmAiLatencyBudgetBurnSlow", "7h", [CRM],
         interval="5m"),
    Case("40 % slow is no page", latency("0+6x84", "0+10x84"), "CrmAiLatencyBudgetBurnFast", "7h", interval="5m"),
    Case("10 % slow: no ticket", latency("0+9x84", "0+10x84"), "CrmAiLatencyBudgetBurnSlow", "7h", interval="5m"),
    # --- circuits -----------------------------------------------------------------------------------------
    Case("the gateway's circuit open and half-open for 10 minutes: page",
         {f'crm_ai_circuit_state{{{POD},upstream="conductor-gateway"}}': "2 2 1 2 2 1 2 2 1 2 2"},
         "CrmAiGatewayCircuitOpen", "10m", [{**POD_LABELS, "upstream": "conductor-gateway"}]),
    Case("the gateway's circuit open for 3 minutes, then closed: no page",
         {f'crm_ai_circuit_state{{{POD},upstream="conductor-gateway"}}': "2 2 2 0 0 0 0 0 0 0 0"},
         "CrmAiGatewayCircuitOpen", "10m"),
    Case("the CRM backend's circuit open for 10 minutes: page",
         {f'crm_ai_circuit_state{{{POD},upstream="crm-backend"}}': "2x10"}, "CrmAiCrmCircuitOpen", "10m",
         [{**POD_LABELS, "upstream": "crm-backend"}]),
    Case("the CRM backend's circuit open for 4 minutes, then closed: no page",
         {f'crm_ai_circuit_state{{{POD},upstream="crm-backend"}}': "2 2 2 2 0 0 0 0 0 0 0"}, "CrmAiCrmCircuitOpen", "10m"),
    Case("the CRM backend's open circuit is not the gateway's",
         {f'crm_ai_circuit_state{{{POD},upstream="crm-backend"}}': "2x10"}, "CrmAiGatewayCircuitOpen", "10m"),
    # --- model answers: yesterday 5 % repaired (15-minute samples: 100 = 25 h, then 1 h more) -------------
    Case("repairs jump from 5 % to 25 % of answers: ticket", answers(LEAD, "0+19x100 1900+15x4", "0+1x100 100+5x4"),
         "CrmAiRepairRateJump", "26h", [{"namespace": "crm", "agent": LEAD}], interval="15m"),
    Case("repairs at 25 % as yesterday: no ticket", answers(LEAD, "0+15x104", "0+5x104"), "CrmAiRepairRateJump", "26h",
         interval="15m"),
    Case("repairs at 50 % of a handful of answers: no ticket", answers(LEAD, "0+1x104", "0x100 0+1x4"),
         "CrmAiRepairRateJump", "26h", interval="15m"),
    Case("guidance warnings jump from 10 % to 50 % of answers: ticket",
         answers(LEAD, "0+20x108", "0x108", guidance="0+2x100 200+10x8"),  # 2 h: the alert waits 30 min
         "CrmAiGuidanceWarningsJump", "27h", [{"namespace": "crm", "agent": LEAD}], interval="15m"),
    Case("guidance warnings steady at 50 %: no ticket", answers(LEAD, "0+20x104", "0x104", guidance="0+10x104"),
         "CrmAiGuidanceWarningsJump", "26h", interval="15m"),
    # --- jobs, Redis, readiness -------------------------------------------------------------------------
    Case("a job taken over from a dead replica: ticket",
         {f'crm_ai_job_takeovers_total{{{POD},reason="lease_lapsed"}}': "0x10 1x10",
          f'crm_ai_job_takeovers_total{{{POD},reason="handed_over"}}': "0x20"}, "CrmAiJobTakeovers", "15m", [CRM]),
    Case("jobs handed over in a rolling deploy: no ticket",
         {f'crm_ai_job_takeovers_total{{{POD},reason="lease_lapsed"}}': "0x20",
          f'crm_ai_job_takeovers_total{{{POD},reason="handed_over"}}': "0x10 3x10"}, "CrmAiJobTakeovers", "15m"),
    Case("Redis failing for 3 minutes: page", {f'crm_ai_cache_store_up{{{POD},backend="redis"}}': "1 1 0 0 0 0 0"},
         "CrmAiRedisUnavailable", "6m", [{**POD_LABELS, "backend": "redis"}]),
    Case("Redis failing for a minute: no page", {f'crm_ai_cache_store_up{{{POD},backend="redis"}}': "1 1 0 1 1 1 1"},
         "CrmAiRedisUnavailable", "6m"),
    Case("Redis failing for the second minute: still no page", {f'crm_ai_cache_store_up{{{POD},backend="redis"}}': "1 1 0 0 1"},
         "CrmAiRedisUnavailable", "3m"),
    Case("a replica not ready for 12 minutes: ticket", {f"crm_ai_ready{{{POD}}}": "1 1 0x12"}, "CrmAiReplicaNotReady", "14m",
         [POD_LABELS]),
    Case("a replica draining for a minute, then gone: no ticket", {f"crm_ai_ready{{{POD}}}": "1x10 0 0 stale"},
         "CrmAiReplicaNotReady", "14m"),
    Case("a replica nothing probes (NaN): no ticket", {f"crm_ai_ready{{{POD}}}": " ".join(["NaN"] * 15)}, "CrmAiReplicaNotReady", "14m"),
]


def test_the_rules_are_valid_and_every_alert_has_a_runbook_and_cases():
    promtool = deploy_tool("promtool")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in {"page", "ticket"} and rule["annotations"]["summary"], name
        assert len(rule["annotations"]["runbook"].split()) >= 20, f"{name}'s runbook says too little"
        assert {c.alert for c in CASES if c.alert == name and c.fires}, f"no case makes {name} fire"
        assert {c.alert for c in CASES if c.alert == name and not c.fires}, f"no case keeps {name} quiet"


def _group(case: Case) -> dict:
    rule = alerts()[case.alert]
    expected = []
    for labels in case.fires:
        labels = {**labels, **rule["labels"]}
        notes = {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], v) for k, v in rule["annotations"].items()}
        expected.append({"exp_labels": labels, "exp_annotations": notes})
    return {"name": case.name, "interval": case.interval,
            "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
            "alert_rule_test": [{"eval_time": case.at, "alertname": case.alert, "exp_alerts": expected}]}


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> dict[str, str]:
    """Every case in one promtool run (one process, under a second); what it said about each failed one.

    Rules are evaluated every evaluation_interval up to each case's eval_time, so the long cases
    use 5-minute steps: a day of 1-minute steps costs promtool seconds."""
    promtool = deploy_tool("promtool")
    path = tmp_path_factory.mktemp("alerts") / "test.yml"
    groups = [_group(c) for c in CASES]
    by_interval: dict[str, list[dict]] = {}
    for case, group in zip(CASES, groups):
        by_interval.setdefault(case.interval, []).append(group)
    said: dict[str, str] = {}
    for interval, tests in by_interval.items():
        path.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": interval, "tests": tests},
                                       sort_keys=False))
        done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
        output = done.stdout + done.stderr
        parts = re.split(r"^\s*name: (.*),$", output, flags=re.MULTILINE)
        said.update({name: text for name, text in zip(parts[1::2], parts[2::2])})
        assert done.returncode == 0 or said, f"promtool failed before testing: {output}"
    return said


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_alert(case: Case, failures):
    assert case.name not in failures, failures.get(case.name)
