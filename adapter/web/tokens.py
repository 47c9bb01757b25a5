"""Job tokens: signed, job-scoped, short-lived. They go in `events_url`, never the user's JWT."""

from __future__ import annotations

import datetime as dt
import secrets

import jwt

AUDIENCE = "crm-ai-job"


class JobTokens:
    def __init__(self, secret: str | None, ttl: float) -> None:
        self._secret = secret or secrets.token_urlsafe(48)
        self.ttl = ttl

    def issue(self, job_id: str, *, expires: dt.datetime | None = None) -> tuple[str, dt.datetime]:
        """A token for one job (or batch: the same log), valid JOB_TOKEN_TTL or until `expires`."""
        expires = expires or dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=self.ttl)
        return jwt.encode({"job": job_id, "exp": expires, "aud": AUDIENCE}, self._secret, algorithm="HS256"), expires

    def job_of(self, token: str) -> str | None:
        """The job a valid token is for, or None (expired, forged, not a job token)."""
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"], audience=AUDIENCE)
        except jwt.PyJWTError:
            return None
        job = claims.get("job")
        return job if isinstance(job, str) else None
