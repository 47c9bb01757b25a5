"""The three CRM tasks and the Conductor agents that serve them."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from . import prompting as prompts, reading as validation
from ..models import (
    DealPredictRequest,
    DealPredictResult,
    EmailGenerateRequest,
    EmailGenerateResult,
    LeadQualifyRequest,
    LeadQualifyResult,
)
from ..settings import ConfigError

# (model text, record id, agent id) -> the normalised result with its guidance breaches; raises
# validation.OutputInvalid when the contract is broken.
Validate = Callable[[str, str, str], validation.Verdict]


@dataclass(frozen=True, slots=True)
class Task:
    name: Literal["email.generate", "lead.qualify", "deal.predict"]
    agent_id: str
    record_kind: Literal["lead", "deal"]
    request_type: type
    result_type: type
    render: Callable[[dict, Any, dt.date], str]
    validate: Validate
    version: str = field(default="unversioned")

    @property
    def id_field(self) -> str:
        return f"{self.record_kind}_id"


def _email_render(lead: dict, req: EmailGenerateRequest, _today: dt.date) -> str:
    return prompts.email_generate_input(lead, req.context, req.tone)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "email.generate", "EmailAssistant_CRM_Agent", "lead",
            EmailGenerateRequest, EmailGenerateResult, _email_render,
            validation.email_result,
        ),
        Task(
            "lead.qualify", "LeadQualifier_CRM_Agent", "lead",
            LeadQualifyRequest, LeadQualifyResult,
            lambda lead, _req, _today: prompts.lead_qualify_input(lead),
            validation.lead_result,
        ),
        Task(
            "deal.predict", "DealPredictor_CRM_Agent", "deal",
            DealPredictRequest, DealPredictResult,
            lambda deal, _req, today: prompts.deal_predict_input(deal, today),
            validation.deal_result,
        ),
    )
}
AGENT_IDS = tuple(t.agent_id for t in TASKS.values())


def load_tasks(agents_dir: str) -> dict[str, Task]:
    """The tasks, each stamped with a digest of its agent's definition and persona.

    The digest goes into cache keys: editing `conductor-agents/<Agent>/` retires
    every cached answer of that agent without anyone flushing anything.
    """
    root = Path(agents_dir)
    stamped = {}
    for name, task in TASKS.items():
        folder = root / task.agent_id
        try:
            definition = (folder / "definition.yaml").read_bytes()
            persona = (folder / "persona.md").read_bytes()
            meta = yaml.safe_load(definition) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"CONDUCTOR_AGENTS_DIR: cannot read agent {task.agent_id}: {exc}") from None
        digest = hashlib.sha256(definition + b"\0" + persona).hexdigest()[:16]
        stamped[name] = replace(task, version=f"{meta.get('version', '0')}-{digest}")
    return stamped

