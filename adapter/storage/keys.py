"""The key of one cached answer: what it is for, kept as a value and rendered to Redis in one place.

The pipeline derives it (pipeline/cache.py `cache_key`: the digest commits to the task's agent, its
version, the record and the rendered input); storage renders it and names its side keys (the flight
lock, a job's claim on the question) after its parts. Nothing reads a rendered key back apart: code
that needs the task or the digest takes it from this object.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CacheKey:
    prefix: str  # CACHE_PREFIX: every key of one deployment starts with it
    task: str  # the task's name (`<record kind>.<verb>`): per-task metrics and the task's result reader use it
    digest: str  # 40 hex digits: the question itself (agent, version, record id, input)

    @property
    def tag(self) -> str:
        """The question's hash tag: in a Redis Cluster, the entry and every side key of it hash to one slot
        (issue 24). Redis hashes only what is inside the first `{...}` of a key; a prefix has no braces."""
        return f"{{{self.digest}}}"

    @property
    def redis_key(self) -> str:
        """The one rendering of a cache key. Entries are signed over it: changing it moves every entry
        (the hash tag did, once: the release before issue 24 rendered the digest bare)."""
        return f"{self.prefix}:result:{self.task}:{self.tag}"

    # Its side keys, rendered here too and under the same tag, so a command or script naming the entry and
    # any of them never crosses slots (tests/test_redis_ha.py checks each with CLUSTER KEYSLOT).
    @property
    def lock_key(self) -> str:
        """The single-flight lock: who asks the model for this question now."""
        return f"{self.prefix}:lock:{self.tag}"

    @property
    def channel(self) -> str:
        """Where the flight's holder announces its outcome (pub/sub)."""
        return f"{self.prefix}:flight:{self.tag}"

    def outcome_key(self, holder: str) -> str:
        """The outcome the holder `holder` (the lock's value) left for its followers."""
        return f"{self.prefix}:outcome:{self.tag}:{holder}"

    @property
    def claim_key(self) -> str:
        """Which job answers this question across replicas (the job log's claim)."""
        return f"{self.prefix}:jobkey:{self.tag}"

    def __str__(self) -> str:  # log lines and task names show the key as Redis has it
        return self.redis_key
