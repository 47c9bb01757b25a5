// @crm-ai/sidecar-client: a typed client for the CRM AI sidecar, framework-agnostic.
// The Angular service is in "@crm-ai/sidecar-client/angular".
export { createSidecarClient } from "./client.js";
export type {
  BatchQueryOptions, CallOptions, ListThreadsOptions, SidecarClient, SidecarClientOptions, TaskMethods, TokenProvider,
} from "./client.js";
// The task map (route, record id field, method name per task) and each task's types by name, from the registry.
export { TASKS } from "./generated/tasks.js";
export type * from "./generated/tasks.js";
export { SidecarProblem, SidecarStreamError, isProblem } from "./errors.js";
export type {
  BatchStream, EventSourceConstructor, EventSourceLike, JobStream, SidecarEventStream, StreamOptions,
} from "./stream.js";
export type {
  AiHealth, BatchCounts, BatchCreated, BatchEvent, BatchEventPayloads, BatchEventType, BatchItem, BatchItemStatus,
  BatchOptions, BatchStatus, BatchView, FieldError, JobCreated, JobEvent, JobEventPayloads, JobEventType, JobStatus, JobView,
  Problem, StartedBatch, StartedJob, Task, TaskInput, TaskMap, TaskMethodName, TaskPath, TaskRecordIds, TaskResult, TaskTypes,
  Thread, ThreadPage, ThreadRecord, ThreadRecordQuery, ThreadSummary, ThreadTask, ThreadTurn, components, operations, paths,
} from "./types.js";
