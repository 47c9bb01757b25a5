"""Read an agent's answer the way a careful reader would, then hold it to the contract.

Two kinds of rule, kept apart on purpose:

* The **contract** is what the CRM and its frontend rely on: required fields,
  types, enums, ranges, the exact set of email variations, subjects of at most
  60 characters, at least one action, a classification that agrees with the
  score. A breach raises `OutputInvalid`, whose lines (contract errors only)
  go verbatim into the repair prompt and, if repair fails too, into the 502's
  detail.
* **Guidance** is the personas' style: reasoning length, paragraphs, no
  pricing, no spam-trigger words, 3 to 5 next actions. A breach is a `Breach`
  on the `Verdict`: reported (log, metric, `X-Agent-Warnings`), never repaired.
  `GUIDANCE` names every rule; `guidance()` is a pure function of the result,
  so a cached answer's warnings are recomputed from its body.

Before the contract is checked, the answer is *normalised*, and each change is
noted on the verdict: broken JSON syntax (extract.py, json-repair), a single-key
wrapper (`{"result": {...}}`), numbers written as strings or percentages,
enums in any case, Portuguese labels, dates with a time or as DD/MM/YYYY.
What normalisation never does is guess: a truncated answer stays invalid, and a
value strictly between 0 and 1 in a 0-100 field is a unit error (a fraction),
sent to repair rather than scaled or rounded away.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from .extract import NoJsonObject, objects
from ..models import (
    Bant,
    DealPredictResult,
    EmailGenerateResult,
    EmailVariation,
    LeadQualifyResult,
)

T = TypeVar("T")
VARIATION_ORDER = ("formal", "casual", "direct")
SUBJECT_MAX = 60
BANT_KEYS = ("budget", "authority", "need", "timeline")
LEAD_REASONING_WORDS = 50
DEAL_REASONING_WORDS = 100
NEXT_ACTIONS = (3, 5)
PARAGRAPHS = (2, 5)

# The personas' style rules: id (as in the header, the log and the metric) -> what the persona asks.
GUIDANCE = {
    "reasoning-length": f"lead reasoning of at least {LEAD_REASONING_WORDS} words, deal reasoning of at least {DEAL_REASONING_WORDS}",
    "next-actions-count": f"{NEXT_ACTIONS[0]} to {NEXT_ACTIONS[1]} next actions",
    "email-paragraphs": f"email bodies of {PARAGRAPHS[0]} to {PARAGRAPHS[1]} paragraphs",
    "email-pricing": "no pricing and no discounts in an email",
    "email-spam-words": "no spam-trigger words in an email",
}

# What the CRM's users' models write, in any case: the score still decides.
_LABELS = {"hot": "Hot", "warm": "Warm", "cold": "Cold",
           "quente": "Hot", "morno": "Warm", "morna": "Warm", "frio": "Cold", "fria": "Cold"}
_VARIATION_TYPES = {"formal": "formal", "casual": "casual", "direct": "direct", "direto": "direct", "informal": "casual"}
_NUMBER = re.compile(r"([+-]?\d+(?:[.,]\d+)?)\s*(%?)")
_BR_DATE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})(?:[ T,]+\d{1,2}:\d{2}(?::\d{2})?)?")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_PRICING = re.compile(
    r"(?:R\$|US\$|\$|€|£)\s?\d[\d.,]*|\d+\s?%\s?(?:off|de desconto)|\b(?:discounts?|discounted|descontos?|pricing|prices?|"
    r"preços?|orçamento de \d|per seat|per user|por usuário)\b", re.IGNORECASE)
_SPAM = re.compile(
    r"\b(?:free|grátis|gratuito|guarantee[ds]?|garantia|garantido|act now|aja agora|risk[- ]free|limited time|"
    r"no obligation|click here|clique aqui|buy now|compre já)\b", re.IGNORECASE)
_NOT_SPAM = re.compile(r"\bfeel free\b|\bfree to\b", re.IGNORECASE)
# Cheap substring tests that every match of the patterns above contains: most emails contain none,
# and these checks run on every cache hit (the warnings are recomputed), so the regexes run rarely.
_PRICING_HINTS = ("$", "€", "£", "%", "discount", "desconto", "pric", "preço", "orçamento de", "per seat", "per user",
                  "por usuário")
_SPAM_HINTS = ("free", "grátis", "gratuito", "guarant", "garanti", "act now", "aja agora", "limited time",
               "no obligation", "click here", "clique aqui", "buy now", "compre já")


class OutputInvalid(ValueError):
    """The answer breaks the contract; `errors` are contract errors only, one readable line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Breach:
    """One guidance rule the answer did not follow."""

    rule: str
    detail: str


@dataclass(frozen=True, slots=True)
class Verdict:
    result: Any
    normalised: tuple[str, ...] = ()  # what a careful reader changed before the contract was checked
    warnings: tuple[Breach, ...] = ()  # guidance breaches: reported, never repaired
    corrected: bool = False  # lead: the classification served is the score's, not the model's


def classify(score: int) -> str:
    return "Hot" if score >= 70 else "Warm" if score >= 40 else "Cold"


# --- reading: normalise one candidate object, collecting contract errors -----------------------

def _show(value: Any) -> str:
    return msgspec.json.encode(value).decode() if isinstance(value, str) else repr(value)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


class _Reader:
    """Reads fields of one object; notes normalisations and collects errors (shared with nested readers)."""

    def __init__(self, obj: dict[str, Any], notes: list[str], errors: list[str], path: str = "") -> None:
        self.obj, self.notes, self.errors, self.path = obj, notes, errors, path

    def at(self, obj: dict[str, Any], path: str) -> _Reader:
        return _Reader(obj, self.notes, self.errors, path)

    def name(self, field: str) -> str:
        return f"`{self.path}{field}`"

    def fail(self, message: str) -> None:
        self.errors.append(message)

    def get(self, field: str) -> tuple[bool, Any]:
        if field in self.obj:
            return True, self.obj[field]
        self.fail(f"{self.name(field)} is missing")
        return False, None

    def percent(self, field: str) -> int | None:
        """A 0-100 number: numeric strings and percentages are read, fractions are refused."""
        there, raw = self.get(field)
        if not there:
            return None
        value: float
        if isinstance(raw, str) and (m := _NUMBER.fullmatch(raw.strip())):
            value = float(m.group(1).replace(",", "."))
        elif isinstance(raw, int | float) and not isinstance(raw, bool):
            value = raw
        else:
            shown = f" {_show(raw)[:40]}" if isinstance(raw, str) else ""
            self.fail(f"{self.name(field)} must be a number 0-100, got {_kind(raw)}{shown}")
            return None
        if not math.isfinite(value):
            self.fail(f"{self.name(field)} must be a finite number 0-100, got {_show(raw)}")
            return None
        if 0 < value < 1:
            # A unit error, not a precision one: 0.55 means 55 %, and rounding would serve 1 %.
            self.fail(f"{self.name(field)} {_show(raw)} looks like a fraction; answer a percentage 0-100")
            return None
        if not 0 <= value <= 100:
            self.fail(f"{self.name(field)} {_show(raw)} is outside 0-100")
            return None
        whole = math.floor(value + 0.5)
        if isinstance(raw, str):
            self.notes.append(f"{self.name(field)} {_show(raw)} read as {whole}")
        elif whole != value:
            self.notes.append(f"{self.name(field)} {raw} rounded to {whole}")
        return whole

    def text(self, field: str, max_length: int | None = None) -> str | None:
        there, raw = self.get(field)
        if not there:
            return None
        if not isinstance(raw, str):
            self.fail(f"{self.name(field)} must be a string, got {_kind(raw)}")
            return None
        value = raw.strip()
        if not value:
            self.fail(f"{self.name(field)} is empty")
            return None
        if max_length is not None and len(value) > max_length:
            self.fail(f"{self.name(field)} has {len(value)} characters, at most {max_length} are allowed")
            return None
        return value

    def texts(self, field: str, at_least: int) -> list[str] | None:
        """A list of non-empty strings; a lone string is a list of one, blank items are dropped."""
        raw = self.obj.get(field)
        if raw is None and at_least == 0:
            self.notes.append(f"{self.name(field)} {'is null' if field in self.obj else 'is missing'}: read as none")
            return []
        if field not in self.obj:
            self.fail(f"{self.name(field)} is missing")
            return None
        if isinstance(raw, str):
            self.notes.append(f"{self.name(field)} is a single string: read as a list of one")
            raw = [raw]
        if not isinstance(raw, list):
            self.fail(f"{self.name(field)} must be an array of strings, got {_kind(raw)}")
            return None
        items = []
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                self.fail(f"`{self.path}{field}[{i}]` must be a string, got {_kind(item)}")
                return None
            if item.strip():
                items.append(item.strip())
        if len(items) < len(raw):
            self.notes.append(f"{self.name(field)}: {len(raw) - len(items)} empty item(s) dropped")
        if len(items) < at_least:
            self.fail(f"{self.name(field)} has {len(items)} non-empty item(s), at least {at_least} required")
            return None
        return items

    def date(self, field: str) -> dt.date | None:
        """An ISO date or null; a time is dropped and DD/MM/YYYY (the CRM is Brazilian) is read."""
        raw = self.obj.get(field)
        if raw is None or raw == "":
            if field not in self.obj or raw == "":
                self.notes.append(f"{self.name(field)} {'is missing' if field not in self.obj else 'is empty'}: read as null")
            return None
        if not isinstance(raw, str):
            self.fail(f"{self.name(field)} must be a date YYYY-MM-DD or null, got {_kind(raw)}")
            return None
        value = raw.strip()
        try:
            return dt.date.fromisoformat(value) if len(value) == 10 else self._dated(field, raw, dt.datetime.fromisoformat(value).date())
        except ValueError:
            pass
        if m := _BR_DATE.fullmatch(value):
            day, month, year = (int(g) for g in m.groups())
            try:
                return self._dated(field, raw, dt.date(year, month, day))
            except ValueError:
                self.fail(f"{self.name(field)} {_show(raw)} is not a valid DD/MM/YYYY date; answer YYYY-MM-DD")
                return None
        self.fail(f"{self.name(field)} {_show(raw)} is not a date; answer YYYY-MM-DD or null")
        return None

    def _dated(self, field: str, raw: str, value: dt.date) -> dt.date:
        self.notes.append(f"{self.name(field)} {_show(raw)} read as {value.isoformat()}")
        return value

    def choice(self, field: str, allowed: dict[str, str]) -> str | None:
        there, raw = self.get(field)
        if not there:
            return None
        value = allowed.get(raw.strip().lower()) if isinstance(raw, str) else None
        if value is None:
            options = ", ".join(f"`{v}`" for v in dict.fromkeys(allowed.values()))
            self.fail(f"{self.name(field)} {_show(raw)[:40]} is not one of {options}")
            return None
        if raw != value:
            self.notes.append(f"{self.name(field)} {_show(raw)} read as {_show(value)}")
        return value

    def object(self, field: str) -> _Reader | None:
        there, raw = self.get(field)
        if not there:
            return None
        if not isinstance(raw, dict):
            self.fail(f"{self.name(field)} must be an object, got {_kind(raw)}")
            return None
        return self.at(raw, f"{self.path}{field}.")


def _unwrap(obj: dict[str, Any], fields: frozenset[str], notes: list[str]) -> dict[str, Any]:
    """`{"qualification": {...}}` is the object itself, when nothing else is there."""
    for _ in range(3):
        if len(obj) != 1:
            break
        (key, inner), = obj.items()
        if key in fields or not isinstance(inner, dict):
            break
        notes.append(f"the answer was wrapped in `{key}`: unwrapped")
        obj = inner
    return obj


def _read(text: str, fields: frozenset[str], build: Callable[[_Reader], T]) -> tuple[T, list[str]]:
    """The first object in the answer that meets the contract; else the errors of the likeliest one."""
    best: tuple[int, list[str]] | None = None
    try:
        for found in objects(text):
            notes = ["the JSON's syntax was repaired"] if found.repaired else []
            obj = _unwrap(found.value, fields, notes)
            errors: list[str] = []
            value = build(_Reader(obj, notes, errors))
            if not errors:
                return value, notes
            # The candidate with most of the shape's fields is the one the model meant as its answer.
            overlap = len(fields & obj.keys())
            if best is None or overlap > best[0]:
                best = (overlap, errors)
    except NoJsonObject as exc:
        raise OutputInvalid([str(exc)]) from None
    assert best is not None
    if best[0] == 0:
        raise OutputInvalid(["the JSON object is not the answer's shape: expected the fields "
                             + ", ".join(f"`{f}`" for f in sorted(fields))] + best[1][:3])
    raise OutputInvalid(best[1])


# --- the three answers ----------------------------------------------------------------------

_EMAIL_FIELDS = frozenset({"variations"})
_LEAD_FIELDS = frozenset({"score", "classification", "reasoning", "next_actions", "bant"})
_DEAL_FIELDS = frozenset({"win_probability", "health_score", "predicted_close_date", "risk_factors",
                          "recommended_actions", "reasoning"})


def _variations(r: _Reader) -> list[EmailVariation] | None:
    there, raw = r.get("variations")
    if not there:
        return None
    if not isinstance(raw, list):
        r.fail(f"`variations` must be an array of {len(VARIATION_ORDER)} objects, got {_kind(raw)}")
        return None
    by_type: dict[str, EmailVariation] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            r.fail(f"`variations[{i}]` must be an object, got {_kind(item)}")
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


def _bant(r: _Reader) -> Bant | None:
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


def email_result(text: str, lead_id: str, agent: str) -> Verdict:
    variations, notes = _read(text, _EMAIL_FIELDS, _variations)
    result = EmailGenerateResult(lead_id=lead_id, agent=agent, variations=variations)  # type: ignore[arg-type]
    return Verdict(result, tuple(notes), tuple(guidance(result)))


def lead_result(text: str, lead_id: str, agent: str) -> Verdict:
    def build(r: _Reader) -> tuple[Any, ...] | None:
        parts = (r.percent("score"), r.text("reasoning"), r.texts("next_actions", at_least=1), _bant(r),
                 r.obj.get("classification"), r.obj.keys())
        return None if r.errors else parts

    (score, reasoning, next_actions, bant, raw, obj_keys), notes = _read(text, _LEAD_FIELDS, build)  # type: ignore[misc]
    implied = classify(score)  # the score decides: Hot >= 70, Warm 40-69, Cold < 40
    given = _LABELS.get(raw.strip().lower()) if isinstance(raw, str) else None
    if given is not None and raw != given:
        notes.append(f"`classification` {_show(raw)} read as {_show(given)}")
    if "classification" not in obj_keys:
        notes.append(f"`classification` is missing: {implied!r} from score {score}")
    elif given is None:
        notes.append(f"`classification` {_show(raw)[:40]} is not Hot, Warm or Cold: {implied!r} from score {score}")
    elif given != implied:
        notes.append(f"`classification` {_show(raw)} does not agree with score {score}: {implied!r}, as the score decides")
    result = LeadQualifyResult(lead_id=lead_id, agent=agent, score=score, classification=implied,  # type: ignore[arg-type]
                               reasoning=reasoning, next_actions=next_actions, bant=bant)
    return Verdict(result, tuple(notes), tuple(guidance(result)), corrected=given != implied)


def deal_result(text: str, deal_id: str, agent: str) -> Verdict:
    def build(r: _Reader) -> DealPredictResult | None:
        win, health = r.percent("win_probability"), r.percent("health_score")
        close = r.date("predicted_close_date")
        risks, actions = r.texts("risk_factors", at_least=0), r.texts("recommended_actions", at_least=1)
        reasoning = r.text("reasoning")
        if r.errors:
            return None
        return DealPredictResult(deal_id=deal_id, agent=agent, win_probability=win, health_score=health,  # type: ignore[arg-type]
                                 predicted_close_date=close, risk_factors=risks, recommended_actions=actions,  # type: ignore[arg-type]
                                 reasoning=reasoning)  # type: ignore[arg-type]

    result, notes = _read(text, _DEAL_FIELDS, build)
    return Verdict(result, tuple(notes), tuple(guidance(result)))


# --- guidance: the personas' style, reported and never repaired -------------------------------

def _words(text: str) -> int:
    return len(text.split())


def _email_breaches(v: EmailVariation) -> list[Breach]:
    out = []
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(v.body.strip()) if p.strip()]
    if not PARAGRAPHS[0] <= len(paragraphs) <= PARAGRAPHS[1]:
        out.append(Breach("email-paragraphs", f"the {v.type} email has {len(paragraphs)} paragraph(s); the persona asks "
                                              f"for {PARAGRAPHS[0]} to {PARAGRAPHS[1]}"))
    text = f"{v.subject}\n{v.body}"
    lower = text.lower()
    if any(h in lower for h in _PRICING_HINTS) and (m := _PRICING.search(text)):
        out.append(Breach("email-pricing", f"the {v.type} email mentions pricing ({m.group(0)!r})"))
    if any(h in lower for h in _SPAM_HINTS) and (m := _SPAM.search(_NOT_SPAM.sub(" ", text))):
        out.append(Breach("email-spam-words", f"the {v.type} email uses the spam-trigger word {m.group(0)!r}"))
    return out


def guidance(result: Any) -> list[Breach]:
    """The guidance rules a valid result does not follow (a pure function of the result)."""
    out: list[Breach] = []
    if isinstance(result, EmailGenerateResult):
        for v in result.variations:
            out.extend(_email_breaches(v))
        return out
    minimum = LEAD_REASONING_WORDS if isinstance(result, LeadQualifyResult) else DEAL_REASONING_WORDS
    if (n := _words(result.reasoning)) < minimum:
        out.append(Breach("reasoning-length", f"`reasoning` has {n} words; the persona asks for at least {minimum}"))
    if isinstance(result, LeadQualifyResult) and not NEXT_ACTIONS[0] <= len(result.next_actions) <= NEXT_ACTIONS[1]:
        out.append(Breach("next-actions-count", f"{len(result.next_actions)} next actions; the persona asks for "
                                                f"{NEXT_ACTIONS[0]} to {NEXT_ACTIONS[1]}"))
    return out


def rules(breaches: list[Breach] | tuple[Breach, ...]) -> list[str]:
    """The rule ids, each once, in the order first breached: the `X-Agent-Warnings` list."""
    return list(dict.fromkeys(b.rule for b in breaches))


_RESULT_DECODERS = {t: msgspec.json.Decoder(t) for t in (EmailGenerateResult, LeadQualifyResult, DealPredictResult)}


def reread(body: bytes, result_type: type) -> Any | None:
    """A result already served once (cached), decoded again; None when it cannot be."""
    try:
        return _RESULT_DECODERS[result_type].decode(body)
    except msgspec.DecodeError:  # ValidationError included: a body the cache kept from another shape
        return None  # what is read from it is a courtesy; a body we cannot re-read must not fail its response


def warnings_in(body: bytes, result_type: type) -> list[str]:
    """The guidance warnings of a result already served once (cached): recomputed, not stored."""
    result = reread(body, result_type)
    return [] if result is None else rules(guidance(result))
