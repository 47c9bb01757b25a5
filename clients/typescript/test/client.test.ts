// The framework-agnostic client against the real sidecar (`adapter demo`, started by the global set-up).
// Node has no EventSource: these tests give the client the `eventsource` package's, a WHATWG
// implementation that reconnects with Last-Event-ID as browsers do; the browser test runs the native one.
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";

import { EventSource } from "eventsource";
import { describe, expect, inject, it } from "vitest";

import {
  SidecarProblem, SidecarStreamError, TASKS, createSidecarClient, type JobEvent, type JobStream, type Task, type TaskInput,
} from "../src/index.js";
import { recordingEventSource } from "./support.js";

const sidecar = inject("sidecar");
const [lead, , injectionLead] = sidecar.leads;
const [deal] = sidecar.deals;
const client = createSidecarClient({ baseUrl: sidecar.baseUrl, getToken: () => sidecar.token, EventSource });

async function collect<R>(stream: JobStream<R>): Promise<JobEvent<R>[]> {
  const events: JobEvent<R>[] = [];
  for await (const event of stream) events.push(event);
  return events;
}

function expectConsecutive(events: { id: number }[], from = 1) {
  expect(events.map((e) => e.id)).toEqual(events.map((_, i) => from + i));
}

async function injectFault(task: string, behaviour: string) {
  const response = await fetch(`${sidecar.baseUrl}/demo/fault`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ task, behaviour }),
  });
  expect(response.status).toBe(204);
}

describe("synchronous calls", () => {
  it("return the contract's typed results", async () => {
    const qualified = await client.qualifyLead({ lead_id: lead });
    expect(qualified.lead_id).toBe(lead);
    expect(qualified.classification).toBe(qualified.score >= 70 ? "Hot" : qualified.score >= 40 ? "Warm" : "Cold");
    expect(Object.keys(qualified.bant).sort()).toEqual(["authority", "budget", "need", "timeline"]);

    const emails = await client.generateEmail({ lead_id: lead, tone: "casual" }); // `context` has a default
    expect(emails.variations.map((v) => v.type)).toEqual(["formal", "casual", "direct"]);

    const predicted = await client.predictDeal({ deal_id: deal });
    expect(predicted.deal_id).toBe(deal);
    expect(predicted.win_probability).toBeGreaterThanOrEqual(0);
    expect(predicted.win_probability).toBeLessThanOrEqual(100);
  });

  it("run every registered task by name, and through its generated method", async () => {
    // The demo seeds leads and deals: each task's record id field names the kind it reads.
    const records: Record<string, string> = { lead_id: lead, deal_id: deal };
    const tasks = Object.keys(TASKS) as Task[];
    expect(tasks.length).toBeGreaterThanOrEqual(3);
    for (const task of tasks) {
      const spec = TASKS[task];
      const body = { [spec.recordId]: records[spec.recordId] } as TaskInput<typeof task>;
      const result = (await client.runTask(task, body)) as Record<string, unknown>;
      expect(result[spec.recordId], task).toBe(records[spec.recordId]);
      expect(String(result.agent), task).toMatch(/_Agent$/);
      const method = (client as unknown as Record<string, (b: unknown) => Promise<Record<string, unknown>>>)[spec.method];
      expect(typeof method, `${task}: ${spec.method}`).toBe("function");
      expect((await method(body)).agent, task).toBe(result.agent);
    }
    await expect(client.runTask("no.such" as Task, {} as never)).rejects.toThrow(/no task no\.such/);
  });

  it("report the sidecar's health, with every task's agent known to the gateway", async () => {
    const health = await client.health();
    expect(health.status).toBe("ok");
    expect(Object.values(health.agents)).toEqual(Object.keys(TASKS).map(() => true));
  });

  it("ask the auth hook for the token on every request, and wait for an async one", async () => {
    let asked = 0;
    const hooked = createSidecarClient({
      baseUrl: sidecar.baseUrl, getToken: async () => { asked += 1; return sidecar.token; },
    });
    await hooked.qualifyLead({ lead_id: lead });
    await hooked.qualifyLead({ lead_id: lead });
    expect(asked).toBe(2);
  });

  it("send the cache option as Cache-Control, read through the typed openapi-fetch client", async () => {
    await client.qualifyLead({ lead_id: lead });
    const cached = await client.api.POST("/api/v1/ai/lead/qualify", { body: { lead_id: lead } , headers: { Authorization: `Bearer ${sidecar.token}` } });
    expect(cached.response.headers.get("X-Cache")).toBe("HIT");
    const { response } = await client.api.POST("/api/v1/ai/lead/qualify", {
      body: { lead_id: lead }, headers: { "Cache-Control": "no-store" },
    });
    expect(response.headers.get("X-Cache")).toBe("BYPASS");
  });
});

describe("problems", () => {
  it("arrive as a SidecarProblem carrying the CRM's refusal", async () => {
    const error = await client.qualifyLead({ lead_id: sidecar.othersLead }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(SidecarProblem);
    const problem = error as SidecarProblem;
    expect(problem.status).toBe(403);
    expect(problem.slug).toBe("forbidden");
    expect(problem.problem.detail).toBeTruthy();
    expect(problem.problem.request_id).toBe(problem.response?.headers.get("X-Request-ID"));
  });

  it("name the invalid field", async () => {
    const error = await client.predictDeal({ deal_id: "not-an-object-id" }).catch((e: unknown) => e) as SidecarProblem;
    expect(error).toBeInstanceOf(SidecarProblem);
    expect(error.status).toBe(400);
    expect(error.slug).toBe("invalid-request");
    expect(error.problem.errors?.[0]?.field).toContain("deal_id");
  });

  it("say unauthenticated without a token", async () => {
    const anonymous = createSidecarClient({ baseUrl: sidecar.baseUrl, getToken: () => null });
    const error = await anonymous.startJob("lead.qualify", { lead_id: lead }).catch((e: unknown) => e) as SidecarProblem;
    expect(error).toBeInstanceOf(SidecarProblem);
    expect(error.status).toBe(401);
  });
});

describe("streamed jobs", () => {
  it("deliver typed events with consecutive ids, from status through deltas to the result, ending on done", async () => {
    const job = await client.startJob("lead.qualify", { lead_id: lead }, { cache: "no-cache" });
    expect(job.task).toBe("lead.qualify");
    const events = await collect(client.streamJob(job));
    expectConsecutive(events);
    expect(events[0]).toMatchObject({ type: "status" });
    expect(events.filter((e) => e.type === "delta").length).toBeGreaterThan(3);
    const result = events.find((e) => e.type === "result");
    if (result?.type !== "result") throw new Error("no result event");
    expect(result.result.lead_id).toBe(lead);
    expect(["Hot", "Warm", "Cold"]).toContain(result.result.classification); // typed as LeadQualifyResult
    expect(events.at(-1)).toEqual({ type: "done", id: events.length, status: "succeeded", cached: false });
    const view = await client.getJob(job);
    expect(view).toMatchObject({ job_id: job.job_id, status: "succeeded", result: result.result });
  });

  it("resume after a dropped connection with no gap and no repeat", async () => {
    const { opened, EventSource: Recording } = recordingEventSource();
    const flaky = createSidecarClient({ baseUrl: sidecar.baseUrl, getToken: () => sidecar.token, EventSource: Recording });
    const job = await flaky.startJob("deal.predict", { deal_id: deal }, { cache: "no-cache" });
    let reconnects = 0;
    let beforeDrop = -1;
    const stream = flaky.streamJob({ ...job, events_url: `${job.events_url}&drop_after=3` }, {
      onReconnecting: () => { reconnects += 1; beforeDrop = stream.lastEventId; },
    });
    const events = await collect(stream);
    expect(reconnects).toBe(1);
    expect(beforeDrop).toBe(3); // the sidecar hung up after three events...
    expect(opened).toHaveLength(1); // ...and the same EventSource resumed by itself, with Last-Event-ID
    expectConsecutive(events);
    expect(events.at(-1)).toMatchObject({ type: "done", status: "succeeded" });
    expect(events.some((e) => e.type === "result" && e.result.deal_id === deal)).toBe(true);
  });

  it("start after lastEventId when asked to", async () => {
    const job = await client.startJob("lead.qualify", { lead_id: lead });
    const all = await collect(client.streamJob(job));
    const rest = await collect(client.streamJob(job, { lastEventId: 2 }));
    expectConsecutive(rest, 3);
    expect(rest).toEqual(all.slice(2));
  });

  it("stream a cached answer as its result then done, cached", async () => {
    await client.generateEmail({ lead_id: lead }); // now in the cache
    const job = await client.startJob("email.generate", { lead_id: lead });
    const events = await collect(client.streamJob(job));
    const result = events.find((e) => e.type === "result");
    expect(result?.type === "result" && result.result.variations).toHaveLength(3);
    expect(events.at(-1)).toMatchObject({ type: "done", status: "succeeded", cached: true });
  });

  it("deliver the agent's failure as an error event with its problem, then done failed", async () => {
    await injectFault("lead.qualify", "wrong_shape");
    const job = await client.startJob("lead.qualify", { lead_id: injectionLead }, { cache: "no-cache" });
    const events = await collect(client.streamJob(job));
    expectConsecutive(events);
    expect(events.some((e) => e.type === "result")).toBe(false);
    const error = events.find((e) => e.type === "error");
    if (error?.type !== "error") throw new Error("no error event");
    expect(error.problem.status).toBe(502);
    expect(error.problem.type).toMatch(/invalid-agent-output$/);
    expect(events.at(-1)).toMatchObject({ type: "done", status: "failed" });
  });

  it("close the EventSource when the loop is left, while the job runs on", async () => {
    const { opened, EventSource: Recording } = recordingEventSource();
    const leaving = createSidecarClient({ baseUrl: sidecar.baseUrl, getToken: () => sidecar.token, EventSource: Recording });
    const job = await leaving.startJob("lead.qualify", { lead_id: lead }, { cache: "no-cache" });
    for await (const event of leaving.streamJob(job)) {
      expect(event.id).toBe(1);
      break;
    }
    expect(opened).toHaveLength(1);
    expect(opened[0]!.readyState).toBe(EventSource.CLOSED);
    // A later reader gets the job's whole log: the job did not stop with the first one.
    const events = await collect(leaving.streamJob(job));
    expectConsecutive(events);
    expect(events.at(-1)).toMatchObject({ type: "done", status: "succeeded" });
  });

  it("never connect when closed before the first event is asked for", async () => {
    const { opened, EventSource: Recording } = recordingEventSource();
    const idle = createSidecarClient({ baseUrl: sidecar.baseUrl, getToken: () => sidecar.token, EventSource: Recording });
    const job = await idle.startJob("lead.qualify", { lead_id: lead });
    const stream = idle.streamJob(job);
    stream.close();
    expect(await stream.next()).toEqual({ value: undefined, done: true });
    expect(opened).toHaveLength(0);
  });

  it("stop when the signal aborts, rejecting with its reason", async () => {
    const { opened, EventSource: Recording } = recordingEventSource();
    const aborting = createSidecarClient({ baseUrl: sidecar.baseUrl, getToken: () => sidecar.token, EventSource: Recording });
    const job = await aborting.startJob("lead.qualify", { lead_id: lead }, { cache: "no-cache" });
    const controller = new AbortController();
    const seen: number[] = [];
    const outcome = (async () => {
      for await (const event of aborting.streamJob(job, { signal: controller.signal })) {
        seen.push(event.id);
        if (event.type === "delta") controller.abort(new Error("the user navigated away"));
      }
    })();
    await expect(outcome).rejects.toThrow("the user navigated away");
    expect(seen.length).toBeGreaterThan(0);
    expect(opened[0]!.readyState).toBe(EventSource.CLOSED);
  });

  it("raise the sidecar's problem when the job token is refused", async () => {
    const job = await client.startJob("lead.qualify", { lead_id: lead });
    const forged = job.events_url.replace(/token=[^&]+/, "token=forged.token.value");
    const error = await collect(client.streamJob({ ...job, events_url: forged })).catch((e: unknown) => e) as SidecarProblem;
    expect(error).toBeInstanceOf(SidecarProblem);
    expect(error.status).toBe(403);
    expect(error.problem.detail).toMatch(/job token/);
  });

  it("raise a SidecarProblem for a job that does not exist", async () => {
    const job = await client.startJob("lead.qualify", { lead_id: lead });
    const other = job.events_url.replace(job.job_id, "aijob_00000000000000000000000000000000");
    const error = await collect(client.streamJob({ ...job, events_url: other })).catch((e: unknown) => e) as SidecarProblem;
    expect(error).toBeInstanceOf(SidecarProblem);
    expect(error.status).toBe(404);
  });

  it("explain that Node needs an EventSource", () => {
    const bare = createSidecarClient({ baseUrl: sidecar.baseUrl });
    const job = { job_id: "j", status: "queued" as const, events_url: "/x", expires_at: "" };
    expect(() => bare.streamJob(job)).toThrow(/EventSource/);
  });

  // The sidecar cannot be made to skip or repeat an id, so a two-line SSE server plays the broken one.
  it.each([
    ["a gap", "id: 1\nevent: status\ndata: {}\n\nid: 3\nevent: delta\ndata: {}\n\n", /event "3" \(delta\) after event 1/],
    ["a repeat", "id: 1\nevent: status\ndata: {}\n\nid: 1\nevent: delta\ndata: {}\n\n", /event "1" \(delta\) after event 1/],
  ])("fail the stream on %s in the ids rather than hide it", async (_, body, message) => {
    const server = createServer((_req, res) => {
      res.writeHead(200, { "Content-Type": "text/event-stream" });
      res.end(body);
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    try {
      const { port } = server.address() as AddressInfo;
      const broken = createSidecarClient({ baseUrl: `http://127.0.0.1:${port}`, EventSource });
      const seen: number[] = [];
      const error = await (async () => {
        for await (const event of broken.streamJob({ job_id: "j", status: "queued", events_url: "/events", expires_at: "" })) seen.push(event.id);
      })().catch((e: unknown) => e);
      expect(seen).toEqual([1]);
      expect(error).toBeInstanceOf(SidecarStreamError);
      expect((error as Error).message).toMatch(message);
    } finally {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
  });
});
