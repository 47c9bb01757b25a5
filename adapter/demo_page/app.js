// The demo page: starts a job with the demo user's bearer token, then follows it with the
// browser's own EventSource on the job's events_url (a job token, never the user's JWT).
"use strict";

const $ = (id) => document.getElementById(id);
let session = null;
let source = null;
// What happened when, for people watching the console and for the browser test.
window.demoTimeline = [];
const mark = (what) => window.demoTimeline.push({ what, at: performance.now() });

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function status(text, cls) {
  const item = el("li", cls ? { class: cls } : {}, text);
  $("status").append(item);
}

function reset(title) {
  if (source) source.close();
  $("refine").hidden = true;
  refining = null;
  $("run-title").textContent = title;
  $("status").replaceChildren();
  $("deltas").textContent = "";
  $("output").hidden = true;  // shown with the first delta: no empty dark box before a run or after a failed start
  $("error").hidden = true;
  $("error").replaceChildren();
  $("result").replaceChildren();
}

function showProblem(problem) {
  $("error").hidden = false;
  $("error").replaceChildren(el("strong", {}, problem.title || "Error"), el("span", { class: "detail" }, problem.detail || ""));
}

function list(items) {
  if (!items.length) return el("p", { class: "meta" }, "None identified.");
  return el("ul", {}, ...items.map((text) => el("li", {}, text)));
}

function bar(label, value) {
  const fill = el("span", { style: `width: ${value}%` });
  return el("div", { class: "gauge", "data-label": label }, el("div", { class: "meta" }, `${label}: ${value}%`), el("div", { class: "bar" }, fill));
}

const renderers = {
  variations: (r) => el("div", { class: "variations" }, ...r.variations.map((v) =>
    el("div", { class: "card", "data-type": v.type }, el("h4", {}, v.type), el("div", { class: "subject" }, v.subject),
      el("p", { class: "body" }, v.body), el("div", { class: "tone" }, v.tone)))),
  bant: (r) => el("div", { class: "lead" },
    el("div", {}, el("span", { class: "score" }, String(r.score)), " ", el("span", { class: `badge ${r.classification}` }, r.classification)),
    el("p", { class: "reasoning" }, r.reasoning),
    el("h4", {}, "Next actions"), list(r.next_actions),
    el("h4", {}, "BANT"),
    el("table", { class: "bant" }, ...["budget", "authority", "need", "timeline"].map((k) =>
      el("tr", {}, el("th", {}, k), el("td", {}, r.bant[k]))))),
  win_probability: (r) => el("div", { class: "deal" },
    bar("Win probability", r.win_probability), bar("Health", r.health_score),
    el("p", { class: "meta" }, `Predicted close: ${r.predicted_close_date ?? "unknown"}`),
    el("h4", {}, "Risks"), list(r.risk_factors),
    el("h4", {}, "Recommended actions"), list(r.recommended_actions),
    el("p", { class: "reasoning" }, r.reasoning)),
};

// A result is drawn by the view of the first field it has that a view knows; any other as JSON.
const asJson = (r) => el("pre", { class: "json" }, JSON.stringify(r, null, 2));
const render = (r) => (renderers[Object.keys(renderers).find((field) => field in r)] ?? asJson)(r);

// A person reads names, not record ids.
function recordName(kind, id) {
  if (kind === "deal") return session.deals.find((d) => d.id === id)?.title ?? id;
  const lead = session.leads.find((l) => l.id === id);
  return lead ? (lead.company ? `${lead.name} (${lead.company})` : lead.name) : id;
}

async function run(spec) {
  const task = spec.name;
  const input = { [`${spec.record_kind}_id`]: $(spec.record_kind).value };
  reset(`${spec.label}: ${recordName(spec.record_kind, Object.values(input)[0])}`);
  window.demoTimeline = [];
  mark("click");
  document.body.dataset.state = "running";
  const fault = $("fault").value;
  if (fault) await fetch("/demo/fault", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ task, behaviour: fault }) });
  const started = performance.now();
  const response = await fetch("/api/v1/ai/jobs", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${session.token}`,
               "Cache-Control": $("cached").checked ? "max-age=3600" : "no-cache" },
    body: JSON.stringify({ task, input }),
  });
  const body = await response.json();
  if (!response.ok) { showProblem(body); document.body.dataset.state = "failed"; return; }
  status(`job ${body.job_id} accepted (${response.headers.get("X-Cache")})`);
  let url = body.events_url;
  if ($("drop").checked) url += "&drop_after=3";
  source = new EventSource(url);
  let dropped = false;
  source.onerror = () => { if (source.readyState === EventSource.CONNECTING) { dropped = true; status("connection lost: the browser reconnects with Last-Event-ID", "reconnect"); } };
  source.onopen = () => { if (dropped) { mark("reconnected"); status("reconnected: resuming after the last event received", "reconnect"); } };
  source.addEventListener("status", (e) => status(`${JSON.parse(e.data).state}: ${JSON.parse(e.data).message}`));
  source.addEventListener("delta", (e) => { mark("delta"); $("output").hidden = false; $("deltas").textContent += JSON.parse(e.data).text; });
  source.addEventListener("result", (e) => {
    mark("result");
    $("result").replaceChildren(render(JSON.parse(e.data)));
    if (spec.threads) offerRefine(spec, input);
  });
  source.addEventListener("error", (e) => { if (e.data) { mark("error"); showProblem(JSON.parse(e.data)); } });
  source.addEventListener("done", (e) => {
    const done = JSON.parse(e.data);
    mark("done");
    status(`done: ${done.status}${done.cached ? " (cached)" : ""} in ${Math.round(performance.now() - started)} ms`);
    document.body.dataset.state = done.status;
    source.close();
  });
}

// --- Refine: a thread about the record, continued with the user's follow-ups --------------------
// The answer above came from a job; the first follow-up starts a thread about the same request (its
// first turn answers it again), then continues it. Its own state: body's data-refine-state.
let refining = null;  // {spec, input, threadId}

function offerRefine(spec, input) {
  refining = { spec, input, threadId: null };
  $("refine").hidden = false;
  $("turns").replaceChildren();
  $("refine-error").hidden = true;
  document.body.dataset.refineState = "ready";
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method, headers: { "Content-Type": "application/json", Authorization: `Bearer ${session.token}` },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw answer;  // a problem object
  return answer;
}

async function refine(event) {
  event.preventDefault();
  const message = $("refine-message").value;
  if (!refining || !message.trim()) return;
  const current = refining;
  document.body.dataset.refineState = "running";
  $("refine-send").disabled = true;
  $("refine-error").hidden = true;
  try {
    if (!current.threadId) {
      current.threadId = (await call("POST", "/api/v1/ai/threads", { task: current.spec.name, input: current.input })).thread_id;
    }
    const turn = await call("POST", `/api/v1/ai/threads/${current.threadId}/turns`, { message });
    if (refining !== current) return;  // another run replaced this one meanwhile
    const thread = await call("GET", `/api/v1/ai/threads/${current.threadId}`);
    $("result").replaceChildren(render(turn.result));
    $("turns").replaceChildren(...thread.turns.slice(1).map((t, i) => el("li", { "data-turn": t.turn_id },
      el("div", { class: "message" }, `${i + 1}. ${t.message}`), render(t.result))));
    $("refine-message").value = "";
    document.body.dataset.refineState = "done";
  } catch (problem) {
    $("refine-error").hidden = false;
    $("refine-error").replaceChildren(el("strong", {}, problem.title || "Error"), el("span", { class: "detail" }, problem.detail || String(problem)));
    document.body.dataset.refineState = "failed";
  } finally {
    $("refine-send").disabled = false;
  }
}

// --- The batch: one task over every lead of the session, followed like a job ----------------
// Its own state (body's data-batch-state: idle, starting, running, completed, cancelled, failed),
// so a batch and a single run can be watched at once.
let batch = null;  // {id, total, source}
const COUNTS = ["succeeded", "cached", "failed", "cancelled", "running"];
const setBatchState = (state) => { document.body.dataset.batchState = state; };

function batchStatus(text, cls) {
  $("batch-status").append(el("li", cls ? { class: cls } : {}, text));
}

function showCounts(counts) {
  const done = counts.succeeded + counts.failed + counts.cancelled;
  $("batch-done").textContent = String(done);
  for (const k of COUNTS) $(`batch-${k}`).textContent = String(counts[k]);
  $("batch-bar").value = done;
}

function showItem(item) {
  const row = $("batch-items").querySelector(`li[data-id="${item.id}"]`);
  if (!row) return;
  row.dataset.status = item.status;
  const outcome = [el("span", { class: "state" }, item.cached ? `${item.status} (cached)` : item.status)];
  if (item.result && "score" in item.result) {
    outcome.push(el("span", { class: "score" }, String(item.result.score)),
                 el("span", { class: `badge ${item.result.classification}` }, item.result.classification));
  } else if (item.error) {
    outcome.push(el("span", { class: "problem" }, `${item.error.title}: ${item.error.detail}`));
  }
  row.querySelector(".outcome").replaceChildren(...outcome);
}

async function startBatch(spec, ids) {
  if (batch?.source) batch.source.close();
  batch = null;
  $("batch").hidden = false;
  $("batch-title").textContent = `${$("batch-start").textContent}: ${ids.length} ${spec.record_kind}s`;
  $("batch-status").replaceChildren();
  $("batch-error").hidden = true;
  $("batch-total").textContent = String(ids.length);
  $("batch-bar").max = ids.length;
  showCounts({ succeeded: 0, cached: 0, failed: 0, cancelled: 0, running: 0 });
  $("batch-items").replaceChildren(...ids.map((id) => el("li", { "data-id": id, "data-status": "queued" },
    el("span", { class: "name" }, recordName(spec.record_kind, id)), el("span", { class: "outcome" }, el("span", { class: "state" }, "queued")))));
  setBatchState("starting");
  $("batch-start").disabled = true;
  const response = await fetch("/api/v1/ai/batches", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${session.token}` },
    body: JSON.stringify({ task: spec.name, ids }),
  });
  const body = await response.json();
  if (!response.ok) {
    $("batch-error").hidden = false;
    $("batch-error").replaceChildren(el("strong", {}, body.title || "Error"), el("span", { class: "detail" }, body.detail || ""));
    $("batch-start").disabled = false;
    setBatchState("failed");
    return;
  }
  batch = { id: body.batch_id, total: body.total, source: new EventSource(body.events_url) };
  batchStatus(`batch ${body.batch_id} accepted: ${body.total} item(s)`);
  setBatchState("running");
  $("batch-cancel").disabled = false;
  const source = batch.source;
  // The browser reconnects by itself with Last-Event-ID; only a stream that gave up ends the batch view.
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) { batchStatus("the event stream closed", "reconnect"); finishBatch("failed"); }
  };
  source.addEventListener("status", (e) => { const s = JSON.parse(e.data); batchStatus(`${s.state}: ${s.message}`); });
  source.addEventListener("item", (e) => showItem(JSON.parse(e.data)));
  source.addEventListener("progress", (e) => showCounts(JSON.parse(e.data)));
  source.addEventListener("done", (e) => {
    const done = JSON.parse(e.data);
    showCounts(done.counts);
    batchStatus(`done: ${done.status}${done.message ? ` (${done.message})` : ""}`);
    source.close();
    finishBatch(done.status);
  });
}

function finishBatch(state) {
  $("batch-start").disabled = false;
  $("batch-cancel").disabled = true;
  setBatchState(state);
}

async function cancelBatch() {
  if (!batch) return;
  $("batch-cancel").disabled = true;
  const response = await fetch(`/api/v1/ai/batches/${batch.id}`, { method: "DELETE", headers: { Authorization: `Bearer ${session.token}` } });
  const body = await response.json();
  // Running items finish; queued ones never start. The `done` event ends the batch view.
  batchStatus(response.ok ? (body.cancel_requested ? "cancel requested: running items finish, queued ones never start"
                                                   : `cancel not needed: the batch is ${body.status}`)
                          : `cancel refused: ${body.detail}`);
}

async function init() {
  session = await (await fetch("/demo/session")).json();
  for (const lead of session.leads) $("lead").append(el("option", { value: lead.id }, `${lead.name} (${lead.company})`));
  for (const deal of session.deals) $("deal").append(el("option", { value: deal.id }, deal.title));
  for (const spec of session.tasks) {
    const button = el("button", { id: `task-${spec.name.replace(".", "-")}`, "data-task": spec.name }, spec.label);
    button.addEventListener("click", () => run(spec));
    $("tasks").append(button);
  }
  // The batch task: the one the session marks for batches (never a name written here).
  const batchSpec = session.tasks.find((t) => t.batch && t.record_kind === "lead");
  if (batchSpec) {
    const ids = session.leads.map((l) => l.id);
    $("batch-start").textContent = `${batchSpec.label.split(" ")[0]} all ${batchSpec.record_kind}s`;
    $("batch-start").dataset.task = batchSpec.name;
    $("batch-start").hidden = $("batch-cancel").hidden = false;
    $("batch-start").addEventListener("click", () => startBatch(batchSpec, ids));
    $("batch-cancel").addEventListener("click", cancelBatch);
  }
  $("refine").addEventListener("submit", refine);
  setBatchState("idle");
  document.body.dataset.state = "ready";
}

init();
