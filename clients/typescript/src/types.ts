// Names for the contract's types. Everything here is derived from the generated `openapi.ts`; the
// only hand-written shapes are the SSE payloads, which the contract describes in prose (SseEvent),
// and each is tied to the generated enums so that a contract change fails to compile here.
import type { components, paths } from "./generated/openapi.js";
import type { TASKS } from "./generated/tasks.js";

export type { components, paths, operations } from "./generated/openapi.js";
// Each task's request and result types by name (`<Noun><Verb>Request`, `...Result`), generated from the task registry.
export type * from "./generated/tasks.js";

type Schemas = components["schemas"];

export type Problem = Schemas["Problem"];
export type FieldError = Schemas["FieldError"];
export type JobCreated = Schemas["JobCreated"];
export type JobView = Schemas["JobView"];
export type JobStatus = JobCreated["status"];
export type AiHealth = Schemas["AiHealth"];

/** A task a job can run: the contract's `JobRequest.task`. */
export type Task = Schemas["JobRequest"]["task"];

/** The task map generated from the registry: each task's route, record id field and method name. */
export type TaskMap = typeof TASKS;
/** A task's synchronous route. */
export type TaskPath<T extends Task> = TaskMap[T & keyof TaskMap]["path"];
/** The client's method for a task (`<noun>.<verb>` -> `<verb><Noun>`). */
export type TaskMethodName<T extends Task> = TaskMap[T & keyof TaskMap]["method"];

/** Each task's input and validated result: the synchronous routes' request and 200 bodies. */
export type TaskTypes = { [T in Task]: { input: JsonBody<TaskPath<T>>; result: JsonResult<TaskPath<T>> } };
export type TaskInput<T extends Task> = TaskTypes[T]["input"];
export type TaskResult<T extends Task> = TaskTypes[T]["result"];

type JsonBody<P> = P extends keyof paths
  ? paths[P] extends { post: { requestBody: { content: { "application/json": infer B } } } } ? B : never : never;
type JsonResult<P> = P extends keyof paths
  ? paths[P] extends { post: { responses: { 200: { content: { "application/json": infer R } } } } } ? R : never : never;

/** A job started by `startJob`: the 202 body, remembering its task so its events are typed. */
export type StartedJob<T extends Task = Task> = JobCreated & { readonly task: T };

/** The names of a job's SSE events: the contract's `SseEvent.event`. */
export type JobEventType = Schemas["SseEvent"]["event"];

/** Payloads of a job's events, as the contract's `SseEvent` describes them. */
export interface JobEventPayloads<R> {
  status: { state: "queued" | "running" | "validating"; message: string };
  delta: { text: string };
  result: { result: R };
  error: { problem: Problem };
  done: { status: Extract<JobStatus, "succeeded" | "failed">; cached: boolean };
}

/**
 * One event of a job's stream. `id` is consecutive from 1; `done` is always last.
 * Narrow on `type`: `if (event.type === "result") event.result`.
 */
export type JobEvent<R = TaskResult<Task>> = {
  [K in JobEventType]: { type: K; id: number } & JobEventPayloads<R>[K];
}[JobEventType];

/** Each task's record id field: the one a batch takes from `ids` (every other field is an option). */
export type TaskRecordIds = { [T in Task]: TaskMap[T & keyof TaskMap]["recordId"] };

/**
 * A batch's `options` for `task`: the task's request fields other than the record id, the same for
 * every item. The record id is refused by name (the ids go in `ids`): without that, a task with no
 * other field would take `{}`, which accepts anything.
 */
export type BatchOptions<T extends Task> = Omit<TaskInput<T>, TaskRecordIds[T]> & { [K in TaskRecordIds[T]]?: never };

export type BatchCreated = Schemas["BatchCreated"];
export type BatchCounts = Schemas["BatchCounts"];
/** A batch's state: `queued`, `running`, then `completed`, `cancelled` or `failed`. */
export type BatchStatus = Schemas["BatchView"]["status"];
/** An item's state: `queued`, `running`, then `succeeded`, `failed` or `cancelled`. */
export type BatchItemStatus = Schemas["BatchItem"]["status"];

/** A batch started by `startBatch`: the 202 body, remembering its task so its results are typed. */
export type StartedBatch<T extends Task = Task> = BatchCreated & { readonly task: T };

/**
 * One record of a batch: its status and, once finished, the task's result (the synchronous route's
 * body) or the problem that route would have answered.
 */
export type BatchItem<R = TaskResult<Task>> = Omit<Schemas["BatchItem"], "result" | "error"> & {
  result?: R | null;
  error?: Problem | null;
};

/** `GET /api/v1/ai/batches/{batch_id}`: counts, and every item in the order given (or those of one status). */
export type BatchView<R = TaskResult<Task>> = Omit<Schemas["BatchView"], "items"> & { items: BatchItem<R>[] };

/** The names of a batch's SSE events: the contract's `BatchSseEvent.event`. */
export type BatchEventName = Schemas["BatchSseEvent"]["event"];

/** Payloads of a batch's events, as the contract's `BatchSseEvent` describes them. */
export interface BatchEventPayloads<R> {
  status: { state: "queued" | "running"; message: string };
  /** An item changed: `running`, then `succeeded` (with `result`), `failed` (with `error`) or `cancelled`. */
  item: { item: BatchItem<R> };
  /** The counts after an item finished. */
  progress: { counts: BatchCounts };
  /** Always last. `message` says why a batch stopped short (BATCH_MAX_SECONDS, say). */
  done: { status: Extract<BatchStatus, "completed" | "cancelled" | "failed">; counts: BatchCounts; message?: string };
}
export type BatchEventType = keyof BatchEventPayloads<unknown>;

/**
 * One event of a batch's stream. `id` is the event's (consecutive from 1; the record's id is
 * `item.id`); `done` is always last. Narrow on `type`: `if (event.type === "item") event.item.result`.
 */
export type BatchEvent<R = TaskResult<Task>> = {
  [K in BatchEventType]: { type: K; id: number } & BatchEventPayloads<R>[K];
}[BatchEventType];

/** A task that allows threads (its module sets `threads=True`): the contract's `ThreadRequest.task`. */
export type ThreadTask = Schemas["ThreadRequest"]["task"];
/** The record a thread is about: `{kind: "lead" | "deal", id}`. */
export type ThreadRecord = Schemas["RecordRef"];
/**
 * One turn: the user's follow-up (`message`, null for the first turn) and the task's validated
 * result, as its synchronous route gives it, with its guidance `warnings`.
 */
export type ThreadTurn<R = TaskResult<ThreadTask>> = Omit<Schemas["ThreadTurn"], "result"> & { result: R };
/** A thread with every turn, oldest first. */
export type Thread<T extends ThreadTask = ThreadTask> = Omit<Schemas["Thread"], "task" | "turns"> & {
  task: T;
  turns: ThreadTurn<TaskResult<T>>[];
};
export type ThreadSummary = Schemas["ThreadSummary"];
/** A page of the caller's threads about one record, newest first; `next_cursor` asks for the next one. */
export type ThreadPage = Schemas["ThreadPage"];
/** The record whose threads `listThreads` lists: its id under its kind's field. */
export type ThreadRecordQuery = { lead_id: string; deal_id?: never } | { deal_id: string; lead_id?: never };

// Compile-time guards against drift: every task in the contract has input and result types,
// and every SSE event name in the contract has a payload (and no others).
type Exact<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
type Assert<T extends true> = T;
type TasksMatchContract = Assert<Exact<keyof TaskMap, Task>>;
// Every task's path is a route of the contract (a stale task map fails to compile here).
type PathsMatchContract = Assert<Exact<{ [T in Task]: TaskPath<T> extends keyof paths ? true : false }[Task], true>>;
type EventsMatchContract = Assert<Exact<keyof JobEventPayloads<unknown>, JobEventType>>;
// Every task names its record id field, and that field is one of its request's.
type RecordIdsMatchContract = Assert<Exact<keyof TaskRecordIds, Task>>;
type RecordIdsAreFields = Assert<Exact<{ [T in Task]: TaskRecordIds[T] extends keyof TaskInput<T> ? true : false }[Task], true>>;
type BatchEventsMatchContract = Assert<Exact<keyof BatchEventPayloads<unknown>, BatchEventName>>;
type BatchStatusesMatchContract = Assert<Exact<BatchEventPayloads<unknown>["done"]["status"] | "queued" | "running", BatchStatus>>;
// Every task that allows threads is a task, with its input and result types.
type ThreadTasksAreTasks = Assert<Exact<ThreadTask extends Task ? true : false, true>>;
