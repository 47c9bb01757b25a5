"""Find the JSON object in whatever the model printed.

Models wrap their JSON in ```json fences, put a sentence of prose around it,
print it to stdout between log lines and colour codes, and write JSON the way
people do: single quotes, trailing commas, comments, unquoted keys, Python's
`True`/`None`, raw newlines inside strings. The candidates are every fenced
block, then every top-level balanced ``{...}`` span of the text. Each is first
decoded strictly (the fast path, and the usual case); only when none decodes is
each handed to `json-repair`, longest first.

`json-repair` would also happily *complete* a truncated answer (the model ran
out of tokens mid-object) by closing what is open; that guesses at the missing
fields, so a span whose braces never balance is never a candidate: a truncated
answer is reported as such and goes to repair.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import json_repair
import msgspec

MAX_TEXT = 256 * 1024  # a longer answer is not an answer we can use
MAX_CANDIDATES = 32  # bounds the work on adversarial text full of braces
# json-repair is pure Python and blocks the event loop while it works, and its time grows with the
# square of the length on some broken text (`{a: b, a: b, ...}`: 80 ms at 4 KB, 0.3 s at 8 KB, 1.1 s
# at 16 KB, measured here; json_repair issue #203). Persona answers are 1-5 KB (the corpus's largest
# is 2.2 KB), so a broken candidate longer than this goes to a repair call instead,
REPAIR_MAX = 8 * 1024
# and one answer hands json-repair this many characters in all, however many candidates it holds (the
# longest first; 32 were each read before): one candidate's worth, as time grows faster than length.
REPAIR_BUDGET = REPAIR_MAX

# Each pattern here reads at most MAX_TEXT characters, and in linear time (tests/test_text_bounds.py).
# The fence's opening line is read possessively: two `[ \t]*` around an optional word backtracked into
# each other, so "```" and 64 KiB of spaces took 19 s, and every answer is searched. (The longer languages
# come first: an atomic group does not come back to try `json5` after `json`.)
_FENCE = re.compile(r"```[ \t]*+(?:json5|jsonc|json|JSON)?+[ \t]*+\r?\n(.*?)```", re.DOTALL)
# Terminal colour and cursor codes: CLI agents print them to stdout.
_ANSI = re.compile(r"\x1b\[[0-9;?]*+[ -/]*+[@-~]")
# A brace, or a whole JSON string (its braces are text): a string is skipped in one step, not one
# Python iteration per quote and backslash in it (a string of 128 K `\"`: 33 ms that way, 3 ms now). An
# unclosed string runs to the end of the text.
_TOKEN = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)|[{}]', re.DOTALL)
_decode = msgspec.json.Decoder().decode


class NoJsonObject(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Found:
    value: dict[str, Any]
    repaired: bool  # json-repair had to fix the JSON's syntax


def objects(text: str) -> Iterator[Found]:
    """Every JSON object the answer holds, most trustworthy first; `NoJsonObject` when there is none."""
    if len(text) > MAX_TEXT:
        raise NoJsonObject(f"the answer is {len(text)} characters long, more than the {MAX_TEXT} accepted")
    if "\x1b" in text:
        text = _ANSI.sub("", text)
    candidates = list(_candidates(text))
    broken = []
    found = False
    for candidate in candidates:
        try:
            value = _decode(candidate)
        except (msgspec.DecodeError, RecursionError):  # msgspec raises the latter for absurd nesting
            broken.append(candidate)
            continue
        if isinstance(value, dict):
            found = True
            yield Found(value, repaired=False)
    # The answer itself is most often the longest span; a `{name}` in the prose is not.
    too_long = over_budget = 0
    budget = REPAIR_BUDGET
    for candidate in sorted(broken, key=len, reverse=True):
        if len(candidate) > REPAIR_MAX:
            too_long = too_long or len(candidate)
            continue
        if len(candidate) > budget:
            over_budget += 1
            continue
        budget -= len(candidate)
        try:
            value = json_repair.loads(candidate, skip_json_loads=True)
        except (RecursionError, ValueError):  # it recurses per nesting level, and says so with a ValueError
            continue
        if isinstance(value, dict) and value:
            found = True
            yield Found(value, repaired=True)
    if found:
        return
    if too_long:
        raise NoJsonObject(f"the answer's JSON object is not valid JSON, and at {too_long} characters too long to be "
                           f"read as such (at most {REPAIR_MAX})")
    if over_budget:
        raise NoJsonObject(f"none of the answer's {len(broken)} JSON objects is valid JSON, and they hold more than the "
                           f"{REPAIR_BUDGET} characters read as such per answer")
    if "{" not in text:
        raise NoJsonObject("the answer contains no JSON object (plain prose)")
    if not candidates:
        raise NoJsonObject("the answer is truncated: its JSON object is never closed")
    raise NoJsonObject("the answer contains no parseable JSON object")


def extract_object(text: str) -> dict[str, Any]:
    """The first object `objects` finds."""
    for found in objects(text):
        return found.value
    raise AssertionError("unreachable: objects() raises when it finds nothing")


def _candidates(text: str) -> Iterator[str]:
    seen = 0
    fenced = set()
    for match in _FENCE.finditer(text):
        body = match.group(1).strip()
        start = body.find("{")
        # A fence around a truncated object (the model stopped, the fence was closed) is no candidate.
        if start != -1 and _balanced_end(body, start) is not None:
            seen += 1
            fenced.add(body)
            yield body
    start = text.find("{")
    while start != -1 and seen < MAX_CANDIDATES:
        end = _balanced_end(text, start)
        if end is None:
            return
        span = text[start : end + 1]
        if span not in fenced:  # the fenced object again, found by its braces
            seen += 1
            yield span
        # Top-level spans only: the objects nested in one are its parts (the `bant` of a broken
        # answer), never an answer of their own.
        start = text.find("{", end + 1)


def _balanced_end(text: str, start: int) -> int | None:
    """Index of the brace closing the one at `start`, skipping braces inside strings."""
    depth = 0
    for match in _TOKEN.finditer(text, start):
        ch = text[match.start()]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return match.start()
    return None
