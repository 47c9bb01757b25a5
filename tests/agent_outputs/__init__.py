"""The agent-output corpus: one file per model answer, and the reader of that format.

A file is `conductor-agents/<Agent>/corpus/<name>.txt`, in the folder of the agent that answered
(a task's agent folder holds its definition, its persona and its real answers): a YAML header
between `---` lines, then the model's raw text, byte for byte (see conductor-agents/README.md).
The tests (tests/test_agent_outputs.py) and the measurement (`python -m bench.corpus`) both read
it through `load_corpus()`, for the registered tasks (or those of a registry handed in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml

from adapter.tasks import TASKS, Registry, Task
from adapter.tasks.reading import OutputInvalid, rules
from adapter.tasks.registry import agent_folder

AGENTS = Path(__file__).parents[2] / "conductor-agents"
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


def read_answer(path: Path, task: str) -> Answer:
    raw = path.read_text(encoding="utf-8")
    if not raw.startswith("---\n") or "\n---\n" not in raw[3:]:
        raise ValueError(f"{path}: expected a `---` header, a `---` line, then the model's text")
    head, text = raw[4:].split("\n---\n", 1)
    header = yaml.safe_load(head) or {}
    unknown = set(header) - {"outcome", "why", "expect", "error", "warnings"}
    if unknown:
        raise ValueError(f"{path}: unknown header key(s) {sorted(unknown)}")
    return Answer(path=path, task=task, outcome=header.get("outcome", ""), why=header.get("why", ""),
                  text=text, expect=header.get("expect") or {}, error=header.get("error"),
                  warnings=tuple(header.get("warnings") or ()))


def check_answer(task: Task, answer: Answer, record_id: str) -> None:
    """The answer gets its expected outcome from its task's validator (an AssertionError says how not)."""
    if answer.outcome == "repair":
        try:
            task.validate(answer.text, record_id, task.agent_id)
        except OutputInvalid as caught:
            assert any(answer.error in e for e in caught.errors), f"expected {answer.error!r} among {caught.errors}"
            return
        raise AssertionError(f"{answer.id}: expected a contract error, the answer was accepted")
    verdict = task.validate(answer.text, record_id, task.agent_id)
    if answer.outcome == "accept":
        assert verdict.normalised == (), f"accepted as written, yet normalised: {verdict.normalised}"
    else:
        assert verdict.normalised, "expected a normalisation, the answer was accepted as written"
    assert sorted(rules(verdict.warnings)) == sorted(answer.warnings), [b.detail for b in verdict.warnings]
    got = msgspec.to_builtins(verdict.result)
    for name, value in answer.expect.items():
        assert got[name] == msgspec.to_builtins(value), f"`{name}`"


def corpus_folder(task: str, tasks: Registry = TASKS, agents_dir: Path = AGENTS) -> Path:
    return agent_folder(tasks[task], str(agents_dir)) / "corpus"


def load_corpus(tasks: Registry = TASKS, agents_dir: Path = AGENTS) -> list[Answer]:
    """Every answer in the corpus folders of these tasks' agents, task by task."""
    return [read_answer(p, name) for name in tasks for p in sorted(corpus_folder(name, tasks, agents_dir).glob("*.txt"))]
