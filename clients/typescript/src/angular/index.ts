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

import { createSidecarClient, type CallOptions, type SidecarClient, type SidecarClientOptions } from "../client.js";
import type { JobStream, StreamOptions } from "../stream.js";
import type {
  AiHealth, DealPredictRequest, DealPredictResult, EmailGenerateRequest, EmailGenerateResult, JobCreated, JobEvent,
  JobView, LeadQualifyRequest, LeadQualifyResult, StartedJob, Task, TaskInput, TaskResult,
} from "../types.js";

export type StreamJobOptions = Omit<StreamOptions, "signal">;
export type RequestOptions = Omit<CallOptions, "signal">;

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
  }

  qualifyLead(body: LeadQualifyRequest, options?: RequestOptions): Observable<LeadQualifyResult> {
    return this.call((signal) => this.client.qualifyLead(body, { ...options, signal }));
  }

  generateEmail(body: EmailGenerateRequest, options?: RequestOptions): Observable<EmailGenerateResult> {
    return this.call((signal) => this.client.generateEmail(body, { ...options, signal }));
  }

  predictDeal(body: DealPredictRequest, options?: RequestOptions): Observable<DealPredictResult> {
    return this.call((signal) => this.client.predictDeal(body, { ...options, signal }));
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
    return new Observable<JobEvent<TaskResult<T>>>((subscriber) => {
      const onReconnecting = options?.onReconnecting && (() => this.zone.run(() => options.onReconnecting?.()));
      const stream: JobStream<TaskResult<T>> = this.client.streamJob(job, { ...options, onReconnecting });
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

  /** `startJob` then `streamJob`: one subscription from the POST to `done`. */
  run<T extends Task>(task: T, input: TaskInput<T>, options?: RequestOptions & StreamJobOptions): Observable<JobEvent<TaskResult<T>>> {
    return this.startJob(task, input, options).pipe(switchMap((job) => this.streamJob(job, options)));
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
  AiHealth, DealPredictRequest, DealPredictResult, EmailGenerateRequest, EmailGenerateResult, JobCreated, JobEvent,
  JobView, LeadQualifyRequest, LeadQualifyResult, Problem, StartedJob, Task, TaskInput, TaskResult,
} from "../types.js";
export { SidecarProblem, SidecarStreamError } from "../errors.js";
