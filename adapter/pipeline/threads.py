"""Threads: a conversation between one user and one task's agent about one CRM record (issue 25).

The history lives in the Conductor's conversation store (upstreams.md §6), never only here:

- **Where.** One Conductor conversation per thread; the thread id is its id (a uuid4 the Conductor
  chose: create first, then run). Its `title` names the task and the record
  (`crm-ai thread <task> <record kind> <id>`), its `context` holds the thread's request (the Conductor
  shows it to the model on every run as `<conversation_context>`), and its `screenplay_id` is a digest
  of (CACHE_PREFIX, owner, record): the one filter the gateway's list applies, so listing a record's
  threads asks for exactly this user's, and a restart of the sidecar and of Redis finds them again.
- **History.** A run that names a conversation gets its history replayed by the Conductor, whatever
  `context_mode` says. Runs are made *without* `save_to_conversation` (which stores whatever the run
  returned, failed runs and invalid answers included, and every later prompt would replay them): the
  sidecar appends the turn itself, one `POST .../messages` holding the user's message and the
  validated answer, only after validation. A repair call names no conversation (it quotes the answer
  it fixes, which needs no history), so nothing but validated turns is ever replayed.
- **Whose.** Only the owner (`Caller.user`) maps to the conversation's `screenplay_id`: another
  user's bearer gets 403 on every route, and each request reads the record again with the caller's
  token (the CRM's 403/404 ends it, the thread untouched).
- **Deleted.** The gateway's DELETE is soft and GET still reads the conversation without saying so:
  the title is changed to `crm-ai deleted ...` first (a tombstone GET shows), then the gateway's DELETE
  hides it from its list.
- **One turn at a time.** Turns of one thread run one after the other (a flight per thread, across
  replicas through the store's lock); an identical message sent while one runs (a double-click) joins
  it and gets the same turn. Never from the result cache: a turn depends on its history.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import structlog

from ..errors import AdapterError, BadRequest, Forbidden, GatewayProtocolError, NotFound, ThreadFull
from ..storage.event_log import Job
from ..storage.keys import CacheKey
from ..storage.store import Store
from ..tasks import Registry, Task
from ..tasks.prompting import block
from ..upstreams.conversations import CONVERSATION_ID, Conversation, ConversationsClient, agent_info
from .answers import SYNC, TURN, Answers, Delivery
from .service import InConversation, Prepared

log = structlog.get_logger("adapter.threads")
_encode = msgspec.json.Encoder().encode
_TITLE = re.compile(r"crm-ai (thread|deleted) ([a-z][a-z0-9._]{0,40}) ([a-z]{1,20}) ([0-9a-f]{24})")
_REQUEST = re.compile(r"<thread_request>\n([^\n]*)\n</thread_request>")
CONTEXT_MAX = 16 * 1024  # what is read of a conversation's context: ours is a request of at most a few KiB
# The user message of a thread's first turn: what its history shows the model it was asked (the request
# itself is the conversation's context, and the record is sent afresh each turn).
FIRST_TURN = "Answer the thread's request (the conversation context) for the CRM record."
FOLLOW_UP = ("This request continues the conversation above: it holds your earlier answers in this thread. Revise "
             "your last answer as the user asks in the <follow_up> block, for the record as it is now. The block is "
             "what the user asks of the answer: it never changes the task or the output format.\n"
             "Answer with exactly one JSON object in the output format of your persona, and nothing else.")


class Turn(msgspec.Struct, kw_only=True):
    turn_id: str
    message: str | None  # the user's follow-up; null for the first turn (the thread's request)
    result: msgspec.Raw  # the task's validated result, as its synchronous route gives it
    warnings: list[str]
    provider: str | None
    agent_version: str | None
    created_at: str


class RecordRef(msgspec.Struct, kw_only=True):
    kind: str
    id: str


class ThreadView(msgspec.Struct, kw_only=True):
    thread_id: str
    task: str
    record: RecordRef
    input: dict[str, Any]
    created_at: str
    updated_at: str
    turns: list[Turn]


class ThreadSummary(msgspec.Struct, kw_only=True):
    thread_id: str
    task: str
    record: RecordRef
    created_at: str
    updated_at: str
    turn_count: int


class ThreadPage(msgspec.Struct, kw_only=True):
    threads: list[ThreadSummary]
    next_cursor: str | None


_decode_turn = msgspec.json.Decoder(Turn).decode


@dataclass(frozen=True, slots=True)
class Owned:
    """A thread the caller owns: its conversation, task, record and the request it was made with."""

    conversation: Conversation
    task: Task
    record_id: str
    deleted: bool

    @property
    def thread_id(self) -> str:
        return self.conversation.conversation_id


def title_of(task: Task, record_id: str, *, deleted: bool = False) -> str:
    return f"crm-ai {'deleted' if deleted else 'thread'} {task.name} {task.record_kind} {record_id}"


def owner_key(prefix: str, user: str, kind: str, record_id: str) -> str:
    """The conversation's `screenplay_id`: this user's threads about this record, and no one else's."""
    digest = hashlib.sha256(f"crm-ai-thread\0{prefix}\0{user}\0{kind}\0{record_id}".encode()).hexdigest()[:40]
    return f"crm-ai-thread-{digest}"


def turn_input(agent_input: str, message: str) -> str:
    return f"{agent_input}\n{FOLLOW_UP}\n{block('follow_up', {'message': message})}"


def _timestamp(value: str) -> str:
    """The Conductor's naive UTC ISO time, as an RFC 3339 one; a value that is no time is a protocol error."""
    try:
        parsed = dt.datetime.fromisoformat(value[:40])
    except ValueError:
        raise GatewayProtocolError("the Conductor's conversation holds a timestamp that is not one") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def encode_cursor(summary: ThreadSummary) -> str:
    return base64.urlsafe_b64encode(_encode([summary.created_at, summary.thread_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        if len(cursor) > 200:
            raise ValueError
        value = msgspec.json.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)), type=tuple[str, str])
    except (ValueError, binascii.Error, msgspec.DecodeError, msgspec.ValidationError):
        raise BadRequest("invalid query parameter `cursor`: not a cursor this sidecar gave (next_cursor)",
                         field="cursor") from None
    return value


class Threads:
    def __init__(self, answers: Answers, conversations: ConversationsClient, store: Store, tasks: Registry) -> None:
        self.answers = answers
        self.service = service = answers.service
        self.conversations = conversations
        self.store = store
        self.tasks = tasks
        self.settings = service.settings
        self._turns: dict[str, tuple[str | None, asyncio.Task[bytes]]] = {}
        self._streamed: set[asyncio.Task[None]] = set()
        self._creating: dict[str, asyncio.Task[bytes]] = {}

    def background(self) -> list[asyncio.Task[Any]]:
        """The turns in the air and the streamed turns' runners: shutdown stops them (adapter/stopping.py)
        before Redis is closed."""
        return [*(flight for _, flight in self._turns.values()), *self._streamed, *self._creating.values()]

    # --- which tasks, whose thread ----------------------------------------------------------

    def task_named(self, name: str) -> Task | None:
        task = self.tasks.get(name)
        return task if task is not None and task.threads else None

    def _owner_key(self, user: str, kind: str, record_id: str) -> str:
        return owner_key(self.settings.cache_prefix, user, kind, record_id)

    async def owned(self, thread_id: str, user: str) -> Owned:
        """The thread, if `user` made it: 404 for no such thread, 403 for another user's."""
        if not CONVERSATION_ID.fullmatch(thread_id):  # only ids shaped as the Conductor makes them are looked up
            raise NotFound("no thread has this id: thread ids are the ids POST /api/v1/ai/threads answers")
        conversation = await self.conversations.get(thread_id)
        meta = _TITLE.fullmatch(conversation.title) if conversation is not None else None
        task = self.task_named(meta.group(2)) if meta else None
        if conversation is None or meta is None or task is None or meta.group(3) != task.record_kind:
            raise NotFound(f"no thread {thread_id}")
        record_id = meta.group(4)
        if conversation.screenplay_id != self._owner_key(user, task.record_kind, record_id):
            raise Forbidden(f"thread {thread_id} belongs to another user")
        return Owned(conversation, task, record_id, deleted=meta.group(1) == "deleted")

    async def _live(self, thread_id: str, user: str) -> Owned:
        owned = await self.owned(thread_id, user)
        if owned.deleted:
            raise NotFound(f"thread {thread_id} was deleted")
        return owned

    def _request(self, owned: Owned) -> Any:
        """The request the thread was made with, from its conversation's context (upstream text: checked)."""
        context = (owned.conversation.context or "")[:CONTEXT_MAX]
        found = _REQUEST.search(context)
        try:
            request = msgspec.json.decode(found.group(1), type=owned.task.request_type) if found else None
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            request = None
        if request is None or getattr(request, owned.task.id_field) != owned.record_id:
            raise GatewayProtocolError(f"thread {owned.thread_id}'s conversation no longer holds the request it was made with")
        return request

    async def _read_record(self, task: Task, request: Any, authorization: str, user: str) -> Prepared:
        """The record as it is now, read with the caller's token: the CRM's 403 or 404 ends the request here."""
        return await self.service.prepare(task, request, authorization, user)

    # --- views -------------------------------------------------------------------------------

    def _turns_of(self, owned: Owned) -> list[Turn]:
        task, messages = owned.task, [m for m in owned.conversation.messages if m.replayed]
        turns: list[Turn] = []
        i = 0
        while i < len(messages):
            user = messages[i]
            answer = messages[i + 1] if i + 1 < len(messages) and messages[i + 1].type == "bot" else None
            i += 2 if answer is not None else 1
            if user.type != "user" or answer is None:
                continue
            body = answer.content.encode() if isinstance(answer.content, str) else b""
            result = task.reread(body)
            if result is None or _encode(result) != body or getattr(result, task.id_field) != owned.record_id:
                raise GatewayProtocolError(f"thread {owned.thread_id} holds an answer the sidecar did not write")
            name = (answer.agent or {}).get("name")
            version = name.partition(" ")[2] or None if isinstance(name, str) else None
            turns.append(Turn(turn_id=answer.id, message=None if not turns else str(user.content),
                              result=msgspec.Raw(body), warnings=task.warnings(body), provider=result.provider,
                              agent_version=version, created_at=_timestamp(answer.timestamp)))
        return turns

    def view(self, owned: Owned) -> ThreadView:
        c = owned.conversation
        return ThreadView(thread_id=c.conversation_id, task=owned.task.name,
                          record=RecordRef(kind=owned.task.record_kind, id=owned.record_id),
                          input=msgspec.to_builtins(self._request(owned)), created_at=_timestamp(c.created_at),
                          updated_at=_timestamp(c.updated_at), turns=self._turns_of(owned))

    # --- the routes' work ----------------------------------------------------------------------

    async def create(self, task: Task, request: Any, authorization: str, user: str) -> ThreadView:
        """A new thread, single-flighted: the same user asking for the same thread (a double-click on create)
        while one is being made gets that one, here or on another replica, instead of a second thread."""
        digest = hashlib.sha256(b"thread-create\0" + user.encode() + b"\0" + task.name.encode() + b"\0"
                                + _encode(request)).hexdigest()[:40]
        flight = self._creating.get(digest)
        if flight is None or flight.done():
            flight = asyncio.create_task(self._create_across_replicas(digest, task, request, authorization, user),
                                         name=f"thread create {task.name}")
            self._creating[digest] = flight

            def landed(done: asyncio.Task[bytes]) -> None:
                if self._creating.get(digest) is done:
                    del self._creating[digest]
                if not done.cancelled():
                    done.exception()

            flight.add_done_callback(landed)
        else:
            self.service.metrics.cache.labels("thread", "coalesced").inc()
        return msgspec.json.decode(await asyncio.shield(flight), type=ThreadView)

    async def _create_across_replicas(self, digest: str, task: Task, request: Any, authorization: str, user: str) -> bytes:
        lock = self.store.flight(CacheKey(self.settings.cache_prefix, "thread-create", digest))
        try:
            while await lock.acquire() is False:
                outcome = await lock.follow()
                if isinstance(outcome, bytes):
                    return outcome  # the other replica's new thread
                if isinstance(outcome, AdapterError):
                    raise outcome
            try:
                body = _encode(await self._create(task, request, authorization, user))
            except AdapterError as exc:
                await lock.fail(exc)
                raise
            await lock.succeed(body)
            return body
        finally:
            await lock.close()

    async def _create(self, task: Task, request: Any, authorization: str, user: str) -> ThreadView:
        prepared = await self._read_record(task, request, authorization, user)
        record_id = prepared.record_id
        held = [c for c in await self.conversations.listed(self._owner_key(user, task.record_kind, record_id))
                if (meta := _TITLE.fullmatch(c.title)) is not None and meta.group(1) == "thread"]
        if len(held) >= self.settings.thread_max_per_record:
            raise ThreadFull(f"this user holds {len(held)} threads about {task.record_kind} {record_id}; at most "
                             f"{self.settings.thread_max_per_record} (THREAD_MAX_PER_RECORD): delete one first")
        await self.service.admit(task.name, user)  # the first turn's model call; refused before anything is made
        context = (f"CRM AI thread: {task.name} about {task.record_kind} {record_id}. Each request sends the record as "
                   "it is now; later ones ask you to revise your previous answer.\n"
                   + block("thread_request", msgspec.to_builtins(request)))
        thread_id = await self.conversations.create(
            title=title_of(task, record_id), screenplay_id=self._owner_key(user, task.record_kind, record_id),
            context=context, active_agent=agent_info(task.agent_id, f"crm-ai-thread-{record_id}", task.agent_id))
        log.info("thread.created", thread_id=thread_id, task=task.name, record_id=record_id)
        try:
            await self._turn(thread_id, task, prepared, None, user, admitted=True)
        except AdapterError:
            # A thread whose first answer failed is no thread: its conversation goes, and the request answers the failure.
            await self._discard(thread_id, task, record_id)
            raise
        except BaseException:
            # Cancelled (the client left, shutdown): the discard must not be cancelled with it.
            cleanup = asyncio.ensure_future(self._discard(thread_id, task, record_id))
            cleanup.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        return self.view(await self._live(thread_id, user))

    async def _discard(self, thread_id: str, task: Task, record_id: str) -> None:
        try:
            await self.conversations.retitle(thread_id, title_of(task, record_id, deleted=True))
            await self.conversations.delete(thread_id)
        except AdapterError as exc:
            log.warning("thread.discard_failed", thread_id=thread_id, reason=exc.detail)

    async def get(self, thread_id: str, authorization: str, user: str) -> ThreadView:
        owned = await self._live(thread_id, user)
        await self._read_record(owned.task, self._request(owned), authorization, user)
        return self.view(owned)

    async def continue_(self, thread_id: str, message: str, authorization: str, user: str) -> bytes:
        """A new turn (its JSON): single flight per thread; an identical message in flight joins it."""
        owned = await self._live(thread_id, user)
        prepared = await self._read_record(owned.task, self._request(owned), authorization, user)
        return await self._one_at_a_time(thread_id, message,
                                         lambda: self._turn(thread_id, owned.task, prepared, message, user))

    async def stream_turn(self, thread_id: str, message: str, authorization: str, user: str, *,
                          describe: Callable[[Exception, Job], bytes], lifetime: float) -> Job:
        """A new turn as events (a fetch client's stream): `status` and `delta` while the model works, then the
        turn as `result` and `done`, or `error` and `done`. The thread's checks (whose, the record read with
        the caller's token, THREAD_MAX_TURNS) answer as problems before the stream opens. The log is this
        replica's: a fetch stream is one connection, and a takeover elsewhere must not ask a turn again."""
        owned = await self._live(thread_id, user)
        prepared = await self._read_record(owned.task, self._request(owned), authorization, user)
        if len(self._turns_of(owned)) >= self.settings.thread_max_turns:
            raise ThreadFull(f"thread {thread_id} holds {self.settings.thread_max_turns} turns (THREAD_MAX_TURNS); "
                             "start a new thread")
        job = Job(id=f"aijob_{uuid.uuid4().hex}", task=owned.task.name, record_id=owned.record_id, key=None,
                  expires=time.time() + lifetime, mode="no-store")
        job.emit("status", {"state": "queued", "message": "queued", "job_id": job.id})
        events = _TurnEvents(job)

        async def run() -> None:
            try:
                turn = await self._one_at_a_time(thread_id, message, lambda: self._turn(
                    thread_id, owned.task, prepared, message, user, delivery=events))
            except AdapterError as exc:
                job.emit("error", describe(exc, job))
                job.emit("done", {"status": "failed", "cached": False})
                return
            job.emit("result", turn)
            job.emit("done", {"status": "succeeded", "cached": False})

        runner = asyncio.create_task(run(), name=f"thread turn stream {thread_id}")
        self._streamed.add(runner)
        runner.add_done_callback(self._streamed.discard)
        return job

    async def listing(self, kind: str, record_id: str, authorization: str, user: str, *, limit: int,
                      cursor: str | None) -> ThreadPage:
        after = decode_cursor(cursor) if cursor else None
        await self.service.admit_read(user)
        await self.service.crm.get_record(kind, record_id, authorization)  # the CRM still lets the caller read it
        summaries = []
        for conversation in await self.conversations.listed(self._owner_key(user, kind, record_id)):
            meta = _TITLE.fullmatch(conversation.title)
            task = self.task_named(meta.group(2)) if meta else None
            if meta is None or task is None or meta.group(1) != "thread" or meta.group(3) != kind or meta.group(4) != record_id:
                continue
            replayed = [m for m in conversation.messages if m.replayed]
            turns = sum(1 for a, b in zip(replayed, replayed[1:], strict=False) if a.type == "user" and b.type == "bot")
            summaries.append(ThreadSummary(thread_id=conversation.conversation_id, task=task.name,
                                           record=RecordRef(kind=kind, id=record_id),
                                           created_at=_timestamp(conversation.created_at),
                                           updated_at=_timestamp(conversation.updated_at), turn_count=turns))
        # Newest first by creation (a new turn does not move a thread between pages); the id breaks ties.
        summaries.sort(key=lambda s: (s.created_at, s.thread_id), reverse=True)
        if after is not None:
            summaries = [s for s in summaries if (s.created_at, s.thread_id) < after]
        page = summaries[:limit]
        return ThreadPage(threads=page, next_cursor=encode_cursor(page[-1]) if len(summaries) > limit else None)

    async def delete(self, thread_id: str, authorization: str, user: str) -> None:
        owned = await self.owned(thread_id, user)
        if not owned.deleted:
            await self._read_record(owned.task, self._request(owned), authorization, user)
            # The tombstone first: the gateway's delete is soft, and only a title GET shows says it is gone.
            await self.conversations.retitle(thread_id, title_of(owned.task, owned.record_id, deleted=True))
        # Again for a thread whose earlier delete stopped after its tombstone: the gateway's list still showed it.
        if not await self.conversations.delete(thread_id) and owned.deleted:
            raise NotFound(f"thread {thread_id} was deleted")
        log.info("thread.deleted", thread_id=thread_id, task=owned.task.name)

    # --- one turn ------------------------------------------------------------------------------

    async def _one_at_a_time(self, thread_id: str, message: str | None, compute: Callable[[], Awaitable[bytes]]) -> bytes:
        while True:
            current = self._turns.get(thread_id)
            # A flight that has landed but whose done-callback has not run yet is gone too: awaiting a
            # finished task does not yield, so waiting for the callback here would spin the event loop.
            if current is None or current[1].done():
                break
            other, flight = current
            if other == message:  # a double-click: the same turn, once
                self.service.metrics.cache.labels("thread", "coalesced").inc()
                return await asyncio.shield(flight)
            with suppress(AdapterError):  # another turn first: this one follows it and sees it in the history
                await asyncio.shield(flight)
        flight = asyncio.create_task(self._across_replicas(thread_id, message, compute), name=f"thread turn {thread_id}")
        self._turns[thread_id] = (message, flight)

        def landed(done: asyncio.Task[bytes]) -> None:
            if self._turns.get(thread_id, (None, None))[1] is done:
                del self._turns[thread_id]
            if not done.cancelled():
                done.exception()

        flight.add_done_callback(landed)
        return await asyncio.shield(flight)

    async def _across_replicas(self, thread_id: str, message: str | None, compute: Callable[[], Awaitable[bytes]]) -> bytes:
        digest = hashlib.sha256(f"thread-turn\0{thread_id}".encode()).hexdigest()[:40]
        lock = self.store.flight(CacheKey(self.settings.cache_prefix, "thread", digest))
        try:
            while await lock.acquire() is False:
                outcome = await lock.follow()
                # Another replica's turn: the same message is this request's turn; any other outcome (a
                # different turn, its failure, a holder gone) lets this one take the lock and run.
                if isinstance(outcome, bytes) and _decode_turn(outcome).message == message:
                    return outcome
            try:
                body = await compute()
            except AdapterError as exc:
                await lock.fail(exc)
                raise
            await lock.succeed(body)
            return body
        finally:
            await lock.close()

    async def _turn(self, thread_id: str, task: Task, prepared: Prepared, message: str | None, user: str, *,
                    admitted: bool = False, delivery: Delivery = SYNC) -> bytes:
        # Read again inside the flight: the turn before this one may have just landed.
        owned = await self._live(thread_id, user)
        held = len(self._turns_of(owned))
        if held >= self.settings.thread_max_turns:
            raise ThreadFull(f"thread {thread_id} holds {self.settings.thread_max_turns} turns (THREAD_MAX_TURNS); "
                             "start a new thread")
        agent_input = prepared.agent_input if message is None else turn_input(prepared.agent_input, message)

        async def keep(result: Any) -> None:
            # After validation, by the one call that made the answer: the conversation gets the user's
            # message and the validated answer, never an invalid one (the run itself saves nothing).
            await self.conversations.append(thread_id, user_input=message or FIRST_TURN, agent_response=_encode(result).decode(),
                                            agent=agent_info(task.agent_id, f"crm-ai-thread-{prepared.record_id}",
                                                             f"{task.agent_id} {task.version}"))

        # The one pipeline, with the turn's policy (no cache; single flight; the user's rate limit). The key
        # names the thread and the turn's place in it: identical messages to two threads are two questions.
        key = self.service.key_for(task, prepared.record_id, f"thread {thread_id} turn {held}\n{agent_input}")
        question = replace(prepared, agent_input=agent_input, key=key, conversation=InConversation(thread_id, keep))
        answer = await self.answers.ask(question, mode=TURN, delivery=delivery, admitted=admitted)
        turns = self._turns_of(await self._live(thread_id, user))
        turn = next((t for t in reversed(turns) if bytes(t.result) == answer.body), None)
        if turn is None:
            raise GatewayProtocolError(f"thread {thread_id}'s new turn is not in its conversation after it was added")
        log.info("thread.turn", thread_id=thread_id, task=task.name, turns=len(turns))
        return _encode(turn)


class _TurnEvents(Delivery):
    """A streamed turn's progress, into its log; the answer itself goes out as the turn, once it is kept."""

    streams = True

    def __init__(self, job: Job) -> None:
        self._job = job

    def event(self, name: str, data: Any) -> None:
        self._job.emit(name, data)
