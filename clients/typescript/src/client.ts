import createClient, { type Client } from "openapi-fetch";

import { SidecarProblem, problemOf } from "./errors.js";
import {
  openBatchStream, openJobStream, type BatchStream, type EventSourceConstructor, type JobStream, type StreamOptions,
} from "./stream.js";
import { TASKS } from "./generated/tasks.js";
import type {
  AiHealth, BatchCreated, BatchItemStatus, BatchOptions, BatchView, JobCreated, JobView, StartedBatch,
  StartedJob, Task, TaskInput, TaskMethodName, TaskResult, Thread, ThreadPage, ThreadRecordQuery,
  ThreadTask, ThreadTurn, paths,
} from "./types.js";

/** The bearer token of the signed-in CRM user, or nothing (the sidecar then answers 401). */
export type TokenProvider = () => string | null | undefined | Promise<string | null | undefined>;

export interface SidecarClientOptions {
  /**
   * Where the sidecar is. `""` (the default) means the page's own origin: the sidecar in front of
   * the CRM backend, or behind the same ingress. In Node it must be absolute.
   */
  baseUrl?: string;
  /** Called before every request; its token goes out as `Authorization: Bearer <token>`. */
  getToken?: TokenProvider;
  /** Headers for every request (an `X-Request-ID` of your own, for instance). */
  headers?: Record<string, string>;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof fetch;
  /**
   * The `EventSource` to stream with (default: the global one, which every browser has). Node has
   * none: pass the `eventsource` package's.
   */
  EventSource?: EventSourceConstructor;
}

export interface CallOptions {
  /**
   * The result cache: `no-cache` asks for a fresh answer (and stores it), `no-store` for a fresh one
   * that is not stored. The default may answer from the cache.
   */
  cache?: "default" | "no-cache" | "no-store";
  signal?: AbortSignal;
}

/**
 * One method per task, named from the task (`<noun>.<verb>` -> `<verb><Noun>`), generated from the
 * sidecar's task registry (src/generated/tasks.ts): `runTask(task, body)` under another name.
 */
export type TaskMethods = {
  [T in Task as TaskMethodName<T>]: (body: TaskInput<T>, options?: CallOptions) => Promise<TaskResult<T>>;
};

export interface SidecarClient extends TaskMethods {
  /** `POST` the task's synchronous route (`/api/v1/ai/<noun>/<verb>` for `<noun>.<verb>`): its validated result. */
  runTask<T extends Task>(task: T, body: TaskInput<T>, options?: CallOptions): Promise<TaskResult<T>>;
  /** `GET /api/v1/ai/health`: the gateway, CRM backend and cache, and which agents the gateway knows. */
  health(options?: Pick<CallOptions, "signal">): Promise<AiHealth>;
  /** `POST /api/v1/ai/jobs`: starts `task`; follow it with `streamJob`. */
  startJob<T extends Task>(task: T, input: TaskInput<T>, options?: CallOptions): Promise<StartedJob<T>>;
  /** `GET /api/v1/ai/jobs/{job_id}`: the job's state and, once finished, its result or problem (polling). */
  getJob(job: Pick<JobCreated, "job_id">, options?: Pick<CallOptions, "signal">): Promise<JobView>;
  /**
   * The job's events over EventSource, typed by the job's task, in order and ending after `done`.
   * A dropped connection resumes after the last event received (`Last-Event-ID`).
   */
  streamJob<T extends Task = Task>(job: JobCreated & { readonly task?: T }, options?: StreamOptions): JobStream<TaskResult<T>>;
  /**
   * `POST /api/v1/ai/batches`: runs `task` over every record of `ids` (no duplicates, at most
   * BATCH_MAX_ITEMS), with the same `options` (the task's request fields other than the record id)
   * for each. Bad input is a 400 naming the field (`ids[1]`, `options.<field>`) before anything runs.
   * Follow it with `streamBatch`, or poll `getBatch`.
   */
  startBatch<T extends Task>(task: T, ids: readonly string[], options?: BatchOptions<T>, callOptions?: Pick<CallOptions, "signal">): Promise<StartedBatch<T>>;
  /**
   * `GET /api/v1/ai/batches/{batch_id}` (with the creator's token): the counts and every item in the
   * order given, with its result or problem; `status` keeps only the items in that state.
   */
  getBatch<T extends Task = Task>(batch: Pick<BatchCreated, "batch_id"> & { readonly task?: T }, options?: BatchQueryOptions): Promise<BatchView<TaskResult<T>>>;
  /**
   * `DELETE /api/v1/ai/batches/{batch_id}` (the creator only): running items finish, queued ones end
   * `cancelled`, then the stream's `done` says `cancelled`. On a finished batch it changes nothing
   * (`cancel_requested` stays false). Answers the batch's state.
   */
  cancelBatch<T extends Task = Task>(batch: Pick<BatchCreated, "batch_id"> & { readonly task?: T }, options?: Pick<CallOptions, "signal">): Promise<BatchView<TaskResult<T>>>;
  /**
   * The batch's events over EventSource, items typed by the batch's task, in order and ending after
   * `done`. A dropped connection resumes after the last event received (`Last-Event-ID`), as `streamJob`.
   */
  streamBatch<T extends Task = Task>(batch: BatchCreated & { readonly task?: T }, options?: StreamOptions): BatchStream<TaskResult<T>>;
  /**
   * `POST /api/v1/ai/threads`: starts a thread about the record in `input` (the task's request) and
   * runs its first turn. The history lives in the Conductor; only its creator may read or continue it.
   */
  createThread<T extends ThreadTask>(task: T, input: TaskInput<T>, options?: Pick<CallOptions, "signal">): Promise<Thread<T>>;
  /**
   * `POST /api/v1/ai/threads/{thread_id}/turns`: the agent sees the thread's history and the record as it
   * is now, and answers `message` ("make the casual one shorter"). A second identical call while the
   * first runs (a double-click) gets the same turn. An answer still invalid after repair is a 502, and
   * the thread is left unchanged.
   */
  continueThread<T extends ThreadTask = ThreadTask>(thread: Pick<Thread, "thread_id"> & { readonly task?: T }, message: string,
    options?: Pick<CallOptions, "signal">): Promise<ThreadTurn<TaskResult<T>>>;
  /** `GET /api/v1/ai/threads/{thread_id}`: the thread with every turn. */
  getThread<T extends ThreadTask = ThreadTask>(thread: Pick<Thread, "thread_id"> & { readonly task?: T },
    options?: Pick<CallOptions, "signal">): Promise<Thread<T>>;
  /** `GET /api/v1/ai/threads?lead_id=…` (or `deal_id`): the caller's threads about that record, newest first, a page at a time. */
  listThreads(record: ThreadRecordQuery, options?: ListThreadsOptions): Promise<ThreadPage>;
  /** `DELETE /api/v1/ai/threads/{thread_id}`: deletes the thread, in the Conductor too. */
  deleteThread(thread: Pick<Thread, "thread_id">, options?: Pick<CallOptions, "signal">): Promise<void>;
  /** The underlying openapi-fetch client, typed by the contract, for anything else (response headers, `/readyz`). */
  readonly api: Client<paths>;
}

export interface BatchQueryOptions {
  /** Only the items in this state (`failed`, to start a batch of just those). */
  status?: BatchItemStatus;
  signal?: AbortSignal;
}

export interface ListThreadsOptions {
  /** Threads per page, 1-100 (default 20). */
  limit?: number;
  /** The previous page's `next_cursor`. */
  cursor?: string;
  signal?: AbortSignal;
}

export function createSidecarClient(options: SidecarClientOptions = {}): SidecarClient {
  const baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
  // Looked up per call, not captured: tests and apps may install a fetch after creating the client.
  const fetchFn: typeof fetch = (input, init) => (options.fetch ?? globalThis.fetch)(input, init);
  const api = createClient<paths>({ baseUrl, headers: options.headers, fetch: (request) => fetchFn(request) });
  const { getToken } = options;
  if (getToken) {
    api.use({
      async onRequest({ request }) {
        const token = await getToken();
        if (token) request.headers.set("Authorization", `Bearer ${token}`);
        return request;
      },
    });
  }

  const cacheHeaders = (o?: CallOptions) => (o?.cache && o.cache !== "default" ? { "Cache-Control": o.cache } : {});

  // openapi-fetch resolves failed responses to `{ error, response }`; this client throws them instead.
  async function unwrap<D>(call: Promise<{ data?: D; error?: unknown; response: Response }>): Promise<D> {
    const { data, error, response } = await call;
    if (!response.ok || data === undefined) throw new SidecarProblem(problemOf(error, response), response);
    return data;
  }

  // Every task's route has the same shape; the types say which body and result go with which task.
  type AnyPost = (path: string, init: object) => Promise<{ data?: unknown; error?: unknown; response: Response }>;
  function runTask<T extends Task>(task: T, body: TaskInput<T>, o?: CallOptions): Promise<TaskResult<T>> {
    const spec = TASKS[task as keyof typeof TASKS];
    if (!spec) return Promise.reject(new TypeError(`no task ${String(task)} (tasks: ${Object.keys(TASKS).join(", ")})`));
    const post = api.POST as unknown as AnyPost;
    return unwrap(post(spec.path, { body, headers: cacheHeaders(o), signal: o?.signal })) as Promise<TaskResult<T>>;
  }
  const taskMethods = Object.fromEntries(Object.entries(TASKS).map(([task, spec]) =>
    [spec.method, (body: never, o?: CallOptions) => runTask(task as Task, body, o)])) as unknown as TaskMethods;

  return {
    ...taskMethods,
    api,
    runTask,
    health: (o) => unwrap(api.GET("/api/v1/ai/health", { signal: o?.signal })),
    async startJob(task, input, o) {
      const body = { task, input: input as { [key: string]: unknown } };
      const created = await unwrap(api.POST("/api/v1/ai/jobs", { body, headers: cacheHeaders(o), signal: o?.signal }));
      return { ...created, task };
    },
    getJob: (job, o) =>
      unwrap(api.GET("/api/v1/ai/jobs/{job_id}", { params: { path: { job_id: job.job_id } }, signal: o?.signal })),
    streamJob: (job, streamOptions) => openJobStream(eventsUrl(job.events_url), streamDeps(), streamOptions),
    async startBatch(task, ids, batchOptions, o) {
      const body = { task, ids: [...ids], ...(batchOptions ? { options: batchOptions as { [key: string]: unknown } } : {}) };
      const created = await unwrap(api.POST("/api/v1/ai/batches", { body, signal: o?.signal }));
      return { ...created, task };
    },
    getBatch: <T extends Task>(batch: { batch_id: string }, o?: BatchQueryOptions) =>
      unwrap(api.GET("/api/v1/ai/batches/{batch_id}", {
        params: { path: { batch_id: batch.batch_id }, query: o?.status ? { status: o.status } : {} }, signal: o?.signal,
      })) as Promise<BatchView<TaskResult<T>>>, // the contract types `result` loosely; the task's route defines it
    cancelBatch: <T extends Task>(batch: { batch_id: string }, o?: Pick<CallOptions, "signal">) =>
      unwrap(api.DELETE("/api/v1/ai/batches/{batch_id}", { params: { path: { batch_id: batch.batch_id } }, signal: o?.signal })) as
        Promise<BatchView<TaskResult<T>>>,
    streamBatch: (batch, streamOptions) => openBatchStream(eventsUrl(batch.events_url), streamDeps(), streamOptions),
    createThread: <T extends ThreadTask>(task: T, input: TaskInput<T>, o?: Pick<CallOptions, "signal">) =>
      unwrap(api.POST("/api/v1/ai/threads", { body: { task, input: input as { [key: string]: unknown } }, signal: o?.signal })) as
        Promise<Thread<T>>, // the contract types `result` as any task's; `task` says which
    continueThread: <T extends ThreadTask>(thread: { thread_id: string }, message: string, o?: Pick<CallOptions, "signal">) =>
      unwrap(api.POST("/api/v1/ai/threads/{thread_id}/turns", {
        params: { path: { thread_id: thread.thread_id } }, body: { message }, signal: o?.signal,
      })) as Promise<ThreadTurn<TaskResult<T>>>,
    getThread: <T extends ThreadTask>(thread: { thread_id: string }, o?: Pick<CallOptions, "signal">) =>
      unwrap(api.GET("/api/v1/ai/threads/{thread_id}", { params: { path: { thread_id: thread.thread_id } }, signal: o?.signal })) as
        Promise<Thread<T>>,
    listThreads: (record, o) =>
      unwrap(api.GET("/api/v1/ai/threads", {
        params: { query: { ...record, ...(o?.limit !== undefined ? { limit: o.limit } : {}), ...(o?.cursor ? { cursor: o.cursor } : {}) } },
        signal: o?.signal,
      })),
    async deleteThread(thread, o) {
      // 204: no body, so not `unwrap` (which wants one).
      const { error, response } = await api.DELETE("/api/v1/ai/threads/{thread_id}", {
        params: { path: { thread_id: thread.thread_id } }, signal: o?.signal,
      });
      if (!response.ok) throw new SidecarProblem(problemOf(error, response), response);
    },
  } satisfies SidecarClient;

  function streamDeps() {
    const EventSourceImpl = options.EventSource ?? (globalThis as { EventSource?: EventSourceConstructor }).EventSource;
    if (!EventSourceImpl) {
      throw new TypeError("no EventSource here: pass one in the options (in Node: `import { EventSource } from 'eventsource'`)");
    }
    return { EventSource: EventSourceImpl, fetch: fetchFn };
  }

  // `events_url` is the sidecar's own absolute path, carrying the job's or batch's token; no bearer token goes with it.
  function eventsUrl(path: string): string {
    return /^https?:\/\//.test(path) ? path : `${baseUrl}${path}`;
  }
}
