"""Who is calling: the bearer token, read once per request into a `Caller` dependency.

The CRM backend verifies the token on every request the sidecar makes for the caller. With
CRM_JWT_SECRET set, the sidecar verifies it first too: an expired or badly signed token is
refused before any upstream call, and its verified `sub` names the user for rate limiting.
Without it, the user is a hash of the token: identity the sidecar did not verify is never
taken from the token's claims.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import jwt
from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide

from ..errors import Unauthenticated


@dataclass(frozen=True, slots=True)
class Caller:
    authorization: str  # the header as sent: forwarded to the CRM backend, never logged
    sub: str | None  # the verified subject, when CRM_JWT_SECRET is set
    user: str  # the rate-limit key: `sub:<sub>`, else `tok:<hash of the token>`


def user_key(token: str, verified_sub: str | None) -> str:
    """Whose budget a request spends: every per-user limit (rate limits, CRM reads, open streams,
    running batches) is keyed by this, and job and batch tokens carry it.

    The verified `sub` when CRM_JWT_SECRET checked the signature. Otherwise the token itself,
    hashed: the CRM backend verifies it on the record read that every AI route makes first, and a
    token it refuses ends there (a batch stops reading at the first 401). The `sub` inside an
    unverified token is never used, not even once the CRM has accepted the token: the budgets are
    charged before the CRM is asked (its reads are what they protect), and a key taken from a claim
    nobody checked would let anyone spend, and exhaust, another user's budget. The price: without
    CRM_JWT_SECRET a person holding several tokens has a budget per token; set it to bound people.
    """
    if verified_sub:
        return f"sub:{verified_sub}"
    return "tok:" + hashlib.sha256(token.encode()).hexdigest()[:32]


def read_caller(authorization: str, secret: str | None) -> Caller:
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("an `Authorization: Bearer <token>` header is required")
    sub = None
    if secret:
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the bearer token has expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the bearer token is not valid: {exc}") from None
        sub = str(claims["sub"])
    return Caller(authorization=authorization, sub=sub, user=user_key(token, sub))


def provide_caller(request: Request, state: State) -> Caller:
    return read_caller(request.headers.get("authorization", ""), state.settings.crm_jwt_secret)


# Declared once, on the routers whose every route acts for a caller. Called in the event loop
# (`sync_to_thread=False`): it does no I/O, and a worker thread cost a cache hit more than a tenth of its time.
CALLER = {"caller": Provide(provide_caller, sync_to_thread=False)}
