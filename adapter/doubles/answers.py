"""What the double's "model" answers: each task module's sample answer, for the record and request in the prompt."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ..tasks import TASKS, Registry

_RECORD = re.compile(r"<crm_record>\n(.*?)\n</crm_record>", re.DOTALL)
_REQUEST = re.compile(r"<request>\n(.*?)\n</request>", re.DOTALL)


def blocks(prompt: str) -> tuple[dict, dict]:
    def grab(pattern: re.Pattern[str]) -> dict:
        m = pattern.search(prompt)
        try:
            value = msgspec.json.decode(m.group(1)) if m else {}
        except msgspec.DecodeError:
            value = {}
        return value if isinstance(value, dict) else {}

    return grab(_RECORD), grab(_REQUEST)


def answer_for(agent_id: str, prompt: str, tasks: Registry = TASKS) -> dict[str, Any]:
    """The task's sample answer; an agent that serves no task answers with what no validator accepts."""
    task = tasks.by_agent(agent_id)
    if task is None:
        return {"answer": f"agent {agent_id} serves no task of this sidecar"}
    record, request = blocks(prompt)
    return task.sample_answer(record, request)
