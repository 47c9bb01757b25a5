"""JOB_TOKEN_SECRET rotates without downtime: tokens are issued under the current secret and read
under it or JOB_TOKEN_SECRET_PREVIOUS, so a token a replica issued before the roll keeps working."""

from __future__ import annotations

import datetime as dt

import pytest

from adapter.settings import ConfigError, Settings
from adapter.web.tokens import JobTokens

OLD, NEW, OTHER = "o" * 32, "n" * 32, "x" * 32


def test_a_token_issued_under_either_accepted_secret_is_read_and_no_other():
    issued_before, _ = JobTokens(OLD, 60).issue("job-1", "alice")
    # Step 1 of the README's rotation: replicas keep issuing under OLD and already accept NEW.
    step1 = JobTokens(OLD, 60, previous=NEW)
    # Step 2: replicas issue under NEW and still accept OLD.
    step2 = JobTokens(NEW, 60, previous=OLD)
    issued_after, _ = step2.issue("job-2", "bob")
    assert step2.scope_of(issued_before).job == "job-1" and step2.scope_of(issued_before).user == "alice"
    assert step1.scope_of(issued_after).job == "job-2"  # a replica not yet rolled reads the new tokens
    # Step 3: the previous secret is gone, and with it the tokens only it signed.
    assert JobTokens(NEW, 60).scope_of(issued_before) is None
    assert JobTokens(NEW, 60, previous=OTHER).scope_of(issued_before) is None


def test_an_expired_token_is_refused_under_the_previous_secret_too():
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    expired, _ = JobTokens(OLD, 60).issue("job-1", "alice", expires=past)
    assert JobTokens(NEW, 60, previous=OLD).scope_of(expired) is None


def test_a_previous_secret_needs_a_current_one():
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"JOB_TOKEN_SECRET_PREVIOUS": OLD})
    assert str(refused.value) == "JOB_TOKEN_SECRET_PREVIOUS: is only accepted beside JOB_TOKEN_SECRET (the secret that issues)"
    assert OLD not in str(refused.value)
    assert Settings.from_env({"JOB_TOKEN_SECRET": NEW, "JOB_TOKEN_SECRET_PREVIOUS": OLD}).job_token_secret_previous == OLD
