"""Client of the Conductor's conversation store, through the gateway's `/api/conversations` (upstreams.md §6).

What the real store does, and what this client does about it:
- The Conductor chooses a conversation's id (create first, then run); the id must look like the uuid4 it
  makes, or it is not used (it becomes a thread id the sidecar hands out and looks up).
- The gateway's list filters only on `screenplay_id` (exact) and hides soft-deleted conversations; it has
  no owner filter and no paging and answers whole documents: the caller picks the `screenplay_id`, and
  what comes back is read within a bound.
- The gateway's DELETE is soft: GET still reads a deleted conversation, and nothing in its answer says so.
- Conversation routes are proxied by the gateway with a 30 s timeout (504), 502 when the Conductor is
  unreachable; every answer is upstream text, decoded into shapes and bounded here.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import httpx
import msgspec

from ..context import outbound_headers
from ..errors import AdapterError, GatewayProtocolError, GatewayRejected, GatewayUnavailable
from ..settings import Settings
from .gateway import UPSTREAM, public_detail
from .http import UNREADABLE, transport_error
from .transport import Reply, TooLarge, exchange

# The gateway proxies these routes with a 30 s timeout of its own.
CALL_TIMEOUT = 35.0
# The most of one answer read: the list holds whole documents (every message of every listed conversation).
BODY_MAX = 8 * 1024 * 1024
CONVERSATION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_encode = msgspec.json.Encoder().encode


class Message(msgspec.Struct, kw_only=True):
    id: str = ""
    type: str = ""
    content: Any = None
    timestamp: str = ""
    status: str | None = None
    isDeleted: Any = False  # noqa: N815 - the Conductor's field names
    isHidden: Any = False  # noqa: N815
    agent: dict[str, Any] | None = None

    @property
    def replayed(self) -> bool:
        """Whether the Conductor replays it into prompts (PromptEngine drops deleted, hidden and pending ones)."""
        return not self.isDeleted and not self.isHidden and self.status != "pending"


class Conversation(msgspec.Struct, kw_only=True):
    conversation_id: str
    title: str = ""
    created_at: str = ""
    updated_at: str = ""
    screenplay_id: str | None = None
    context: str | None = None
    messages: list[Message] = []


class _Created(msgspec.Struct):
    conversation_id: str


class _Listed(msgspec.Struct):
    conversations: list[Conversation]


_decode_conversation = msgspec.json.Decoder(Conversation).decode
_decode_created = msgspec.json.Decoder(_Created).decode
_decode_listed = msgspec.json.Decoder(_Listed).decode


def agent_info(agent_id: str, instance_id: str, name: str) -> dict[str, str]:
    return {"agent_id": agent_id, "instance_id": instance_id, "name": name, "emoji": "🤖"}


class ConversationsClient:
    """The conversation routes on the gateway's HTTP client (the one agent runs use)."""

    def __init__(self, http: httpx.AsyncClient, settings: Settings) -> None:
        self._http = http
        self._settings = settings

    async def _call(self, method: str, path: str, *, content: bytes | None = None,
                    params: dict[str, str] | None = None) -> Reply:
        if params:
            path = f"{path}?{urlencode(params)}"
        try:
            return await exchange(self._http, method, path, content=content, timeout=CALL_TIMEOUT, limit=BODY_MAX,
                                  headers={"Content-Type": "application/json", **outbound_headers()})
        except TooLarge as exc:
            raise GatewayProtocolError(f"the {UPSTREAM} answered {exc.status_code} with a body of more than "
                                       f"{BODY_MAX // (1024 * 1024)} MiB; read no further") from None
        except (httpx.TransportError, TimeoutError) as exc:
            raise transport_error(exc, upstream=UPSTREAM, unavailable=GatewayUnavailable, slug="gateway-timeout",
                                  read_timeout=CALL_TIMEOUT) from None

    def _failure(self, what: str, response: Reply) -> AdapterError:
        detail = f"the {UPSTREAM}'s conversation store answered {response.status_code} to {what}: {public_detail(response)}"
        if response.status_code in (502, 503, 504):  # the gateway could not reach the Conductor, or its database
            return GatewayUnavailable(detail)
        return GatewayRejected(detail)

    def _decode(self, what: str, response: Reply, decoder: Any) -> Any:
        try:
            return decoder(response.content)
        except (*UNREADABLE, msgspec.ValidationError):
            raise GatewayProtocolError(f"the {UPSTREAM} answered {what} with a body that is not a conversation document") from None

    async def create(self, *, title: str, screenplay_id: str, context: str, active_agent: dict[str, str]) -> str:
        """A new conversation; its id, chosen by the Conductor."""
        body = {"title": title, "screenplay_id": screenplay_id, "context": context, "active_agent": active_agent,
                "allowed_agents": [active_agent["agent_id"]], "max_chain_depth": 1, "auto_delegate": False}
        # The trailing slash: without it the gateway answers 307.
        response = await self._call("POST", "/api/conversations/", content=_encode(body))
        if response.status_code != 200:
            raise self._failure("creating a conversation", response)
        created = self._decode("the creation", response, _decode_created)
        if not CONVERSATION_ID.fullmatch(created.conversation_id):
            raise GatewayProtocolError(f"the {UPSTREAM} created a conversation whose id is not a uuid4")
        return created.conversation_id

    async def get(self, conversation_id: str) -> Conversation | None:
        """The conversation, or None when the Conductor has none by that id (a soft-deleted one is still read)."""
        response = await self._call("GET", f"/api/conversations/{conversation_id}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._failure("reading a conversation", response)
        conversation = self._decode("a conversation's read", response, _decode_conversation)
        if conversation.conversation_id != conversation_id:
            raise GatewayProtocolError(f"the {UPSTREAM} answered a read of one conversation with another")
        return conversation

    async def listed(self, screenplay_id: str) -> list[Conversation]:
        """The conversations the gateway lists for `screenplay_id` (soft-deleted ones hidden), every one whole."""
        response = await self._call("GET", "/api/conversations/", params={"screenplay_id": screenplay_id,
                                                                          "include_deleted": "false"})
        if response.status_code != 200:
            raise self._failure("listing conversations", response)
        listed = self._decode("the list", response, _decode_listed).conversations
        # No owner filter upstream, and an exact filter is the gateway's promise, not ours to assume.
        return [c for c in listed if c.screenplay_id == screenplay_id]

    async def append(self, conversation_id: str, *, user_input: str, agent_response: str, agent: dict[str, str]) -> None:
        """One user message and the agent's answer, in one write (one `$push` of both, one timestamp)."""
        response = await self._call("POST", f"/api/conversations/{conversation_id}/messages", content=_encode(
            {"user_input": user_input, "agent_response": agent_response, "agent_info": agent}))
        if response.status_code != 200:
            raise self._failure("adding a turn", response)

    async def retitle(self, conversation_id: str, title: str) -> None:
        response = await self._call("PATCH", f"/api/conversations/{conversation_id}/title", params={"new_title": title})
        if response.status_code != 200:
            raise self._failure("renaming a conversation", response)

    async def delete(self, conversation_id: str) -> bool:
        """The gateway's soft delete; False when it says the conversation is unknown or already deleted."""
        response = await self._call("DELETE", f"/api/conversations/{conversation_id}")
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise self._failure("deleting a conversation", response)
        return True
