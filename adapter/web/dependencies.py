"""What handlers get injected: the objects the lifespan opened, from the app's state."""

from __future__ import annotations

from typing import Any

from litestar.datastructures import State
from litestar.di import Provide


def from_state(name: str) -> Provide:
    """A dependency on what the lifespan put in the app's state under `name`."""

    def provide(state: State) -> Any:
        return state[name]

    return Provide(provide, sync_to_thread=False)


# Declared once, on the app: the AI service, the answers, the jobs, the batches, the job tokens and the open streams' places.
STATE = {name: from_state(name) for name in ("service", "answers", "jobs", "batches", "tokens", "streams")}
