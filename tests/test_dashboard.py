"""deploy/grafana/crm-ai-sidecar.json: generated from deploy/grafana (committed copy = generator's output),
every query valid PromQL, and every metric a panel queries exported by the sidecar after a short run."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from deploy import grafana
from tests.helpers import EMAIL_AGENT, LEAD_AGENT, QUALIFY, deploy_tool, make_settings, samples

METRIC = re.compile(r"\b(crm_ai_[a-z0-9_]+)\b")


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target."""
    return [(p["title"], t["expr"]) for p in grafana.dashboard()["panels"] for t in p.get("targets", [])]


def test_the_committed_dashboard_is_the_generators_output():
    assert grafana.OUTPUT.read_text() == grafana.render(), \
        "deploy/grafana/crm-ai-sidecar.json differs from its generator: run `python -m deploy.grafana` and commit both"


def test_the_dashboard_is_well_formed():
    board = json.loads(grafana.OUTPUT.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] == grafana.UID
    cells = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]


def test_every_query_is_valid_promql(tmp_path):
    # promtool has no query checker, but it parses every recording rule's expression.
    promtool = deploy_tool("promtool")
    rules = [{"record": f"dashboard:query_{i}",
              "expr": expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")} for i, (_, expr) in enumerate(queries())]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(tmp_path / "queries.yml")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.redis
async def test_every_metric_a_panel_queries_is_exported_after_a_short_run(make_client, gateway, crm, seed, auth,
                                                                          redis_url, cache_prefix):
    """A short run that touches each panel's subject once: a miss and a hit, a repair, a guidance
    warning, a provider fallback, a rate-limit refusal, a stream job; then /metrics is scraped."""
    settings = make_settings(redis_url=redis_url, cache_prefix=cache_prefix, conductor_ai_provider="claude,gemini",
                             rate_limit_deal_predict="1/60")
    async with make_client(settings=settings) as client:
        gateway.push(LEAD_AGENT, "garbage", "json")  # a repair
        await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
        await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)  # a hit
        gateway.push(LEAD_AGENT, "run_failed")  # the first provider fails: a fallback
        await client.post(QUALIFY, json={"lead_id": seed["leads"][1]}, headers=auth)
        await client.post("/api/v1/ai/email/generate", headers=auth,  # a guidance warning (a spam word)
                          json={"lead_id": seed["leads"][0], "context": "our free pilot programme"})
        for deal in seed["deals"][:2]:  # the second is refused: 1 per minute
            await client.post("/api/v1/ai/deal/predict", json={"deal_id": deal}, headers=auth)
        await client.post("/api/v1/ai/lead/qualify/stream", json={"lead_id": seed["leads"][2]}, headers=auth)
        await client.get("/readyz")
        exported = {name for name, _ in samples((await client.get("/metrics")).text)}
    assert gateway.calls[EMAIL_AGENT] == 1
    queried = {(title, name) for title, expr in queries() for name in METRIC.findall(expr)}
    missing = sorted({f"{name} ({title})" for title, name in queried if name not in exported})
    assert not missing, f"panels query metrics the sidecar does not export: {missing}"
    assert len({name for _, name in queried}) >= 15
