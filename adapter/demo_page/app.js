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

function hue(text) {
  let h = 0;
  for (const c of text) h = (h * 31 + c.codePointAt(0)) % 360;
  return h;
}

// How each kind of part of a task's view is drawn (the task module lists its parts: adapter/tasks/registry.py
// `View`); this page names no task and no result field.
const parts = {
  text: (value, field) => el("p", { class: `text ${field}` }, String(value ?? "")),
  field: (value, field, label) => el("p", { class: `meta ${field}` }, `${label}: ${value ?? "unknown"}`),
  number: (value, field) => el("span", { class: `number ${field}` }, String(value)),
  // A badge's colour follows from its value, the same value always the same colour.
  badge: (value, field) => el("span", { class: `badge ${field}`, style: `background: hsl(${hue(String(value))}, 60%, 42%)` }, String(value)),
  gauge: (value, _field, label) => bar(label, value),
  list: (value, _field, label) => el("div", {}, el("h4", {}, label), list(value ?? [])),
  table: (value, field, label) => el("div", {}, el("h4", {}, label), el("table", { class: `fields ${field}` },
    ...Object.entries(value ?? {}).map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, String(v)))))),
  // Each object a card: its first field is the heading (and the card's data-type), every field a line.
  cards: (value, field) => el("div", { class: `cards ${field}` }, ...(value ?? []).map((item) => {
    const [first, ...rest] = Object.entries(item);
    return el("div", { class: "card", "data-type": String(first?.[1] ?? "") }, el("h4", {}, String(first?.[1] ?? "")),
      ...rest.map(([k, v]) => el(k === "body" ? "p" : "div", { class: k }, String(v))));
  })),
};

// A result is drawn by its task's view, inside an element named by its record kind; without a view, as JSON.
const asJson = (r) => el("pre", { class: "json" }, JSON.stringify(r, null, 2));
const render = (spec, r) => spec.view.length
  ? el("div", { class: spec.record_kind }, ...spec.view.map(([kind, field, label]) => parts[kind](r[field], field, label)))
  : asJson(r);
// A batch row shows the short parts of the view (numbers and badges).
const summary = (spec, r) => spec.view.filter(([kind]) => kind === "number" || kind === "badge")
  .map(([kind, field, label]) => parts[kind](r[field], field, label));

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
    $("result").replaceChildren(render(spec, JSON.parse(e.data)));
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
    $("result").replaceChildren(render(current.spec, turn.result));
    $("turns").replaceChildren(...thread.turns.slice(1).map((t, i) => el("li", { "data-turn": t.turn_id },
      el("div", { class: "message" }, `${i + 1}. ${t.message}`), render(current.spec, t.result))));
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
let batch = null;  // {id, total, spec, source}
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
  if (item.result) {
    outcome.push(...summary(batch.spec, item.result));
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
  batch = { id: body.batch_id, total: body.total, spec, source: new EventSource(body.events_url) };
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
