"""What an AI task is, and the registry from which everything task-specific follows.

A task is one module (or package) that builds one `Task` as `TASK`, and its agent's folder
`conductor-agents/<Agent>/` (definition.yaml, persona.md, and corpus/: real answers, the
agent's examples). `adapter.tasks.TASKS` registers the modules. Nothing outside those two
places names a task (tests/test_task_guard.py): from the registry follow the sync and
stream routes, the jobs' and batches' `task` enum, the `CACHE_TTL_<TASK>` and
`RATE_LIMIT_<TASK>` settings, the agents checked and synced, the health report, the
OpenAPI operations, examples and header descriptions, the metrics' series, the demo's
curl walkthrough, buttons and result views, the doubles' answers, and the generated
files (`adapter generate`: README rows, the TypeScript client's task map).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import msgspec
import yaml

from ..notify.triggers import Trigger
from ..settings import ConfigError
from .reading import Breach, Verdict, rules

# (record, request, today) -> the agent's input text; deterministic, as the cache keys on it.
Render = Callable[[dict[str, Any], Any, dt.date], str]
# (model text, record id, agent id) -> the normalised result with its guidance breaches;
# raises reading.OutputInvalid when the contract is broken.
Validate = Callable[[str, str, str], Verdict]
_NAME = re.compile(r"[a-z][a-z0-9]*(?:[._][a-z][a-z0-9]*)+")  # fullmatch: `$` would also match before a final newline
_KIND = re.compile(r"[a-z][a-z0-9]*")  # a path segment of the CRM's URLs (`/api/v1/<kind>s/<id>`), as it is


# One part of the demo page's view of a result: `text` (a paragraph), `field` (`label: value`),
# `badge` (a short value), `number`, `gauge` (a 0-100 bar), `list` (strings), `table` (an object's
# fields), `cards` (a list of objects, each drawn with its fields). A task without a view is shown as JSON.
ViewKind = Literal["text", "field", "badge", "number", "gauge", "list", "table", "cards"]
View = tuple[ViewKind, str, str]  # (kind, result field, label)


@dataclass(frozen=True, slots=True)
class Task:
    """One AI task: everything the sidecar needs to serve it, in one place.

    `name` is `<record kind>.<verb>` by convention (`lead.qualify`); its route is
    `/api/v1/ai/<name with / for .>` and its settings are `CACHE_TTL_<NAME>` and
    `RATE_LIMIT_<NAME>`, upper-cased with `_` for `.`.
    """

    name: str
    agent_id: str
    record_kind: str  # the CRM collection the record is read from: /api/v1/<kind>s/<id>
    request_type: type[msgspec.Struct]  # the request body; must have `<record_kind>_id`
    result_type: type[msgspec.Struct]  # what the route answers (the validated output plus ids)
    render: Render
    validate: Validate
    guidance: Callable[[Any], list[Breach]]  # the persona's style rules a valid result breaks
    guidance_rules: Mapping[str, str]  # rule id -> what the persona asks (X-Agent-Warnings ids)
    summary: str  # the OpenAPI summary of the synchronous route
    cache_ttl: float  # seconds; CACHE_TTL_<NAME> overrides it
    rate_limit: str  # `<requests>/<seconds>` or `off`; RATE_LIMIT_<NAME> overrides it
    request_example: Mapping[str, Any]
    result_example: Mapping[str, Any]
    # What a double's model answers for a record and request (the demo and the tests).
    sample_answer: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
    # Fields PATCHed onto the record after a fresh answer, with the caller's token (None: no write-back).
    write_back: Callable[[Any], dict[str, Any]] | None = None
    # Notification triggers (adapter/notify/triggers.py), evaluated on every fresh answer.
    triggers: tuple[Trigger, ...] = ()
    stream_summary: str = ""  # the stream route's; `Stream: <summary>` when empty
    # What the write-back PATCH sets, in words ("score and classification"): its header's description.
    writes_back: str = ""
    # How the demo page draws a result: (kind, field, label) parts, in order (see `View`).
    view: tuple[View, ...] = ()
    # A paragraph for the README under the task's route (what its example does not show).
    doc: str = ""
    # Where this task's agent folder is when it is not CONDUCTOR_AGENTS_DIR's (a toy task of a test).
    agents_root: str | None = None
    threads: bool = False  # the task allows threads (a conversation about one record: pipeline/threads.py)
    version: str = field(default="unversioned")  # stamped by `Registry.load` from the agent's files
    _decoder: msgspec.json.Decoder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"task name {self.name!r} must look like `<record kind>.<verb>`")
        if not _KIND.fullmatch(self.record_kind):
            raise ValueError(f"task {self.name}: record kind {self.record_kind!r} must be lower-case letters and digits")
        if self.id_field not in self.request_type.__struct_fields__:
            raise ValueError(f"task {self.name}: {self.request_type.__name__} has no `{self.id_field}`")
        object.__setattr__(self, "_decoder", msgspec.json.Decoder(self.result_type))
        if unknown := [f for _, f, _ in self.view if f not in self.result_type.__struct_fields__]:
            raise ValueError(f"task {self.name}: its view names {unknown}, which {self.result_type.__name__} does not have")
        if self.write_back is not None and not self.writes_back:
            raise ValueError(f"task {self.name}: a write-back needs `writes_back`, the words its header uses")
        if not self.stream_summary:
            object.__setattr__(self, "stream_summary", f"Stream: {self.summary}")

    @property
    def id_field(self) -> str:
        return f"{self.record_kind}_id"

    @property
    def path(self) -> str:
        return "/" + self.name.replace(".", "/")

    @property
    def env_suffix(self) -> str:
        return self.name.replace(".", "_").upper()

    def reread(self, body: bytes) -> Any | None:
        """A result already served once (cached), decoded again; None when it cannot be."""
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError:  # ValidationError included: a body the cache kept from another shape
            return None  # what is read from it is a courtesy; a body we cannot re-read must not fail its response

    def warnings(self, body: bytes) -> list[str]:
        """The guidance rules a served body breaches: recomputed from the body, never stored."""
        result = self.reread(body)
        return [] if result is None else rules(self.guidance(result))


class Registry(Mapping[str, Task]):
    """The tasks by name, in the order they were registered (the OpenAPI's and the demo page's order)."""

    def __init__(self, tasks: Iterable[Task] = ()) -> None:
        self._tasks: dict[str, Task] = {}
        for task in tasks:
            self._add(task)

    def _add(self, task: Task) -> None:
        if task.name in self._tasks:
            raise ValueError(f"task {task.name} is registered twice")
        if any(t.agent_id == task.agent_id for t in self._tasks.values()):
            raise ValueError(f"agent {task.agent_id} already serves another task")
        self._tasks[task.name] = task

    def __getitem__(self, name: str) -> Task:
        return self._tasks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    @classmethod
    def of(cls, modules: Iterable[ModuleType], *, agents_root: str | None = None) -> Registry:
        """The tasks of these modules (each defines `TASK`), in this order.

        `agents_root`: the folder holding their agents' folders, when it is not CONDUCTOR_AGENTS_DIR
        (a test's toy task in a temporary folder); `create_app(settings, tasks=...)` serves them.
        """
        tasks = []
        for module in modules:
            task = getattr(module, "TASK", None)
            if not isinstance(task, Task):
                raise ValueError(f"module {module.__name__} defines no `TASK`")
            tasks.append(task if agents_root is None else replace(task, agents_root=str(agents_root)))
        return cls(tasks)

    def with_task(self, task: Task) -> Registry:
        """A new registry with one more task (this one is left as it is)."""
        return Registry([*self._tasks.values(), task])

    @property
    def agent_ids(self) -> tuple[str, ...]:
        return tuple(t.agent_id for t in self._tasks.values())

    def by_agent(self, agent_id: str) -> Task | None:
        return next((t for t in self._tasks.values() if t.agent_id == agent_id), None)

    @property
    def guidance_rules(self) -> dict[str, str]:
        """Every guidance rule id and what the personas ask; a rule two tasks share lists both wordings."""
        merged: dict[str, list[str]] = {}
        for task in self._tasks.values():
            for rule, words in task.guidance_rules.items():
                merged.setdefault(rule, []).append(words)
        return {rule: ", ".join(words) for rule, words in merged.items()}

    def load(self, agents_dir: str) -> Registry:
        """The tasks, each stamped with a digest of its agent's definition and persona.

        The digest goes into cache keys: editing `conductor-agents/<Agent>/` retires
        every cached answer of that agent without anyone flushing anything. A missing
        persona stops start-up, not a request.
        """
        stamped = []
        for task in self._tasks.values():
            folder = agent_folder(task, agents_dir)
            try:
                definition = (folder / "definition.yaml").read_bytes()
                persona = (folder / "persona.md").read_bytes()
                meta = yaml.safe_load(definition) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"CONDUCTOR_AGENTS_DIR: cannot read agent {task.agent_id}: {exc}") from None
            digest = hashlib.sha256(definition + b"\0" + persona).hexdigest()[:16]
            stamped.append(replace(task, version=f"{meta.get('version', '0')}-{digest}"))
        return Registry(stamped)

    def check_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> None:
        """`CACHE_TTL_<TASK>`/`RATE_LIMIT_<TASK>` variables must name a task: a typo is an error, not a no-op."""
        known = {t.env_suffix for t in self._tasks.values()}
        wrong = [f"{prefix}{suffix}: no task is called that (tasks: {', '.join(sorted(known))})"
                 for prefix, values in overrides.items() for suffix in values if suffix not in known]
        if wrong:
            raise ConfigError(*wrong)


def agent_folder(task: Task, agents_dir: str) -> Path:
    """`<agents dir>/<Agent>/`: the task's definition, persona and corpus."""
    return Path(task.agents_root or agents_dir) / task.agent_id
