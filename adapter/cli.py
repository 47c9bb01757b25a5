"""The `adapter` command: serve, demo, openapi, generate, check, agents sync, webhooks replay."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import structlog

from .servers import CannotListen
from .settings import ConfigError, Settings, redact_url


def _settings(**overrides: object) -> Settings:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    return Settings.from_env(env)


def cmd_serve(args: argparse.Namespace) -> int:
    from . import logs, servers
    from .app import create_app

    settings = _settings(ADAPTER_HOST=args.host, ADAPTER_PORT=args.port, ADAPTER_WORKERS=args.workers)
    if problems := settings.serving_problems():
        raise ConfigError(*problems)
    logs.configure(settings.log_level, settings.log_format)
    # Bound before uvicorn starts: a taken port is one line naming --port, not a logged traceback.
    sock = servers.bind(settings.adapter_host, settings.adapter_port)
    # SIGTERM drains the jobs first (SHUTDOWN_GRACE_SECONDS), then uvicorn's own graceful stop.
    options = dict(graceful=settings.shutdown_grace_seconds, keepalive=settings.keepalive_seconds, loop="auto")
    if settings.adapter_workers == 1:
        servers.server(create_app(settings), **options).run(sockets=[sock])
        return 0
    if settings.redis is None:
        structlog.get_logger("adapter.cli").warning(
            "workers.without_redis", workers=settings.adapter_workers,
            detail="REDIS_URL is unset: each worker process has its own in-memory cache, rate limits and stream jobs")
    return servers.serve_workers(lambda: create_app(settings), sock, settings.adapter_workers, **options)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    settings = _settings(ADAPTER_PORT=args.port, ADAPTER_HOST=args.host)
    return asyncio.run(run_demo(settings))


def cmd_openapi(_: argparse.Namespace) -> int:
    from .generate import openapi_document

    sys.stdout.write(openapi_document())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .generate import generate

    for line in generate(Path(args.root)):
        print(line)
    return 0


def cmd_check(_: argparse.Namespace) -> int:
    from .check import run_checks

    return asyncio.run(run_checks(_settings()))


def cmd_agents_sync(_: argparse.Namespace) -> int:
    import httpx

    from .agent_sync import local_agents, sync_agents
    from .tasks import TASKS
    from .upstreams.gateway import GatewayClient

    settings = _settings()
    agents = local_agents(settings.conductor_agents_dir, TASKS.agent_ids)

    async def run() -> int:
        async with httpx.AsyncClient(base_url=settings.conductor_gateway_url, timeout=30.0) as http:
            try:
                results = await sync_agents(GatewayClient(http, settings), agents)
            except (httpx.HTTPError, ValueError) as exc:
                print(f"adapter: cannot list the gateway's agents at {redact_url(settings.conductor_gateway_url)}: "
                      f"{type(exc).__name__} {exc}".strip(), file=sys.stderr)
                return 1
        for r in results:
            line = f"{r.outcome:<9} {r.agent_id}" + (f"  ({r.detail})" if r.detail else "")
            print(line, file=sys.stderr if r.outcome in ("invalid", "failed") else sys.stdout)
        return 1 if any(r.outcome in ("invalid", "failed") for r in results) else 0

    return asyncio.run(run())


def cmd_webhooks_replay(_: argparse.Namespace) -> int:
    """Move every dead letter back to the retry set, due now; the workers deliver them."""
    from .assembly import redis_signer
    from .notify.outbox import RedisOutbox
    from .storage.redis_store import redis_client

    settings = _settings()
    if (target := settings.redis) is None:
        print("adapter: REDIS_URL is unset: without Redis the dead letters live in the sidecar's process, "
              "and a restart dropped them", file=sys.stderr)
        return 1
    if problems := settings.serving_problems():
        raise ConfigError(*problems)

    async def run() -> int:
        client = redis_client(target)
        try:
            outbox = RedisOutbox(client, prefix=settings.cache_prefix, signer=redis_signer(settings))
            dead = await outbox.dead()
            moved = await outbox.replay()
        finally:
            await client.aclose()
        for d in dead:
            print(f"{d.event.id} {d.event.type} {d.sink} attempts={d.attempt} last error: {d.error}")
        print(f"replayed {moved} dead letter(s)")
        return 0

    return asyncio.run(run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapter", description="CRM AI sidecar for the Conductor Gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sidecar (configuration from the environment)")
    serve.add_argument("--host", help="interface to listen on (env ADAPTER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (env ADAPTER_PORT, default 8080)")
    serve.add_argument("--workers", type=int, help="server processes sharing the port (env ADAPTER_WORKERS, default 1); "
                       "set REDIS_URL with more than one")
    serve.set_defaults(func=cmd_serve)
    demo = sub.add_parser("demo", help="run the sidecar with built-in gateway and CRM doubles and demo data")
    demo.add_argument("--host", help="interface for the sidecar (default 127.0.0.1)")
    demo.add_argument("--port", type=int, help="port for the sidecar (default 8080)")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("openapi", help="print the OpenAPI document").set_defaults(func=cmd_openapi)
    generate = sub.add_parser("generate", help="write the files that list the tasks (OpenAPI, README rows, the client's "
                              "task map) from the task registry; run from the repository's root")
    generate.add_argument("--root", default=".", help="the repository's root (default: the current directory)")
    generate.set_defaults(func=cmd_generate)
    agents = sub.add_parser("agents", help="manage the agents on the Conductor Gateway")
    agents_sub = agents.add_subparsers(dest="agents_command", required=True)
    agents_sub.add_parser("sync", help="create or update every task's agent on the gateway from CONDUCTOR_AGENTS_DIR "
                          "(idempotent; prints created, updated or unchanged per agent)").set_defaults(func=cmd_agents_sync)
    webhooks = sub.add_parser("webhooks", help="notification deliveries (webhooks and CRM notifications)")
    webhooks_sub = webhooks.add_subparsers(dest="webhooks_command", required=True)
    webhooks_sub.add_parser("replay", help="move every dead-lettered delivery back to the retry queue (REDIS_URL), "
                            "printing each").set_defaults(func=cmd_webhooks_replay)
    sub.add_parser("check", help="validate the configuration and probe the gateway, the CRM backend and Redis"
                   ).set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"adapter: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except CannotListen as exc:
        print(f"adapter: cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"adapter: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
