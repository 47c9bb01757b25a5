"""Nothing outside a task's module (adapter/tasks/) and its agent folder (conductor-agents/) names it.

The sidecar's own code, its demo page and the TypeScript client's hand-written source go over the
registry instead; a task's name, route, agent, schema names, result and request field names and
guidance rule ids written anywhere else is a place a new task would be missed silently. The few
exceptions are listed below, each with its reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from adapter.tasks import TASKS, Registry
from tests.helpers import ROOT

# Where the guard looks: what ships (the service, its demo page, the client's hand-written source).
SCANNED = [ROOT / "adapter", ROOT / "clients/typescript/src"]
SUFFIXES = {".py", ".ts", ".js", ".html", ".css"}

# Where a task may be named, and why.
ALLOWED_DIRS = {
    ROOT / "adapter/tasks": "the tasks themselves (one module each, and what they share)",
    ROOT / "clients/typescript/src/generated": "generated from the registry and the OpenAPI document (`make generate`)",
}
ALLOWED_FILES = {
    # The CRM backend's own models (Lead, Deal, LeadUpdate) have these fields before any task does:
    # the double reproduces the backend, and says which of a lead's fields its update drops.
    ROOT / "adapter/doubles/crm.py": {"score", "classification", "next_actions", "risk_factors"},
    # The gateway double's `misclassified` fault: a model whose lead classification contradicts its
    # score, for the tests that the score decides (a fault of one task's answers, by nature).
    ROOT / "adapter/doubles/gateway.py": {"score", "classification"},
}
# Field names too common to mean a task where they appear outside it (HTTP bodies, problem and
# event types, request contexts, a batch's status): each is also a field of some task's result.
GENERIC_FIELDS = {"body", "type", "context", "agent", "provider"}


def forbidden(tasks: Registry) -> tuple[set[str], set[str]]:
    """(words matched anywhere, field names matched as quoted names or attributes)."""
    words: set[str] = set()
    fields: set[str] = set()
    types = []
    for task in tasks.values():
        words |= {task.name, task.path.lstrip("/"), task.agent_id, *task.guidance_rules}
        words.add(task.name.replace(".", "_").title().replace("_", ""))  # LeadQualify (schema and operation names)
        types += [task.request_type, task.result_type]
    _, components = msgspec.json.schema_components(types, ref_template="{name}")
    words |= set(components)
    for schema in components.values():
        fields |= set(schema.get("properties", {}))
    ids = {t.id_field for t in tasks.values()}
    return words, fields - ids - GENERIC_FIELDS


def scanned_files() -> list[Path]:
    files = []
    for top in SCANNED:
        for path in sorted(top.rglob("*")):
            if path.suffix not in SUFFIXES or "node_modules" in path.parts or "__pycache__" in path.parts:
                continue
            if any(path.is_relative_to(d) for d in ALLOWED_DIRS):
                continue
            files.append(path)
    return files


def naming(text: str, words: set[str], fields: set[str]) -> set[str]:
    found = {w for w in words if re.search(rf"(?<![\w.-]){re.escape(w)}(?![\w-])", text)}
    # A field in code: quoted ("score", 'score', `score`), or read as an attribute (.score).
    found |= {f for f in fields if re.search(rf"""["'`]{re.escape(f)}["'`]|\.{re.escape(f)}\b""", text)}
    return found


def test_the_guard_scans_something_and_knows_every_task():
    words, fields = forbidden(TASKS)
    assert len(scanned_files()) > 40
    for task in TASKS.values():
        assert task.name in words and task.agent_id in words and set(task.guidance_rules) <= words
    assert fields, "the tasks' result fields are forbidden outside them"


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_task_is_named_outside_its_module_and_agent_folder(path: Path):
    words, fields = forbidden(TASKS)
    found = naming(path.read_text(encoding="utf-8"), words, fields) - ALLOWED_FILES.get(path, set())
    assert not found, (f"{path.relative_to(ROOT)} names {sorted(found)}: go over the registry (adapter/tasks), "
                       "or generate the file (`make generate`)")


def test_the_exceptions_are_still_needed():
    """An exception that no longer matches anything is removed, so the list stays what it says."""
    words, fields = forbidden(TASKS)
    for path, allowed in ALLOWED_FILES.items():
        assert allowed <= naming(path.read_text(encoding="utf-8"), words, fields), f"{path}: drop the exceptions it no longer needs"


def test_the_guard_catches_a_task_named_in_code():
    words, fields = forbidden(TASKS)
    task = next(iter(TASKS.values()))
    rule = next(t for t in TASKS.values() if t.guidance_rules).guidance_rules
    assert task.name in naming(f'run("{task.name}")', words, fields)
    assert next(iter(rule)) in naming(f"warnings = ['{next(iter(rule))}']", words, fields)
    field = sorted(fields)[0]
    assert field in naming(f"result.{field}", words, fields)
    assert not naming("the task's name and its fields, from the registry", words, fields)
