"""The `adapter` command: serve, demo, openapi."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import msgspec

from .settings import ConfigError, Settings


def _settings(**overrides: object) -> Settings:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    return Settings.from_env(env)


def cmd_serve(args: argparse.Namespace) -> int:
    from . import logs, servers
    from .app import create_app

    settings = _settings(ADAPTER_HOST=args.host, ADAPTER_PORT=args.port)
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    sock = servers.bind(settings.adapter_host, settings.adapter_port)
    # SIGTERM drains the jobs first (SHUTDOWN_GRACE_SECONDS), then uvicorn's own graceful stop.
    server = servers.server(app, graceful=settings.shutdown_grace_seconds, keepalive=settings.keepalive_seconds)
    server.run(sockets=[sock])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    settings = _settings(ADAPTER_PORT=args.port, ADAPTER_HOST=args.host)
    return asyncio.run(run_demo(settings))


def cmd_openapi(_: argparse.Namespace) -> int:
    from .app import create_app

    schema = create_app(Settings.from_env({})).openapi_schema.to_schema()
    # Sorted keys: Litestar orders some maps (response headers) differently from run to run,
    # and the committed copy must not churn when nothing changed.
    encoded = msgspec.json.Encoder(order="sorted").encode(schema)
    sys.stdout.write(msgspec.json.format(encoded, indent=2).decode() + "\n")
    return 0


def cmd_check(_: argparse.Namespace) -> int:
    from .check import run_checks

    return asyncio.run(run_checks(_settings()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapter", description="CRM AI sidecar for the Conductor Gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sidecar (configuration from the environment)")
    serve.add_argument("--host", help="interface to listen on (env ADAPTER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (env ADAPTER_PORT, default 8080)")
    serve.set_defaults(func=cmd_serve)
    demo = sub.add_parser("demo", help="run the sidecar with built-in gateway and CRM doubles and demo data")
    demo.add_argument("--host", help="interface for the sidecar (default 127.0.0.1)")
    demo.add_argument("--port", type=int, help="port for the sidecar (default 8080)")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("openapi", help="print the OpenAPI document").set_defaults(func=cmd_openapi)
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
    except OSError as exc:  # typically the port is taken
        print(f"adapter: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
