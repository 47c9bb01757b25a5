"""The one way to get an answer (pipeline/answers.py), through seams the routes do not show: the policy a
thread's turn asks with (`TURN`), and the fresh-answer hook point (`Answers.on_fresh`).

The sidecar runs in process with the doubles; a question is prepared as every route prepares one
(`AiService.prepare`, the CRM read included). Waits are on the gateway double's call tally, under deadlines.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from adapter.errors import InvalidAgentOutput, RateLimited
from adapter.pipeline.answers import TURN, Answer, Answers
from adapter.pipeline.service import InConversation, Prepared
from tests.helpers import LEAD_AGENT, QUALIFY, Clock, make_settings


async def prepared(answers: Answers, seed: dict, lead: str, user: str = "thread-user") -> Prepared:
    task = answers.service.tasks["lead.qualify"]
    request = msgspec.convert({"lead_id": lead}, task.request_type)
    return await answers.service.prepare(task, request, f"Bearer {seed['token']}", user)


async def test_a_thread_turn_joins_the_call_in_the_air_and_neither_reads_nor_keeps_the_cache(make_client, seed, auth, gateway):
    clock = Clock()
    async with make_client(clock=clock) as client:
        answers: Answers = client._transport.app.state.answers  # type: ignore[attr-defined]
        stored = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
        clock.now += 30
        question = await prepared(answers, seed, seed["leads"][0])
        gateway.gate = asyncio.Event()  # the model thinks until released: both turns are in the air together
        turns = [asyncio.create_task(answers.ask(question, mode=TURN)) for _ in range(2)]
        await asyncio.wait_for(gateway.calls.reach(2), 10)  # the stored answer's call, and one for both turns
        gateway.gate.set()
        first, second = await asyncio.wait_for(asyncio.gather(*turns), 10)
        after = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    assert stored.headers["x-cache"] == "MISS"
    # Not looked up: a fresh stored answer was there, and the turns asked the model anyway, once between them.
    assert first.x_cache == second.x_cache == "MISS" and gateway.calls[LEAD_AGENT] == 2
    assert first.body == second.body and first.result is not None
    # Not kept: the entry is still the one stored 30 s before the turns.
    assert after.headers["x-cache"] == "HIT" and after.headers["age"] == "30"


async def test_a_thread_turn_spends_the_users_rate_limit(make_client, seed, gateway):
    async with make_client(settings=make_settings(rate_limit_lead_qualify="1/60")) as client:
        answers: Answers = client._transport.app.state.answers  # type: ignore[attr-defined]
        question = await prepared(answers, seed, seed["leads"][0])
        answered = await answers.ask(question, mode=TURN)
        with pytest.raises(RateLimited):
            await answers.ask(question, mode=TURN)
        other = await answers.ask(await prepared(answers, seed, seed["leads"][0], user="someone-else"), mode=TURN)
    assert answered.x_cache == other.x_cache == "MISS" and gateway.calls[LEAD_AGENT] == 2


async def test_the_fresh_answer_hook_sees_each_fresh_answer_once_and_never_fails_it(make_client, seed, auth, gateway):
    seen: list[tuple[str, str, Any]] = []

    async def record(question: Prepared, answer: Answer) -> None:
        seen.append((question.record_id, answer.x_cache, answer.provider))

    async def broken(question: Prepared, answer: Answer) -> None:
        raise RuntimeError("a notification backend that is down")

    async with make_client() as client:
        answers: Answers = client._transport.app.state.answers  # type: ignore[attr-defined]
        answers.on_fresh += [broken, record]
        with capture_logs() as logs:
            fresh = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
            hit = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
            bypass = await client.post(QUALIFY, json={"lead_id": seed["leads"][1]}, headers={**auth, "Cache-Control": "no-store"})
    assert [r.headers["x-cache"] for r in (fresh, hit, bypass)] == ["MISS", "HIT", "BYPASS"]
    assert all(r.status_code == 200 for r in (fresh, hit, bypass))
    assert seen == [(seed["leads"][0], "MISS", fresh.json()["provider"]), (seed["leads"][1], "BYPASS", bypass.json()["provider"])]
    failed = [e for e in logs if e["event"] == "answer.hook_failed"]
    assert len(failed) == 2 and all(e["hook"].endswith("broken") for e in failed)


async def test_a_question_in_a_conversation_names_it_and_keeps_the_validated_answer_once(make_client, seed, gateway):
    """A thread's turn (pipeline/threads.py) asks through here: the run names the conversation (the Conductor replays
    its history), the repair names none, and the validated answer is kept once per call, whoever joined it."""
    kept: list[Any] = []

    async def keep(result: Any) -> None:
        kept.append(result)

    async with make_client() as client:
        answers: Answers = client._transport.app.state.answers  # type: ignore[attr-defined]
        question = dataclasses.replace(await prepared(answers, seed, seed["leads"][0]),
                                       conversation=InConversation("conversation-1", keep))
        runs = len(gateway.runs)
        gateway.push(LEAD_AGENT, "garbage")  # the first answer breaks the contract: one repair call
        gateway.gate = asyncio.Event()
        turns = [asyncio.create_task(answers.ask(question, mode=TURN)) for _ in range(2)]
        await asyncio.wait_for(gateway.calls.reach(1), 10)
        gateway.gate.set()
        first, second = await asyncio.wait_for(asyncio.gather(*turns), 10)
    turn_run, repair_run = gateway.runs[runs:]
    assert turn_run["conversation_id"] == "conversation-1" and repair_run["conversation_id"] != "conversation-1"
    assert len(kept) == 1 and msgspec.json.encode(kept[0]) == first.body == second.body


async def test_an_answer_that_stays_invalid_is_never_kept_in_its_conversation(make_client, seed, gateway):
    kept: list[Any] = []

    async def keep(result: Any) -> None:
        kept.append(result)

    async with make_client() as client:
        answers: Answers = client._transport.app.state.answers  # type: ignore[attr-defined]
        question = dataclasses.replace(await prepared(answers, seed, seed["leads"][0]),
                                       conversation=InConversation("conversation-1", keep))
        gateway.push(LEAD_AGENT, "garbage", "garbage")
        with pytest.raises(InvalidAgentOutput):
            await answers.ask(question, mode=TURN)
    assert kept == []
