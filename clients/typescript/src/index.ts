// @crm-ai/sidecar-client: a typed client for the CRM AI sidecar, framework-agnostic.
// The Angular service is in "@crm-ai/sidecar-client/angular".
export { createSidecarClient } from "./client.js";
export type {
  BatchQueryOptions, CallOptions, ListThreadsOptions, SidecarClient, SidecarClientOptions, TokenProvider,
} from "./client.js";
export { SidecarProblem, SidecarStreamError, isProblem } from "./errors.js";
export type {
  BatchStream, EventSourceConstructor, EventSourceLike, JobStream, SidecarEventStream, StreamOptions,
} from "./stream.js";
export type {
  AiHealth, Bant, BatchCounts, BatchCreated, BatchEvent, BatchEventPayloads, BatchEventType, BatchItem, BatchItemStatus,
  BatchOptions, BatchStatus, BatchView, DealPredictRequest, DealPredictResult, EmailGenerateRequest, EmailGenerateResult,
  EmailVariation, FieldError, JobCreated, JobEvent, JobEventPayloads, JobEventType, JobStatus, JobView, LeadQualifyRequest,
  LeadQualifyResult, Problem, StartedBatch, StartedJob, Task, TaskInput, TaskRecordIds, TaskResult, TaskTypes, Thread,
  ThreadPage, ThreadRecord, ThreadRecordQuery, ThreadSummary, ThreadTask, ThreadTurn, components, operations, paths,
} from "./types.js";
