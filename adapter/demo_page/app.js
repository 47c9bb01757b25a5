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
  source.addEventListener("result", (e) => { mark("result"); $("result").replaceChildren(render(JSON.parse(e.data))); });
  source.addEventListener("error", (e) => { if (e.data) { mark("error"); showProblem(JSON.parse(e.data)); } });
  source.addEventListener("done", (e) => {
    const done = JSON.parse(e.data);
    mark("done");
    status(`done: ${done.status}${done.cached ? " (cached)" : ""} in ${Math.round(performance.now() - started)} ms`);
    document.body.dataset.state = done.status;
    source.close();
  });
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
  document.body.dataset.state = "ready";
}

init();
