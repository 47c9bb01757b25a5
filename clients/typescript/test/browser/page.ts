// The browser test's page: the package as an app bundles it (esbuild, from the built output), running
// one lead qualification through the real sidecar with the browser's own EventSource.
// Configuration comes from the query string: base (the sidecar), token, lead, drop (demo fault:
// the sidecar hangs up after that many events on the first connection).
import { createSidecarClient, SidecarProblem, type JobEvent, type LeadQualifyResult } from "@crm-ai/sidecar-client";

const params = new URLSearchParams(location.search);
const $ = (id: string) => document.getElementById(id)!;

type Mark = { what: string; at: number; id?: number; type?: string };
const timeline: Mark[] = [];
(window as unknown as { timeline: Mark[] }).timeline = timeline;
const mark = (what: string, extra: Partial<Mark> = {}) => timeline.push({ what, at: performance.now(), ...extra });

const client = createSidecarClient({ baseUrl: params.get("base") ?? "", getToken: () => params.get("token") });

function show(result: LeadQualifyResult): void {
  const score = Object.assign(document.createElement("span"), { className: "score", textContent: String(result.score) });
  const badge = Object.assign(document.createElement("span"), { className: "classification", textContent: result.classification });
  const bant = document.createElement("dl");
  for (const [key, value] of Object.entries(result.bant)) bant.append(Object.assign(document.createElement("dt"), { textContent: key }),
    Object.assign(document.createElement("dd"), { textContent: value }));
  $("result").replaceChildren(score, " ", badge, bant);
}

async function run(): Promise<void> {
  timeline.length = 0;
  mark("click");
  document.body.dataset.state = "running";
  try {
    const job = await client.startJob("lead.qualify", { lead_id: params.get("lead")! }, { cache: "no-cache" });
    const drop = params.get("drop");
    const events_url = drop ? `${job.events_url}&drop_after=${drop}` : job.events_url;
    const stream = client.streamJob({ ...job, events_url }, { onReconnecting: () => mark("reconnecting") });
    let last: JobEvent<LeadQualifyResult> | undefined;
    for await (const event of stream) {
      last = event;
      mark("event", { id: event.id, type: event.type });
      $("events").append(Object.assign(document.createElement("li"), { textContent: `${event.id} ${event.type}` }));
      if (event.type === "result") show(event.result); // typed: score, classification, bant
      if (event.type === "error") $("error").textContent = event.problem.detail;
    }
    document.body.dataset.state = last?.type === "done" ? last.status : "incomplete";
  } catch (error) {
    $("error").hidden = false;
    $("error").textContent = error instanceof SidecarProblem ? `${error.status} ${error.problem.detail}` : String(error);
    document.body.dataset.state = "threw";
  }
}

$("run").addEventListener("click", () => void run());
document.body.dataset.state = "ready";
