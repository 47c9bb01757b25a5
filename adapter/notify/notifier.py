"""The pipeline's side of notifications: three calls, and nothing else of it knows about them.

- `remember(task, record_id, record)` when a record has been read with the caller's token: keeps
  what the task's triggers compare with (the fields they name, the owner, the title, the version),
  never the whole record;
- `answered(task, record_id, result)` on every fresh answer, where it is validated, before it is
  stored: each trigger that fires writes its event to the outbox, so an answer in the cache always
  has its events in the outbox (a hit, a joined call and a stale answer never come here);
- `batch_finished(...)` when a batch ends, for its creator.

A fault writing the outbox is logged and counted, never the answer's failure.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextvars import ContextVar
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from ..metrics import Metrics
from ..settings import Settings
from .triggers import Event, Trigger, batch_finished, event_id, object_id, shown

log = structlog.get_logger("adapter.notify")
REMEMBER = 10_000  # records whose facts are kept between their read and their answer, per process
# The facts of the record this request (or job) read last. A model call runs in a task created after
# the read, which starts with a copy of this context: the answer is evaluated against the very read
# that led to it, even while other requests read the same record. Batches read every record first and
# ask later, in other tasks: they fall back on the record's latest facts (`Notifier._facts`).
_READ: ContextVar[tuple[str, str, dict[str, Any]] | None] = ContextVar("notify_read", default=None)


class Notifier:
    def __init__(self, outbox: Any | None, settings: Settings, metrics: Metrics | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.outbox = outbox
        self.on = outbox is not None
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._off = settings.notify_off
        self._clock = clock
        self._facts: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    @classmethod
    def off(cls, settings: Settings) -> Notifier:
        return cls(None, settings)

    def remember(self, task: Any, record_id: str, record: Mapping[str, Any]) -> None:
        triggers: tuple[Trigger, ...] = getattr(task, "triggers", ())
        if not self.on or not triggers:
            return
        facts = {name: record.get(name) for t in triggers for name in t.reads}
        facts.update(owner=object_id(record.get("owner_id")), version=str(record.get("updated_at") or ""),
                     label=shown(record.get(triggers[0].label_field)))
        key = (task.name, record_id)
        _READ.set((task.name, record_id, facts))
        self._facts[key] = facts
        self._facts.move_to_end(key)
        if len(self._facts) > REMEMBER:
            self._facts.popitem(last=False)

    async def answered(self, task: Any, record_id: str, result: Any) -> None:
        if not self.on:
            return
        read = _READ.get()
        facts = read[2] if read is not None and read[:2] == (task.name, record_id) else self._facts.get((task.name, record_id))
        if facts is None:
            return  # no trigger, or a record this replica did not read (a job taken over)
        for trigger in getattr(task, "triggers", ()):
            if trigger.name in self._off:
                continue
            try:
                found = trigger.check(facts, result, self.settings)
            except Exception as exc:  # a trigger's bug must not fail the answer it looks at
                log.error("notify.trigger_failed", type=trigger.name, exc_info=exc)
                continue
            if found is None:
                continue
            event = Event(id=event_id(trigger.name, task.record_kind, record_id, facts["version"], dict(found.key)),
                          type=trigger.name, crm_type=found.crm_type, user_id=facts["owner"], title=found.title,
                          message=found.message, priority=found.priority, entity_type=task.record_kind,
                          entity_id=object_id(record_id), about={"task": task.name, **found.about},
                          created_at=self._clock())
            await self._add(event)

    async def batch_finished(self, batch_id: str, task: str, counts: Mapping[str, int], cancelled: bool, user: str) -> None:
        if not self.on or "batch.finished" in self._off:
            return
        creator = object_id(user.removeprefix("sub:")) if user.startswith("sub:") else None
        await self._add(batch_finished(batch_id, task, counts, cancelled, creator, self._clock()))

    async def _add(self, event: Event) -> None:
        try:
            written = await self.outbox.add(event)  # type: ignore[union-attr]
        except Exception as exc:  # Redis away: the answer is served all the same; the event is lost, and counted
            self.metrics.notify_events.labels(event.type, "lost").inc()
            log.warning("notify.outbox_write_failed", event_id=event.id, type=event.type,
                        error=f"{type(exc).__name__}: {exc}"[:200])
            return
        self.metrics.notify_events.labels(event.type, "written" if written else "duplicate").inc()
        log.info("notify.event", event_id=event.id, type=event.type, written=written)
