"""Read an agent's answer the way a careful reader would: the toolkit every task's validator uses.

Two kinds of rule, kept apart on purpose (each task module states its own):

* The **contract** is what the CRM and its frontend rely on. A breach raises
  `OutputInvalid`, whose lines (contract errors only) go verbatim into the repair
  prompt and, if repair fails too, into the 502's detail.
* **Guidance** is the persona's style. A breach is a `Breach` on the `Verdict`:
  reported (log, metric, `X-Agent-Warnings`), never repaired. A task's guidance is a
  pure function of its result, so a cached answer's warnings are recomputed from its body.

Before the contract is checked, the answer is *normalised*, and each change is
noted on the verdict: broken JSON syntax (extract.py, json-repair), a single-key
wrapper (`{"result": {...}}`), numbers written as strings or percentages,
enums in any case, dates with a time or as DD/MM/YYYY.
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

T = TypeVar("T")
# Both read one string field of a model's answer, whole (fullmatch), in linear time
# (tests/test_text_bounds.py); and only when it is short enough to be what they look for.
_NUMBER = re.compile(r"([+-]?\d++(?:[.,]\d++)?+)\s*+(%?)")
NUMBER_MAX = 32  # "  99.5 %": a longer string is no percentage, and is not read as one
_BR_DATE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})(?:[ T,]++\d{1,2}:\d{2}(?::\d{2})?)?")
DATE_MAX = 32  # "31/12/2024, 23:59:59"

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


# --- reading: normalise one candidate object, collecting contract errors -----------------------

def show(value: Any) -> str:
    return msgspec.json.encode(value).decode() if isinstance(value, str) else repr(value)


def kind_of(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


class Reader:
    """Reads fields of one object; notes normalisations and collects errors (shared with nested readers)."""

    def __init__(self, obj: dict[str, Any], notes: list[str], errors: list[str], path: str = "") -> None:
        self.obj, self.notes, self.errors, self.path = obj, notes, errors, path

    def at(self, obj: dict[str, Any], path: str) -> Reader:
        return Reader(obj, self.notes, self.errors, path)

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
        if isinstance(raw, str) and len(stripped := raw.strip()) <= NUMBER_MAX and (m := _NUMBER.fullmatch(stripped)):
            value = float(m.group(1).replace(",", "."))
        elif isinstance(raw, int | float) and not isinstance(raw, bool):
            value = raw
        else:
            shown = f" {show(raw)[:40]}" if isinstance(raw, str) else ""
            self.fail(f"{self.name(field)} must be a number 0-100, got {kind_of(raw)}{shown}")
            return None
        if not math.isfinite(value):
            self.fail(f"{self.name(field)} must be a finite number 0-100, got {show(raw)}")
            return None
        if 0 < value < 1:
            # A unit error, not a precision one: 0.55 means 55 %, and rounding would serve 1 %.
            self.fail(f"{self.name(field)} {show(raw)} looks like a fraction; answer a percentage 0-100")
            return None
        if not 0 <= value <= 100:
            self.fail(f"{self.name(field)} {show(raw)} is outside 0-100")
            return None
        whole = math.floor(value + 0.5)
        if isinstance(raw, str):
            self.notes.append(f"{self.name(field)} {show(raw)} read as {whole}")
        elif whole != value:
            self.notes.append(f"{self.name(field)} {raw} rounded to {whole}")
        return whole

    def text(self, field: str, max_length: int | None = None) -> str | None:
        there, raw = self.get(field)
        if not there:
            return None
        if not isinstance(raw, str):
            self.fail(f"{self.name(field)} must be a string, got {kind_of(raw)}")
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
            self.fail(f"{self.name(field)} must be an array of strings, got {kind_of(raw)}")
            return None
        items = []
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                self.fail(f"`{self.path}{field}[{i}]` must be a string, got {kind_of(item)}")
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
            self.fail(f"{self.name(field)} must be a date YYYY-MM-DD or null, got {kind_of(raw)}")
            return None
        value = raw.strip()
        try:
            return dt.date.fromisoformat(value) if len(value) == 10 else self._dated(field, raw, dt.datetime.fromisoformat(value).date())
        except ValueError:
            pass
        if len(value) <= DATE_MAX and (m := _BR_DATE.fullmatch(value)):
            day, month, year = (int(g) for g in m.groups())
            try:
                return self._dated(field, raw, dt.date(year, month, day))
            except ValueError:
                self.fail(f"{self.name(field)} {show(raw)} is not a valid DD/MM/YYYY date; answer YYYY-MM-DD")
                return None
        self.fail(f"{self.name(field)} {show(raw)} is not a date; answer YYYY-MM-DD or null")
        return None

    def _dated(self, field: str, raw: str, value: dt.date) -> dt.date:
        self.notes.append(f"{self.name(field)} {show(raw)} read as {value.isoformat()}")
        return value

    def choice(self, field: str, allowed: dict[str, str]) -> str | None:
        there, raw = self.get(field)
        if not there:
            return None
        value = allowed.get(raw.strip().lower()) if isinstance(raw, str) else None
        if value is None:
            options = ", ".join(f"`{v}`" for v in dict.fromkeys(allowed.values()))
            self.fail(f"{self.name(field)} {show(raw)[:40]} is not one of {options}")
            return None
        if raw != value:
            self.notes.append(f"{self.name(field)} {show(raw)} read as {show(value)}")
        return value

    def object(self, field: str) -> Reader | None:
        there, raw = self.get(field)
        if not there:
            return None
        if not isinstance(raw, dict):
            self.fail(f"{self.name(field)} must be an object, got {kind_of(raw)}")
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


def read_answer(text: str, fields: frozenset[str], build: Callable[[Reader], T]) -> tuple[T, list[str]]:
    """The first object in the answer that meets the contract; else the errors of the likeliest one."""
    best: tuple[int, list[str]] | None = None
    try:
        for found in objects(text):
            notes = ["the JSON's syntax was repaired"] if found.repaired else []
            obj = _unwrap(found.value, fields, notes)
            errors: list[str] = []
            value = build(Reader(obj, notes, errors))
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


def words(text: str) -> int:
    return len(text.split())


def rules(breaches: list[Breach] | tuple[Breach, ...]) -> list[str]:
    """The rule ids, each once, in the order first breached: the `X-Agent-Warnings` list."""
    return list(dict.fromkeys(b.rule for b in breaches))
