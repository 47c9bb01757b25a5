"""The AI tasks, one module each, and their registry (`TASKS`).

Adding a task is adding a module here that builds a `Task`, and one line below.
"""

from __future__ import annotations

from . import deal_predict, email_generate, lead_qualify
from .registry import Registry, Task

# In the order the OpenAPI document and the demo page list them.
TASKS = Registry([email_generate.TASK, lead_qualify.TASK, deal_predict.TASK])

__all__ = ["TASKS", "Registry", "Task"]
