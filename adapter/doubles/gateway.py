"""A Conductor Gateway double with the real wire format and its quirks (docs/upstreams.md §5).

What it reproduces of the real gateway and the Conductor API behind it:
- execute requires `input_text`, `instance_id`, `conversation_id` and `cwd` (400, with the
  real texts); the Conductor API refuses a task without `screenplay_id`, relayed as a
  500 whose detail wraps the Conductor's JSON (`require_screenplay`, on by default);
- the answer is `{status, result: {result, exit_code, status}, instance_id, context_mode,
  execution_id, task_id, duration_ms}` (no `stdout`), and each run leaves an
  `agent_instances` document that `DELETE /api/agents/instances/{id}` removes;
- the stream carries no tokens: `task_started`, one `status_update`, then `result` (a
  failed run is a `result` with status `error` and exit code 1) or `error`; a job's
  stream can be read once, and the job is gone `job_linger` seconds after it ends (404,
  text/plain);
- `GET /api/agents` lists `{"id": <agent_id>, "name": <definition name>, ...}` from its
  database, or the Conductor API's `{"total", "agents"}` while that database is down;
- agents live in its database: `POST /api/agents` and `PUT /api/agents/{id}` with the
  real validation rules, `GET /api/agents/{id}/persona`;
- conversations (§6, `conversations.py`): `/api/conversations/...` as the Conductor and the gateway
  serve them; a run naming a `conversation_id` gets its history replayed (`runs` records what each
  run saw), `save_to_conversation: true` on execute stores the input and whatever the run returned
  (a failed run's error text too), and a stream never saves.

Behaviours (queue them per agent with `push`, or set `default`):
  json, fenced, prose, trailing_comma  - valid output, wrapped the ways real models wrap it
  garbage                              - prose with no JSON at all
  wrong_shape                          - JSON, but not the persona's shape
  misclassified                        - a lead classification that contradicts the score
  run_failed                           - the run failed: status "error", exit code 1
  error_500                            - the run started, then the Conductor API failed it (a 500 with its detail)
  unavailable_503                      - the gateway's database is down (503, nothing started)
  conductor_down                       - 503 after the gateway's own 3 tries to reach the Conductor API
Stream behaviours (for POST /api/v1/stream-execute, same queue):
  tokens          - a gateway that does stream tokens: on_llm_new_token events, then `result`
  no_result       - events, then the stream closes without a `result`
  start_fails     - 200 with the body `[{"error": ...}, 500]` (the real handler returns a tuple)
  stream_error    - an `error` event (the gateway's call to the Conductor API failed)
  never_ends      - a few events, then silence forever
  cut             - the connection drops mid-stream
  vanished        - the run happens, but the job is gone (404) before the first read
  any sync behaviour (json, fenced, garbage, run_failed, ...) - the real event sequence with that outcome
Set `delay` for a slow model, `gate` (an asyncio.Event) to hold calls until released,
`unknown_agents` to hide agents, `down` for a gateway whose database is unavailable.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
import uuid
from collections import defaultdict, deque
from functools import cached_property
from pathlib import Path
from typing import Any

import msgspec
import yaml
from litestar import Litestar, Request, Response, delete, get, post, put
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from ..settings import default_agents_dir
from ..tasks import TASKS, Registry
from ..tasks.registry import agent_folder
from . import answers
from .conversations import Conversations, conversation_routes
from .tally import Tally

_encode = msgspec.json.Encoder().encode
VALID = ("json", "fenced", "prose", "trailing_comma")
DB_DOWN = "MongoDB connection not available"
NO_CWD = ("Diretório de trabalho (CWD) não configurado. Configure o CWD nas propriedades do Roteiro antes de "
          "executar o agente.")
NO_SCREENPLAY = ("🚨 ERRO: Tentativa de inserir task na coleção MongoDB com campos obrigatórios faltando:\n❌ Campo "
                 "'screenplay_id' é obrigatório e não pode ser None. Cada execução deve estar associada a um screenplay "
                 "(contexto do projeto).")
CONDUCTOR_URL = "http://conductor-api:8000"  # what leaks into the real gateway's error texts
SQUADS = {"development", "crm", "content", "documentation", "devops", "orchestration", "testing", "career", "other"}


def _json(body: Any, status: int = 200) -> Response[bytes]:
    return Response(_encode(body), status_code=status, media_type="application/json")


def model_text(behaviour: str, agent_id: str, prompt: str, tasks: Registry = TASKS) -> str:
    answer = answers.answer_for(agent_id, prompt, tasks)
    if behaviour == "misclassified" and "score" in answer:
        answer["classification"] = "Cold" if answer["classification"] != "Cold" else "Hot"
    text = _encode(answer).decode()
    if behaviour == "fenced":
        return f"```json\n{text}\n```"
    if behaviour == "prose":
        return f"Here is my analysis of the record you sent.\n{text}\nLet me know if you need anything else."
    if behaviour == "trailing_comma":
        return text[:-1] + ",}"
    if behaviour == "garbage":
        return "I am sorry, I could not analyse this record right now. Please try again later."
    if behaviour == "wrong_shape":
        return _encode({"answer": "looks promising", "confidence": "high"}).decode()
    return text


def agent_document(folder: Path) -> dict[str, Any]:
    """An agent as the Conductor stores it: `{agent_id, definition, persona: {content}}`."""
    definition = yaml.safe_load((folder / "definition.yaml").read_text()) or {}
    return {"agent_id": folder.name, "definition": {**definition, "name": definition.get("name", folder.name)},
            "persona": {"content": (folder / "persona.md").read_text()}, "created_at": None}


def default_registry(tasks: Registry = TASKS, agents_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """The gateway's agent database, holding the agent of every task."""
    root = str(agents_dir or default_agents_dir())
    return {t.agent_id: agent_document(agent_folder(t, root)) for t in tasks.values()}


class GatewayDouble:
    SYNC_FAULTS = ("error_500", "unavailable_503", "garbage", "run_failed")
    STREAM_FAULTS = ("start_fails", "no_result", "stream_error", "cut", "garbage")

    def __init__(self, *, default: str = "fenced", delay: float = 0.0, stream_tokens: int = 0, token_interval: float = 0.0,
                 fault_rate: float = 0.0, seed: int = 0, require_screenplay: bool = True, job_linger: float = 2.0,
                 registry: dict[str, dict[str, Any]] | None = None, tasks: Registry = TASKS) -> None:
        # The tasks whose sample answers its model gives (a test's extra task included).
        self.tasks = tasks
        self.default = default
        # Load runs: this share of calls (queued behaviours aside) gets a random fault, reproducibly.
        self.fault_rate = fault_rate
        self._rng = random.Random(seed)
        self.delay = delay
        # Benchmarks: `tokens` streams this many tokens, each its own send time, paced by `token_interval`.
        self.stream_tokens = stream_tokens
        self.token_interval = token_interval
        self.require_screenplay = require_screenplay
        # The real gateway drops a finished job a few seconds after its task ends.
        self.job_linger = job_linger
        self.gate: asyncio.Event | None = None
        self.down = False
        self.unknown_agents: set[str] = set()
        self.registry = default_registry(tasks) if registry is None else registry
        self.instances: dict[str, dict[str, Any]] = {}
        self.deleted_instances: list[str] = []
        self.script: defaultdict[str, deque[str]] = defaultdict(deque)
        self.calls = Tally()  # model runs started, per agent
        self.prompts: list[tuple[str, str]] = []
        self.request_ids: list[str | None] = []
        self.bodies: list[dict[str, Any]] = []
        self.refused: list[tuple[int, str]] = []  # (status, detail) of every execute the double refused
        self.jobs: dict[str, asyncio.Queue[dict[str, Any] | None]] = {}
        self.stream_reads: Tally = Tally()
        self._producers: set[asyncio.Task[None]] = set()
        self._attached: dict[str, asyncio.Event] = {}
        # The Conductor's conversation store (§6) and what each run replayed of it.
        self.conversations = Conversations()
        self.conversation_calls: list[tuple[str, str]] = []
        self.fail_messages = False  # POST .../messages answers 500 (the Conductor's database failing)
        self.runs: list[dict[str, Any]] = []  # {agent_id, conversation_id, input, history, saved}

    def _replay(self, agent_id: str, body: dict[str, Any], prompt: str) -> None:
        # The Conductor replays a named conversation's history whatever `context_mode` says (§6).
        conversation_id = body.get("conversation_id")
        doc = self.conversations.docs.get(conversation_id or "")
        self.runs.append({"agent_id": agent_id, "conversation_id": conversation_id, "input": prompt,
                          "context": doc.get("context") if doc else None,
                          "history": self.conversations.history(conversation_id),
                          "saved": bool(body.get("save_to_conversation"))})

    def push(self, agent_id: str, *behaviours: str) -> None:
        self.script[agent_id].extend(behaviours)

    def _behaviour(self, agent_id: str, stream: bool = False) -> str:
        queue = self.script[agent_id]
        if queue:
            return queue.popleft()
        if self.fault_rate and self._rng.random() < self.fault_rate:
            return self._rng.choice(self.STREAM_FAULTS if stream else self.SYNC_FAULTS)
        return self.default

    def _known(self, agent_id: str) -> bool:
        return agent_id in self.registry and agent_id not in self.unknown_agents

    def _refuse(self, status: int, detail: Any) -> Response[bytes]:
        self.refused.append((status, detail if isinstance(detail, str) else _encode(detail).decode()))
        return _json({"detail": detail}, status)

    def _listing(self) -> list[dict[str, Any]]:
        return [{"id": a, "name": doc["definition"].get("name", a), "emoji": doc["definition"].get("emoji", "🤖"),
                 "description": doc["definition"].get("description", ""), "prompt": "", "model": "",
                 "is_councilor": False, "mcp_configs": [], "created_at": doc.get("created_at"),
                 "group": doc["definition"].get("group", "other"), "tags": doc["definition"].get("tags", [])}
                for a, doc in self.registry.items() if self._known(a)]

    @cached_property
    def app(self) -> Litestar:
        double = self

        @get("/health")
        async def health() -> Response[bytes]:
            # The real /health touches no database: it says healthy even while MongoDB is down.
            return _json({"status": "healthy", "service": "conductor_gateway", "version": "3.1.0", "timestamp": time.time()})

        @get("/api/agents")
        async def agents() -> Response[bytes]:
            if double.down:  # its MongoDB is down: the Conductor API's own listing comes back instead
                listed = [{"id": a["id"], "name": a["name"], "emoji": "🤖", "description": a["description"],
                           "group": "other", "squads": ["other"], "tags": a["tags"], "created_at": None}
                          for a in double._listing()]
                return _json({"total": len(listed), "agents": listed})
            return _json(double._listing())

        @post("/api/agents", status_code=200)
        async def create_agent(request: Request) -> Response[bytes]:
            body = msgspec.json.decode(await request.body())
            problems = []
            for name, low, high in (("name", 1, None), ("description", 10, 200), ("persona_content", 50, None)):
                value = body.get(name)
                if not isinstance(value, str) or len(value) < low or (high and len(value) > high):
                    problems.append({"type": "string_too_short" if isinstance(value, str) else "missing", "loc": ["body", name]})
            if problems:  # the gateway's own pydantic model
                return _json({"detail": problems}, 422)
            name, persona = body["name"], body["persona_content"]
            # The Conductor API's rules, relayed by the gateway inside a 500 (a 409 stays a 409).
            if not name.endswith("_Agent"):
                return _json({"detail": f"Failed to create agent: Client error '400 Bad Request': name must end with _Agent"}, 500)
            if not persona.lstrip().startswith("#"):
                return _json({"detail": "Failed to create agent: Client error '400 Bad Request': persona must start with #"}, 500)
            if body.get("squads") and not set(body["squads"]) <= SQUADS:
                return _json({"detail": "Failed to create agent: Client error '400 Bad Request': unknown squad"}, 500)
            if name in double.registry:
                return _json({"detail": f"Agent already exists: {name}"}, 409)
            if double.down:
                return _json({"detail": DB_DOWN}, 503)
            double.registry[name] = {
                "agent_id": name, "created_at": dt.datetime.now(dt.UTC).isoformat(),
                "definition": {"name": name, "description": body["description"], "emoji": body.get("emoji", "🤖"),
                               "tags": body.get("tags") or [], "mcp_configs": body.get("mcp_configs") or []},
                "persona": {"content": persona}}
            return _json({"status": "success", "agent_id": name, "message": f"Agent '{name}' created successfully"})

        @put("/api/agents/{agent_id:str}", status_code=200)
        async def update_agent(agent_id: FromPath[str], request: Request) -> Response[bytes]:
            if double.down:
                return _json({"detail": DB_DOWN}, 503)
            doc = double.registry.get(agent_id)
            if doc is None:
                return _json({"detail": f"Agent not found: {agent_id}"}, 404)
            body = msgspec.json.decode(await request.body())
            updated = []
            for field in ("name", "description", "group", "emoji", "tags", "mcp_configs"):
                if body.get(field) is not None:
                    doc["definition"][field] = body[field]
                    updated.append(field)
            if body.get("persona_content") is not None:
                doc["persona"] = {"content": body["persona_content"], "updated_at": dt.datetime.now(dt.UTC).isoformat()}
                updated.append("persona_content")
            return _json({"status": "success", "agent_id": agent_id, "updated_fields": updated,
                          "message": f"Agent '{agent_id}' updated successfully" if updated else "No fields to update"})

        @get("/api/agents/{agent_id:str}/persona")
        async def persona(agent_id: FromPath[str]) -> Response[bytes]:
            doc = double.registry.get(agent_id)
            if doc is None:
                return _json({"detail": f"Agente '{agent_id}' não encontrado"}, 404)
            content = (doc.get("persona") or {}).get("content", "")
            return _json({"agent_id": agent_id, "persona_content": content, "has_persona": bool(content)})

        @delete("/api/agents/instances/{instance_id:str}", status_code=200)
        async def delete_instance(instance_id: FromPath[str], hard: FromQuery[bool] = False, cascade: FromQuery[bool] = False) -> Response[bytes]:
            if double.down:
                return _json({"detail": DB_DOWN}, 503)
            if instance_id not in double.instances:
                return _json({"detail": {"success": False, "error": "Instance not found", "instance_id": instance_id}}, 404)
            if hard:
                del double.instances[instance_id]
                double.deleted_instances.append(instance_id)
            else:
                double.instances[instance_id]["isDeleted"] = True
            return _json({"success": True, "instance_id": instance_id, "deletion_type": "hard" if hard else "soft"})

        @post("/api/agents/{agent_id:str}/execute", status_code=200)
        async def execute(agent_id: FromPath[str], request: Request) -> Response[bytes]:
            body = msgspec.json.decode(await request.body())
            behaviour = double._behaviour(agent_id)
            if double.down or behaviour == "unavailable_503":
                return double._refuse(503, DB_DOWN)
            if not isinstance(body, dict) or not body.get("input_text"):
                return double._refuse(400, "input_text is required")
            if not body.get("instance_id"):
                return double._refuse(400, "instance_id is required. Cannot execute agent without instance context.")
            if not body.get("conversation_id"):
                return double._refuse(400, "conversation_id is required. Cannot execute agent without conversation context.")
            if not double._known(agent_id):
                return double._refuse(404, f"Agent '{agent_id}' not found")
            if not body.get("cwd"):  # the gateway does not check that the directory exists
                return double._refuse(400, NO_CWD)
            if behaviour == "conductor_down":
                return double._refuse(503, f"Cannot connect to Conductor API after 3 attempts: All connection attempts "
                                      f"failed ({CONDUCTOR_URL})")
            if double.require_screenplay and not (body.get("screenplay_id") or body.get("document_id")):
                return double._refuse(500, "Conductor API error: " + _encode({"detail": NO_SCREENPLAY}).decode())
            double.calls.hit(agent_id)
            double.prompts.append((agent_id, body["input_text"]))
            double.bodies.append(body)
            double.request_ids.append(request.headers.get("x-request-id"))
            double._replay(agent_id, body, body["input_text"])
            task_id = uuid.uuid4().hex[:24]
            # `save_to_conversation`: the input and a pending placeholder before the run, the outcome after,
            # whatever it is (a failed run's error text too); an unknown conversation gets nothing.
            placeholder = (double.conversations.save_run(body["conversation_id"], body["input_text"], agent_id,
                                                         body["instance_id"], task_id)
                           if body.get("save_to_conversation") is True else None)
            if double.gate is not None:
                await double.gate.wait()
            if double.delay:
                await asyncio.sleep(double.delay)
            if behaviour == "error_500":  # the run started, then the Conductor API gave up on it
                response = double._refuse(500, "Conductor API error: " + _encode(
                    {"detail": f"⏰ Tempo de espera excedido para a tarefa (task watcher at {CONDUCTOR_URL})"}).decode())
                if placeholder is not None:
                    placeholder.update(content=f"Erro: {double.refused[-1][1]}", status="error")
                return response
            run = double._run_document(behaviour, agent_id, body["input_text"])
            if placeholder is not None:
                placeholder.update(content=run["result"], status="completed" if run["exit_code"] == 0 else "error",
                                   completed_at=dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat())
            double.instances[body["instance_id"]] = {"instance_id": body["instance_id"], "agent_id": agent_id,
                                                     "screenplay_id": body.get("screenplay_id"),
                                                     "conversation_id": body.get("conversation_id")}
            return _json({"status": "success" if run["exit_code"] == 0 else "error",
                          "result": {k: run[k] for k in ("result", "exit_code", "status")},
                          "instance_id": body["instance_id"], "context_mode": body.get("context_mode", "stateless"),
                          "execution_id": f"exec_{agent_id}_{int(time.time() * 1000)}", "task_id": task_id,
                          "duration_ms": int(run["duration"] * 1000)})

        @post("/api/v1/stream-execute", status_code=200)
        async def stream_execute(request: Request) -> Response[bytes]:
            body = msgspec.json.decode(await request.body())
            agent_id = body.get("agent_id", "")
            prompt = body.get("input") or (body.get("textEntries") or [{}])[0].get("content") or body.get("command")
            behaviour = double._behaviour(agent_id, stream=True)
            # The real handler returns (dict, 500) from a FastAPI route: it goes out as a 200 list.
            if behaviour == "start_fails":
                return _json([{"error": "Failed to start job: queue full"}, 500])
            if not agent_id or not prompt:
                return _json([{"error": "400: agent_id and input are required"}, 500])
            if not body.get("cwd"):
                return _json([{"error": f"400: {NO_CWD}"}, 500])
            job_id = f"job_{uuid.uuid4()}"
            if behaviour == "vanished":  # the run goes on, but the job is gone before anyone reads it
                double.calls.hit(agent_id)
                double.bodies.append(body)
                return _json({"job_id": job_id, "status": "started", "stream_url": f"/api/v1/stream/{job_id}"})
            queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
            double.jobs[job_id] = queue
            double._attached[job_id] = asyncio.Event()
            producer = asyncio.create_task(double._produce(job_id, queue, agent_id, prompt, behaviour, body))
            double._producers.add(producer)
            producer.add_done_callback(double._producers.discard)
            return _json({"job_id": job_id, "status": "started", "stream_url": f"/api/v1/stream/{job_id}"})

        @get("/api/v1/stream/{job_id:str}")
        async def stream(job_id: FromPath[str]) -> Response[bytes] | Stream:
            queue = double.jobs.get(job_id)
            if queue is None:
                return Response(f"Job ID '{job_id}' not found or already completed.".encode(), status_code=404,
                                media_type="text/plain")
            double.stream_reads.hit(job_id)
            double._attached.setdefault(job_id, asyncio.Event()).set()

            async def events():
                try:
                    while (envelope := await queue.get()) is not None:
                        if envelope.get("event") == "__cut__":
                            raise ConnectionAbortedError("the double drops the connection mid-stream")
                        # One `data:` line per message: no event names, ids, retry hints or heartbeats.
                        yield b"data: " + _encode(envelope) + b"\n\n"
                finally:
                    double.jobs.pop(job_id, None)  # finished or dropped: the job is gone for good

            return Stream(events(), media_type="text/event-stream")

        return Litestar([health, agents, create_agent, update_agent, persona, delete_instance, execute, stream_execute,
                         stream, *conversation_routes(double)], logging_config=None)

    def _run_document(self, behaviour: str, agent_id: str, prompt: str) -> dict[str, Any]:
        if behaviour == "run_failed":
            return {"result": "Error: claude exited with code 1: rate limit exceeded", "exit_code": 1, "status": "error",
                    "duration": 0.01, "message": "Tarefa falhou"}
        return {"result": model_text(behaviour, agent_id, prompt, self.tasks), "exit_code": 0, "status": "completed", "duration": 0.01,
                "message": "Tarefa concluída com sucesso"}

    def stop(self) -> None:
        """Cancel the model runs still producing events (e.g. `never_ends`)."""
        for producer in list(self._producers):
            producer.cancel()

    async def _produce(self, job_id: str, queue: asyncio.Queue, agent_id: str, prompt: str, behaviour: str,
                       body: dict[str, Any]) -> None:
        try:
            await self._run_job(job_id, queue, agent_id, prompt, behaviour, body)
        finally:
            self._attached.pop(job_id, None)

    async def _run_job(self, job_id: str, queue: asyncio.Queue, agent_id: str, prompt: str, behaviour: str,
                       body: dict[str, Any]) -> None:
        task_id = uuid.uuid4().hex[:24]

        def put(event: str, data: Any) -> None:
            queue.put_nowait({"event": event, "data": data, "timestamp": time.time(), "job_id": job_id, "task_id": task_id})

        # The gateway's background call to the Conductor API: its refusals become an `error` event,
        # and the job is dropped at once (a reader that comes later gets 404).
        refusal = None
        if not self._known(agent_id):
            refusal = f"Server error '500 Internal Server Error' for url '{CONDUCTOR_URL}/agents/{agent_id}/execute'"
        elif self.require_screenplay and not body.get("screenplay_id"):
            refusal = f"Server error '500 Internal Server Error' for url '{CONDUCTOR_URL}/agents/{agent_id}/execute'"
        elif behaviour == "stream_error":
            refusal = "Conductor API request failed: 500"
        if refusal is not None:
            # Its call to the Conductor API takes a moment, so its reader is usually there by then.
            try:
                await asyncio.wait_for(self._attached[job_id].wait(), 1.0)
            except TimeoutError:
                pass
            put("error", {"error": refusal})
            queue.put_nowait(None)
            self.jobs.pop(job_id, None)
            return
        self.calls.hit(agent_id)
        self.prompts.append((agent_id, prompt))
        self.bodies.append(body)
        self._replay(agent_id, body, prompt)  # history used, never saved: the client appends it itself
        put("task_started", {"message": "Tarefa submetida ao Conductor, aguardando processamento..."})
        put("status_update", {"message": "Agente processando a tarefa..."})
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if behaviour == "cut":
            put("__cut__", {})
        elif behaviour == "never_ends":
            await asyncio.Event().wait()
        elif behaviour != "no_result":
            if behaviour == "tokens":
                text = model_text("json", agent_id, prompt, self.tasks)
                put("on_llm_start", {})
                if self.stream_tokens:
                    for _ in range(self.stream_tokens):
                        put("on_llm_new_token", {"token": f"{time.time():.6f}"})
                        if self.token_interval:
                            await asyncio.sleep(self.token_interval)
                else:
                    for i in range(0, len(text), 16):
                        put("on_llm_new_token", {"token": text[i : i + 16]})
                        if self.token_interval:
                            await asyncio.sleep(self.token_interval)
                put("on_llm_end", {})
                run = {"result": text, "exit_code": 0, "status": "completed", "duration": 0.01,
                       "message": "Tarefa concluída com sucesso"}
            else:
                run = self._run_document(behaviour, agent_id, prompt)
            put("result", run)
        queue.put_nowait(None)
        # The gateway forgets a finished job a few seconds after its task ends.
        await asyncio.sleep(self.job_linger)
        self.jobs.pop(job_id, None)
