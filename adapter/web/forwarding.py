"""Forwarding headers: which peers' are believed, and what the backend is told (FORWARDED_ALLOW_IPS).

`X-Forwarded-For`/`-Proto`/`-Host` (and the rest of `X-Forwarded-*`), `Forwarded` and `X-Real-IP`
are claims any client can make. They are believed only from a peer in FORWARDED_ALLOW_IPS: an
ingress that set them itself (uvicorn's convention and default, `127.0.0.1`; `*` for any peer).
From any other peer they are ignored where the sidecar needs the public origin (a rewritten
`Location`) and stripped before the backend. Either way the sidecar sets `X-Forwarded-For`,
`-Proto` and `-Host` itself, as nginx does: the trusted chain with the peer appended
(`proxy_add_x_forwarded_for`), and the public scheme and host.

The decision is made here only. uvicorn's own proxy_headers middleware stays off (servers.py):
it would rewrite the scope's client and scheme from the same headers by its own reading.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from litestar.types import Scope

from ..settings import IPNetwork

# The headers that claim something about an earlier hop, besides every `x-forwarded-*` (names as ASGI holds them).
_CLAIMS = frozenset({b"forwarded", b"x-real-ip"})
# What the sidecar sets itself, from what it saw and what it believed.
_SET_HERE = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
_PUBLIC_SCHEMES = ("http", "https")


class Forwarding:
    def __init__(self, forwarders: tuple[IPNetwork, ...] | None) -> None:
        """`forwarders`: the trusted peers' networks (`Settings.forwarders`); None trusts every peer."""
        self._forwarders = forwarders
        # Peers are few (an ingress's addresses) and parsing one costs more than the lookup.
        self._trusts = lru_cache(maxsize=1024)(self._decide)

    def _decide(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False  # not an IP peer (a Unix socket's): nothing to match it against
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
        return any(address in network for network in self._forwarders or ())

    def trusted(self, scope: Scope) -> bool:
        """Whether the peer that sent this request is one whose forwarding headers are believed."""
        if self._forwarders is None:
            return True
        client = scope.get("client")
        return bool(client) and self._trusts(client[0])

    def origin(self, scope: Scope, trusted: bool | None = None) -> tuple[str, str]:
        """The public (scheme, host) the caller used: a trusted peer's `X-Forwarded-Proto`/`-Host`,
        else the request's own scheme and `Host` ("" when there is none)."""
        if trusted is None:
            trusted = self.trusted(scope)
        scheme = scope.get("scheme", "http")
        host = proto = forwarded_host = b""
        for k, v in scope["headers"]:  # one pass: this runs on every pass-through request
            if k == b"host":
                host = host or v
            elif trusted and k == b"x-forwarded-proto":
                proto = proto or v
            elif trusted and k == b"x-forwarded-host":
                forwarded_host = forwarded_host or v
        public = proto.split(b",")[0].strip().lower().decode("latin-1") or scheme
        return (public if public in _PUBLIC_SCHEMES else scheme), \
            (forwarded_host.split(b",")[0].strip() or host).decode("latin-1")

    def upstream_headers(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`headers` (the request's, hop-by-hop ones gone) as the backend gets them.

        A trusted peer's forwarding headers go on, its `X-Forwarded-For` chain with the peer appended;
        an untrusted peer's are dropped, and the chain starts at the peer. `X-Forwarded-Proto`/`-Host`
        are the public origin either way.
        """
        trusted = self.trusted(scope)
        if trusted:
            out = [(k, v) for k, v in headers if k not in _SET_HERE]
            chain = b", ".join(v for k, v in scope["headers"] if k == b"x-forwarded-for")
        else:
            out = [(k, v) for k, v in headers if not (k in _CLAIMS or k.startswith(b"x-forwarded-"))]
            chain = b""
        if client := scope.get("client"):
            peer = client[0].encode("latin-1")
            chain = chain + b", " + peer if chain else peer
        if chain:
            out.append((b"X-Forwarded-For", chain))
        proto, host = self.origin(scope, trusted)
        out.append((b"X-Forwarded-Proto", proto.encode("latin-1")))
        if host:
            out.append((b"X-Forwarded-Host", host.encode("latin-1")))
        return out
