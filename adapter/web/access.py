"""Who may read a log (a job's, a batch's): written once for both kinds.

A reader brings the log's own token (`?token=` from its events_url: EventSource cannot send
headers) or a bearer token. A job's token may also come as the bearer. Without the log's token,
the bearer must be one the log's kind accepts: for a job, one the CRM backend lets read the job's
record (pipeline/jobs.py `check_reader`); for a batch, its creator's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from litestar import Request

from ..errors import Forbidden, Unauthenticated
from ..storage.event_log import Log
from .auth import Caller, read_caller
from .tokens import JobTokens


@dataclass(frozen=True, slots=True)
class Access:
    noun: str  # "job", "batch": in the problems' details
    missing: str  # the 401's detail when neither token came
    token_as_bearer: bool  # the log's token may come as `Authorization: Bearer` (a job's may)
    # (the log, the bearer as a Caller) -> the user the reader counts as; raises Forbidden
    bearer: Callable[[Log, Caller], Awaitable[str]]


async def authorized(request: Request, log: Log, tokens: JobTokens, access: Access, jwt_secret: str | None, *,
                     bearer_only: bool = False) -> str:
    """The user the reader counts as (the token's creator, or the bearer's), or the problem saying why not.

    `bearer_only`: the log's token does not do (cancelling a batch takes its creator)."""
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    bearer = bearer.strip() if scheme.lower() == "bearer" else ""
    token = "" if bearer_only else request.query_params.get("token") or (bearer if access.token_as_bearer else "")
    if token:
        scoped = tokens.scope_of(token)
        if scoped is not None and scoped.job == log.id:
            return scoped.user
        if scoped is not None:
            raise Forbidden(f"this {access.noun} token is for another {access.noun}")
        if not (access.token_as_bearer and token == bearer):
            raise Forbidden(f"the {access.noun} token is invalid or expired")
    elif not bearer:
        raise Unauthenticated(access.missing)
    return await access.bearer(log, read_caller(f"Bearer {bearer}", jwt_secret))
