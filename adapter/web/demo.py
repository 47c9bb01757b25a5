"""Routes of `adapter demo` only: the demo page, its session and fault injection. Never in `serve`."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Protocol

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.params import FromPath, JSONBody

from ..errors import BadRequest, NotFound

PAGE = resources.files("adapter") / "demo_page"
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}


class ScriptedModel(Protocol):
    """What the demo's gateway double offers the page: the next answers of an agent, queued."""

    def push(self, agent_id: str, *behaviours: str) -> None: ...


@dataclass
class DemoSession:
    token: str
    leads: list[dict[str, str]]
    deals: list[dict[str, str]]
    gateway: ScriptedModel = field(repr=False)


class Fault(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    task: str
    behaviour: Literal["wrong_shape", "start_fails", "garbage", "fenced", "run_failed"]


@get("/", media_type="text/html; charset=utf-8", include_in_schema=False)
async def page() -> bytes:
    return (PAGE / "index.html").read_bytes()


@get("/static/{name:str}", include_in_schema=False)
async def static(name: FromPath[str]) -> Response[bytes]:
    if name not in STATIC:
        raise NotFound(f"no demo asset {name}")
    return Response((PAGE / name).read_bytes(), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


@get("/session", include_in_schema=False)
async def session(request: Request) -> dict[str, Any]:
    demo: DemoSession = request.app.state.demo
    registry = request.app.state.service.tasks.values()
    # The page's "all leads" batch runs the task whose answer is stored on the record: its result
    # is what a person runs over a whole list (the page finds it by this flag, never by name).
    batch = next((t.name for t in registry if t.write_back is not None), None)
    # `view`: how the page draws the task's result ((kind, field, label) parts, from the task module).
    tasks = [{"name": t.name, "record_kind": t.record_kind, "batch": t.name == batch, "threads": t.threads, "view": [list(p) for p in t.view],
              "label": f"{t.name.split('.', 1)[1].replace('_', ' ').capitalize()} {t.name.split('.', 1)[0]}"}
             for t in registry]
    return {"token": demo.token, "leads": demo.leads, "deals": demo.deals, "tasks": tasks}


@get("/env", media_type="text/plain; charset=utf-8", include_in_schema=False)
async def env(request: Request) -> str:
    """`eval "$(curl -s localhost:8080/demo/env)"`: the README's $TOKEN, $LEAD and $DEAL for this run, and the
    doubles' URLs, so that `adapter check` and `adapter agents sync` (docs/migration.md) run against them too."""
    demo: DemoSession = request.app.state.demo
    settings = request.app.state.settings
    return (f"export TOKEN={demo.token}\nexport LEAD={demo.leads[0]['id']}\nexport DEAL={demo.deals[0]['id']}\n"
            f"export CONDUCTOR_GATEWAY_URL={settings.conductor_gateway_url}\nexport CRM_BACKEND_URL={settings.crm_backend_url}\n")


@post("/fault", status_code=204, include_in_schema=False)
async def fault(data: JSONBody[Fault], request: Request) -> None:
    demo: DemoSession = request.app.state.demo
    tasks = request.app.state.service.tasks
    if data.task not in tasks:
        raise BadRequest(f"invalid request body: `task`: no task {data.task!r} (tasks: {', '.join(tasks)})", field="task")
    agent = tasks[data.task].agent_id
    # Invalid output must survive the repair call too; the others happen once.
    demo.gateway.push(agent, *[data.behaviour] * (2 if data.behaviour in ("wrong_shape", "garbage") else 1))


demo_router = Router(path="/demo", route_handlers=[page, static, session, env, fault], include_in_schema=False)
