"""One module per task: a task that is only a module and an agent folder, both in a temporary
folder, is served like the built-in ones (sync and stream routes, jobs, batches, its settings,
health, OpenAPI, the generated files and the client's types); and the architecture's import
rules hold (imports point one way, task names live in their modules)."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import httpx
import msgspec
import pytest
from httpx_sse import aconnect_sse

from adapter import generate
from adapter.app import create_app
from adapter.doubles.gateway import GatewayDouble, default_registry
from adapter.settings import ConfigError
from adapter.tasks import TASKS, Registry, Task
from tests.agent_outputs import check_answer, load_corpus
from tests.helpers import LEAD_AGENT, ROOT, asgi_client, decode, make_settings, running, serving

TOY_AGENT = "ContactGreeter_CRM_Agent"
TOY_MODULE = '''
"""contact.greet: a one-line greeting for a contact (a test's toy task, in a folder of its own)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from adapter.models import Inbound, ObjectId, Provider
from adapter.tasks.prompting import pick, task_input
from adapter.tasks.reading import Breach, Reader, Verdict, read_answer, words
from adapter.tasks.registry import Task

NAME, AGENT = "contact.greet", "ContactGreeter_CRM_Agent"
GREETING_WORDS = 12


class ContactGreetRequest(Inbound):
    contact_id: ObjectId
    channel: Literal["email", "phone"] = "email"


class ContactGreetResult(msgspec.Struct, kw_only=True):
    contact_id: str
    agent: str
    greeting: str
    channel: Literal["email", "phone"]
    provider: Provider = None


def render(contact: dict[str, Any], request: Any, _today: Any) -> str:
    return task_input(NAME, pick(contact, "name", "email"), {"channel": request.channel})


def guidance(result: ContactGreetResult) -> list[Breach]:
    n = words(result.greeting)
    return [Breach("greeting-length", f"{n} words")] if n > GREETING_WORDS else []


def validate(text: str, contact_id: str, agent: str) -> Verdict:
    def build(r: Reader) -> ContactGreetResult | None:
        greeting, channel = r.text("greeting"), r.obj.get("channel")
        if channel not in ("email", "phone"):
            r.errors.append("`channel` must be email or phone")
        return None if r.errors else ContactGreetResult(contact_id=contact_id, agent=agent, greeting=greeting,
                                                        channel=channel)

    result, notes = read_answer(text, frozenset({"greeting", "channel"}), build)
    return Verdict(result, tuple(notes), tuple(guidance(result)))


def sample_answer(record: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    return {"greeting": f"Hello {record.get('name')}!", "channel": request.get("channel", "email")}


TASK = Task(
    name=NAME, agent_id=AGENT, record_kind="contact",
    request_type=ContactGreetRequest, result_type=ContactGreetResult,
    render=render, validate=validate, guidance=guidance,
    guidance_rules={"greeting-length": f"a greeting of at most {GREETING_WORDS} words"},
    summary="Greet a contact in one line", cache_ttl=600.0, rate_limit="5/60",
    request_example={"contact_id": "65f1c0ffee0000000000c001", "channel": "email"},
    result_example={"contact_id": "65f1c0ffee0000000000c001", "agent": AGENT, "greeting": "Hello Ana!", "channel": "email"},
    sample_answer=sample_answer,
    view=(("text", "greeting", "Greeting"), ("badge", "channel", "Channel")),
)
'''
PERSONA = '''# Contact greeter

You greet a CRM contact in one line.

## Example output

```json
{"greeting": "Hello Ana!", "channel": "email"}
```
'''
CORPUS = {
    "persona-example.txt": "---\noutcome: accept\nwhy: The persona's own example.\n---\n"
                           '{"greeting": "Hello Ana!", "channel": "email"}',
    "fenced-prose.txt": "---\noutcome: accept-normalised\nwhy: Prose and a fence around the object.\n"
                        "expect:\n  channel: phone\n---\nSure! Here it is:\n```json\n"
                        "{'greeting': 'Hi Ana, good to meet you', 'channel': 'phone',}\n```\n",
    "long-greeting.txt": "---\noutcome: accept\nwhy: Too long for the persona's taste, still a greeting.\n"
                         "warnings: [greeting-length]\n---\n"
                         '{"greeting": "' + " ".join(["hello"] * 20) + '", "channel": "email"}',
    "no-channel.txt": "---\noutcome: repair\nwhy: The channel is missing.\nerror: '`channel` must be email or phone'\n---\n"
                      '{"greeting": "Hello Ana!"}',
}


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"toy_{path.stem}_{abs(hash(path))}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # msgspec resolves the structs' annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy(tmp_path: Path) -> tuple[Registry, Path]:
    """The built-in tasks plus a toy task that is only its module and its agent folder, both under tmp_path."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "contact_greet.py").write_text(TOY_MODULE)
    folder = tmp_path / "agents" / TOY_AGENT
    (folder / "corpus").mkdir(parents=True)
    (folder / "definition.yaml").write_text(f"name: {TOY_AGENT}\nversion: '1'\ndescription: Greets a CRM contact in one line\n"
                                            "tags: [crm, greeting]\n")
    (folder / "persona.md").write_text(PERSONA)
    for name, text in CORPUS.items():
        (folder / "corpus" / name).write_text(text)
    toy_tasks = Registry.of([_import(tmp_path / "tasks" / "contact_greet.py")], agents_root=str(tmp_path / "agents"))
    return Registry([*TASKS.values(), *toy_tasks.values()]), tmp_path / "agents"


def test_the_toy_tasks_corpus_and_persona_are_its_agent_folders(toy):
    tasks, agents = toy
    answers = load_corpus(Registry([tasks["contact.greet"]]), agents)
    assert sorted(a.path.name for a in answers) == sorted(CORPUS)
    for answer in answers:
        check_answer(tasks["contact.greet"], answer, "65f1c0ffee0000000000c001")
    loaded = tasks.load(str(ROOT / "conductor-agents"))  # the built-in agents where settings say, the toy's in its own root
    assert loaded["contact.greet"].version.startswith("1-") and loaded["lead.qualify"].version.startswith("1.0.0-")


async def test_a_task_that_is_a_module_and_an_agent_folder_is_served_everywhere(toy, crm, seed, auth):
    tasks, _ = toy
    gateway = GatewayDouble(tasks=tasks, registry=default_registry(tasks))
    settings = make_settings(cache_ttl_contact_greet=321, rate_limit_contact_greet="5/60")
    # A kind of record the built-in tasks never read: the CRM's contacts.
    contacts = [crm.add_record("contact", seed["alice"], name=name, email=f"{name.lower()}@example.com")
                for name in ("Ana", "Bruno")]
    contact = contacts[0]
    path = "/api/v1/ai/contact/greet"
    async with asgi_client(gateway.app, "http://gateway.test") as gw, asgi_client(crm.app, "http://crm.test") as backend:
        app = create_app(settings, gateway_http=gw, crm_http=backend, tasks=tasks)
        async with running(app) as client:
            # The sync route: validated, cached, its own TTL (a hit is free).
            first = await client.post(path, json={"contact_id": contact}, headers=auth)
            assert first.status_code == 200, first.text
            assert decode(first) == {"contact_id": contact, "agent": TOY_AGENT, "greeting": "Hello Ana!",
                                     "channel": "email", "provider": None}
            assert first.headers["x-cache"] == "MISS" and "x-agent-warnings" not in first.headers
            assert (await client.post(path, json={"contact_id": contact}, headers=auth)).headers["x-cache"] == "HIT"
            assert app.state.service.settings.ttl_for(app.state.service.tasks["contact.greet"]) == 321
            bad = await client.post(path, json={"contact_id": contact, "channel": "fax"}, headers=auth)
            assert bad.status_code == 400 and decode(bad)["errors"][0]["field"] == "channel"
            missing = await client.post(path, json={"contact_id": "0" * 24}, headers=auth)
            assert missing.status_code == 404 and "contact" in decode(missing)["detail"].lower()

            # The stream route.
            async with aconnect_sse(client, "POST", f"{path}/stream?cache=no-cache", json={"contact_id": contact,
                                    "channel": "phone"}, headers=auth) as source:
                events = [(e.event, e.data) async for e in source.aiter_sse()]
            assert [name for name, _ in events][-2:] == ["result", "done"]
            assert msgspec.json.decode(events[-2][1])["channel"] == "phone"

            # A job, followed by its events_url.
            fresh = {**auth, "Cache-Control": "no-cache"}
            created = await client.post("/api/v1/ai/jobs", json={"task": "contact.greet", "input": {"contact_id": contact}},
                                        headers=fresh)
            assert created.status_code == 202, created.text
            async with aconnect_sse(client, "GET", decode(created)["events_url"]) as source:
                assert [e.event async for e in source.aiter_sse()][-2:] == ["result", "done"]

            # A batch over both contacts, followed to its end.
            started = await client.post("/api/v1/ai/batches", json={"task": "contact.greet", "ids": contacts,
                                                                     "options": {"channel": "phone"}}, headers=fresh)
            assert started.status_code == 202, started.text
            async with aconnect_sse(client, "GET", decode(started)["events_url"]) as source:
                batch_events = [(e.event, e.data) async for e in source.aiter_sse()]
            done = msgspec.json.decode(batch_events[-1][1])
            assert batch_events[-1][0] == "done" and done["status"] == "completed" and done["counts"]["succeeded"] == 2
            assert done["counts"]["cached"] == 1  # the first contact's phone greeting: the stream's answer

            # Health lists its agent; the OpenAPI document has both operations, the enums and its own headers.
            assert decode(await client.get("/api/v1/ai/health"))["agents"][TOY_AGENT] is True
            schema = decode(await client.get("/schema/openapi.json"))
            operation = schema["paths"][path]["post"]
            assert operation["summary"] == "Greet a contact in one line" and f"{path}/stream" in schema["paths"]
            assert "(greeting-length)" in operation["responses"]["200"]["headers"]["X-Agent-Warnings"]["description"]
            assert "X-CRM-Write-Back" not in operation["responses"]["200"]["headers"]
            assert "contact.greet" in schema["components"]["schemas"]["JobRequest"]["properties"]["task"]["enum"]
            assert "contact.greet" in schema["components"]["schemas"]["BatchRequest"]["properties"]["task"]["enum"]
            assert "The CRM backend has no such contact" == operation["responses"]["404"]["description"]

            # RATE_LIMIT_CONTACT_GREET: 5 model calls (miss, stream, job, one batch item, this one); the next is refused.
            assert (await client.post(path, json={"contact_id": contacts[1]}, headers=fresh)).status_code == 200
            limited = await client.post(path, json={"contact_id": contact}, headers=fresh)
            assert limited.status_code == 429 and "contact.greet" in decode(limited)["detail"]
            # The built-in tasks are untouched by the addition.
            assert (await client.post("/api/v1/ai/deal/predict", json={"deal_id": seed["deals"][0]}, headers=auth)).status_code == 200
    assert gateway.calls[TOY_AGENT] == 5  # hits, refusals and bad requests made no model call


def test_a_per_task_setting_must_name_a_task():
    with pytest.raises(ConfigError, match=r"CACHE_TTL_LEAD_QUALIFI: no task is called that"):
        create_app(make_settings(cache_ttl_lead_qualifi=60))


def test_a_task_is_checked_when_it_is_declared(toy):
    tasks, _ = toy
    declared = {f: getattr(tasks["contact.greet"], f) for f in (
        "name", "agent_id", "request_type", "result_type", "render", "validate", "guidance", "guidance_rules", "summary",
        "cache_ttl", "rate_limit", "request_example", "result_example", "sample_answer")}
    with pytest.raises(ValueError, match="has no `deal_id`"):
        Task(**declared, record_kind="deal")
    with pytest.raises(ValueError, match="lower-case letters and digits"):
        Task(**declared, record_kind="Contact/../lead")
    with pytest.raises(ValueError, match=r"its view names \['greting'\]"):
        Task(**declared, record_kind="contact", view=(("text", "greting", "Greeting"),))
    with pytest.raises(ValueError, match="needs `writes_back`"):
        Task(**declared, record_kind="contact", write_back=lambda result: {})
    with pytest.raises(ValueError, match="registered twice"):
        TASKS.with_task(TASKS["lead.qualify"])
    with pytest.raises(ValueError, match="defines no `TASK`"):
        Registry.of([generate])


# --- what lists the tasks is generated from the registry --------------------------------------

def test_the_committed_generated_files_are_up_to_date():
    stale = [str(p.relative_to(ROOT)) for p in generate.stale(ROOT)]
    assert not stale, f"{stale} differ from what the registry renders: run `make generate` and commit the result"


def test_a_new_task_is_in_every_generated_file(toy):
    tasks, _ = toy
    readme = generate.readme((ROOT / "README.md").read_text(), tasks)
    assert "`CACHE_TTL_CONTACT_GREET`" in readme and "`RATE_LIMIT_CONTACT_GREET`" in readme and "`600`" in readme
    assert f"| `contact.greet` | `POST /api/v1/ai/contact/greet` | contact | `{TOY_AGENT}` | `greeting-length` | none |" in readme
    assert "### `POST /api/v1/ai/contact/greet`" in readme and '\\"contact_id\\": \\"$CONTACT\\"' in readme
    client = generate.typescript_tasks(tasks)
    assert '"contact.greet": { path: "/api/v1/ai/contact/greet", recordId: "contact_id", method: "greetContact",' in client
    assert 'export type ContactGreetResult = Schemas["ContactGreetResult"];' in client


def test_the_client_types_a_new_task(toy, tmp_path):
    """The client compiled against the contract and task map of a registry with the toy task: its
    `runTask` and its generated method take the toy's request and give its result, typed."""
    package = ROOT / "clients" / "typescript"
    node, modules = shutil.which("node"), package / "node_modules"
    if node is None or not (modules / "openapi-typescript").is_dir():
        pytest.skip("the client's dependencies are not installed (`npm ci` in clients/typescript)")
    tasks, _ = toy
    work = tmp_path / "client"
    shutil.copytree(package / "src", work / "src", ignore=shutil.ignore_patterns("generated"))
    (work / "src" / "generated").mkdir()
    os.symlink(modules, work / "node_modules")
    (work / "openapi.json").write_text(generate.openapi_document(tasks))
    subprocess.run([node, str(modules / "openapi-typescript/bin/cli.js"), "openapi.json", "--output", "src/generated/openapi.ts",
                    "--default-non-nullable", "false"], cwd=work, check=True, capture_output=True, timeout=120)
    (work / "src" / "generated" / "tasks.ts").write_text(generate.typescript_tasks(tasks))
    (work / "src" / "toy-check.ts").write_text(textwrap.dedent("""\
        import { createSidecarClient, type TaskResult } from "./index.js";
        const client = createSidecarClient({ baseUrl: "http://sidecar.test" });
        export async function greet(): Promise<string> {
          const result: TaskResult<"contact.greet"> = await client.runTask("contact.greet", { contact_id: "c", channel: "phone" });
          const again = await client.greetContact({ contact_id: "c" });
          const channel: "email" | "phone" = again.channel;
          // @ts-expect-error: the toy's request has no lead_id
          await client.runTask("contact.greet", { lead_id: "l" });
          // @ts-expect-error: nor does its result have a score
          void result.score;
          return result.greeting + channel;
        }
        """))
    (work / "tsconfig.json").write_text(msgspec.json.encode({"compilerOptions": {
        "target": "ES2022", "lib": ["ES2022", "DOM", "DOM.Iterable"], "module": "NodeNext", "moduleResolution": "NodeNext",
        "strict": True, "skipLibCheck": True, "noEmit": True, "types": []},
        "include": ["src"]}).decode())
    compiled = subprocess.run([node, str(modules / "typescript/bin/tsc"), "-p", "tsconfig.json"], cwd=work,
                              capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    # The same check fails when the task map lacks the toy (what a stale generated file would be).
    (work / "src" / "generated" / "tasks.ts").write_text(generate.typescript_tasks(TASKS))
    stale = subprocess.run([node, str(modules / "typescript/bin/tsc"), "-p", "tsconfig.json"], cwd=work,
                           capture_output=True, text=True, timeout=300)
    errors = stale.stdout + stale.stderr
    # types.ts's guard that the task map and the contract's tasks agree, and the missing method.
    assert stale.returncode != 0 and "src/types.ts" in errors and "Property 'greetContact' does not exist" in errors, errors


# --- the architecture's rules -----------------------------------------------------------------

LAYERS = {"web": 3, "pipeline": 2, "upstreams": 1, "storage": 1, "tasks": 1, "notify": 1}
ENTRY = {"app", "assembly", "cli", "demo", "check", "agent_sync", "servers", "generate"}


def _imports(path: Path) -> list[str]:
    """The adapter modules a module imports, as dotted names relative to `adapter`."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            targets = [name] if node.module else [f"{name}.{alias.name}" for alias in node.names]
            found += [t.removeprefix("adapter.") for t in targets if t.startswith("adapter")]
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("adapter.") for a in node.names if a.name.startswith("adapter.")]
    return found


def _modules() -> list[Path]:
    return [p for p in (ROOT / "adapter").rglob("*.py") if "doubles" not in p.parts]


def test_production_modules_never_import_the_doubles():
    demo = ROOT / "adapter" / "demo.py"  # `adapter demo` wires the doubles in; nothing else may
    offenders = [f"{p.relative_to(ROOT)} imports {i}" for p in _modules() if p != demo for i in _imports(p)
                 if i.startswith("doubles")]
    assert not offenders


def test_imports_point_one_way():
    """entry -> web -> pipeline -> upstreams, storage, tasks; no layer imports one above it."""
    offenders = []
    for path in _modules():
        parts = path.relative_to(ROOT / "adapter").with_suffix("").parts
        if len(parts) == 1:  # entry points and shared modules (settings, errors, models, ...)
            if parts[0] in ENTRY:
                continue
            level = 0
        else:
            level = LAYERS[parts[0]]
        for name in _imports(path):
            top = name.split(".")[0]
            if top in LAYERS and LAYERS[top] > level and not (len(parts) > 1 and top == parts[0]):
                offenders.append(f"{'/'.join(parts)} imports {name}")
            if len(parts) == 1 and top in ENTRY and parts[0] not in ENTRY:
                offenders.append(f"{parts[0]} imports the entry point {name}")
    assert not offenders


def test_nothing_imports_another_modules_private_names():
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                offenders += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders


def test_task_names_appear_only_in_their_own_task_modules():
    names = re.compile(r"\b(" + "|".join(re.escape(n) for n in TASKS) + r")\b")
    own = {f"{t.name.replace('.', '_')}.py" for t in TASKS.values()}
    offenders = []
    for path in (ROOT / "adapter").rglob("*"):
        if path.suffix not in {".py", ".js", ".html"} or path.name in own:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # Docstrings and comments may use a task as an example; code and pages may not name one.
            code = line.split("#", 1)[0] if path.suffix == ".py" else line
            if names.search(code) and not _in_docstring(path, number):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def _in_docstring(path: Path, number: int) -> bool:
    if path.suffix != ".py":
        return False
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            if node.lineno <= number <= (node.end_lineno or node.lineno):
                return True
    return False


def test_the_sync_and_stream_routes_all_act_for_a_verified_caller(client: httpx.AsyncClient):
    app = client._transport.app  # type: ignore[attr-defined]
    task_routes = [r for r in app.routes if r.path.startswith("/api/v1/ai/")
                   and not r.path.startswith(("/api/v1/ai/jobs", "/api/v1/ai/batches", "/api/v1/ai/threads"))
                   and r.path != "/api/v1/ai/health"]
    assert len(task_routes) == 2 * len(TASKS)
    thread_routes = [r for r in app.routes if r.path.startswith("/api/v1/ai/threads")]
    assert len(thread_routes) == 4  # /, /{id}, /{id}/turns, /{id}/turns/stream
    for route in task_routes + thread_routes:
        for handler in route.route_handlers:
            if handler.http_methods == {"OPTIONS"}:
                continue  # Litestar's own OPTIONS handler
            assert "caller" in handler.resolve_dependencies() and "caller" in handler.parsed_fn_signature.parameters, route.path


def test_errors_cross_processes_by_registry_and_group_by_upstream():
    from adapter.errors import AdapterError, ClientGone, CrmCircuitOpen, CrmUnavailable, from_record, to_record
    from adapter.web.problems import problem_of

    opened = CrmCircuitOpen("paused", retry_after=7)
    assert isinstance(opened, CrmUnavailable) and opened.status == 503 and opened.headers == {"Retry-After": "7"}
    again = from_record(to_record(opened))
    assert type(again) is CrmCircuitOpen and again.detail == "paused" and again.headers == {"Retry-After": "7"}
    # A record naming no error class (or a non-error global) becomes the base class, never anything else.
    assert type(from_record({**to_record(opened), "cls": "Mapping"})) is AdapterError
    problem, _ = problem_of(ClientGone("the client hung up before its request body was complete"), "POST", "/api/v1/leads")
    assert (problem.status, problem.type) == (499, "urn:problem:crm-ai:client-closed-request")


async def test_a_client_hanging_up_mid_upload_on_a_proxied_path_is_no_server_error(crm, gateway, seed):
    from structlog.testing import capture_logs

    # Over real TCP: an in-process transport would hand the hang-up to the backend's app instead.
    async with serving(crm.app) as crm_url, httpx.AsyncClient(base_url=crm_url) as backend, \
            asgi_client(gateway.app, "http://gateway.test") as gw:
        app = create_app(make_settings(), gateway_http=gw, crm_http=backend)
        async with running(app):
            messages = iter([{"type": "http.request", "body": b'{"name": "half', "more_body": True}])
            sent: list[dict] = []

            async def receive() -> dict:
                # As a server does: after the client has gone, every receive says so.
                return next(messages, {"type": "http.disconnect"})

            async def send(message: dict) -> None:
                sent.append(message)

            path = f"/api/v1/leads/{seed['leads'][0]}"  # the backend reads this PATCH's body
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PATCH", "scheme": "http",
                     "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                     "headers": [(b"host", b"sidecar.test"), (b"content-type", b"application/json"),
                                 (b"transfer-encoding", b"chunked")],
                     "client": ("127.0.0.1", 5000), "server": ("sidecar.test", 80), "state": {}}
            with capture_logs() as logs:
                await app(scope, receive, send)
    events = {entry["event"]: entry for entry in logs}
    assert "request.unhandled" not in events
    assert events["request.problem"]["status"] == 499 and events["request"]["status"] == 499
    assert sent[0]["status"] == 499


# --- one pipeline: a stream and a synchronous request share one model call -------------------

async def _joined(client: httpx.AsyncClient, deadline: float = 5.0) -> None:
    """Until the sidecar counts one request joining a call in the air (bounded)."""
    import asyncio

    async with asyncio.timeout(deadline):
        while 'result="coalesced"' not in (await client.get("/metrics")).text:
            await asyncio.sleep(0.01)


async def _events(client: httpx.AsyncClient, url: str) -> list[tuple[str, dict]]:
    async with aconnect_sse(client, "GET", url) as source:
        return [(e.event, msgspec.json.decode(e.data)) async for e in source.aiter_sse() if e.data]


async def test_a_sync_request_joins_the_model_call_of_a_running_job(client, crm, seed, auth, gateway):
    import asyncio

    gateway.gate = asyncio.Event()
    lead = seed["leads"][0]
    created = await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": lead}}, headers=auth)
    await gateway.calls.reach(1)
    sync = asyncio.create_task(client.post("/api/v1/ai/lead/qualify", json={"lead_id": lead}, headers=auth))
    await _joined(client)
    gateway.gate.set()
    answer = await sync
    events = await _events(client, decode(created)["events_url"])
    assert answer.status_code == 200 and answer.headers["x-cache"] == "MISS"
    assert [e for e, _ in events][-2:] == ["result", "done"] and events[-2][1]["score"] == decode(answer)["score"]
    assert gateway.calls[LEAD_AGENT] == 1


async def test_a_job_joins_the_model_call_of_a_sync_request(client, crm, seed, auth, gateway):
    import asyncio

    gateway.gate = asyncio.Event()
    lead = seed["leads"][0]
    sync = asyncio.create_task(client.post("/api/v1/ai/lead/qualify", json={"lead_id": lead}, headers=auth))
    await gateway.calls.reach(1)
    created = await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": lead}}, headers=auth)
    await _joined(client)
    gateway.gate.set()
    answer = await sync
    events = await _events(client, decode(created)["events_url"])
    assert any("sharing its answer" in data.get("message", "") for name, data in events if name == "status")
    assert events[-2][0] == "result" and events[-2][1]["score"] == decode(answer)["score"]
    assert gateway.calls[LEAD_AGENT] == 1


async def test_a_sync_request_sharing_a_stopped_jobs_call_gets_a_retryable_problem(make_client, crm, seed, auth, gateway):
    import asyncio

    gateway.gate = asyncio.Event()
    lead = seed["leads"][0]
    async with make_client() as client:
        await client.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": lead}}, headers=auth)
        await gateway.calls.reach(1)
        sync = asyncio.create_task(client.post("/api/v1/ai/lead/qualify", json={"lead_id": lead}, headers=auth))
        await _joined(client)
        # Shutting down without Redis: the job is stopped, and its model call with it.
        await client._transport.app.state.jobs.drain(0)  # type: ignore[attr-defined]
        answer = await sync
    assert answer.status_code == 503 and decode(answer)["type"].endswith("shared-call-cancelled")
    assert answer.headers["retry-after"] == "1"


@pytest.mark.parametrize("module", sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__"))
def test_every_benchmark_still_imports(module):
    """The benchmarks are not run by the suite, so a refactor could break them unseen (one did)."""
    import importlib

    importlib.import_module(f"bench.{module}")
