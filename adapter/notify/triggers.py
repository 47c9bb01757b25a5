"""What a notification trigger is, and the event it makes.

A task module declares its triggers on its `Task` (`triggers=`), so a new task brings its own.
A trigger compares a fresh answer with the facts of the record it was asked about (read with the
caller's token before the model was asked) and says whether, and what, to tell the record's owner.

An event's id is derived from what it is about (trigger, record, the record's version, and the
trigger's `key`), never drawn at random: two replicas, a retried request or a retried insert that
evaluate the same answer over the same record make the same id, and every sink keeps one per id.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

Priority = Literal["low", "medium", "high", "urgent"]
_OBJECT_ID = re.compile(r"[0-9a-f]{24}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
LABEL_MAX = 120  # characters of a record's title in a notification's text
ABOUT_MAX = 200  # characters of what the trigger is about (a risk factor's words)
_encode = msgspec.json.Encoder(order="sorted").encode


@dataclass(frozen=True, slots=True)
class Finding:
    """What a trigger found: the notification's words, and what it is about.

    `key`: what makes two findings the same event for one record version (a classification's
    from and to; which score dropped, not by how much: the next answer's numbers differ).
    """

    crm_type: str  # the backend's Notification.type (lead_qualified, deal_at_risk, ...)
    title: str
    message: str
    priority: Priority
    about: Mapping[str, Any]  # the webhook's data beside the ids: only what the trigger is about
    key: Mapping[str, Any]


# (the record's facts, the validated result, the settings) -> a finding or None
Check = Callable[[Mapping[str, Any], Any, Any], Finding | None]


@dataclass(frozen=True, slots=True)
class Trigger:
    """One notification a task can raise. `name` is the webhook's event type and what
    NOTIFY_TRIGGERS_OFF names; `reads`: the record's fields it compares with (kept, nothing else)."""

    name: str
    check: Check
    reads: tuple[str, ...] = ()
    label_field: str = "title"  # the record's field that names it in the text (a lead's `name`)
    summary: str = field(default="")  # what the README's trigger table says


class Event(msgspec.Struct, kw_only=True, frozen=True):
    """One notification, as it travels through the outbox to every sink."""

    id: str  # msg_<24 hex>: the webhook-id, and the CRM document's ObjectId
    type: str  # the trigger's name (the webhook's `type`)
    crm_type: str
    user_id: str | None  # the record's owner or the batch's creator (24 hex), when known
    title: str
    message: str
    priority: str
    entity_type: str | None = None
    entity_id: str | None = None
    about: dict[str, Any] = {}
    created_at: float = 0.0

    @property
    def object_id(self) -> bytes:
        return bytes.fromhex(self.id.removeprefix("msg_"))

    def webhook_body(self) -> bytes:
        """Standard Webhooks' `{type, timestamp, data}`."""
        stamp = dt.datetime.fromtimestamp(self.created_at, dt.UTC).isoformat().replace("+00:00", "Z")
        data = {"id": self.id, "user_id": self.user_id, "entity_type": self.entity_type, "entity_id": self.entity_id,
                "title": self.title, "message": self.message, "priority": self.priority, **self.about}
        return _encode({"type": self.type, "timestamp": stamp, "data": data})


def event_id(*parts: Any) -> str:
    return "msg_" + hashlib.sha256(_encode(list(parts))).hexdigest()[:24]


def object_id(value: Any) -> str | None:
    """A CRM user or record id as the backend stores it (24 hex), else None: never guessed."""
    return value.lower() if isinstance(value, str) and _OBJECT_ID.fullmatch(value.lower()) else None


def shown(text: Any, limit: int = LABEL_MAX) -> str:
    """Record or model text as it may appear in a notification: one line, bounded."""
    words = _CONTROL.sub(" ", str(text or "")).strip()
    return words if len(words) <= limit else words[: limit - 1].rstrip() + "…"


def batch_finished(batch_id: str, task: str, counts: Mapping[str, int], cancelled: bool, creator: str | None,
                   now: float) -> Event:
    """A batch ended (completed or cancelled): to its creator, with its counts."""
    done, failed = counts.get("succeeded", 0), counts.get("failed", 0)
    words = f"{done} succeeded, {failed} failed" + (f", {counts.get('cancelled', 0)} cancelled" if counts.get("cancelled") else "")
    return Event(id=event_id(BATCH_FINISHED, batch_id), type=BATCH_FINISHED, crm_type="batch_completed",
                 user_id=creator, title="Batch cancelled" if cancelled else "Batch finished",
                 message=f"Your {task} batch {'was cancelled' if cancelled else 'finished'}: {words}",
                 priority="medium" if failed else "low",
                 about={"batch_id": batch_id, "task": task, "status": "cancelled" if cancelled else "completed",
                        "counts": dict(counts)}, created_at=now)


BATCH_FINISHED = "batch.finished"
