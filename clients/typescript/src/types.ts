// Names for the contract's types. Everything here is derived from the generated `openapi.ts`; the
// only hand-written shapes are the SSE payloads, which the contract describes in prose (SseEvent),
// and each is tied to the generated enums so that a contract change fails to compile here.
import type { components, paths } from "./generated/openapi.js";

export type { components, paths, operations } from "./generated/openapi.js";

type Schemas = components["schemas"];

export type Problem = Schemas["Problem"];
export type FieldError = Schemas["FieldError"];
export type LeadQualifyRequest = Schemas["LeadQualifyRequest"];
export type LeadQualifyResult = Schemas["LeadQualifyResult"];
export type EmailGenerateRequest = Schemas["EmailGenerateRequest"];
export type EmailGenerateResult = Schemas["EmailGenerateResult"];
export type EmailVariation = Schemas["EmailVariation"];
export type DealPredictRequest = Schemas["DealPredictRequest"];
export type DealPredictResult = Schemas["DealPredictResult"];
export type Bant = Schemas["Bant"];
export type JobCreated = Schemas["JobCreated"];
export type JobView = Schemas["JobView"];
export type JobStatus = JobCreated["status"];
export type AiHealth = Schemas["AiHealth"];

/** A task a job can run: the contract's `JobRequest.task`. */
export type Task = Schemas["JobRequest"]["task"];

/** Each task's input and validated result: the synchronous routes' request and 200 bodies. */
export interface TaskTypes {
  "lead.qualify": { input: JsonBody<"/api/v1/ai/lead/qualify">; result: JsonResult<"/api/v1/ai/lead/qualify"> };
  "email.generate": { input: JsonBody<"/api/v1/ai/email/generate">; result: JsonResult<"/api/v1/ai/email/generate"> };
  "deal.predict": { input: JsonBody<"/api/v1/ai/deal/predict">; result: JsonResult<"/api/v1/ai/deal/predict"> };
}
export type TaskInput<T extends Task> = TaskTypes[T]["input"];
export type TaskResult<T extends Task> = TaskTypes[T]["result"];

type JsonBody<P extends keyof paths> = paths[P] extends { post: { requestBody: { content: { "application/json": infer B } } } } ? B : never;
type JsonResult<P extends keyof paths> = paths[P] extends { post: { responses: { 200: { content: { "application/json": infer R } } } } } ? R : never;

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
 * Narrow on `type`: `if (event.type === "result") event.result.score`.
 */
export type JobEvent<R = TaskResult<Task>> = {
  [K in JobEventType]: { type: K; id: number } & JobEventPayloads<R>[K];
}[JobEventType];

// Compile-time guards against drift: every task in the contract has input and result types,
// and every SSE event name in the contract has a payload (and no others).
type Exact<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
type Assert<T extends true> = T;
type TasksMatchContract = Assert<Exact<keyof TaskTypes, Task>>;
type EventsMatchContract = Assert<Exact<keyof JobEventPayloads<unknown>, JobEventType>>;
