"""`adapter check`: configuration and every dependency, one clear line per problem."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TextIO

import httpx

from .agent_sync import drift, local_agents
from .storage.connect import describe
from .storage.redis_store import redis_client
from .tasks import TASKS
from .upstreams.gateway import GatewayClient, listed_agents
from .settings import ConfigError, Settings, redact_url


async def run_checks(settings: Settings, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    problems: list[str] = []

    def ok(line: str) -> None:
        print(f"ok    {line}", file=out)

    try:
        tasks = TASKS.load(settings.conductor_agents_dir)
        ok(f"agent definitions in {settings.conductor_agents_dir}: " + ", ".join(f"{t.agent_id} {t.version}" for t in tasks.values()))
    except ConfigError as exc:
        problems.append(str(exc))

    # What the real gateway refuses without (checked when the settings were read; said here so an
    # operator sees what every run carries).
    ok(f"runs carry screenplay_id={settings.conductor_screenplay_id} (CONDUCTOR_SCREENPLAY_ID) and "
       f"cwd={settings.conductor_cwd} (CONDUCTOR_CWD)")

    timeout = httpx.Timeout(settings.health_probe_timeout)
    gateway_url = settings.conductor_gateway_url.rstrip("/")
    async with httpx.AsyncClient(timeout=timeout) as client, \
            httpx.AsyncClient(base_url=gateway_url, timeout=timeout) as gateway_http:
        async def probe(name: str, url: str) -> httpx.Response | None:
            shown = redact_url(url)
            try:
                response = await client.get(url)
            except httpx.HTTPError as exc:
                problems.append(f"{name} unreachable at {shown}: {type(exc).__name__} {exc}".strip())
                return None
            if response.status_code != 200:
                problems.append(f"{name} at {shown} answered {response.status_code}: {response.text[:120]}")
                return None
            ok(f"{name} at {shown}")
            return response

        gateway = GatewayClient(gateway_http, settings)
        health, crm, listing = await asyncio.gather(
            probe("Conductor Gateway", f"{gateway_url}/health"),
            probe("CRM backend", f"{settings.crm_backend_url.rstrip('/')}/health"),
            probe("Conductor Gateway agent list", f"{gateway_url}/api/agents"),
        )
        if listing is not None:
            await _check_agents(gateway, settings, listing, ok, problems)

    if (target := settings.redis) is not None:
        redis = redis_client(target)
        try:
            # The server, the master the sentinels name, or the cluster's masters and state (connect.py).
            ok(await describe(redis, target))
        except Exception as exc:  # any failure to reach it is the one line we owe
            what = {"single": "Redis", "sentinel": f"Redis master {target.master!r} via Sentinel", "cluster": "Redis Cluster"}[target.mode]
            problems.append(f"{what} unreachable at {target.shown}: {type(exc).__name__}: {exc}")
        finally:
            await redis.aclose()
    else:
        ok("REDIS_URL unset: a bounded in-process cache (no sharing between replicas)")
    # What `adapter serve` would refuse although every variable alone is valid (REDIS_SIGNING_KEY).
    problems.extend(settings.serving_problems())

    for line in problems:
        print(f"FAIL  {line}", file=err)
    return 1 if problems else 0


async def _check_agents(gateway: GatewayClient, settings: Settings, listing: httpx.Response,
                        ok: Callable[[str], None], problems: list[str]) -> None:
    """Each agent listed by id (a listed `name` proves nothing: execute looks agents up by id),
    with the persona the gateway holds compared to the one in CONDUCTOR_AGENTS_DIR."""
    try:
        listed = listed_agents(listing.json())
    except ValueError:
        problems.append("the Conductor Gateway's /api/agents did not answer a list of agents")
        return
    try:
        local = {a.agent_id: a for a in local_agents(settings.conductor_agents_dir, TASKS.agent_ids)}
    except ConfigError:
        local = {}  # already reported with the definitions
    for agent in TASKS.agent_ids:
        if agent not in listed:
            problems.append(f"the gateway does not know agent {agent}: run `adapter agents sync`")
            continue
        if agent not in local:
            ok(f"the gateway knows agent {agent}")
            continue
        try:
            differs = await drift(gateway, local[agent], listed[agent])
        except httpx.HTTPError as exc:
            problems.append(f"cannot read agent {agent}'s persona from the gateway: {type(exc).__name__} {exc}".strip())
            continue
        if differs:
            problems.append(f"agent {agent} on the gateway differs from conductor-agents/{agent}/ "
                            f"({', '.join(differs)}): run `adapter agents sync`")
        else:
            ok(f"the gateway knows agent {agent}, with the same persona")
