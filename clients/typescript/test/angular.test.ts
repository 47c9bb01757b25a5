// The Angular entry point against the real sidecar: resolved from an Angular injector, callbacks in
// Angular's zone (zone.js loaded as in an app), unsubscribing closes the EventSource.
import "zone.js";

import { InjectionToken, Injector, NgZone, inject as ngInject } from "@angular/core";
import { EventSource } from "eventsource";
import { type Observable, firstValueFrom } from "rxjs";
import { describe, expect, inject, it } from "vitest";

import {
  ConductorAiService, SidecarProblem, provideConductorAi, type BatchEvent, type JobEvent, type LeadQualifyResult,
} from "../src/angular/index.js";
import type { EventSourceConstructor } from "../src/index.js";
import { recordingEventSource } from "./support.js";

const sidecar = inject("sidecar");
const [lead] = sidecar.leads;

/** Where an app's auth service would hand out the signed-in user's token. */
const TOKEN = new InjectionToken<() => string>("token");

function service(EventSourceImpl: EventSourceConstructor = EventSource) {
  const injector = Injector.create({
    providers: [
      { provide: NgZone, useFactory: () => new NgZone({ enableLongStackTrace: false }) },
      { provide: TOKEN, useValue: () => sidecar.token },
      // The options factory runs in an injection context, as an app's would to reach its auth service.
      provideConductorAi(() => ({ baseUrl: sidecar.baseUrl, getToken: ngInject(TOKEN), EventSource: EventSourceImpl })),
    ],
  });
  return { ai: injector.get(ConductorAiService), zone: injector.get(NgZone) };
}

/** Every value of `source`, subscribed from outside Angular's zone (as a timer callback might), with
 * whether each value and the completion were delivered inside it. */
function collectInZone<T>(zone: NgZone, source: Observable<T>): Promise<{ seen: { event: T; inZone: boolean }[]; completedInZone: boolean }> {
  const seen: { event: T; inZone: boolean }[] = [];
  return new Promise((resolve, reject) => zone.runOutsideAngular(() => {
    source.subscribe({
      next: (event) => seen.push({ event, inZone: NgZone.isInAngularZone() }),
      error: reject,
      complete: () => resolve({ seen, completedInZone: NgZone.isInAngularZone() }),
    });
  }));
}

describe("ConductorAiService", () => {
  it("answers the synchronous calls inside Angular's zone, then completes", async () => {
    const { ai, zone } = service();
    const outcome = await new Promise<{ values: unknown[]; inZone: boolean[] }>((resolve, reject) => {
      const values: unknown[] = [];
      const inZone: boolean[] = [];
      zone.runOutsideAngular(() => ai.qualifyLead({ lead_id: lead }).subscribe({
        next: (value) => { values.push(value); inZone.push(NgZone.isInAngularZone()); },
        error: reject,
        complete: () => { inZone.push(NgZone.isInAngularZone()); resolve({ values, inZone }); },
      }));
    });
    expect(outcome.values).toHaveLength(1);
    expect(outcome.values[0]).toMatchObject({ lead_id: lead, agent: "LeadQualifier_CRM_Agent" });
    expect(outcome.inZone).toEqual([true, true]); // the value, then the completion
  });

  it("runs a job as typed events, every one delivered inside the zone, completing after done", async () => {
    const { ai, zone } = service();
    // Subscribed from outside the zone, as a timer callback might: delivery still enters it.
    const { seen, completedInZone } = await collectInZone<JobEvent<LeadQualifyResult>>(
      zone, ai.run("lead.qualify", { lead_id: lead }, { cache: "no-cache" }));
    expect(seen.map((s) => s.event.id)).toEqual(seen.map((_, i) => i + 1));
    expect(seen.every((s) => s.inZone)).toBe(true);
    expect(completedInZone).toBe(true);
    const result = seen.find((s) => s.event.type === "result")?.event;
    expect(result?.type === "result" && result.result.lead_id).toBe(lead);
    expect(seen.at(-1)!.event).toMatchObject({ type: "done", status: "succeeded" });
  });

  it("closes the EventSource when the subscriber unsubscribes", async () => {
    const { opened, EventSource: Recording } = recordingEventSource();
    const { ai } = service(Recording);
    const job = await firstValueFrom(ai.startJob("lead.qualify", { lead_id: lead }, { cache: "no-cache" }));
    await new Promise<void>((resolve) => {
      const subscription = ai.streamJob(job).subscribe((event) => {
        if (event.type === "delta") {
          subscription.unsubscribe();
          resolve();
        }
      });
    });
    expect(opened).toHaveLength(1);
    expect(opened[0]!.readyState).toBe(EventSource.CLOSED);
  });

  it("streams a batch as typed events inside the zone, completing after done; getBatch and cancelBatch answer its state", async () => {
    const { ai, zone } = service();
    const batch = await firstValueFrom(ai.startBatch("lead.qualify", sidecar.leads));
    const { seen, completedInZone } = await collectInZone<BatchEvent<LeadQualifyResult>>(zone, ai.streamBatch(batch));
    expect(seen.map((s) => s.event.id)).toEqual(seen.map((_, i) => i + 1));
    expect(seen.every((s) => s.inZone)).toBe(true);
    expect(completedInZone).toBe(true);
    const finished = seen.flatMap(({ event }) => (event.type === "item" && event.item.status === "succeeded" ? [event.item] : []));
    expect(finished.map((item) => item.result?.lead_id).sort()).toEqual([...sidecar.leads].sort()); // typed results
    expect(seen.at(-1)!.event).toMatchObject({ type: "done", status: "completed", counts: { succeeded: sidecar.leads.length } });

    const view = await firstValueFrom(ai.getBatch(batch, { status: "succeeded" }));
    expect(view.items.map((item) => item.id)).toEqual(sidecar.leads);
    expect(await firstValueFrom(ai.cancelBatch(batch))).toMatchObject({ status: "completed", cancel_requested: false });
  });

  it("runBatch errors with the SidecarProblem naming the field, inside the zone", async () => {
    const { ai } = service();
    const failure = await new Promise<{ error: unknown; inZone: boolean }>((resolve) => {
      ai.runBatch("lead.qualify", [lead!, lead!]).subscribe({ error: (error) => resolve({ error, inZone: NgZone.isInAngularZone() }) });
    });
    expect(failure.inZone).toBe(true);
    expect(failure.error).toBeInstanceOf(SidecarProblem);
    expect((failure.error as SidecarProblem).problem.errors?.[0]?.field).toBe("ids[1]");
  });

  it("errors with the SidecarProblem, inside the zone", async () => {
    const { ai } = service();
    const failure = await new Promise<{ error: unknown; inZone: boolean }>((resolve) => {
      ai.predictDeal({ deal_id: "not-an-id" }).subscribe({ error: (error) => resolve({ error, inZone: NgZone.isInAngularZone() }) });
    });
    expect(failure.inZone).toBe(true);
    expect(failure.error).toBeInstanceOf(SidecarProblem);
    expect((failure.error as SidecarProblem).status).toBe(400);
  });
  it("starts, continues, lists and deletes a thread, each answer inside Angular's zone", async () => {
    const { ai, zone } = service();
    const created = await collectInZone(zone, ai.createThread("email.generate", { lead_id: lead }));
    const thread = created.seen[0].event;
    expect(created.seen.map((s) => s.inZone)).toEqual([true]);
    const turn = await firstValueFrom(ai.continueThread(thread, "more formal"));
    expect(turn.message).toBe("more formal");
    expect((await firstValueFrom(ai.getThread(thread))).turns).toHaveLength(2);
    const page = await firstValueFrom(ai.listThreads({ lead_id: lead }, { limit: 100 }));
    expect(page.threads.map((t) => t.thread_id)).toContain(thread.thread_id);
    await firstValueFrom(ai.deleteThread(thread));
    const gone = await firstValueFrom(ai.getThread(thread)).catch((e: unknown) => e);
    expect(gone).toBeInstanceOf(SidecarProblem);
  });
});
