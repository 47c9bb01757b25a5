"""lead.summarize: a short brief on a lead for the rep about to call it (a headline, an overview,
the key facts, and how engaged the lead seems)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..models import Inbound, ObjectId, Provider
from .prompting import pick, task_input
from .reading import Breach, Reader, Verdict, read_answer, words
from .registry import Task
from .samples import EXAMPLE_LEAD_ID

NAME = "lead.summarize"
AGENT = "LeadSummarizer_CRM_Agent"
HEADLINE_MAX = 120  # one line in the CRM's lead header
OVERVIEW_WORDS = (30, 80)  # a paragraph a rep reads before dialling
KEY_FACTS = (2, 5)
Sentiment = Literal["positive", "neutral", "negative"]
# What the CRM's users' models write, in any case.
_SENTIMENTS = {"positive": "positive", "neutral": "neutral", "negative": "negative",
               "positivo": "positive", "positiva": "positive", "neutro": "neutral", "neutra": "neutral",
               "negativo": "negative", "negativa": "negative"}
_FIELDS = frozenset({"headline", "overview", "key_facts", "sentiment"})


class LeadSummarizeRequest(Inbound):
    lead_id: ObjectId


class LeadSummarizeResult(msgspec.Struct, kw_only=True):
    lead_id: str
    agent: str
    headline: Annotated[str, Meta(min_length=1, max_length=HEADLINE_MAX)]
    overview: str
    key_facts: list[str]
    sentiment: Sentiment  # how engaged the lead seems from the record: a hint for the call's tone
    provider: Provider = None


def render(lead: dict[str, Any], _request: Any, _today: dt.date) -> str:
    data = pick(lead, "name", "email", "company", "job_title", "source", "status", "tags", "enrichment_data")
    custom = lead.get("custom_fields") or {}
    data["notes"] = lead.get("notes") if lead.get("notes") is not None else custom.get("notes")
    return task_input(NAME, data)


def validate(text: str, lead_id: str, agent: str) -> Verdict:
    def build(r: Reader) -> LeadSummarizeResult | None:
        headline, overview = r.text("headline", max_length=HEADLINE_MAX), r.text("overview")
        facts, sentiment = r.texts("key_facts", at_least=1), r.choice("sentiment", _SENTIMENTS)
        if r.errors:
            return None
        return LeadSummarizeResult(lead_id=lead_id, agent=agent, headline=headline, overview=overview,  # type: ignore[arg-type]
                                   key_facts=facts, sentiment=sentiment)  # type: ignore[arg-type]

    result, notes = read_answer(text, _FIELDS, build)
    return Verdict(result, tuple(notes), tuple(guidance(result)))


def guidance(result: LeadSummarizeResult) -> list[Breach]:
    out = []
    if not OVERVIEW_WORDS[0] <= (n := words(result.overview)) <= OVERVIEW_WORDS[1]:
        out.append(Breach("overview-length", f"`overview` has {n} words; the persona asks for "
                                             f"{OVERVIEW_WORDS[0]} to {OVERVIEW_WORDS[1]}"))
    if not KEY_FACTS[0] <= len(result.key_facts) <= KEY_FACTS[1]:
        out.append(Breach("key-facts-count", f"{len(result.key_facts)} key facts; the persona asks for "
                                             f"{KEY_FACTS[0]} to {KEY_FACTS[1]}"))
    return out


def sample_answer(record: dict[str, Any], _request: dict[str, Any]) -> dict[str, Any]:
    name, company = record.get("name") or "The lead", record.get("company") or "an unknown company"
    title = record.get("job_title") or "an unknown role"
    facts = [f"{title} at {company}", f"Came in through {record.get('source') or 'an unknown source'}"]
    if industry := (record.get("enrichment_data") or {}).get("industry"):
        facts.append(f"Industry: {industry}")
    overview = (f"{name} is {title} at {company}. The record shows how the lead reached the team and what it holds "
                "about the company; confirm the need, the budget owner and the timing on the first call, and note "
                "what the record leaves open so the next touch starts from facts.")
    return {"headline": f"{name}, {title} at {company}"[:HEADLINE_MAX], "overview": overview, "key_facts": facts,
            "sentiment": "positive" if record.get("notes") else "neutral"}


TASK = Task(
    name=NAME, agent_id=AGENT, record_kind="lead",
    request_type=LeadSummarizeRequest, result_type=LeadSummarizeResult,
    render=render, validate=validate, guidance=guidance,
    guidance_rules={
        "overview-length": f"a lead overview of {OVERVIEW_WORDS[0]} to {OVERVIEW_WORDS[1]} words",
        "key-facts-count": f"{KEY_FACTS[0]} to {KEY_FACTS[1]} key facts",
    },
    summary="Summarize a lead for the rep (headline, overview, key facts)",
    stream_summary="Stream a lead summary",
    cache_ttl=3_600.0, rate_limit="30/60",
    request_example={"lead_id": EXAMPLE_LEAD_ID},
    result_example={
        "lead_id": EXAMPLE_LEAD_ID, "agent": AGENT, "headline": "Maria Silva, VP of Sales at Acme Logistics (Series C)",
        "overview": ("Maria Silva runs sales at Acme Logistics, a Series C logistics company with 500 to 1000 employees. "
                     "She came through a referral and asked for a demo at a trade fair, so the interest is hers. "
                     "No timeline is on record: ask when a decision is due."),
        "key_facts": ["VP of Sales: likely decision maker", "Series C funding", "Asked for a demo at a trade fair"],
        "sentiment": "positive"},
    sample_answer=sample_answer,
    view=(("text", "headline", "Headline"), ("badge", "sentiment", "Sentiment"), ("text", "overview", "Overview"),
          ("list", "key_facts", "Key facts")),
    doc="A brief to read before calling the lead; nothing is written back to the CRM.",
)
