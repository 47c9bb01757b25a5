"""Job tokens: signed, job-scoped, short-lived. They go in `events_url`, never the user's JWT.

A token also names the user who created the job (`usr`: the `Caller.user` key, never a claim
read from an unverified bearer), so an EventSource reading with it counts against that user's
limits (MAX_STREAMS_PER_USER) like a reader sending the bearer itself.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

import jwt

AUDIENCE = "crm-ai-job"


@dataclass(frozen=True, slots=True)
class Scope:
    job: str
    user: str  # whose limits a reader with this token counts against


class JobTokens:
    def __init__(self, secret: str | None, ttl: float, *, previous: str | None = None) -> None:
        self._secret = secret or secrets.token_urlsafe(48)
        # Rotation without downtime: tokens are issued under `secret` only, and accepted under either,
        # so a token another replica issued before the roll keeps working until it expires.
        self._accepted = (self._secret,) if previous is None else (self._secret, previous)
        self.ttl = ttl

    def issue(self, job_id: str, user: str, *, expires: dt.datetime | None = None) -> tuple[str, dt.datetime]:
        """A token for one job (or batch: the same log) of `user`, valid JOB_TOKEN_TTL or until `expires`."""
        expires = expires or dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=self.ttl)
        claims = {"job": job_id, "usr": user, "exp": expires, "aud": AUDIENCE}
        return jwt.encode(claims, self._secret, algorithm="HS256"), expires

    def scope_of(self, token: str) -> Scope | None:
        """The job a valid token is for, and its user; None when expired, forged or not a job token."""
        for secret in self._accepted:
            try:
                claims = jwt.decode(token, secret, algorithms=["HS256"], audience=AUDIENCE)
                break
            except jwt.InvalidSignatureError:
                continue  # perhaps signed with the other accepted secret
            except jwt.PyJWTError:
                return None
        else:
            return None
        job, user = claims.get("job"), claims.get("usr")
        if not isinstance(job, str):
            return None
        # A token issued before tokens named their user (a rolling upgrade) counts against its job alone.
        return Scope(job, user if isinstance(user, str) and user else f"job:{job}")

    def job_of(self, token: str) -> str | None:
        """The job a valid token is for, or None (expired, forged, not a job token)."""
        scope = self.scope_of(token)
        return scope.job if scope is not None else None
