// @crm-ai/sidecar-client/angular: the client as an Angular service of RxJS Observables.
//
// Built with plain `tsc`, not ng-packagr: nothing here needs Angular's compiler. The service is a
// plain class registered by a factory provider (`provideConductorAi`), with no decorator, template
// or component; a decorated `@Injectable` compiled by tsc would need the JIT compiler at run time,
// and ng-packagr's partial compilation (for the CLI's linker) exists only for decorated classes.
// So the entry point uses public API only (`inject`, `NgZone`, `Provider`) and works in any
// Angular version with `inject()` (14+), with or without zone.js.
import { NgZone, inject, type Provider } from "@angular/core";
import { Observable, switchMap } from "rxjs";

import {
  createSidecarClient, type BatchQueryOptions, type CallOptions, type ListThreadsOptions, type SidecarClient,
  type SidecarClientOptions,
} from "../client.js";
import type { SidecarEventStream, StreamOptions } from "../stream.js";
import { TASKS } from "../generated/tasks.js";
import type {
  AiHealth, BatchCreated, BatchEvent, BatchOptions, BatchView, JobCreated, JobEvent, JobView,
  StartedBatch, StartedJob, Task, TaskInput, TaskMethodName, TaskResult, Thread, ThreadPage,
  ThreadRecordQuery, ThreadTask, ThreadTurn,
} from "../types.js";

export type StreamJobOptions = Omit<StreamOptions, "signal">;
export type RequestOptions = Omit<CallOptions, "signal">;
export type GetBatchOptions = Omit<BatchQueryOptions, "signal">;

/** One Observable method per task (`qualifyLead`, ...), generated from the task registry: `runTask` under another name. */
export type TaskObservables = {
  [T in Task as TaskMethodName<T>]: (body: TaskInput<T>, options?: RequestOptions) => Observable<TaskResult<T>>;
};

// The per-task methods are made in the constructor from the task map; this declares them on the class.
export interface ConductorAiService extends TaskObservables {}

/**
 * The sidecar's AI routes as Observables. Every callback runs inside Angular's zone (the network
 * work outside it, so raw network events do not trigger change detection); unsubscribing aborts the
 * request or closes the job's EventSource (the job itself runs on and its result is cached).
 *
 * Provide it once with `provideConductorAi(...)`, then `inject(ConductorAiService)`.
 */
export class ConductorAiService {
  /** The framework-agnostic client underneath. */
  readonly client: SidecarClient;

  constructor(options: SidecarClientOptions, private readonly zone: NgZone) {
    this.client = createSidecarClient(options);
    for (const [task, spec] of Object.entries(TASKS)) {
      (this as unknown as Record<string, unknown>)[spec.method] =
        (body: never, o?: RequestOptions) => this.runTask(task as Task, body, o);
    }
  }

  /** The task's validated result (its synchronous route). */
  runTask<T extends Task>(task: T, body: TaskInput<T>, options?: RequestOptions): Observable<TaskResult<T>> {
    return this.call((signal) => this.client.runTask(task, body, { ...options, signal }));
  }

  health(): Observable<AiHealth> {
    return this.call((signal) => this.client.health({ signal }));
  }

  startJob<T extends Task>(task: T, input: TaskInput<T>, options?: RequestOptions): Observable<StartedJob<T>> {
    return this.call((signal) => this.client.startJob(task, input, { ...options, signal }));
  }

  getJob(job: Pick<JobCreated, "job_id">): Observable<JobView> {
    return this.call((signal) => this.client.getJob(job, { signal }));
  }

  /** The job's typed events; completes after `done`, errors with SidecarProblem or SidecarStreamError. */
  streamJob<T extends Task = Task>(job: JobCreated & { readonly task?: T }, options?: StreamJobOptions): Observable<JobEvent<TaskResult<T>>> {
    return this.follow((o) => this.client.streamJob(job, o), options);
  }

  /** `startJob` then `streamJob`: one subscription from the POST to `done`. */
  run<T extends Task>(task: T, input: TaskInput<T>, options?: RequestOptions & StreamJobOptions): Observable<JobEvent<TaskResult<T>>> {
    return this.startJob(task, input, options).pipe(switchMap((job) => this.streamJob(job, options)));
  }

  /** The 202 body (`batch_id`, `total`, `events_url`, `expires_at`) with its `task`; a 400 names the bad field. */
  startBatch<T extends Task>(task: T, ids: readonly string[], options?: BatchOptions<T>): Observable<StartedBatch<T>> {
    return this.call((signal) => this.client.startBatch(task, ids, options, { signal }));
  }

  /** The batch's state: counts and items (only those in `status`, if given). */
  getBatch<T extends Task = Task>(batch: Pick<BatchCreated, "batch_id"> & { readonly task?: T }, options?: GetBatchOptions): Observable<BatchView<TaskResult<T>>> {
    return this.call((signal) => this.client.getBatch(batch, { ...options, signal }));
  }

  /** Cancels the batch (running items finish, queued ones never start); emits its state. A finished batch is left as it is. */
  cancelBatch<T extends Task = Task>(batch: Pick<BatchCreated, "batch_id"> & { readonly task?: T }): Observable<BatchView<TaskResult<T>>> {
    return this.call((signal) => this.client.cancelBatch(batch, { signal }));
  }

  /** The batch's typed events (`status`, `item`, `progress`); completes after `done`, errors with SidecarProblem or SidecarStreamError. */
  streamBatch<T extends Task = Task>(batch: BatchCreated & { readonly task?: T }, options?: StreamJobOptions): Observable<BatchEvent<TaskResult<T>>> {
    return this.follow((o) => this.client.streamBatch(batch, o), options);
  }

  /** `startBatch` then `streamBatch`: one subscription from the POST to `done`. */
  runBatch<T extends Task>(task: T, ids: readonly string[], options?: BatchOptions<T>, streamOptions?: StreamJobOptions): Observable<BatchEvent<TaskResult<T>>> {
    return this.startBatch(task, ids, options).pipe(switchMap((batch) => this.streamBatch(batch, streamOptions)));
  }

  /** Starts a thread about the record in `input` and runs its first turn; emits the thread. */
  createThread<T extends ThreadTask>(task: T, input: TaskInput<T>): Observable<Thread<T>> {
    return this.call((signal) => this.client.createThread(task, input, { signal }));
  }

  /** The thread's next turn: the agent sees its history and the record as it is now. */
  continueThread<T extends ThreadTask = ThreadTask>(thread: Pick<Thread, "thread_id"> & { readonly task?: T }, message: string): Observable<ThreadTurn<TaskResult<T>>> {
    return this.call((signal) => this.client.continueThread(thread, message, { signal }));
  }

  /** The thread with every turn. */
  getThread<T extends ThreadTask = ThreadTask>(thread: Pick<Thread, "thread_id"> & { readonly task?: T }): Observable<Thread<T>> {
    return this.call((signal) => this.client.getThread(thread, { signal }));
  }

  /** The caller's threads about one record, newest first, a page at a time (`next_cursor`). */
  listThreads(record: ThreadRecordQuery, options?: Omit<ListThreadsOptions, "signal">): Observable<ThreadPage> {
    return this.call((signal) => this.client.listThreads(record, { ...options, signal }));
  }

  /** Deletes the thread, in the Conductor too; emits once (no value) when it is gone. */
  deleteThread(thread: Pick<Thread, "thread_id">): Observable<void> {
    return this.call((signal) => this.client.deleteThread(thread, { signal }));
  }

  // An event stream as a cold Observable: events and the end inside the zone, the network outside it;
  // unsubscribing closes the EventSource.
  private follow<E>(open: (options: StreamOptions) => SidecarEventStream<E>, options?: StreamJobOptions): Observable<E> {
    return new Observable<E>((subscriber) => {
      const onReconnecting = options?.onReconnecting && (() => this.zone.run(() => options.onReconnecting?.()));
      const stream = open({ ...options, onReconnecting });
      this.zone.runOutsideAngular(async () => {
        try {
          for await (const event of stream) this.zone.run(() => subscriber.next(event));
          this.zone.run(() => subscriber.complete());
        } catch (error) {
          this.zone.run(() => subscriber.error(error));
        }
      });
      return () => stream.close();
    });
  }

  // A promise-returning call as a cold Observable: one request per subscription, aborted on unsubscribe.
  private call<V>(request: (signal: AbortSignal) => Promise<V>): Observable<V> {
    return new Observable<V>((subscriber) => {
      const controller = new AbortController();
      this.zone.runOutsideAngular(() => request(controller.signal)).then(
        (value) => this.zone.run(() => { subscriber.next(value); subscriber.complete(); }),
        (error) => { if (!controller.signal.aborted) this.zone.run(() => subscriber.error(error)); },
      );
      return () => controller.abort();
    });
  }
}

/**
 * Providers for `ConductorAiService`. `options` may be a function: it runs in an injection context,
 * so it can `inject()` the app's auth service for the token.
 *
 *     provideConductorAi(() => {
 *       const auth = inject(AuthService);
 *       return { baseUrl: environment.sidecarUrl, getToken: () => auth.accessToken() };
 *     })
 */
export function provideConductorAi(options: SidecarClientOptions | (() => SidecarClientOptions) = {}): Provider[] {
  return [{
    provide: ConductorAiService,
    useFactory: () => new ConductorAiService(typeof options === "function" ? options() : options, inject(NgZone)),
  }];
}

export type {
  AiHealth, BatchCounts, BatchCreated, BatchEvent, BatchItem, BatchItemStatus, BatchOptions, BatchStatus, BatchView,
  JobCreated, JobEvent, JobView, Problem, StartedBatch, StartedJob, Task, TaskInput, TaskResult,
} from "../types.js";
// Each task's request and result types by name, generated from the task registry.
export type * from "../generated/tasks.js";
export { SidecarProblem, SidecarStreamError } from "../errors.js";
