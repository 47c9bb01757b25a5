"""deal.predict: a deal's win probability, health, likely close date, risks and next actions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import msgspec

from ..models import Inbound, ObjectId, Percent, Provider
from ..notify.triggers import ABOUT_MAX, Finding, Trigger, shown
from .prompting import days_since, pick, task_input
from .reading import Breach, Reader, Verdict, read_answer, words
from .registry import Task
from .samples import EXAMPLE_DEAL_ID, EXAMPLE_REASONING, filler

NAME = "deal.predict"
AGENT = "DealPredictor_CRM_Agent"
REASONING_WORDS = 100
_FIELDS = frozenset({"win_probability", "health_score", "predicted_close_date", "risk_factors",
                     "recommended_actions", "reasoning"})


class DealPredictRequest(Inbound):
    deal_id: ObjectId


class DealPredictResult(msgspec.Struct, kw_only=True):
    deal_id: str
    agent: str
    win_probability: Percent
    health_score: Percent
    predicted_close_date: dt.date | None
    risk_factors: list[str]
    recommended_actions: list[str]
    reasoning: str
    provider: Provider = None


def render(deal: dict[str, Any], _request: Any, today: dt.date) -> str:
    custom = deal.get("custom_fields") or {}
    data = pick(deal, "title", "value", "currency", "stage", "expected_close_date")
    data["currency"] = data["currency"] or "BRL"
    data["days_in_pipeline"] = days_since(deal.get("created_at"), today)
    data["contacts_count"] = len(deal.get("contact_ids") or [])
    # Not first-class deal fields in the CRM; teams keep them in custom_fields.
    for name in ("activity_count", "last_activity_date", "engagement_score", "decision_makers_count"):
        data[name] = custom.get(name)
    data["today"] = today.isoformat()
    return task_input(NAME, data)


def validate(text: str, deal_id: str, agent: str) -> Verdict:
    def build(r: Reader) -> DealPredictResult | None:
        win, health = r.percent("win_probability"), r.percent("health_score")
        close = r.date("predicted_close_date")
        risks, actions = r.texts("risk_factors", at_least=0), r.texts("recommended_actions", at_least=1)
        reasoning = r.text("reasoning")
        if r.errors:
            return None
        return DealPredictResult(deal_id=deal_id, agent=agent, win_probability=win, health_score=health,  # type: ignore[arg-type]
                                 predicted_close_date=close, risk_factors=risks, recommended_actions=actions,  # type: ignore[arg-type]
                                 reasoning=reasoning)  # type: ignore[arg-type]

    result, notes = read_answer(text, _FIELDS, build)
    return Verdict(result, tuple(notes), tuple(guidance(result)))


def guidance(result: DealPredictResult) -> list[Breach]:
    if (n := words(result.reasoning)) < REASONING_WORDS:
        return [Breach("reasoning-length", f"`reasoning` has {n} words; the persona asks for at least {REASONING_WORDS}")]
    return []


def sample_answer(record: dict[str, Any], _request: dict[str, Any]) -> dict[str, Any]:
    stage_p = {"prospecting": 10, "qualification": 25, "proposal": 50, "negotiation": 70, "won": 100, "lost": 0}
    p = stage_p.get(str(record.get("stage")), 30)
    today = dt.date.fromisoformat(record["today"]) if record.get("today") else dt.date.today()
    close = record.get("expected_close_date") or (today + dt.timedelta(days=30)).isoformat()
    risks = ["No recent activity recorded"] if not record.get("activity_count") else []
    if not record.get("decision_makers_count"):
        risks.append("No decision maker identified")
    return {
        "win_probability": p,
        "health_score": min(100, p + 15),
        "predicted_close_date": str(close)[:10],
        "risk_factors": risks,
        "recommended_actions": ["Schedule a call with the economic buyer", "Send a mutual action plan"],
        "reasoning": filler(f"the deal {record.get('title') or ''}".strip(), 110),
    }


# --- notification triggers (adapter/notify) ------------------------------------------------------
def _dropped(deal: Mapping[str, Any], result: DealPredictResult, settings: Any) -> Finding | None:
    """Win probability (against the deal's `probability`) or health (against its `ai_score`) fell by more than
    NOTIFY_DEAL_DROP_POINTS."""
    limit = settings.notify_deal_drop_points
    drops = {name: (before, now) for name, before, now in (
        ("win_probability", deal.get("probability"), result.win_probability),
        ("health_score", deal.get("ai_score"), result.health_score))
        if isinstance(before, int | float) and before - now > limit}
    if not drops:
        return None
    words = ", ".join(f"{name.replace('_', ' ')} {before:g} → {now}" for name, (before, now) in drops.items())
    return Finding(crm_type="deal_at_risk", title="Deal health dropped", priority="high",
                   message=f"Deal {deal['label'] or 'without a title'}: {words}",
                   about={name: {"previous": before, "now": now} for name, (before, now) in drops.items()},
                   key={"dropped": sorted(drops)})


def _new_risk(deal: Mapping[str, Any], result: DealPredictResult, settings: Any) -> Finding | None:
    """A risk factor the deal did not list, holding one of NOTIFY_DEAL_RISK_WORDS."""
    words = [w.strip().lower() for w in settings.notify_deal_risk_words.split(",") if w.strip()]
    known = {str(r).strip().lower() for r in deal.get("risk_factors") or []}
    new = [r for r in result.risk_factors if r.strip().lower() not in known and any(w in r.lower() for w in words)]
    if not new:
        return None
    return Finding(crm_type="deal_at_risk", title="New risk on a deal", priority="high",
                   message=f"Deal {deal['label'] or 'without a title'}: {shown(new[0], ABOUT_MAX)}",
                   about={"risk_factors": [shown(r, ABOUT_MAX) for r in new[:5]]},
                   key={"risks": sorted(r.strip().lower() for r in new)})


TRIGGERS = (
    Trigger("deal.score_dropped", _dropped, reads=("probability", "ai_score"),
            summary="win probability (against the deal's `probability`) or health score (against its `ai_score`) fell by "
                    "more than `NOTIFY_DEAL_DROP_POINTS`"),
    Trigger("deal.high_risk", _new_risk, reads=("risk_factors",),
            summary="a risk factor the deal does not list yet, holding one of `NOTIFY_DEAL_RISK_WORDS`"),
)


TASK = Task(
    name=NAME, agent_id=AGENT, record_kind="deal",
    request_type=DealPredictRequest, result_type=DealPredictResult,
    render=render, validate=validate, guidance=guidance,
    guidance_rules={"reasoning-length": f"deal reasoning of at least {REASONING_WORDS} words"},
    summary="Predict a deal's outcome and health",
    stream_summary="Stream deal prediction",
    cache_ttl=21_600.0, rate_limit="60/60",
    request_example={"deal_id": EXAMPLE_DEAL_ID},
    result_example={
        "deal_id": EXAMPLE_DEAL_ID, "agent": AGENT, "win_probability": 55, "health_score": 68,
        "predicted_close_date": "2027-01-31", "risk_factors": ["Only one decision maker engaged"],
        "recommended_actions": ["Meet the economic buyer"], "reasoning": (EXAMPLE_REASONING * 3).strip()},
    sample_answer=sample_answer, threads=True,
    view=(("gauge", "win_probability", "Win probability"), ("gauge", "health_score", "Health"),
          ("field", "predicted_close_date", "Predicted close"), ("list", "risk_factors", "Risks"),
          ("list", "recommended_actions", "Recommended actions"), ("text", "reasoning", "Reasoning")),
    triggers=TRIGGERS,
)
