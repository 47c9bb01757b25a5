"""lead.qualify: a BANT score and a Hot/Warm/Cold classification for a lead, written back onto it."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from ..models import Inbound, ObjectId, Percent, Provider
from ..notify.triggers import Finding, Trigger, shown
from .prompting import pick, task_input
from .reading import Breach, Reader, Verdict, read_answer, show, words
from .registry import Task
from .samples import EXAMPLE_LEAD_ID, EXAMPLE_REASONING, filler

NAME = "lead.qualify"
AGENT = "LeadQualifier_CRM_Agent"
BANT_KEYS = ("budget", "authority", "need", "timeline")
REASONING_WORDS = 50
NEXT_ACTIONS = (3, 5)
Classification = Literal["Hot", "Warm", "Cold"]
# What the CRM's users' models write, in any case: the score still decides.
_LABELS = {"hot": "Hot", "warm": "Warm", "cold": "Cold",
           "quente": "Hot", "morno": "Warm", "morna": "Warm", "frio": "Cold", "fria": "Cold"}
_FIELDS = frozenset({"score", "classification", "reasoning", "next_actions", "bant"})


class LeadQualifyRequest(Inbound):
    lead_id: ObjectId


class Bant(msgspec.Struct, kw_only=True):
    budget: str
    authority: str
    need: str
    timeline: str


class LeadQualifyResult(msgspec.Struct, kw_only=True):
    lead_id: str
    agent: str
    score: Percent
    classification: Classification
    reasoning: str
    next_actions: list[str]
    bant: Bant
    provider: Provider = None


def classify(score: int) -> str:
    return "Hot" if score >= 70 else "Warm" if score >= 40 else "Cold"


def render(lead: dict[str, Any], _request: Any, _today: dt.date) -> str:
    data = pick(lead, "name", "email", "company", "job_title", "source", "phone", "tags", "enrichment_data")
    custom = lead.get("custom_fields") or {}
    data["notes"] = lead.get("notes") if lead.get("notes") is not None else custom.get("notes")
    return task_input(NAME, data)


def _bant(r: Reader) -> Bant | None:
    b = r.object("bant")
    if b is None:
        return None
    # BANT is an acronym: models write `Budget` as often as `budget`.
    lowered = {k.strip().lower(): v for k, v in b.obj.items()}
    if any(k not in BANT_KEYS and k.strip().lower() in BANT_KEYS for k in b.obj):
        r.notes.append("`bant` keys read case-insensitively")
    b = b.at(lowered, "bant.")
    values = {}
    for key in BANT_KEYS:
        if key in b.obj and b.obj[key] in (None, ""):
            # The persona's word for "the record is silent".
            r.notes.append(f"`bant.{key}` {'null' if b.obj[key] is None else 'empty'}: read as \"Unknown\"")
            values[key] = "Unknown"
        else:
            values[key] = b.text(key)
    return None if r.errors else Bant(**values)  # type: ignore[arg-type]


def validate(text: str, lead_id: str, agent: str) -> Verdict:
    def build(r: Reader) -> tuple[Any, ...] | None:
        parts = (r.percent("score"), r.text("reasoning"), r.texts("next_actions", at_least=1), _bant(r),
                 r.obj.get("classification"), r.obj.keys())
        return None if r.errors else parts

    (score, reasoning, next_actions, bant, raw, obj_keys), notes = read_answer(text, _FIELDS, build)  # type: ignore[misc]
    implied = classify(score)  # the score decides: Hot >= 70, Warm 40-69, Cold < 40
    given = _LABELS.get(raw.strip().lower()) if isinstance(raw, str) else None
    if given is not None and raw != given:
        notes.append(f"`classification` {show(raw)} read as {show(given)}")
    if "classification" not in obj_keys:
        notes.append(f"`classification` is missing: {implied!r} from score {score}")
    elif given is None:
        notes.append(f"`classification` {show(raw)[:40]} is not Hot, Warm or Cold: {implied!r} from score {score}")
    elif given != implied:
        notes.append(f"`classification` {show(raw)} does not agree with score {score}: {implied!r}, as the score decides")
    result = LeadQualifyResult(lead_id=lead_id, agent=agent, score=score, classification=implied,  # type: ignore[arg-type]
                               reasoning=reasoning, next_actions=next_actions, bant=bant)
    return Verdict(result, tuple(notes), tuple(guidance(result)), corrected=given != implied)


def guidance(result: LeadQualifyResult) -> list[Breach]:
    out = []
    if (n := words(result.reasoning)) < REASONING_WORDS:
        out.append(Breach("reasoning-length", f"`reasoning` has {n} words; the persona asks for at least {REASONING_WORDS}"))
    if not NEXT_ACTIONS[0] <= len(result.next_actions) <= NEXT_ACTIONS[1]:
        out.append(Breach("next-actions-count", f"{len(result.next_actions)} next actions; the persona asks for "
                                                f"{NEXT_ACTIONS[0]} to {NEXT_ACTIONS[1]}"))
    return out


def write_back(result: LeadQualifyResult) -> dict[str, Any]:
    # The qualification fields the CRM's LeadUpdate keeps (it silently drops reasoning and actions).
    return {"score": result.score, "classification": result.classification}


_SENIOR = re.compile(r"\b(ceo|cto|cfo|coo|chief|vp|vice president|head|director|founder|owner)\b", re.I)


def sample_answer(record: dict[str, Any], _request: dict[str, Any]) -> dict[str, Any]:
    enrichment = record.get("enrichment_data") or {}
    score = 35
    if _SENIOR.search(str(record.get("job_title") or "")):
        score += 25
    if enrichment.get("funding") or enrichment.get("revenue"):
        score += 15
    if str(record.get("source") or "").lower() in {"referral", "website", "event"}:
        score += 10
    if record.get("email") and record.get("phone"):
        score += 5
    score = min(score, 95)
    who = f"{record.get('name') or 'the lead'} at {record.get('company') or 'an unknown company'}"
    return {
        "score": score,
        "classification": classify(score),
        "reasoning": filler(who, 60),
        "next_actions": [
            f"Book a 30-minute discovery call with {record.get('name') or 'the lead'}",
            "Confirm the budget owner and the approval process",
            "Send a case study from the same industry",
        ],
        "bant": {
            "budget": "Funded company" if enrichment.get("funding") else "Unknown",
            "authority": "Decision maker" if _SENIOR.search(str(record.get("job_title") or "")) else "Influencer",
            "need": f"Interest shown via {record.get('source') or 'an unknown source'}",
            "timeline": "Unknown",
        },
    }


# --- notification triggers (adapter/notify) ------------------------------------------------------
def _classification_changed(lead: Mapping[str, Any], result: LeadQualifyResult, _settings: Any) -> Finding | None:
    before = lead.get("classification")
    if result.classification == before:
        return None
    was = f" (was {shown(before, 10)})" if before else ""
    return Finding(crm_type="lead_qualified", title=f"{'New ' if result.classification == 'Hot' else ''}{result.classification} lead",
                   message=f"Lead {lead['label'] or 'without a name'} has been qualified as {result.classification}{was}",
                   priority={"Hot": "high", "Warm": "medium"}.get(result.classification, "low"),  # type: ignore[arg-type]
                   about={"classification": result.classification, "previous_classification": before, "score": result.score},
                   key={"from": before, "to": result.classification})


TRIGGERS = (Trigger("lead.classification_changed", _classification_changed, reads=("classification",), label_field="name",
                    summary="the lead's classification differs from the one on the record; `high` when it became Hot"),)


TASK = Task(
    name=NAME, agent_id=AGENT, record_kind="lead",
    request_type=LeadQualifyRequest, result_type=LeadQualifyResult,
    render=render, validate=validate, guidance=guidance,
    guidance_rules={
        "reasoning-length": f"lead reasoning of at least {REASONING_WORDS} words",
        "next-actions-count": f"{NEXT_ACTIONS[0]} to {NEXT_ACTIONS[1]} next actions",
    },
    summary="Qualify a lead (BANT score and classification)",
    stream_summary="Stream lead qualification",
    cache_ttl=21_600.0, rate_limit="60/60",
    request_example={"lead_id": EXAMPLE_LEAD_ID},
    result_example={
        "lead_id": EXAMPLE_LEAD_ID, "agent": AGENT, "score": 78, "classification": "Hot",
        "reasoning": EXAMPLE_REASONING.strip(), "next_actions": ["Book a discovery call", "Confirm the budget owner", "Send a case study"],
        "bant": {"budget": "Series C funding", "authority": "VP of Sales", "need": "Asked for a demo", "timeline": "Unknown"}},
    sample_answer=sample_answer,
    write_back=write_back, writes_back="score and classification",
    doc="The classification always agrees with the score (Hot ≥ 70, Warm 40-69, Cold < 40): the sidecar corrects "
        "a model that disagrees.",
    view=(("number", "score", "Score"), ("badge", "classification", "Classification"), ("text", "reasoning", "Reasoning"),
          ("list", "next_actions", "Next actions"), ("table", "bant", "BANT")),
    triggers=TRIGGERS,
)
