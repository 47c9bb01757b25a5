// Threads against the real sidecar (`adapter demo`, started by the global set-up).
import { describe, expect, inject, it } from "vitest";

import { SidecarProblem, createSidecarClient } from "../src/index.js";

const sidecar = inject("sidecar");
const [lead] = sidecar.leads;
const [deal] = sidecar.deals;
const client = createSidecarClient({ baseUrl: sidecar.baseUrl, getToken: () => sidecar.token });

describe("threads", () => {
  it("start, continue, read, list and delete a thread, typed by its task", async () => {
    const thread = await client.createThread("email.generate", { lead_id: lead, tone: "casual" });
    expect(thread.task).toBe("email.generate");
    expect(thread.record).toEqual({ kind: "lead", id: lead });
    expect(thread.turns[0].message).toBeNull();
    expect(thread.turns[0].result.variations.map((v) => v.type)).toEqual(["formal", "casual", "direct"]);

    const turn = await client.continueThread(thread, "make the casual one shorter");
    expect(turn.message).toBe("make the casual one shorter");
    expect(turn.result.variations).toHaveLength(3);

    const read = await client.getThread(thread);
    expect(read.turns.map((t) => t.turn_id)).toEqual([thread.turns[0].turn_id, turn.turn_id]);

    const page = await client.listThreads({ lead_id: lead }, { limit: 100 });
    expect(page.threads.find((t) => t.thread_id === thread.thread_id)?.turn_count).toBe(2);

    await client.deleteThread(thread);
    const gone = await client.getThread(thread).catch((e: unknown) => e);
    expect(gone).toBeInstanceOf(SidecarProblem);
    expect((gone as SidecarProblem).status).toBe(404);
  });

  it("throw a problem naming the field for a bad message", async () => {
    const thread = await client.createThread("deal.predict", { deal_id: deal });
    expect(thread.turns[0].result.deal_id).toBe(deal);
    const refused = await client.continueThread(thread, "").catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(SidecarProblem);
    expect((refused as SidecarProblem).problem.errors?.[0]?.field).toBe("message");
    await client.deleteThread(thread);
  });
});
