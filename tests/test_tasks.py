"""One module per task: a task defined here alone is served like the built-in ones, and the
architecture's import rules hold (imports point one way, task names live in their modules)."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import httpx
import msgspec
import pytest
from httpx_sse import aconnect_sse

from adapter.app import create_app
from adapter.doubles.gateway import GatewayDouble, default_registry
from adapter.models import Inbound, ObjectId, Provider
from adapter.settings import ConfigError
from adapter.tasks import TASKS, Task
from adapter.tasks.prompting import pick, task_input
from adapter.tasks.reading import Breach, Reader, Verdict, read_answer, words
from tests.helpers import LEAD_AGENT, ROOT, asgi_client, decode, make_settings, running, serving

AGENTS = ROOT / "conductor-agents"
TOY_AGENT = "LeadSummarizer_CRM_Agent"


# --- a fifth task, defined in this test module only ------------------------------------------

class LeadSummarizeRequest(Inbound):
    lead_id: ObjectId


class LeadSummarizeResult(msgspec.Struct, kw_only=True):
    lead_id: str
    agent: str
    summary: str
    provider: Provider = None


def _validate(text: str, lead_id: str, agent: str) -> Verdict:
    def build(r: Reader) -> str | None:
        summary = r.text("summary")
        return None if r.errors else summary

    summary, notes = read_answer(text, frozenset({"summary"}), build)
    result = LeadSummarizeResult(lead_id=lead_id, agent=agent, summary=summary)
    return Verdict(result, tuple(notes), tuple(_guidance(result)))


def _guidance(result: LeadSummarizeResult) -> list[Breach]:
    return [] if words(result.summary) <= 40 else [Breach("summary-length", "at most 40 words")]


TOY = Task(
    name="lead.summarize", agent_id=TOY_AGENT, record_kind="lead",
    request_type=LeadSummarizeRequest, result_type=LeadSummarizeResult,
    render=lambda lead, _request, _today: task_input("lead.summarize", pick(lead, "name", "company")),
    validate=_validate, guidance=_guidance, guidance_rules={"summary-length": "a summary of at most 40 words"},
    summary="Summarize a lead in one sentence", cache_ttl=600.0, rate_limit="5/60",
    request_example={"lead_id": "65f1c0ffee0000000000a001"},
    result_example={"lead_id": "65f1c0ffee0000000000a001", "agent": TOY_AGENT, "summary": "Maria Silva, VP of Sales at Acme."},
    sample_answer=lambda record, _request: {"summary": f"{record.get('name')} works at {record.get('company')}."},
)


@pytest.fixture
def agents_dir(tmp_path: Path) -> Path:
    """The built-in personas plus the toy task's folder: what CONDUCTOR_AGENTS_DIR would hold."""
    root = tmp_path / "agents"
    shutil.copytree(AGENTS, root)
    (root / TOY_AGENT).mkdir()
    (root / TOY_AGENT / "definition.yaml").write_text(f"name: {TOY_AGENT}\nversion: '1'\ndescription: Summarizes a lead\n"
                                                      "group: crm\ntags: [crm, summary]\n")
    (root / TOY_AGENT / "persona.md").write_text("# Lead summarizer\n\nAnswer `{\"summary\": \"...\"}`, one sentence.\n")
    return root


async def test_a_task_defined_in_a_test_module_is_served_everywhere(agents_dir, crm, seed, auth):
    tasks = TASKS.with_task(TOY)
    gateway = GatewayDouble(tasks=tasks, registry=default_registry(tasks, str(agents_dir)))
    settings = make_settings(conductor_agents_dir=str(agents_dir), cache_ttl_lead_summarize=321,
                             rate_limit_lead_summarize="4/60")
    lead = seed["leads"][0]
    async with asgi_client(gateway.app, "http://gateway.test") as gw, asgi_client(crm.app, "http://crm.test") as backend:
        app = create_app(settings, gateway_http=gw, crm_http=backend, tasks=tasks)
        async with running(app) as client:
            # The sync route: validated, cached, rate-limited by its own setting (a hit is free).
            first = await client.post("/api/v1/ai/lead/summarize", json={"lead_id": lead}, headers=auth)
            assert first.status_code == 200, first.text
            assert decode(first) == {"lead_id": lead, "agent": TOY_AGENT, "provider": None,
                                     "summary": "Maria Silva works at Acme Logistics."}
            assert first.headers["x-cache"] == "MISS" and "x-crm-write-back" not in first.headers
            hit = await client.post("/api/v1/ai/lead/summarize", json={"lead_id": lead}, headers=auth)
            assert hit.headers["x-cache"] == "HIT"
            assert app.state.service.settings.ttl_for(app.state.service.tasks["lead.summarize"]) == 321
            # Its request struct is enforced like any other.
            bad = await client.post("/api/v1/ai/lead/summarize", json={"lead_id": lead, "tone": "x"}, headers=auth)
            assert bad.status_code == 400 and decode(bad)["errors"][0]["field"] == "tone"

            # The stream route.
            async with aconnect_sse(client, "POST", "/api/v1/ai/lead/summarize/stream?cache=no-cache",
                                    json={"lead_id": lead}, headers=auth) as source:
                events = [(e.event, e.data) async for e in source.aiter_sse()]
            assert [name for name, _ in events][-2:] == ["result", "done"]
            assert msgspec.json.decode(events[-2][1])["summary"] == "Maria Silva works at Acme Logistics."

            # A job, read back by its job token.
            fresh = {**auth, "Cache-Control": "no-cache"}
            created = await client.post("/api/v1/ai/jobs", json={"task": "lead.summarize", "input": {"lead_id": lead}},
                                        headers=fresh)
            assert created.status_code == 202, created.text
            async with aconnect_sse(client, "GET", decode(created)["events_url"]) as source:
                assert [e.event async for e in source.aiter_sse()][-1] == "done"
            job = await client.get(decode(created)["events_url"].replace("/events", ""))
            assert decode(job)["task"] == "lead.summarize" and decode(job)["status"] == "succeeded"

            # Health lists its agent; the OpenAPI document has both operations and the job enum.
            health = decode(await client.get("/api/v1/ai/health"))
            assert health["agents"][TOY_AGENT] is True
            schema = decode(await client.get("/schema/openapi.json"))
            assert schema["paths"]["/api/v1/ai/lead/summarize"]["post"]["summary"] == "Summarize a lead in one sentence"
            assert "/api/v1/ai/lead/summarize/stream" in schema["paths"]
            assert "lead.summarize" in schema["components"]["schemas"]["JobRequest"]["properties"]["task"]["enum"]
            assert schema["components"]["schemas"]["LeadSummarizeResult"]["properties"]["summary"]["type"] == "string"
            # RATE_LIMIT_LEAD_SUMMARIZE: the 4 model calls were its budget (the hit was free).
            assert (await client.post("/api/v1/ai/lead/summarize", json={"lead_id": lead}, headers=fresh)).status_code == 200
            limited = await client.post("/api/v1/ai/lead/summarize", json={"lead_id": lead}, headers=fresh)
            assert limited.status_code == 429 and "lead.summarize" in decode(limited)["detail"]
            # The built-in tasks are untouched by the addition.
            assert (await client.post("/api/v1/ai/deal/predict", json={"deal_id": seed["deals"][0]}, headers=auth)).status_code == 200
    assert gateway.calls[TOY_AGENT] == 4  # miss, no-cache, stream, job: hits and refusals made no model call


def test_a_per_task_setting_must_name_a_task():
    with pytest.raises(ConfigError, match=r"CACHE_TTL_LEAD_QUALIFI: no task is called that"):
        create_app(make_settings(cache_ttl_lead_qualifi=60))


def test_a_task_is_checked_when_it_is_declared():
    with pytest.raises(ValueError, match="has no `deal_id`"):
        Task(**{**{f: getattr(TOY, f) for f in ("name", "agent_id", "request_type", "result_type", "render", "validate",
                                                 "guidance", "guidance_rules", "summary", "cache_ttl", "rate_limit",
                                                 "request_example", "result_example", "sample_answer")},
                "record_kind": "deal"})
    with pytest.raises(ValueError, match="registered twice"):
        TASKS.with_task(TASKS["lead.qualify"])


# --- the architecture's rules -----------------------------------------------------------------

LAYERS = {"web": 3, "pipeline": 2, "upstreams": 1, "storage": 1, "tasks": 1}
ENTRY = {"app", "assembly", "cli", "demo", "check", "agent_sync", "servers"}


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
    # The demo's printed jobs-flow curl is data: a real request for the reader to paste.
    assert [o for o in offenders if not o.startswith("adapter/demo.py")] == []


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
    assert len(thread_routes) == 3
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
