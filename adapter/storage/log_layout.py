"""Where a log lives in Redis, how its metadata encodes each kind, and how what is read back is checked.

Layout, per log (every key expires with the log's retention), the same for every kind:
  <prefix>:job:{<id>}           hash: task, record_id, key, expires, mode, input, owner (+ digest)
  <prefix>:job:{<id>}:log       stream: one entry per event, with the explicit id `<n>-0`
  <prefix>:job:{<id>}:lease     the owner's replica id, with a short TTL the owner renews
  <prefix>:job:{<id>}:handover  written once when a runner hands the log over
  (batch_store.py adds `:inputs` and `:cancel` under the same tag)
`{<id>}` is a hash tag (issue 24): in a Redis Cluster every key of one log is in one slot, so the
append and takeover scripts, which name three of them, never cross slots. The release before
issue 24 rendered the id bare: a log it wrote is not found by this one (a rolling upgrade from it
serves each job on the replicas of the release that made it). The prefix stays `job` for every
kind, and a batch's metadata stays what the release before kept (mode "batch", its spec as JSON in
`input`). In memory a batch is its own kind (event_log.Batch), never a `Job`.

What a replica reads back is checked (signing.py): the metadata carries a MAC over its fields
(`sig`; not over `owner`, which only says who writes), each stream entry one over its id, name
and data (`s`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from ..errors import JobLogTampered
from .event_log import Batch, Job, Log
from .keys import CacheKey
from .redis_store import RedisStore
from .signing import Tampered

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

def log_key(prefix: str, log_id: str, part: str = "") -> str:
    """The one rendering of a log's keys: its metadata (`part` empty), or `:log`, `:lease`, ... under its hash tag."""
    return f"{prefix}:job:{{{log_id}}}{':' + part if part else ''}"


# The metadata fields the `sig` field's MAC covers, in this order.
SIGNED_META = ("task", "record_id", "key", "expires", "mode", "input")
BATCH_MODE = "batch"  # a batch's `mode` in Redis, as the release before wrote it


@dataclass(frozen=True, slots=True)
class Timing:
    """How long a log is kept (`ttl`), how long its owner's lease lasts, and how Redis faults are backed off."""

    ttl: float
    lease: float

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    @property
    def lease_ms(self) -> int:
        return max(int(self.lease * 1000), 100)

    @property
    def backoff_cap(self) -> float:
        return min(max(self.lease / 3, 0.2), 2.0)


class Layout:
    """Key names and codecs of the logs under one store's prefix."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.prefix = store.prefix
        self.signer = store.signer

    def meta(self, log_id: str) -> str:
        return log_key(self.prefix, log_id)

    def log(self, log_id: str) -> str:
        return log_key(self.prefix, log_id, "log")

    def lease(self, log_id: str) -> str:
        return log_key(self.prefix, log_id, "lease")

    def nudge(self, log_id: str) -> str:
        # Written once when a runner hands the log over: its followers wake at once instead of at their next block.
        return log_key(self.prefix, log_id, "handover")

    # --- metadata ---------------------------------------------------------------------------

    def meta_fields(self, log: Log, owner: str) -> dict[str, str | bytes]:
        """The metadata hash of a log, signed, with its owner."""
        if isinstance(log, Batch):
            spec = _encode({"ids": log.ids, "options": log.options, "user": log.user}).decode()
            meta: dict[str, str | bytes] = {"task": log.task, "record_id": "", "key": "", "expires": repr(log.expires),
                                            "mode": BATCH_MODE, "input": spec}
        else:
            assert isinstance(log, Job)
            meta = {"task": log.task, "record_id": log.record_id, "key": log.key.redis_key if log.key is not None else "",
                    "expires": repr(log.expires), "mode": log.mode, "input": log.agent_input}
        meta["sig"] = self.signer.mac(self.meta(log.id), *(str(meta[f]).encode() for f in SIGNED_META))
        if isinstance(log, Job) and log.key is not None:
            # The key's parts, so a replica reading the job back never parses "key" apart. Not signed
            # itself (older releases sign the fields above): `checked_meta` checks it renders to the signed "key".
            meta["digest"] = log.key.digest
        meta["owner"] = owner
        return meta

    def checked_meta(self, log_id: str, raw: dict[bytes, bytes]) -> dict[str, str]:
        """The log's metadata once its MAC checks out; else reported, and raised as JobLogTampered."""
        fields = {k.decode(errors="replace"): v for k, v in raw.items()}
        try:
            self.signer.check(fields.get("sig"), self.meta(log_id), *(fields.get(f, b"") for f in SIGNED_META))
            if "digest" in fields and _key_of(self.prefix, fields).redis_key.encode() != fields.get("key"):
                raise Tampered("digest-mismatch")  # unsigned itself: the key's parts must render to the signed key
        except Tampered as exc:
            self.store.tampering("job-log", self.meta(log_id), exc.reason, b"\0".join(sorted(k + b"=" + v for k, v in raw.items())),
                                 effect="the job is answered as job-log-tampered (502)")
            raise JobLogTampered(f"job {log_id}'s metadata in Redis failed its integrity check (REDIS_SIGNING_KEY): "
                                 "it was changed outside the sidecar, or signed with a key this replica does not accept; "
                                 "start the job again") from None
        return {k: v.decode(errors="replace") for k, v in fields.items() if k != "sig"}  # `owner` is not signed

    def log_of(self, log_id: str, m: dict[str, str]) -> Log:
        """The local copy a log's (checked) metadata describes: a `Batch` or a `Job`, by its mode."""
        if m.get("mode") == BATCH_MODE:
            spec: dict[str, Any] = _decode(m.get("input", "{}"))
            return Batch(id=log_id, task=m["task"], expires=float(m["expires"]), ids=list(spec.get("ids", [])),
                         options=dict(spec.get("options", {})), user=str(spec.get("user", "")))
        # No "digest": written by a release that kept only the rendered key; a job resumed from it
        # has its key derived again (pipeline/jobs.py `resume`).
        key = _key_of(self.prefix, m) if "digest" in m else None
        return Job(id=log_id, task=m["task"], record_id=m["record_id"], key=key, expires=float(m["expires"]),
                   agent_input=m.get("input", ""), mode=m.get("mode", "default"))  # type: ignore[arg-type]

    @staticmethod
    def refresh(log: Log, m: Mapping[str, str]) -> None:
        """A log taken over: what its (checked) metadata says now stands (a job's input and mode)."""
        if isinstance(log, Job):
            log.agent_input, log.mode = m.get("input", log.agent_input), m.get("mode", log.mode)  # type: ignore[assignment]

    # --- stream entries ---------------------------------------------------------------------

    def entry_mac(self, log_id: str, seq: int, event: bytes, data: bytes) -> bytes:
        # The entry's id is in the MAC: a valid entry moved to another place in the log fails its check.
        return self.signer.mac(self.log(log_id), b"%d" % seq, event, data)


def seq_of(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def _key_of(prefix: str, m: Mapping[str, str] | Mapping[str, bytes]) -> CacheKey:
    """The cache key a job's metadata names, from its parts (task, digest): never parsed from "key"."""
    task, digest = m.get("task", ""), m["digest"]
    return CacheKey(prefix, *(part.decode(errors="replace") if isinstance(part, bytes) else part for part in (task, digest)))
