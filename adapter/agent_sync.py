"""`adapter agents sync`: make the gateway's agents match `conductor-agents/`.

The real gateway keeps agents in its MongoDB, so copying the folders anywhere
registers nothing. Its own API does: `POST /api/agents` creates an agent (relayed
to the Conductor API, which answers 409 when it exists), `PUT /api/agents/{id}`
updates one in place. Both are idempotent here: an agent whose description, tags
and persona already match is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from .upstreams.gateway import GatewayClient, public_detail
from .settings import ConfigError

Outcome = Literal["created", "updated", "unchanged", "invalid", "failed"]


@dataclass(frozen=True, slots=True)
class LocalAgent:
    agent_id: str
    description: str
    tags: list[str]
    emoji: str
    persona: str

    def problems(self) -> list[str]:
        """What the gateway and the Conductor API would refuse, said before asking them."""
        found = []
        if not self.agent_id.endswith("_Agent"):
            found.append("its id must end with `_Agent`")
        if not 10 <= len(self.description) <= 200:
            found.append(f"definition.yaml `description` must be 10-200 characters (has {len(self.description)})")
        if not self.persona.lstrip().startswith("#") or len(self.persona) < 50:
            found.append("persona.md must start with a `#` heading and hold at least 50 characters")
        return found

    def body(self) -> dict[str, Any]:
        return {"description": self.description, "tags": self.tags, "emoji": self.emoji, "persona_content": self.persona}


@dataclass(frozen=True, slots=True)
class Synced:
    agent_id: str
    outcome: Outcome
    detail: str = ""


def local_agents(agents_dir: str, agent_ids: tuple[str, ...]) -> list[LocalAgent]:
    root = Path(agents_dir)
    agents = []
    for agent_id in agent_ids:
        folder = root / agent_id
        try:
            meta = yaml.safe_load((folder / "definition.yaml").read_text()) or {}
            persona = (folder / "persona.md").read_text()
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"CONDUCTOR_AGENTS_DIR: cannot read agent {agent_id}: {exc}") from None
        agents.append(LocalAgent(agent_id=agent_id, description=str(meta.get("description") or "").strip(),
                                 tags=[str(t) for t in meta.get("tags") or []], emoji=str(meta.get("emoji") or "🤖"),
                                 persona=persona))
    return agents


def same_persona(a: str | None, b: str) -> bool:
    # Editors and MongoDB round-trips may differ in trailing white space only.
    return a is not None and a.strip() == b.strip()


async def drift(gateway: GatewayClient, agent: LocalAgent, listed: dict[str, Any]) -> list[str]:
    """How the gateway's copy of a listed agent differs from the local one."""
    differs = []
    if str(listed.get("description") or "").strip() != agent.description:
        differs.append("description")
    if list(listed.get("tags") or []) != agent.tags:
        differs.append("tags")
    if not same_persona(await gateway.persona(agent.agent_id), agent.persona):
        differs.append("persona")
    return differs


async def sync_agents(gateway: GatewayClient, agents: list[LocalAgent]) -> list[Synced]:
    listed = await gateway.agents()
    results = []
    for agent in agents:
        if problems := agent.problems():
            results.append(Synced(agent.agent_id, "invalid", "; ".join(problems)))
            continue
        try:
            results.append(await _sync_one(gateway, agent, listed.get(agent.agent_id)))
        except httpx.HTTPError as exc:
            results.append(Synced(agent.agent_id, "failed", f"{type(exc).__name__}: {exc}"))
    return results


async def _sync_one(gateway: GatewayClient, agent: LocalAgent, listed: dict[str, Any] | None) -> Synced:
    if listed is None:
        response = await gateway.create_agent({"name": agent.agent_id, **agent.body()})
        if response.status_code == 200:
            return Synced(agent.agent_id, "created")
        if response.status_code != 409:  # 409: it exists, though the listing (a fallback, say) did not show it
            return Synced(agent.agent_id, "failed", f"POST /api/agents answered {response.status_code}: {public_detail(response)}")
        differs = ["unlisted"]
    else:
        differs = await drift(gateway, agent, listed)
        if not differs:
            return Synced(agent.agent_id, "unchanged")
    response = await gateway.update_agent(agent.agent_id, agent.body())
    if response.status_code != 200:
        return Synced(agent.agent_id, "failed", f"PUT /api/agents/{agent.agent_id} answered {response.status_code}: "
                                                f"{public_detail(response)}")
    return Synced(agent.agent_id, "updated", ", ".join(differs))
