"""Validate what an agent answered against the output its persona promises.

Decoding structs tolerate unknown fields (models add chatter keys); everything
the CRM relies on is typed, ranged and checked here. A failure raises
`OutputInvalid` with one readable line per problem: those lines go verbatim
into the repair prompt and, if repair fails too, into the 502's detail.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import msgspec
from msgspec import Meta

from .extract import NoJsonObject, extract_object
from .models import (
    Bant,
    DealPredictResult,
    EmailGenerateResult,
    EmailVariation,
    LeadQualifyResult,
)

NonEmpty = Annotated[str, Meta(min_length=1)]
Score = Annotated[float, Meta(ge=0, le=100)]
VARIATION_ORDER = ("formal", "casual", "direct")


class OutputInvalid(ValueError):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


class _EmailOut(msgspec.Struct, kw_only=True):
    variations: list[EmailVariation]


class _LeadOut(msgspec.Struct, kw_only=True):
    score: Annotated[int, Meta(ge=0, le=100)]
    classification: str = ""
    reasoning: NonEmpty
    next_actions: Annotated[list[NonEmpty], Meta(min_length=3, max_length=5)]
    bant: Bant


class _DealOut(msgspec.Struct, kw_only=True):
    win_probability: Score
    health_score: Score
    predicted_close_date: dt.date | None
    risk_factors: list[NonEmpty]
    recommended_actions: Annotated[list[NonEmpty], Meta(min_length=1)]
    reasoning: NonEmpty


def classify(score: int) -> str:
    return "Hot" if score >= 70 else "Warm" if score >= 40 else "Cold"


def parse(text: str, shape: type):
    try:
        obj = extract_object(text)
    except NoJsonObject as exc:
        raise OutputInvalid([str(exc)]) from None
    try:
        return msgspec.convert(obj, shape)
    except msgspec.ValidationError as exc:
        raise OutputInvalid([str(exc)]) from None


def _words(text: str) -> int:
    return len(text.split())


def email_result(text: str, lead_id: str, agent: str) -> EmailGenerateResult:
    out: _EmailOut = parse(text, _EmailOut)
    by_type: dict[str, EmailVariation] = {}
    errors = []
    for v in out.variations:
        if v.type in by_type:
            errors.append(f"variation type `{v.type}` appears more than once")
        by_type[v.type] = v
    missing = [t for t in VARIATION_ORDER if t not in by_type]
    if missing:
        errors.append("missing variation type(s): " + ", ".join(f"`{t}`" for t in missing))
    if len(out.variations) != 3:
        errors.append(f"expected exactly 3 variations, got {len(out.variations)}")
    if errors:
        raise OutputInvalid(errors)
    return EmailGenerateResult(lead_id=lead_id, agent=agent, variations=[by_type[t] for t in VARIATION_ORDER])


def lead_result(text: str, lead_id: str, agent: str) -> tuple[LeadQualifyResult, bool]:
    """The result, and whether the model's classification had to be corrected."""
    out: _LeadOut = parse(text, _LeadOut)
    if (n := _words(out.reasoning)) < 50:
        raise OutputInvalid([f"`reasoning` has {n} words, at least 50 are required"])
    implied = classify(out.score)
    result = LeadQualifyResult(
        lead_id=lead_id,
        agent=agent,
        score=out.score,
        classification=implied,  # the score decides: Hot >= 70, Warm 40-69, Cold < 40
        reasoning=out.reasoning,
        next_actions=out.next_actions,
        bant=out.bant,
    )
    return result, out.classification.strip().lower() != implied.lower()


def deal_result(text: str, deal_id: str, agent: str) -> DealPredictResult:
    out: _DealOut = parse(text, _DealOut)
    if (n := _words(out.reasoning)) < 100:
        raise OutputInvalid([f"`reasoning` has {n} words, at least 100 are required"])
    return DealPredictResult(
        deal_id=deal_id,
        agent=agent,
        win_probability=round(out.win_probability),
        health_score=round(out.health_score),
        predicted_close_date=out.predicted_close_date,
        risk_factors=out.risk_factors,
        recommended_actions=out.recommended_actions,
        reasoning=out.reasoning,
    )
