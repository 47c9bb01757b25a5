"""`adapter check`: configuration and every dependency, one clear line per problem."""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

import httpx

from .agents import AGENT_IDS, load_tasks
from .app import redis_client
from .settings import ConfigError, Settings


async def run_checks(settings: Settings, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    problems: list[str] = []

    def ok(line: str) -> None:
        print(f"ok    {line}", file=out)

    try:
        tasks = load_tasks(settings.conductor_agents_dir)
        ok(f"agent definitions in {settings.conductor_agents_dir}: " + ", ".join(f"{t.agent_id} {t.version}" for t in tasks.values()))
    except ConfigError as exc:
        problems.append(str(exc))

    timeout = httpx.Timeout(settings.health_probe_timeout)
    async with httpx.AsyncClient(timeout=timeout) as client:
        async def probe(name: str, url: str) -> httpx.Response | None:
            try:
                response = await client.get(url)
            except httpx.HTTPError as exc:
                problems.append(f"{name} unreachable at {url}: {type(exc).__name__} {exc}".strip())
                return None
            if response.status_code != 200:
                problems.append(f"{name} at {url} answered {response.status_code}: {response.text[:120]}")
                return None
            ok(f"{name} at {url}")
            return response

        gateway = settings.conductor_gateway_url.rstrip("/")
        health, crm, listing = await asyncio.gather(
            probe("Conductor Gateway", f"{gateway}/health"),
            probe("CRM backend", f"{settings.crm_backend_url.rstrip('/')}/health"),
            probe("Conductor Gateway agent list", f"{gateway}/api/agents"),
        )
    if listing is not None:
        try:
            listed = {str(a.get(k)) for a in listing.json() for k in ("agent_id", "id", "name") if a.get(k)}
        except (ValueError, AttributeError, TypeError):
            listed = set()
            problems.append(f"Conductor Gateway at {gateway}/api/agents did not answer a list of agents")
        for agent in AGENT_IDS:
            if agent in listed:
                ok(f"the gateway knows agent {agent}")
            elif listed:
                problems.append(f"the gateway does not know agent {agent}: copy conductor-agents/{agent}/ into the Conductor's agents")

    if settings.redis_url:
        redis = redis_client(settings.redis_url)
        try:
            await redis.ping()
            ok(f"Redis at {settings.redis_url}")
        except Exception as exc:  # any failure to ping is the one line we owe
            problems.append(f"Redis unreachable at {settings.redis_url}: {type(exc).__name__}: {exc}")
        finally:
            await redis.aclose()
    else:
        ok("REDIS_URL unset: a bounded in-process cache (no sharing between replicas)")

    for line in problems:
        print(f"FAIL  {line}", file=err)
    return 1 if problems else 0
