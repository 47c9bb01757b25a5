"""The Conductor's conversation store behind the gateway's `/api/conversations` (docs: upstreams.md §6).

What it reproduces, quirks included:
- the Conductor chooses the conversation id (a uuid4) on `POST /api/conversations/`; without the trailing
  slash the gateway answers 307; a title outside 3-100 characters is a **500** "Erro ao criar conversa: ...";
- `GET .../{id}` drops `isDeleted`/`display_order`, so a soft-deleted conversation reads like any other;
- `GET .../{id}/messages?limit=N` returns every stored message (the newest N), 200 with none for an unknown id;
- `POST .../{id}/messages` adds a user message if `user_input`, a bot message only if `agent_response` **and**
  `agent_info` (the agent joins `participants` once); nothing to add or an unknown id is a 400, an
  `agent_info` without `name` a 422;
- the list is the gateway's own: `{"success", "count", "conversations": [whole documents, "_id" a string]}`,
  newest `updated_at` first, filtered only on `screenplay_id` (exact) and `isDeleted != true`; `limit`/`skip`
  are ignored and there is no owner filter;
- DELETE is the gateway's soft delete (`isDeleted`, `deletedAt`, and its `agent_instances` marked); unknown or
  already deleted: 404;
- `history(id)`: what a run naming the conversation replays to the model (PromptEngine): the messages minus
  deleted, hidden and pending ones, the last 100 messages, a user message paired with the next bot answer.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

if TYPE_CHECKING:
    from .gateway import GatewayDouble

_encode = msgspec.json.Encoder().encode
HISTORY_MESSAGES = 100  # PromptEngine's MAX_HISTORY_TURNS: messages, not pairs
_DETAIL_FIELDS = ("conversation_id", "title", "created_at", "updated_at", "active_agent", "participants", "messages",
                  "screenplay_id", "context", "allowed_agents", "max_chain_depth", "auto_delegate")
_AGENT_INFO = ("agent_id", "instance_id", "name", "emoji")


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat()  # naive UTC, as datetime.utcnow()


def _json(body: Any, status: int = 200) -> Response[bytes]:
    return Response(_encode(body), status_code=status, media_type="application/json")


def _unprocessable(loc: list[str], msg: str) -> Response[bytes]:
    return _json({"detail": [{"type": "value_error", "loc": loc, "msg": msg}]}, 422)


class Conversations:
    """`conductor_state.conversations`, as ConversationService writes it."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        title = body.get("title") or f"Conversa {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')}"
        if not 3 <= len(title) <= 100:
            raise ValueError("O título deve ter entre 3 e 100 caracteres")
        agent = body.get("active_agent")
        same = [d for d in self.docs.values() if d.get("screenplay_id") == body.get("screenplay_id")] if body.get(
            "screenplay_id") else list(self.docs.values())
        stamp = now()
        doc = {"_id": secrets.token_hex(12), "conversation_id": str(uuid.uuid4()), "title": title, "created_at": stamp,
               "updated_at": stamp, "active_agent": agent, "participants": [agent] if agent else [], "messages": [],
               "screenplay_id": body.get("screenplay_id"), "context": body.get("context"),
               "allowed_agents": body.get("allowed_agents"),
               "display_order": max((d.get("display_order", -1) for d in same), default=-1) + 1,
               "max_chain_depth": body.get("max_chain_depth", 10), "auto_delegate": body.get("auto_delegate", True)}
        self.docs[doc["conversation_id"]] = doc
        return doc

    def add(self, conversation_id: str, user_input: str | None, agent_response: str | None,
            agent_info: dict[str, Any] | None) -> bool:
        doc = self.docs.get(conversation_id)
        stamp = now()
        new = []
        if user_input:
            new.append({"id": str(uuid.uuid4()), "type": "user", "content": user_input, "timestamp": stamp})
        if agent_response and agent_info:
            new.append({"id": str(uuid.uuid4()), "type": "bot", "content": agent_response, "timestamp": stamp,
                        "agent": {k: agent_info.get(k) for k in _AGENT_INFO}})
            if doc is not None and not any(p.get("agent_id") == agent_info.get("agent_id") for p in doc["participants"]):
                doc["participants"].append(agent_info)
        if not new or doc is None:
            return False
        doc["messages"].extend(new)
        doc["updated_at"] = stamp
        return True

    def history(self, conversation_id: str | None) -> list[tuple[str, str]]:
        """The (user, assistant) turns a run naming this conversation replays (deleted conversations too)."""
        doc = self.docs.get(conversation_id or "")
        if doc is None:
            return []
        active = [m for m in doc["messages"] if not m.get("isDeleted") and not m.get("isHidden")
                  and m.get("status") != "pending"]
        recent = sorted(active[-HISTORY_MESSAGES:], key=lambda m: m.get("timestamp") or "")
        turns, i = [], 0
        while i < len(recent):
            message = recent[i]
            if message.get("type") != "user":
                i += 1
                continue
            answered = i + 1 < len(recent) and recent[i + 1].get("type") in ("assistant", "ai", "bot")
            answer = recent[i + 1].get("content", "") if answered else ""
            i += 2 if answered else 1
            if answer:  # a user message without an answer is left out
                turns.append((message.get("content", ""), answer))
        return turns

    def save_run(self, conversation_id: str, user_input: str, agent_id: str, instance_id: str,
                 task_id: str) -> dict[str, Any] | None:
        """The gateway's `save_to_conversation`: the user message and a pending bot placeholder, before the run."""
        doc = self.docs.get(conversation_id)
        if doc is None:
            return None
        stamp = now()
        placeholder = {"id": str(uuid.uuid4()), "type": "bot", "content": "Aguardando processamento...", "timestamp": stamp,
                       "status": "pending", "task_id": task_id,
                       "agent": {"agent_id": agent_id, "instance_id": instance_id, "name": agent_id, "emoji": "🤖"}}
        doc["messages"].extend([{"id": str(uuid.uuid4()), "type": "user", "content": user_input, "timestamp": stamp},
                                placeholder])
        doc["updated_at"] = stamp
        return placeholder


def conversation_routes(double: GatewayDouble) -> list[HTTPRouteHandler]:
    store = double.conversations

    def detail(doc: dict[str, Any]) -> dict[str, Any]:
        return {k: doc.get(k) for k in _DETAIL_FIELDS}

    @post(["/api/conversations"], status_code=200)
    async def create(request: Request) -> Response[bytes]:
        path = (request.scope.get("raw_path") or request.scope["path"].encode()).decode("latin-1")
        if not path.endswith("/"):  # FastAPI's redirect_slashes
            return Response(b"", status_code=307, headers={"location": f"{request.url.scheme}://{request.url.netloc}{path}/"})
        double.conversation_calls.append(("POST", "/api/conversations/"))
        body = msgspec.json.decode(await request.body() or b"{}")
        depth = body.get("max_chain_depth", 10)
        if depth is not None and not (isinstance(depth, int) and 1 <= depth <= 100):
            return _unprocessable(["body", "max_chain_depth"], "Input should be between 1 and 100")
        agent = body.get("active_agent")
        if agent is not None and not all(isinstance(agent.get(k), str) for k in ("agent_id", "instance_id", "name")):
            return _unprocessable(["body", "active_agent"], "Field required")
        try:
            doc = store.create(body)
        except ValueError as exc:
            return _json({"detail": f"Erro ao criar conversa: {exc}"}, 500)
        return _json({"conversation_id": doc["conversation_id"], "title": doc["title"], "created_at": doc["created_at"]})

    @get(["/api/conversations"])
    async def listing(request: Request) -> Response[bytes]:
        double.conversation_calls.append(("GET", "/api/conversations/"))
        screenplay = request.query_params.get("screenplay_id")
        deleted = request.query_params.get("include_deleted", "false").lower() in ("true", "1")
        docs = [{**d, "messages": list(d["messages"])} for d in store.docs.values()
                if (not screenplay or d.get("screenplay_id") == screenplay) and (deleted or d.get("isDeleted") is not True)]
        docs.sort(key=lambda d: d["updated_at"], reverse=True)
        return _json({"success": True, "count": len(docs), "conversations": docs})

    @get("/api/conversations/{conversation_id:str}")
    async def read(conversation_id: FromPath[str]) -> Response[bytes]:
        double.conversation_calls.append(("GET", "/api/conversations/{id}"))
        doc = store.docs.get(conversation_id)
        if doc is None:
            return _json({"detail": f"Conversa não encontrada: {conversation_id}"}, 404)
        return _json(detail(doc))

    @get("/api/conversations/{conversation_id:str}/messages")
    async def messages(conversation_id: FromPath[str], request: Request) -> Response[bytes]:
        raw = request.query_params.get("limit")
        if raw is not None and (not raw.isdigit() or int(raw) < 1):
            return _unprocessable(["query", "limit"], "Input should be greater than or equal to 1")
        doc = store.docs.get(conversation_id)
        found = list(doc["messages"]) if doc else []
        if raw is not None:
            found = found[-int(raw):]
        return _json({"conversation_id": conversation_id, "total": len(found), "messages": found})

    @post("/api/conversations/{conversation_id:str}/messages", status_code=200)
    async def add(conversation_id: FromPath[str], request: Request) -> Response[bytes]:
        double.conversation_calls.append(("POST", "/api/conversations/{id}/messages"))
        body = msgspec.json.decode(await request.body() or b"{}")
        info = body.get("agent_info")
        if info is not None and not all(isinstance(info.get(k), str) for k in ("agent_id", "instance_id", "name")):
            return _unprocessable(["body", "agent_info", "name"], "Field required")
        if double.fail_messages:
            return _json({"detail": "Erro ao adicionar mensagem: connection closed"}, 500)
        if not store.add(conversation_id, body.get("user_input"), body.get("agent_response"), info):
            return _json({"detail": "Erro ao adicionar mensagem"}, 400)
        return _json({"success": True, "message": "Mensagem adicionada com sucesso"})

    @patch("/api/conversations/{conversation_id:str}/title")
    async def title(conversation_id: FromPath[str], request: Request) -> Response[bytes]:
        new = request.query_params.get("new_title")
        if new is None or not 3 <= len(new) <= 100:
            return _unprocessable(["query", "new_title"], "String should have between 3 and 100 characters")
        doc = store.docs.get(conversation_id)
        if doc is None:
            return _json({"detail": f"Conversa não encontrada: {conversation_id}"}, 404)
        doc.update(title=new, updated_at=now())
        return _json({"success": True, "message": "Título atualizado com sucesso", "new_title": new})

    @patch("/api/conversations/{conversation_id:str}/context")
    async def context(conversation_id: FromPath[str], request: Request) -> Response[bytes]:
        body = msgspec.json.decode(await request.body() or b"{}")
        doc = store.docs.get(conversation_id)
        if doc is None:
            return _json({"detail": f"Conversa não encontrada: {conversation_id}"}, 404)
        doc.update(context=body.get("context"), updated_at=now())
        return _json({"success": True, "message": "Contexto atualizado com sucesso"})

    @delete("/api/conversations/{conversation_id:str}", status_code=200)
    async def remove(conversation_id: FromPath[str]) -> Response[bytes]:
        double.conversation_calls.append(("DELETE", "/api/conversations/{id}"))
        doc = store.docs.get(conversation_id)
        if doc is None or doc.get("isDeleted") is True:
            return _json({"detail": "Conversa não encontrada ou já deletada"}, 404)
        doc.update(isDeleted=True, deletedAt=now(), updated_at=now())
        marked = 0
        for instance in double.instances.values():
            if instance.get("conversation_id") == conversation_id and not instance.get("isDeleted"):
                instance.update(isDeleted=True, deletedReason="conversation_deleted")
                marked += 1
        return _json({"success": True, "message": "Conversa deletada com sucesso", "conversation_id": conversation_id,
                      "instances_deleted": marked})

    return [create, listing, read, messages, add, title, context, remove]
