// @crm-ai/sidecar-client: a typed client for the CRM AI sidecar, framework-agnostic.
// The Angular service is in "@crm-ai/sidecar-client/angular".
export { createSidecarClient } from "./client.js";
export type { CallOptions, SidecarClient, SidecarClientOptions, TokenProvider } from "./client.js";
export { SidecarProblem, SidecarStreamError, isProblem } from "./errors.js";
export type { EventSourceConstructor, EventSourceLike, JobStream, StreamOptions } from "./stream.js";
export type {
  AiHealth, Bant, DealPredictRequest, DealPredictResult, EmailGenerateRequest, EmailGenerateResult, EmailVariation,
  FieldError, JobCreated, JobEvent, JobEventPayloads, JobEventType, JobStatus, JobView, LeadQualifyRequest,
  LeadQualifyResult, Problem, StartedJob, Task, TaskInput, TaskResult, TaskTypes, components, operations, paths,
} from "./types.js";
