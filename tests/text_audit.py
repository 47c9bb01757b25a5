"""Every regular expression in adapter/ and whose text it reads (issue 22), and the hostile text to try them on.

`HOSTILE` patterns read text an outsider chooses: a model's answer (fresh or cached), a CRM record,
an upstream's error text, a caller's request. Each must run in linear time on any text:
tests/test_text_bounds.py times every one on adversarial strings of 64 KiB, and
`python -m bench.regex` reports the longest time. `TRUSTED` patterns read only our own text (the
operator's settings and msgspec's messages about them, task names, our own OpenAPI), or run only
in the test doubles. tests/test_text_bounds.py fails on a pattern in adapter/ that is in neither
list, so a new one is audited when it is written.

Nothing here imports `adapter` until a pattern is asked for: `bench.regex --root` measures an older
checkout's `adapter` with this list.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Audited:
    """One pattern: a module's compiled attribute (`name`), or one written inline (`source`, `flags`)."""

    path: str  # the module, relative to the repository
    reads: str  # whose text, and what bounds it
    name: str = ""
    source: str = ""
    flags: int = 0
    _compiled: list[re.Pattern[str]] = field(default_factory=list, compare=False, repr=False)

    @property
    def pattern(self) -> re.Pattern[str]:
        if not self._compiled:
            if self.name:
                module = importlib.import_module(self.path.removesuffix(".py").replace("/", "."))
                value = getattr(module, self.name)  # a compiled pattern, or the text of one (`Meta(pattern=RATE)`)
                self._compiled.append(value if isinstance(value, re.Pattern) else re.compile(value))
            else:
                self._compiled.append(re.compile(self.source, self.flags))
        return self._compiled[0]

    @property
    def label(self) -> str:
        return f"{self.path.removeprefix('adapter/')} {self.name or repr(self.source)}"


MODEL = "model output"
HOSTILE = (
    Audited("adapter/tasks/extract.py", f"{MODEL}: the whole answer, at most MAX_TEXT characters", "_FENCE"),
    Audited("adapter/tasks/extract.py", f"{MODEL}: the whole answer, at most MAX_TEXT characters", "_ANSI"),
    Audited("adapter/tasks/extract.py", f"{MODEL}: the whole answer, at most MAX_TEXT characters", "_TOKEN"),
    Audited("adapter/tasks/reading.py", f"{MODEL}: one string field, at most NUMBER_MAX characters", "_NUMBER"),
    Audited("adapter/tasks/reading.py", f"{MODEL}: one string field, at most DATE_MAX characters", "_BR_DATE"),
    Audited("adapter/tasks/email_generate.py", f"{MODEL}, cached answers too: an email body, at most GUIDANCE_MAX "
                                               "characters", "_PARAGRAPH_BREAK"),
    Audited("adapter/tasks/email_generate.py", f"{MODEL}, cached answers too: an email's subject and body, at most "
                                               "SUBJECT_MAX + GUIDANCE_MAX characters", "_PRICING"),
    Audited("adapter/tasks/email_generate.py", f"{MODEL}, cached answers too: as _PRICING", "_SPAM"),
    Audited("adapter/tasks/email_generate.py", f"{MODEL}, cached answers too: as _PRICING", "_NOT_SPAM"),
    Audited("adapter/tasks/lead_qualify.py", "record content: a lead's job title (the doubles' sample answers)",
            "_SENIOR"),
    Audited("adapter/upstreams/gateway.py", "upstream error text: at most URL_SCAN_MAX characters", "_URL"),
    Audited("adapter/upstreams/gateway.py", "upstream error text: a detail already cut to 500 characters",
            "_DB_FAULT"),
    Audited("adapter/tracing.py", "the caller's URL, at most URL_ATTRIBUTE_MAX characters", "_SECRET_QUERY"),
    Audited("adapter/context.py", "the caller's X-Request-ID (MAX_HEADER_BYTES)", "_SAFE_ID"),
    Audited("adapter/web/problems.py", "msgspec's messages on the caller's body: its field names (MAX_BODY_BYTES)",
            "_NAMED_FIELD"),
    Audited("adapter/web/batches.py", "a batch's record ids (MAX_BODY_BYTES)", "_OBJECT_ID"),
    Audited("adapter/web/batches.py", "msgspec's messages on a batch's options (MAX_BODY_BYTES)",
            source=r"field `([^`]+)`"),
    Audited("adapter/web/proxy.py", "the caller's path (the server's request-line limit)", source=r"[/\\]"),
    Audited("adapter/models.py", "record ids in the caller's body (msgspec `Meta(pattern=)`)",
            source="^[0-9a-fA-F]{24}$"),
    Audited("adapter/notify/triggers.py", "record content: a record's `owner_id`, and record ids (fullmatch, fixed width)",
            "_OBJECT_ID"),
    Audited("adapter/notify/triggers.py", "record content and model output: a record's title, a risk factor "
                                          "(the CRM's answer, bounded by its read; the answer's MAX_TEXT)", "_CONTROL"),
    Audited("adapter/upstreams/conversations.py", "a thread id in the caller's path, a conversation id the Conductor "
            "answers (fullmatch of bounded repeats)", "CONVERSATION_ID"),
    Audited("adapter/pipeline/threads.py", "a Conductor conversation's title: upstream text (fullmatch of bounded "
            "repeats)", "_TITLE"),
    Audited("adapter/pipeline/threads.py", "a Conductor conversation's context, at most CONTEXT_MAX characters",
            "_REQUEST"),
    Audited("adapter/web/threads.py", "a thread turn's message in the caller's body (MAX_BODY_BYTES)", "_CONTROL"),
)

TRUSTED = (
    Audited("adapter/tasks/registry.py", "task names, written in adapter/tasks/", "_NAME"),
    Audited("adapter/tasks/registry.py", "record kinds, written in adapter/tasks/", "_KIND"),
    Audited("adapter/generate.py", "task names (checked by `Task` first), split at `adapter generate`", source=r"[._]"),
    *(Audited("adapter/settings.py", "msgspec's messages about the operator's environment variables", source=s)
      for s in (r" - at `\$[^`]*`$", r"Expected `(\w+)` (>=|>|<=|<) ([\d.e+-]+)", r"Expected `str` of length >= (\d+)",
                r"Expected `(\w+)(?: \| null)?`, got")),
    Audited("adapter/settings.py", "the operator's environment (RATE_LIMIT_*)", "RATE"),
    Audited("adapter/settings.py", "the operator's environment (CONDUCTOR_AI_PROVIDER)", "PROVIDERS"),
    Audited("adapter/settings.py", "the operator's environment (CACHE_PREFIX)", source=r"^[A-Za-z0-9:_.-]{1,64}\Z"),
    Audited("adapter/models.py", "SSE event ids in our OpenAPI document: nothing is decoded with it",
            source="^[1-9][0-9]*$"),
    Audited("adapter/doubles/crm.py", "the CRM double (the demo and the tests only)", "_OBJECT_ID"),
    Audited("adapter/doubles/answers.py", "the gateway double: our own prompts (the demo and the tests only)", "_RECORD"),
    Audited("adapter/doubles/answers.py", "the gateway double: our own prompts (the demo and the tests only)",
            "_REQUEST"),
)


# --- adversarial text -------------------------------------------------------------------------------

# What the patterns above look for, and what makes a backtracking matcher start again: runs of digits,
# dots, spaces, `%`, `$`, scheme-like prefixes, fences, escape codes, quotes, braces.
PIECES = ("1", "9", "0.", ".", ",", " ", "\t", "\n", "\n ", "%", "1%", "1 %", "$", "R$", "US$ ", "€", "a", "a.", "-",
          "+", "_", "http://", "a://", "://", "1.1.1.1:", "10.0.0.1:80", "```", "```json", "\x1b[", "\x1b[1;", "{", "}",
          '"', "\\", "`", "field `", "?token=", "&", "=", "/", "T", "1/1/", "12/12/2024 ", "free ", "feel free",
          "discount", "orçamento de ", "ceo", "Connection refused", "é")
# A run of one piece after another: the shape of each quadratic pattern found (issue 22).
HEADS = (("%", "1"), ("$", "1."), ("", "a."), ("http://", "a"), ("```", " "), ("```", " \t"), ("\x1b[", "1"),
         ("1", " "), ("1/1/2000", " "), ("field `", "a"), ("?token=", "a"), ("a", ".a"), ("1.1.1.", "1"))
SIZE = 64 * 1024


def repeated(recipe: list[tuple[str, int]] | tuple[tuple[str, int], ...], size: int = SIZE) -> str:
    """`size` characters of the recipe's pieces, each repeated its count of times, over and over."""
    unit = "".join(piece * count for piece, count in recipe) or "a"
    return (unit * (size // len(unit) + 1))[:size]


def corpus(size: int = SIZE) -> dict[str, str]:
    """The fixed adversarial corpus (the benchmark's, and the property test's explicit examples)."""
    texts = {f"{p!r} repeated": repeated([(p, 1)], size) for p in PIECES}
    texts |= {f"{h!r} then {u!r} repeated": (h + u * size)[:size] for h, u in HEADS}
    texts |= {f"{u!r} repeated, then 'x'": (u * size)[: size - 1] + "x" for _, u in HEADS}
    return texts


def scan(pattern: re.Pattern[str], text: str) -> int:
    """Every match, as `sub`, `split` and `finditer` walk them."""
    return sum(1 for _ in pattern.finditer(text))


# How adapter/ calls its patterns, between them: each is timed (a match from the start, a search, a walk).
CALLS = (("search", re.Pattern.search), ("match", re.Pattern.match), ("fullmatch", re.Pattern.fullmatch),
         ("finditer", scan))


# --- the worst answer a model can give --------------------------------------------------------------

# A record every task's sample answer can be made from.
RECORD = {"name": "Maria Silva", "company": "Acme Logistics", "job_title": "CEO", "title": "Fleet renewal",
          "stage": "proposal", "expected_close_date": "2027-01-31"}
# What fills the answer's long string fields: a head, then a unit over and over.
FILLS = (("%", "1"), ("", "1%"), ("", "1 % "), ("$", "1."), ("", "1."), ("", "a."), ("http://", "a."), ("", "free "),
         ("", "discount 1"), ("", "\n \n"), ("R$ ", "1,"), ("", " "), ("```", " "), ("", '"'), ("", "\\"), ("", "{}"))


def inflate(obj: Any, fill: tuple[str, str], size: int) -> str:
    """`obj` as JSON of about `size` characters: its long strings (free text: reasoning, an email's body) `fill`ed."""
    long: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, str) and len(value) >= 100:
                long.append((node, key))
            elif isinstance(value, dict | list):
                walk(value)

    walk(obj)
    head, unit = fill
    spare = size - len(json.dumps(obj, ensure_ascii=False))
    cost = len(json.dumps(unit, ensure_ascii=False)) - 2  # a newline is two characters in JSON
    for node, key in long:
        node[key] = "Hello,\n\n" + head + unit * max((spare // len(long) - 40 - len(head)) // cost, 1) + "\n\nBest regards"
    return json.dumps(obj, ensure_ascii=False)


def worst_answer(task: Any, fill: tuple[str, str], size: int) -> str:
    """About `size` characters of the task's sample answer, as a model would send it."""
    return inflate(task.sample_answer(RECORD, {}), fill, size)
