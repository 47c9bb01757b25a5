"""A Conductor Gateway double with the real wire format and its quirks.

Behaviours (queue them per agent with `push`, or set `default`):
  json, fenced, prose, trailing_comma  - valid output, wrapped the ways real models wrap it
  garbage                              - prose with no JSON at all
  wrong_shape                          - JSON, but not the persona's shape
  misclassified                        - a lead classification that contradicts the score
  task_error                           - 200, but the Conductor task document says "error"
  error_500, unavailable_503           - the gateway's own failures, with FastAPI `detail` bodies
Stream behaviours (for POST /api/v1/stream-execute, same queue):
  tokens          - the answer as on_llm_new_token events, then `result`
  no_result       - events, then the stream closes without a `result`
  start_fails     - 200 with the body `[{"error": ...}, 500]` (the real handler returns a tuple)
  stream_error    - an `error` event
  never_ends      - a few events, then silence forever
  cut             - a few tokens, then the connection drops mid-stream
  any sync behaviour (json, fenced, garbage, ...) - status events, then `result` with that text
Set `delay` for a slow model, `gate` (an asyncio.Event) to hold calls until released,
`unknown_agents` to make agents 404, `down` to make /health and /api/agents fail.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict, deque
from functools import cached_property
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream
from litestar.params import FromPath

from ..agents import AGENT_IDS
from .answers import answer_for
from .tally import Tally

_encode = msgspec.json.Encoder().encode
VALID = ("json", "fenced", "prose", "trailing_comma")


def _json(body: Any, status: int = 200) -> Response[bytes]:
    return Response(_encode(body), status_code=status, media_type="application/json")


def model_text(behaviour: str, agent_id: str, prompt: str) -> str:
    answer = answer_for(agent_id, prompt)
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


class GatewayDouble:
    SYNC_FAULTS = ("error_500", "unavailable_503", "garbage", "task_error")
    STREAM_FAULTS = ("start_fails", "no_result", "stream_error", "cut", "garbage")

    def __init__(self, *, default: str = "fenced", delay: float = 0.0, stream_tokens: int = 0, token_interval: float = 0.0,
                 fault_rate: float = 0.0, seed: int = 0) -> None:
        self.default = default
        # Load runs: this share of calls (queued behaviours aside) gets a random fault, reproducibly.
        self.fault_rate = fault_rate
        self._rng = random.Random(seed)
        self.delay = delay
        # Benchmarks: `tokens` streams this many tokens, each its own send time, paced by `token_interval`.
        self.stream_tokens = stream_tokens
        self.token_interval = token_interval
        self.gate: asyncio.Event | None = None
        self.down = False
        self.unknown_agents: set[str] = set()
        self.script: defaultdict[str, deque[str]] = defaultdict(deque)
        self.calls = Tally()
        self.prompts: list[tuple[str, str]] = []
        self.request_ids: list[str | None] = []
        self.bodies: list[dict[str, Any]] = []
        self.jobs: dict[str, asyncio.Queue[dict[str, Any] | None]] = {}
        self.stream_reads: Tally = Tally()
        self._producers: set[asyncio.Task[None]] = set()

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
        return agent_id in AGENT_IDS and agent_id not in self.unknown_agents

    @cached_property
    def app(self) -> Litestar:
        double = self

        @get("/health")
        async def health() -> Response[bytes]:
            if double.down:
                return _json({"detail": "MongoDB connection not available"}, 503)
            return _json({"status": "healthy", "service": "conductor_gateway", "version": "3.1.0", "timestamp": time.time()})

        @get("/api/agents")
        async def agents() -> Response[bytes]:
            if double.down:
                return _json({"detail": "MongoDB connection not available"}, 503)
            return _json([
                {"id": a, "agent_id": a, "name": a, "emoji": "🤖", "description": f"{a} (double)", "model": "double", "tags": ["crm"]}
                for a in AGENT_IDS if double._known(a)
            ])

        @post("/api/agents/{agent_id:str}/execute", status_code=200)
        async def execute(agent_id: FromPath[str], request: Request) -> Response[bytes]:
            body = msgspec.json.decode(await request.body())
            if not isinstance(body, dict) or not body.get("input_text"):
                return _json({"detail": "input_text is required"}, 400)
            if not double._known(agent_id):
                return _json({"detail": f"Agent '{agent_id}' not found"}, 404)
            double.calls.hit(agent_id)
            double.prompts.append((agent_id, body["input_text"]))
            double.bodies.append(body)
            double.request_ids.append(request.headers.get("x-request-id"))
            behaviour = double._behaviour(agent_id)
            if double.gate is not None:
                await double.gate.wait()
            if double.delay:
                await asyncio.sleep(double.delay)
            if behaviour == "error_500":
                return _json({"detail": "Conductor API request failed: 502 Bad Gateway"}, 500)
            if behaviour == "unavailable_503":
                return _json({"detail": "MongoDB connection not available"}, 503)
            task: dict[str, Any] = {"task_id": uuid.uuid4().hex, "status": "completed", "exit_code": 0, "duration": 0.01}
            if behaviour == "task_error":
                task.update(status="error", exit_code=1, result="", stderr="claude: rate limit exceeded")
            else:
                text = model_text(behaviour, agent_id, body["input_text"])
                task.update(result=text, stdout=text)
            return _json({"status": "success", "result": task, "instance_id": body.get("instance_id"),
                          "context_mode": body.get("context_mode", "stateless")})

        @post("/api/v1/stream-execute", status_code=200)
        async def stream_execute(request: Request) -> Response[bytes]:
            body = msgspec.json.decode(await request.body())
            agent_id = body.get("agent_id", "")
            prompt = body.get("input") or (body.get("textEntries") or [{}])[0].get("content") or body.get("command")
            behaviour = double._behaviour(agent_id, stream=True)
            if behaviour == "unavailable_503":
                return _json({"detail": "MongoDB connection not available"}, 503)
            if behaviour == "start_fails" or not prompt or not double._known(agent_id):
                reason = "agent_id and input are required" if not prompt else f"Agent '{agent_id}' not found"
                # The real handler returns (dict, 500) from a FastAPI route: it goes out as a 200 list.
                return _json([{"error": reason if behaviour != "start_fails" else "Failed to start job: queue full"}, 500])
            double.calls.hit(agent_id)
            double.prompts.append((agent_id, prompt))
            double.bodies.append(body)
            double.request_ids.append(request.headers.get("x-request-id"))
            job_id = f"job_{uuid.uuid4()}"
            queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
            double.jobs[job_id] = queue
            task = asyncio.create_task(double._produce(job_id, queue, agent_id, prompt, behaviour))
            double._producers.add(task)
            task.add_done_callback(double._producers.discard)
            return _json({"job_id": job_id, "status": "started", "stream_url": f"/api/v1/stream/{job_id}"})

        @get("/api/v1/stream/{job_id:str}")
        async def stream(job_id: FromPath[str]) -> Response[bytes] | Stream:
            queue = double.jobs.get(job_id)
            if queue is None:
                return Response(f"Job ID '{job_id}' not found or already completed.".encode(), status_code=404,
                                media_type="text/plain")
            double.stream_reads.hit(job_id)

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

        return Litestar([health, agents, execute, stream_execute, stream], logging_config=None)

    def stop(self) -> None:
        """Cancel the model runs still producing events (e.g. `never_ends`)."""
        for task in list(self._producers):
            task.cancel()

    async def _produce(self, job_id: str, queue: asyncio.Queue, agent_id: str, prompt: str, behaviour: str) -> None:
        def put(event: str, data: Any) -> None:
            queue.put_nowait({"event": event, "data": data, "timestamp": time.time(), "job_id": job_id})

        put("job_started", {"agent_id": agent_id})
        put("status_update", {"message": "Executando agente..."})
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        put("on_chain_start", {"name": "AgentExecutor"})  # unknown to the sidecar: must be ignored
        if behaviour == "stream_error":
            put("error", {"error": "Conductor API request failed: 500"})
        elif behaviour == "cut":
            put("on_llm_start", {})
            put("on_llm_new_token", {"token": "{\"score\": "})
            put("__cut__", {})
        elif behaviour == "never_ends":
            put("on_llm_start", {})
            await asyncio.Event().wait()
        elif behaviour != "no_result":
            text = model_text("json" if behaviour == "tokens" else behaviour, agent_id, prompt)
            if behaviour == "tokens":
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
            put("result", {"result": text, "exit_code": 0, "status": "completed", "duration": 0.01})
        queue.put_nowait(None)
