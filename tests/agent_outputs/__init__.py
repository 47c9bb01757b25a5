"""The agent-output corpus: one file per model answer, and the reader of that format.

A file is `tests/agent_outputs/<task>/<name>.txt`: a YAML header between `---` lines, then the
model's raw text, byte for byte (see README.md here). The tests (tests/test_agent_outputs.py) and
the measurement (`python -m bench.corpus`) both read it through `load_corpus()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CORPUS = Path(__file__).parent
OUTCOMES = ("accept", "accept-normalised", "repair")


@dataclass(frozen=True)
class Answer:
    path: Path
    task: str
    outcome: str
    why: str
    text: str
    expect: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.task}/{self.path.stem}"


def read_answer(path: Path) -> Answer:
    raw = path.read_text(encoding="utf-8")
    if not raw.startswith("---\n") or "\n---\n" not in raw[3:]:
        raise ValueError(f"{path}: expected a `---` header, a `---` line, then the model's text")
    head, text = raw[4:].split("\n---\n", 1)
    header = yaml.safe_load(head) or {}
    unknown = set(header) - {"outcome", "why", "expect", "error", "warnings"}
    if unknown:
        raise ValueError(f"{path}: unknown header key(s) {sorted(unknown)}")
    return Answer(path=path, task=path.parent.name, outcome=header.get("outcome", ""), why=header.get("why", ""),
                  text=text, expect=header.get("expect") or {}, error=header.get("error"),
                  warnings=tuple(header.get("warnings") or ()))


def load_corpus() -> list[Answer]:
    return [read_answer(p) for p in sorted(CORPUS.glob("*/*.txt"))]
