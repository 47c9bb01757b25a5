"""Forwarding headers are believed from trusted peers only (FORWARDED_ALLOW_IPS; issue 22 §6).

The sidecar runs over TCP and the test connects from 127.0.0.1: trusted under the default
(`127.0.0.1`), `*` or a network holding it, untrusted under FORWARDED_ALLOW_IPS=10.0.0.0/8.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from adapter.app import create_app
from adapter.settings import ConfigError
from adapter.web.forwarding import Forwarding
from tests.echo_backend import EchoBackend
from tests.helpers import closed_port_url, make_settings, serving

UNTRUSTED = "10.0.0.0/8"  # the test's peer, 127.0.0.1, is not in it
CLAIMS = [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-Proto", "https"),
          ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Port", "443"), ("Forwarded", "for=203.0.113.9;host=evil.example"),
          ("X-Real-IP", "203.0.113.9")]


@asynccontextmanager
async def sidecar(backend, **overrides) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """The sidecar over TCP, with the clients it builds itself, in front of `backend`; yields (client, its URL)."""
    async with serving(backend) as backend_url:
        app = create_app(make_settings(crm_backend_url=backend_url, conductor_gateway_url=closed_port_url(), **overrides))
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client, url


def sent(echo: EchoBackend) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for k, v in echo.seen[-1]["headers"]:
        headers.setdefault(k.lower(), []).append(v)
    return headers


async def test_an_untrusted_peers_forwarding_headers_never_reach_the_backend():
    echo = EchoBackend()
    async with sidecar(echo, forwarded_allow_ips=UNTRUSTED) as (client, url):
        r = await client.get("/api/v1/companies", headers=CLAIMS)
    assert r.status_code == 200
    headers = sent(echo)
    # What the sidecar saw, and nothing the caller claimed.
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"] and headers["x-forwarded-host"] == [url.removeprefix("http://")]
    assert not {"forwarded", "x-real-ip", "x-forwarded-port"} & set(headers), headers


@pytest.mark.parametrize("allow", ["127.0.0.1", "*", "10.0.0.0/8, 127.0.0.0/8"])
async def test_a_trusted_peers_chain_is_appended_to_and_its_headers_go_on(allow):
    echo = EchoBackend()
    async with sidecar(echo, forwarded_allow_ips=allow) as (client, _):
        r = await client.get("/api/v1/companies", headers=CLAIMS)
    assert r.status_code == 200
    headers = sent(echo)
    assert headers["x-forwarded-for"] == ["203.0.113.9, 198.51.100.7, 127.0.0.1"]  # as nginx's proxy_add_x_forwarded_for
    assert headers["x-forwarded-proto"] == ["https"] and headers["x-forwarded-host"] == ["evil.example"]
    assert headers["forwarded"] == ["for=203.0.113.9;host=evil.example"] and headers["x-real-ip"] == ["203.0.113.9"]
    assert headers["x-forwarded-port"] == ["443"]


async def redirect_as_the_forwarded_scheme(scope, receive, send) -> None:
    """A backend that believes X-Forwarded-Proto from its peer, as uvicorn does from 127.0.0.1: its
    trailing-slash redirect names its own host with the public scheme (the fidelity rig's real CRM)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = dict(scope["headers"])
    proto = headers.get(b"x-forwarded-proto", b"http").decode()
    location = f"{proto}://{headers[b'host'].decode()}{scope['path']}/"
    await send({"type": "http.response.start", "status": 307, "headers": [(b"location", location.encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(("allow", "trusted"), [(UNTRUSTED, False), ("127.0.0.1", True)])
async def test_a_redirect_in_the_public_scheme_is_still_on_the_sidecars_origin(allow, trusted):
    async with sidecar(redirect_as_the_forwarded_scheme, forwarded_allow_ips=allow) as (client, url):
        r = await client.get("/api/v1/leads", headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "crm.example.com"})
    assert r.status_code == 307
    assert r.headers["location"] == ("https://crm.example.com/api/v1/leads/" if trusted else f"{url}/api/v1/leads/")


@pytest.mark.parametrize(("allow", "trusted"), [(UNTRUSTED, False), ("127.0.0.1", True)])
async def test_a_redirect_names_a_forwarded_host_only_for_a_trusted_peer(crm, seed, allow, trusted):
    auth = {"Authorization": f"Bearer {seed['token']}"}
    async with sidecar(crm.app, forwarded_allow_ips=allow) as (client, url):
        r = await client.get("/api/v1/leads", headers={**auth, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"})
    assert r.status_code == 307  # the backend's redirect to its collection path, on its own origin
    assert r.headers["location"] == ("https://evil.example/api/v1/leads/" if trusted else f"{url}/api/v1/leads/")


@pytest.mark.parametrize("value", ["nginx", "10.0.0.1/8", "10.0.0.0/33", "127.0.0.1;10.0.0.1"])
def test_a_forwarded_allow_ips_that_is_not_addresses_stops_start_up_naming_it(value):
    with pytest.raises(ConfigError) as refused:
        make_settings(forwarded_allow_ips=value)
    assert str(refused.value).startswith("FORWARDED_ALLOW_IPS: must be `*` or comma-separated IP addresses or networks")


@pytest.mark.parametrize(("peer", "trusted"), [
    ("127.0.0.1", True), ("10.1.2.3", True), ("::ffff:10.1.2.3", True),  # a dual-stack listener's view of an IPv4 peer
    ("::1", False), ("192.0.2.1", False), ("/run/sidecar.sock", False), (None, False),
])
def test_the_trust_decision_reads_the_peer_as_an_address(peer, trusted):
    forwarding = Forwarding(make_settings(forwarded_allow_ips="127.0.0.1, 10.0.0.0/8").forwarders)
    scope = {"type": "http", "headers": [], "client": (peer, 1234) if peer else None}
    assert forwarding.trusted(scope) is trusted  # type: ignore[arg-type]
    assert Forwarding(None).trusted(scope)  # type: ignore[arg-type]  # `*`
