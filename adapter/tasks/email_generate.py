"""email.generate: three sales-email variations (formal, casual, direct) for a lead."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..models import Inbound, ObjectId, Provider
from .prompting import pick, task_input
from .reading import Breach, Reader, Verdict, kind_of, read_answer
from .registry import Task
from .samples import EXAMPLE_LEAD_ID

NAME = "email.generate"
AGENT = "EmailAssistant_CRM_Agent"
VARIATION_ORDER = ("formal", "casual", "direct")
SUBJECT_MAX = 60
PARAGRAPHS = (2, 5)
Tone = Literal["professional", "formal", "casual", "direct"]
VariationType = Literal["formal", "casual", "direct"]
_FIELDS = frozenset({"variations"})
_VARIATION_TYPES = {"formal": "formal", "casual": "casual", "direct": "direct", "direto": "direct", "informal": "casual"}
# The patterns below read model output, cached answers included: each runs in linear time on any text
# (tests/test_text_bounds.py). A run of digits is read once, from its first digit (`(?<!\d)` and the
# possessive `\d++`), not again from each of its digits: `\d+\s?%` took 1.7 s on `'%' + '1' * 16000` (5 s in
# issue 22's report), 29 s on 64 KiB of digits.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*+\n")
_PRICING = re.compile(
    r"(?:R\$|US\$|\$|€|£)\s?\d[\d.,]*+|(?<!\d)\d++\s?%\s?(?:off|de desconto)|\b(?:discounts?|discounted|descontos?|pricing|prices?|"
    r"preços?|orçamento de \d|per seat|per user|por usuário)\b", re.IGNORECASE)
_SPAM = re.compile(
    r"\b(?:free|grátis|gratuito|guarantee[ds]?|garantia|garantido|act now|aja agora|risk[- ]free|limited time|"
    r"no obligation|click here|clique aqui|buy now|compre já)\b", re.IGNORECASE)
_NOT_SPAM = re.compile(r"\bfeel free\b|\bfree to\b", re.IGNORECASE)
# What the guidance reads of each email's body. It runs on every cache hit too (the warnings are recomputed
# from the served body), so its cost must not grow with what a model chose to write; the persona's emails
# are 1-5 KB, and a longer one is judged on its beginning.
GUIDANCE_MAX = 8 * 1024
# Cheap substring tests that every match of the patterns above contains: most emails contain none,
# and these checks run on every cache hit (the warnings are recomputed), so the regexes run rarely.
_PRICING_HINTS = ("$", "€", "£", "%", "discount", "desconto", "pric", "preço", "orçamento de", "per seat", "per user",
                  "por usuário")
_SPAM_HINTS = ("free", "grátis", "gratuito", "guarant", "garanti", "act now", "aja agora", "limited time",
               "no obligation", "click here", "clique aqui", "buy now", "compre já")


class EmailGenerateRequest(Inbound):
    lead_id: ObjectId
    context: Annotated[str, Meta(min_length=1, max_length=2000)] = "initial outreach"
    tone: Tone = "professional"


class EmailVariation(msgspec.Struct, kw_only=True):
    type: VariationType
    subject: Annotated[str, Meta(min_length=1, max_length=SUBJECT_MAX)]
    body: Annotated[str, Meta(min_length=1)]
    tone: Annotated[str, Meta(min_length=1)]


class EmailGenerateResult(msgspec.Struct, kw_only=True):
    lead_id: str
    agent: str
    variations: Annotated[list[EmailVariation], Meta(min_length=3, max_length=3)]
    provider: Provider = None


def render(lead: dict[str, Any], request: EmailGenerateRequest, _today: dt.date) -> str:
    return task_input(NAME, pick(lead, "name", "company", "job_title"), {"context": request.context, "tone": request.tone})


def _variations(r: Reader) -> list[EmailVariation] | None:
    there, raw = r.get("variations")
    if not there:
        return None
    if not isinstance(raw, list):
        r.fail(f"`variations` must be an array of {len(VARIATION_ORDER)} objects, got {kind_of(raw)}")
        return None
    by_type: dict[str, EmailVariation] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            r.fail(f"`variations[{i}]` must be an object, got {kind_of(item)}")
            continue
        v = r.at(item, f"variations[{i}].")
        kind, subject = v.choice("type", _VARIATION_TYPES), v.text("subject", SUBJECT_MAX)
        body, tone = v.text("body"), v.text("tone")
        if kind is None or subject is None or body is None or tone is None:
            continue
        if kind in by_type:
            r.fail(f"variation type `{kind}` appears more than once")
        by_type[kind] = EmailVariation(type=kind, subject=subject, body=body, tone=tone)  # type: ignore[arg-type]
    if r.errors:
        return None
    if missing := [t for t in VARIATION_ORDER if t not in by_type]:
        r.fail("missing variation type(s): " + ", ".join(f"`{t}`" for t in missing))
    if len(raw) != len(VARIATION_ORDER):
        r.fail(f"expected exactly {len(VARIATION_ORDER)} variations, got {len(raw)}")
    return None if r.errors else [by_type[t] for t in VARIATION_ORDER]


def validate(text: str, lead_id: str, agent: str) -> Verdict:
    variations, notes = read_answer(text, _FIELDS, _variations)
    result = EmailGenerateResult(lead_id=lead_id, agent=agent, variations=variations)  # type: ignore[arg-type]
    return Verdict(result, tuple(notes), tuple(guidance(result)))


def _breaches(v: EmailVariation) -> list[Breach]:
    out = []
    body = v.body[:GUIDANCE_MAX]
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(body.strip()) if p.strip()]
    if not PARAGRAPHS[0] <= len(paragraphs) <= PARAGRAPHS[1]:
        out.append(Breach("email-paragraphs", f"the {v.type} email has {len(paragraphs)} paragraph(s); the persona asks "
                                              f"for {PARAGRAPHS[0]} to {PARAGRAPHS[1]}"))
    text = f"{v.subject}\n{body}"  # the subject is at most SUBJECT_MAX characters (the result struct says so)
    lower = text.lower()
    if any(h in lower for h in _PRICING_HINTS) and (m := _PRICING.search(text)):
        out.append(Breach("email-pricing", f"the {v.type} email mentions pricing ({m.group(0)!r})"))
    if any(h in lower for h in _SPAM_HINTS) and (m := _SPAM.search(_NOT_SPAM.sub(" ", text))):
        out.append(Breach("email-spam-words", f"the {v.type} email uses the spam-trigger word {m.group(0)!r}"))
    return out


def guidance(result: EmailGenerateResult) -> list[Breach]:
    return [breach for v in result.variations for breach in _breaches(v)]


def sample_answer(record: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
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


TASK = Task(
    name=NAME, agent_id=AGENT, record_kind="lead",
    request_type=EmailGenerateRequest, result_type=EmailGenerateResult,
    render=render, validate=validate, guidance=guidance,
    guidance_rules={
        "email-paragraphs": f"email bodies of {PARAGRAPHS[0]} to {PARAGRAPHS[1]} paragraphs",
        "email-pricing": "no pricing and no discounts in an email",
        "email-spam-words": "no spam-trigger words in an email",
    },
    summary="Generate three sales-email variations for a lead",
    stream_summary="Stream email generation",
    cache_ttl=1_800.0, rate_limit="20/60",
    request_example={"lead_id": EXAMPLE_LEAD_ID, "context": "follow-up after the demo", "tone": "casual"},
    result_example={
        "lead_id": EXAMPLE_LEAD_ID, "agent": AGENT, "variations": [
            {"type": t, "subject": s, "body": "Hi Maria,\n\nA short note about Acme Logistics.\n\nBest", "tone": d}
            for t, s, d in (("formal", "Acme Logistics: a proposal", "Formal"), ("casual", "Quick idea for Acme", "Friendly"),
                            ("direct", "Maria, 20 minutes?", "Brief"))]},
    sample_answer=sample_answer, threads=True,
    view=(("cards", "variations", "Variations"),),
    doc='Body `{"lead_id", "context": "initial outreach" (1-2000 chars), "tone": "professional" | "formal" | "casual" | '
        '"direct"}`: three variations, exactly one `formal`, `casual` and `direct`, subjects of at most 60 characters.',
)
