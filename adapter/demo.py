"""`adapter demo`: the sidecar with its doubles and seeded data, nothing else needed."""

from __future__ import annotations

import asyncio

import msgspec

from . import logs, servers
from .app import create_app
from .doubles.crm import CrmDouble
from .doubles.gateway import GatewayDouble
from .web.demo import DemoSession
from .settings import Settings
from .tasks import TASKS, Registry, Task


def curls(base: str, token: str, seed: dict, tasks: Registry = TASKS) -> list[tuple[str, str]]:
    """The walkthrough: every task's route on a seeded record of its kind (its OpenAPI example's body),
    a stream, a job, the seeded prompt injection and another user's lead, then health."""
    auth = f"-H 'Authorization: Bearer {token}'"
    json = "-H 'Content-Type: application/json'"

    def post(path: str, body: dict, flags: str = "-s") -> str:
        return f"curl {flags} -X POST {base}{path} {auth} {json} -d '{msgspec.json.encode(body).decode()}'"

    def body(task: Task, record_id: str) -> dict:
        return {**task.request_example, task.id_field: record_id}

    # Tasks on a kind of record the demo has no seeded records of are left out.
    seeded = [t for t in tasks.values() if seed.get(f"{t.record_kind}s")]
    lines = [(t.summary, post("/api/v1/ai" + t.path, body(t, seed[f"{t.record_kind}s"][0]))) for t in seeded]
    if not seeded:
        return [("AI health", f"curl -s {base}/api/v1/ai/health")]
    first, last = seeded[0], seeded[-1]
    # The jobs flow as a browser does it: create the job, then follow events_url (a job token, no JWT).
    events_url = "python3 -c 'import json, sys; print(json.load(sys.stdin)[\"events_url\"])'"
    job = post("/api/v1/ai/jobs", {"task": last.name, "input": body(last, seed[f"{last.record_kind}s"][0])})
    lines += [
        (f"{first.stream_summary} (server-sent events)",
         post(f"/api/v1/ai{first.path}/stream", body(first, seed[f"{first.record_kind}s"][0]), "-sN")),
        (f"Start a {last.name} job, then follow its events as a browser's EventSource would",
         f'EVENTS=$({job} | {events_url}) && curl -sN "{base}$EVENTS"'),
    ]
    # The seeded prompt injection and Bob's lead, through each task on leads.
    for task in (t for t in seeded if t.record_kind == "lead"):
        lines += [(f"A lead with a prompt injection in its notes: {task.name}",
                   post("/api/v1/ai" + task.path, body(task, seed["leads"][2]))),
                  (f"Another user's lead (the CRM says 403): {task.name}",
                   post("/api/v1/ai" + task.path, body(task, seed["bobs_lead"])))]
    return [*lines, ("AI health", f"curl -s {base}/api/v1/ai/health")]


def demo_session(crm: CrmDouble, gateway: GatewayDouble, seed: dict, token: str) -> DemoSession:
    leads = [{"id": lid, "name": crm.leads[lid]["name"], "company": crm.leads[lid]["company"] or ""} for lid in seed["leads"]]
    deals = [{"id": did, "title": crm.deals[did]["title"]} for did in seed["deals"]]
    return DemoSession(token=token, leads=leads, deals=deals, gateway=gateway)


async def run_demo(settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_format)
    # The demo's model streams its answer token by token, at a pace a person can watch.
    gateway, crm = GatewayDouble(default="tokens", token_interval=0.015), CrmDouble()
    seed = crm.seed()
    gw_sock, crm_sock = servers.bind("127.0.0.1", 0), servers.bind("127.0.0.1", 0)
    app_sock = servers.bind(settings.adapter_host, settings.adapter_port)
    settings = msgspec.structs.replace(
        settings, conductor_gateway_url=servers.url_of(gw_sock), crm_backend_url=servers.url_of(crm_sock), redis_url=None,
        redis_sentinels=None, redis_sentinel_master=None, redis_cluster=False,
        sse_retry_ms=500, rate_limit={t.env_suffix: "off" for t in TASKS.values()})
    token = crm.token(seed["alice"], expires_in=7 * 86400)
    main = servers.server(create_app(settings, demo=demo_session(crm, gateway, seed, token)))
    doubles = [servers.server(gateway.app, quiet=True), servers.server(crm.app, quiet=True)]
    base = servers.url_of(app_sock)
    print(f"\nCRM AI sidecar demo on {base}  (gateway double {settings.conductor_gateway_url}, "
          f"CRM double {settings.crm_backend_url}, in-memory cache)\n")
    print(f"Demo page: {base}/demo\n")
    for title, line in curls(base, token, seed):
        print(f"# {title}\n{line}\n")
    print(f"# The README's examples use $TOKEN, $LEAD and $DEAL: set them for this run\neval \"$(curl -s {base}/demo/env)\"\n")
    print("Press Ctrl+C to stop.\n", flush=True)
    upstreams = [asyncio.create_task(s.serve(sockets=[sock])) for s, sock in zip(doubles, (gw_sock, crm_sock), strict=True)]
    try:
        await main.serve(sockets=[app_sock])
    finally:
        for s in doubles:
            s.should_exit = True
        await asyncio.gather(*upstreams, return_exceptions=True)
    return 0
