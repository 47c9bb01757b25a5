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
    def redis_key(self) -> str:
        """The one rendering of a cache key. Entries are signed over it: changing it moves every entry.

        Redis Cluster (issue 24) will put a hash tag here (`{digest}`), so the entry, its flight lock
        and its job claim land in one slot; storage builds those side keys from the same parts.
        """
        return f"{self.prefix}:result:{self.task}:{self.digest}"

    def __str__(self) -> str:  # log lines and task names show the key as Redis has it
        return self.redis_key
