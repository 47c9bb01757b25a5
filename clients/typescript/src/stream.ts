// A job's or a batch's events over EventSource, as an async iterable.
//
// Both speak the same SSE protocol (consecutive ids from 1, `done` last, resumable with
// Last-Event-ID); only their event names and payloads differ, so one EventStream serves both,
// given the event names to listen for and how to type each payload (an EventProtocol).
//
// Why EventSource rather than fetch + a stream parser: the job's `events_url` carries a job token
// precisely so the browser's own EventSource can follow it without the user's JWT, and the browser
// then reconnects by itself after a dropped connection, sending `Last-Event-ID`; the sidecar
// replays exactly the events after it. This module adds what EventSource lacks: typed events, an
// end (`done`), cancellation, a check that ids stay consecutive, and a reason when the browser
// gives up (EventSource reports only "error", never the HTTP status or the problem body).
import { SidecarProblem, SidecarStreamError, problemOf } from "./errors.js";
import type {
  BatchEvent, BatchEventPayloads, BatchEventType, BatchItem, JobEvent, JobEventPayloads, JobEventType,
} from "./types.js";

/** The part of the WHATWG EventSource this client uses (the browser's, or the `eventsource` package in Node). */
export interface EventSourceLike {
  readonly readyState: number;
  addEventListener(type: string, listener: (event: Event) => void): void;
  close(): void;
}
export type EventSourceConstructor = new (url: string, init?: { withCredentials?: boolean }) => EventSourceLike;

// EventSource.readyState values (the constants are not on the polyfill's interface type).
const CONNECTING = 0;
const CLOSED = 2;

/** Which events a stream listens for, and how each payload becomes a typed event. */
interface EventProtocol<E> {
  /** Every event name, `done` among them. `error` also names EventSource's connection errors (no data). */
  readonly types: readonly string[];
  toEvent(type: string, id: number, data: unknown): E;
}

/** Every event a stream delivers: an id, a name, and `done` last. */
type StreamEvent = { readonly type: string; readonly id: number };

/** How often an EventSource that gave up is reopened (after the server said the stream is there). */
const MAX_REOPENS = 3;

export interface StreamOptions {
  /** Aborting closes the connection; the iteration then rejects with the signal's reason. */
  signal?: AbortSignal;
  /** Resume after this event id: events up to it are not replayed. */
  lastEventId?: number;
  /** The connection dropped; the EventSource reconnects and resumes after the last event received. */
  onReconnecting?: () => void;
}

/** Typed events in order, ending after `done`. Breaking out of `for await` or `close()` closes the connection. */
export interface SidecarEventStream<E> extends AsyncIterableIterator<E> {
  close(): void;
  /** The id of the last event delivered (0 before the first). */
  readonly lastEventId: number;
}

/** A job's typed events in order, ending after `done`. */
export interface JobStream<R> extends SidecarEventStream<JobEvent<R>> {}

/** A batch's typed events in order (`status`, then `item` and `progress` as items finish), ending after `done`. */
export interface BatchStream<R> extends SidecarEventStream<BatchEvent<R>> {}

export interface StreamDeps {
  EventSource: EventSourceConstructor;
  fetch: typeof fetch;
}

export function openJobStream<R>(url: string, deps: StreamDeps, options: StreamOptions = {}): JobStream<R> {
  return new EventStream<JobEvent<R>>(url, jobProtocol<R>(), deps, options);
}

export function openBatchStream<R>(url: string, deps: StreamDeps, options: StreamOptions = {}): BatchStream<R> {
  return new EventStream<BatchEvent<R>>(url, batchProtocol<R>(), deps, options);
}

type Waiter<E> = { resolve: (r: IteratorResult<E>) => void; reject: (e: unknown) => void };

class EventStream<E extends StreamEvent> implements SidecarEventStream<E> {
  #source: EventSourceLike | null = null;
  #queue: E[] = [];
  #waiter: Waiter<E> | null = null;
  #started = false;
  #ended = false; // `done` arrived, or the consumer closed the stream
  #failure: { error: unknown } | null = null;
  #reopens = 0;
  #last: number;
  readonly #abort = () => this.#fail(this.options.signal?.reason ?? new DOMException("aborted", "AbortError"));

  constructor(
    private readonly url: string,
    private readonly protocol: EventProtocol<E>,
    private readonly deps: StreamDeps,
    private readonly options: StreamOptions,
  ) {
    this.#last = options.lastEventId ?? 0;
  }

  get lastEventId(): number {
    return this.#last;
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  next(): Promise<IteratorResult<E>> {
    if (!this.#started) this.#start();
    const value = this.#queue.shift();
    if (value !== undefined) return Promise.resolve({ value, done: false });
    if (this.#failure) {
      const { error } = this.#failure;
      this.#failure = null;
      this.#ended = true;
      return Promise.reject(error);
    }
    if (this.#ended) return Promise.resolve({ value: undefined, done: true });
    if (this.#waiter) return Promise.reject(new SidecarStreamError("next() called again before the previous call settled"));
    return new Promise((resolve, reject) => (this.#waiter = { resolve, reject }));
  }

  return(): Promise<IteratorResult<E>> {
    this.close();
    return Promise.resolve({ value: undefined, done: true });
  }

  close(): void {
    this.#started = true; // a stream closed before its first next() never connects
    this.#ended = true;
    this.#queue.length = 0;
    this.#failure = null;
    this.#disconnect();
    this.#settle();
  }

  #start(): void {
    this.#started = true;
    const { signal } = this.options;
    if (signal?.aborted) return this.#abort();
    signal?.addEventListener("abort", this.#abort, { once: true });
    // A fresh EventSource sends no Last-Event-ID header; the sidecar takes the query parameter instead.
    this.#connect(this.#last ? withQuery(this.url, "lastEventId", String(this.#last)) : this.url);
  }

  #connect(url: string): void {
    const source = new this.deps.EventSource(url);
    this.#source = source;
    const { types } = this.protocol;
    // EventSource's own "error" (the connection's) is heard even when the protocol has no such event.
    for (const type of types.includes("error") ? types : [...types, "error"]) {
      source.addEventListener(type, (event) => {
        if (source !== this.#source) return; // a late event of a connection we already left
        if (type === "error" && typeof (event as MessageEvent).data !== "string") this.#connectionError(source);
        else this.#message(type, event as MessageEvent<string>);
      });
    }
  }

  #message(type: string, event: MessageEvent<string>): void {
    const id = Number(event.lastEventId);
    if (id !== this.#last + 1) {
      // The sidecar's ids are consecutive and a resume replays exactly the missed ones: anything
      // else is a gap or a repeat, and smoothing it over would hide a lost or doubled delta.
      return this.#fail(new SidecarStreamError(`event ${JSON.stringify(event.lastEventId)} (${type}) after event ${this.#last}: expected ${this.#last + 1}`));
    }
    let data: unknown;
    try {
      data = JSON.parse(event.data);
    } catch {
      return this.#fail(new SidecarStreamError(`event ${id} (${type}) carries no JSON: ${event.data.slice(0, 80)}`));
    }
    this.#last = id;
    this.#push(this.protocol.toEvent(type, id, data));
    if (type === "done") {
      this.#disconnect(); // else the EventSource would reconnect when the server closes the stream
      this.#ended = true;
      this.#settle();
    }
  }

  #connectionError(source: EventSourceLike): void {
    if (this.#ended) return;
    if (source.readyState === CONNECTING) {
      this.options.onReconnecting?.(); // the EventSource retries by itself, sending Last-Event-ID
      return;
    }
    if (source.readyState === CLOSED) void this.#diagnose();
  }

  // The EventSource gave up (an HTTP error, or not text/event-stream) and says nothing about why:
  // ask the same URL once ourselves. A problem (expired job token, job gone) becomes a SidecarProblem;
  // a healthy answer means a transient fault, so reopen after the last event received.
  async #diagnose(): Promise<void> {
    this.#disconnect();
    const url = withQuery(this.url, "lastEventId", String(this.#last));
    const controller = new AbortController();
    const onAbort = () => controller.abort();
    this.options.signal?.addEventListener("abort", onAbort, { once: true });
    try {
      const response = await this.deps.fetch(url, { headers: { Accept: "text/event-stream" }, signal: controller.signal });
      if (!response.ok) {
        const text = await response.text();
        let body: unknown = text;
        try { body = JSON.parse(text); } catch { /* not JSON: problemOf describes it */ }
        return this.#fail(new SidecarProblem(problemOf(body, response), response));
      }
      controller.abort(); // we only wanted the status
      if (this.#ended || this.#failure) return;
      if (++this.#reopens > MAX_REOPENS) {
        return this.#fail(new SidecarStreamError(`the event stream failed ${MAX_REOPENS + 1} times although the sidecar serves it`));
      }
      this.#connect(url);
    } catch (error) {
      if (this.#ended || this.#failure) return;
      this.#fail(new SidecarStreamError("the event stream closed and the sidecar cannot be reached", { cause: error }));
    } finally {
      this.options.signal?.removeEventListener("abort", onAbort);
    }
  }

  #push(event: E): void {
    if (this.#waiter) {
      const { resolve } = this.#waiter;
      this.#waiter = null;
      resolve({ value: event, done: false });
    } else {
      this.#queue.push(event);
    }
  }

  #fail(error: unknown): void {
    if (this.#ended) return;
    this.#disconnect();
    if (this.#waiter) {
      const { reject } = this.#waiter;
      this.#waiter = null;
      this.#ended = true;
      this.#queue.length = 0;
      reject(error);
    } else {
      this.#failure = { error }; // delivered after the events already queued
    }
  }

  // Wakes a consumer waiting for an event that will not come.
  #settle(): void {
    if (this.#waiter && this.#ended && !this.#queue.length) {
      const { resolve } = this.#waiter;
      this.#waiter = null;
      resolve({ value: undefined, done: true });
    }
  }

  #disconnect(): void {
    this.options.signal?.removeEventListener("abort", this.#abort);
    this.#source?.close();
    this.#source = null;
  }
}

/** A protocol from one payload builder per event name: the names are the builders' keys. */
function protocol<P, E>(payloads: (data: unknown) => { [K in keyof P]: () => P[K] }): EventProtocol<E> {
  // Built once here for the names only: each builder is lazy, so an empty object is enough.
  const types = Object.keys(payloads({})) as string[];
  return {
    types,
    toEvent: (type, id, data) => ({ type, id, ...payloads(data)[type as keyof P]() }) as E,
  };
}

/**
 * A job's events. The builders' keys are checked against the contract's `SseEvent.event` by the
 * mapped type: adding or dropping a name there fails to compile here.
 */
function jobProtocol<R>(): EventProtocol<JobEvent<R>> {
  return protocol<JobEventPayloads<R>, JobEvent<R>>((data) => {
    const d = data as Record<string, unknown>;
    return {
      status: () => ({ state: d.state as JobEventPayloads<R>["status"]["state"], message: String(d.message ?? "") }),
      delta: () => ({ text: String(d.text ?? "") }),
      result: () => ({ result: data as R }),
      error: () => ({ problem: data as JobEventPayloads<R>["error"]["problem"] }),
      done: () => ({ status: d.status as JobEventPayloads<R>["done"]["status"], cached: Boolean(d.cached) }),
    } satisfies { [K in JobEventType]: () => JobEventPayloads<R>[K] };
  });
}

/** A batch's events: the builders' keys are checked against the contract's `BatchSseEvent.event`. */
function batchProtocol<R>(): EventProtocol<BatchEvent<R>> {
  return protocol<BatchEventPayloads<R>, BatchEvent<R>>((data) => {
    const d = data as Record<string, unknown>;
    type P = BatchEventPayloads<R>;
    return {
      status: () => ({ state: d.state as P["status"]["state"], message: String(d.message ?? "") }),
      item: () => ({ item: data as BatchItem<R> }),
      progress: () => ({ counts: data as P["progress"]["counts"] }),
      done: () => ({
        status: d.status as P["done"]["status"], counts: d.counts as P["done"]["counts"],
        ...(typeof d.message === "string" ? { message: d.message } : {}),
      }),
    } satisfies { [K in BatchEventType]: () => P[K] };
  });
}

/** `url` with `key=value` set in its query; works for relative URLs (`/api/...`) too. */
export function withQuery(url: string, key: string, value: string): string {
  const base = "http://relative.invalid";
  const parsed = new URL(url, base);
  parsed.searchParams.set(key, value);
  return parsed.origin === base && !url.startsWith(base) ? parsed.pathname + parsed.search + parsed.hash : parsed.href;
}
