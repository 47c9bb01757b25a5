"""What the double's "model" answers: plausible, valid output derived from the prompt."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import msgspec

_RECORD = re.compile(r"<crm_record>\n(.*?)\n</crm_record>", re.DOTALL)
_REQUEST = re.compile(r"<request>\n(.*?)\n</request>", re.DOTALL)
_SENIOR = re.compile(r"\b(ceo|cto|cfo|coo|chief|vp|vice president|head|director|founder|owner)\b", re.I)


def blocks(prompt: str) -> tuple[dict, dict]:
    def grab(pattern: re.Pattern[str]) -> dict:
        m = pattern.search(prompt)
        try:
            value = msgspec.json.decode(m.group(1)) if m else {}
        except msgspec.DecodeError:
            value = {}
        return value if isinstance(value, dict) else {}

    return grab(_RECORD), grab(_REQUEST)


def _filler(subject: str, words: int) -> str:
    sentence = (f"The assessment of {subject} weighs the available evidence on budget, authority, need "
                "and timing, and notes where the record is silent so the team can close those gaps quickly. ")
    text = ""
    while len(text.split()) < words:
        text += sentence
    return text.strip()


def lead_qualify(record: dict) -> dict[str, Any]:
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
        "classification": "Hot" if score >= 70 else "Warm" if score >= 40 else "Cold",
        "reasoning": _filler(who, 60),
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


def email_generate(record: dict, request: dict) -> dict[str, Any]:
    name = str(record.get("name") or "there").split()[0]
    company = record.get("company") or "your team"
    context = request.get("context") or "initial outreach"

    def body(opening: str) -> str:
        return (f"{opening} {name},\n\nI am reaching out about {context} at {company}. Teams like yours use our CRM "
                "to spend less time on data entry and more time with customers.\n\nWould you have 20 minutes next "
                "week for a short call?\n\nBest regards")

    return {"variations": [
        {"type": "formal", "subject": f"{company}: a proposal for your sales team"[:60], "body": body("Dear"), "tone": "Formal and respectful"},
        {"type": "casual", "subject": f"Quick idea for {company}"[:60], "body": body("Hi"), "tone": "Friendly and relaxed"},
        {"type": "direct", "subject": f"{name}, 20 minutes next week?"[:60], "body": body("Hello"), "tone": "Brief and to the point"},
    ]}


def deal_predict(record: dict) -> dict[str, Any]:
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
        "reasoning": _filler(f"the deal {record.get('title') or ''}".strip(), 110),
    }


def answer_for(agent_id: str, prompt: str) -> dict[str, Any]:
    record, request = blocks(prompt)
    if agent_id.startswith("Email"):
        return email_generate(record, request)
    if agent_id.startswith("Deal"):
        return deal_predict(record)
    return lead_qualify(record)
