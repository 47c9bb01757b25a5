"""Find the JSON object in whatever the model printed.

Models wrap their JSON in ```json fences, put a sentence of prose before it, or
leave a trailing comma. We try, in order: every fenced block, then every
balanced ``{...}`` span in the text; each candidate is decoded as is, then with
trailing commas removed. The first candidate that decodes to an object wins.
"""

from __future__ import annotations

import re

import msgspec

MAX_TEXT = 256 * 1024  # a longer answer is not an answer we can use
MAX_CANDIDATES = 32  # bounds the work on adversarial text full of braces

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_decode = msgspec.json.Decoder().decode


class NoJsonObject(ValueError):
    pass


def extract_object(text: str) -> dict:
    if len(text) > MAX_TEXT:
        raise NoJsonObject(f"the answer is {len(text)} characters long, more than the {MAX_TEXT} accepted")
    for candidate in _candidates(text):
        for variant in (candidate, _strip_trailing_commas(candidate)):
            try:
                value = _decode(variant)
            except msgspec.DecodeError:
                continue
            if isinstance(value, dict):
                return value
    if "{" not in text:
        raise NoJsonObject("the answer contains no JSON object (plain prose)")
    raise NoJsonObject("the answer contains no parseable JSON object")


def _candidates(text: str):
    seen = 0
    for match in _FENCE.finditer(text):
        seen += 1
        yield match.group(1).strip()
    start = text.find("{")
    while start != -1 and seen < MAX_CANDIDATES:
        end = _balanced_end(text, start)
        if end is None:
            return
        seen += 1
        yield text[start : end + 1]
        start = text.find("{", start + 1)


def _balanced_end(text: str, start: int) -> int | None:
    """Index of the brace closing the one at `start`, skipping braces inside strings."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _strip_trailing_commas(candidate: str) -> str:
    # Only outside strings: rebuild the text, rewriting the non-string stretches.
    out, i, n = [], 0, len(candidate)
    while i < n:
        q = candidate.find('"', i)
        if q == -1:
            out.append(_TRAILING_COMMA.sub(r"\1", candidate[i:]))
            break
        out.append(_TRAILING_COMMA.sub(r"\1", candidate[i:q]))
        j = q + 1
        while j < n and candidate[j] != '"':
            j += 2 if candidate[j] == "\\" else 1
        out.append(candidate[q : j + 1])
        i = j + 1
    return "".join(out)
