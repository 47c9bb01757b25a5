"""The AI tasks, one module (or package) each, and their registry (`TASKS`).

Adding a task is: its module here (it builds `TASK`), its agent folder in conductor-agents/,
and its module's name in `MODULES` below; then `make generate` (README rows, OpenAPI, client).
"""

from __future__ import annotations

from importlib import import_module

from .registry import Registry, Task

# In the order the OpenAPI document and the demo page list them.
MODULES = ("email_generate", "lead_qualify", "deal_predict", "lead_summarize")

TASKS = Registry.of(import_module(f"{__name__}.{name}") for name in MODULES)

__all__ = ["MODULES", "TASKS", "Registry", "Task"]
