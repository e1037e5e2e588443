// The mistry web view: the job list at /, a job's page at /job/{project}/{id}, a pipeline run's
// page at /pipeline/{name}/{run}.
// Everything user-controlled (names, params, logs) goes into the page as text, never as HTML.
"use strict";

const app = document.getElementById("app");
const statusEl = document.getElementById("status");

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function duration(ns) {
  if (ns < 0) return "";
  const s = ns / 1e9;
  return s < 60 ? s.toFixed(2) + "s" : Math.floor(s / 60) + "m" + Math.round(s % 60) + "s";
}

function badges(info) {
  const out = [];
  for (const b of ["Cached", "Coalesced", "Incremental"]) {
    if (info[b]) out.push(el("span", { class: "badge " + b.toLowerCase() }, b.toLowerCase()));
  }
  if (info.ExitCode !== 0 || info.ErrBuild) out.push(el("span", { class: "badge failed" }, "failed"));
  return out;
}

// Which pipeline run each job belongs to: {"<project>/<id>": {pipeline, run, url}}.
async function jobRuns() {
  try {
    const r = await fetch("/pipelines/jobs/");
    return r.ok ? await r.json() : {};
  } catch (e) { return {}; }
}

// Which agent ran each job: {"<project>/<id>": "<agent>"} (GET /api/agents/jobs; mistry's
// /index/ keeps its shape). `query` narrows it to one job.
async function jobAgents(query) {
  try {
    const r = await fetch("/api/agents/jobs" + (query || ""));
    return r.ok ? await r.json() : {};
  } catch (e) { return {}; }
}

// The cluster's job records (GET /api/cluster/jobs): /index/ entries plus agent, clusterState
// and retries. [] on a single node (404) or when the database does not answer.
async function clusterJobs() {
  try {
    const r = await fetch("/api/cluster/jobs");
    return r.ok ? await r.json() : [];
  } catch (e) { return []; }
}

// The job list: this agent's builds (/index/, newest first; they win) merged with the records of
// the jobs held only by other agents, newest first (by StartedAt), each list keeping its order.
function mergeJobs(local, records) {
  const here = new Set(local.map((j) => j.project + "/" + j.id));
  const others = records.filter((r) => !here.has(r.project + "/" + r.id));
  if (!others.length) return local;
  const time = (j) => Date.parse(j.buildInfo.StartedAt) || 0;
  const out = [];
  let i = 0, k = 0;
  while (i < local.length && k < others.length) out.push(time(local[i]) >= time(others[k]) ? local[i++] : others[k++]);
  return out.concat(local.slice(i), others.slice(k));
}

function agentLink(name) {
  if (!name) return [];
  return [el("a", { class: "agent-link", href: "/agents?agent=" + encodeURIComponent(name) }, name)];
}

function runLink(link) {
  if (!link || !link.url) return [];
  return [el("a", { class: "run-link", href: "/" + link.url }, link.pipeline + " " + link.run.slice(0, 8))];
}

// --- The job list -----------------------------------------------------------------------
function listPage() {
  const params = new URLSearchParams(location.search);
  const project = el("select", { id: "filter-project" }, el("option", { value: "" }, "all projects"));
  const state = el("select", { id: "filter-state" },
    el("option", { value: "" }, "all states"), el("option", { value: "pending" }, "pending"),
    el("option", { value: "ready" }, "ready"), el("option", { value: "failed" }, "failed"));
  const agent = el("select", { id: "filter-agent" }, el("option", { value: "" }, "all agents"));
  const body = el("tbody", { id: "jobs" });
  app.replaceChildren(
    el("div", { class: "filters" }, project, state, agent),
    el("table", {}, el("thead", {}, el("tr", {},
      ...["ID", "Project", "Group", "State", "Agent", "Started", "Duration", "Exit", "", "Pipeline run"].map((h) => el("th", {}, h)))), body));
  const known = new Set();
  const knownAgents = new Set();
  async function refresh() {
    let local, runs, agents, records;
    try {
      [local, runs, agents, records] = await Promise.all([fetch("/index/").then((r) => r.json()), jobRuns(), jobAgents(), clusterJobs()]);
      statusEl.textContent = "";
    } catch (e) {
      statusEl.textContent = "server unreachable";
      return;
    }
    const jobs = mergeJobs(local, records);
    for (const j of jobs) {
      if (!known.has(j.project)) {
        known.add(j.project);
        project.append(el("option", { value: j.project }, j.project));
      }
    }
    for (const a of Object.values(agents).concat(records.map((r) => r.agent || []).flat(), params.get("agent") || []).sort()) {
      if (!knownAgents.has(a)) {
        knownAgents.add(a);
        agent.append(el("option", { value: a }, a));
      }
    }
    project.value = params.get("project") || project.value;
    if (params.has("agent")) { agent.value = params.get("agent"); params.delete("agent"); }
    const agentOf = (j) => agents[j.project + "/" + j.id] || j.agent || "";
    const rows = jobs.filter((j) => !project.value || j.project === project.value)
      .filter((j) => !agent.value || agentOf(j) === agent.value).filter((j) => {
      const failed = j.state === "ready" && (j.buildInfo.ExitCode !== 0 || j.buildInfo.ErrBuild || j.clusterState === "failed");
      return !state.value || (state.value === "failed" ? failed : j.state === state.value);
    }).map((j) => el("tr", { "data-id": j.id, "data-agent": agentOf(j), ...("clusterState" in j ? { "data-held": "elsewhere", "data-cluster-state": j.clusterState } : {}) },
      el("td", { class: "id" }, el("a", { href: "/job/" + encodeURIComponent(j.project) + "/" + encodeURIComponent(j.id) }, j.id.slice(0, 12))),
      el("td", {}, j.project), el("td", {}, j.buildInfo.Group),
      el("td", { class: "state-" + j.state }, j.state), el("td", { class: "agent" }, ...agentLink(agentOf(j))), el("td", {}, j.startedAt),
      el("td", {}, duration(j.buildInfo.Duration)), el("td", {}, j.state === "ready" ? j.buildInfo.ExitCode : ""),
      el("td", {}, ...(j.state === "ready" ? badges(j.buildInfo) : [])),
      el("td", {}, ...runLink(runs[j.project + "/" + j.id]))));
    body.replaceChildren(...rows);
    if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 10, class: "muted" }, "No jobs.")));
  }
  project.addEventListener("change", refresh);
  agent.addEventListener("change", refresh);
  state.addEventListener("change", refresh);
  refresh();
  setInterval(refresh, 2000);
}

// --- ANSI colours: SGR colours and bold become classes; every other escape goes --------------
function appendAnsi(target, text) {
  const re = /\x1b\[([0-9;]*)([A-Za-z])/g;
  let last = 0, cls = [], m;
  const push = (s) => { if (s) target.append(cls.length ? el("span", { class: cls.join(" ") }, s) : document.createTextNode(s)); };
  while ((m = re.exec(text))) {
    push(text.slice(last, m.index));
    last = re.lastIndex;
    if (m[2] !== "m") continue;
    for (const code of (m[1] || "0").split(";").map(Number)) {
      if (code === 0) cls = [];
      else if (code === 1) cls.push("ansi-bold");
      else if (code >= 30 && code <= 37) cls = cls.filter((c) => !/^ansi-3/.test(c)).concat("ansi-" + code);
      else if (code >= 90 && code <= 97) cls = cls.filter((c) => !/^ansi-3/.test(c)).concat("ansi-" + (code - 60));
    }
  }
  push(text.slice(last).replace(/\x1b[^a-zA-Z]*[a-zA-Z]?/g, ""));
}

// --- A job ------------------------------------------------------------------------------
const TAIL = 256 * 1024;

async function jobPage(project, id) {
  const base = encodeURIComponent(project) + "/" + encodeURIComponent(id);
  let job;
  try {
    const r = await fetch("/api/job/" + base);
    if (r.status === 404) { app.replaceChildren(el("p", {}, "Unknown job ", project, "/", id)); return; }
    job = await r.json();
  } catch (e) { app.replaceChildren(el("p", {}, "Cannot reach the server.")); return; }

  const stateEl = el("span", { id: "state", class: "state-" + job.state }, job.state);
  const fields = el("dl", { id: "fields" });
  const params = el("ul", { id: "params" });
  const log = el("pre", { id: "log" });
  const more = el("button", { id: "load-all", hidden: "" }, "Load the whole log");
  const rebuild = el("input", { type: "checkbox", id: "rebuild" });
  const note = el("span", { id: "retrigger-note", class: "muted" });
  const retrigger = el("button", { id: "retrigger", onclick: async () => {
    const body = JSON.stringify({ project, group: job.buildInfo.Group, params: job.buildInfo.Params, rebuild: rebuild.checked });
    const r = await fetch("/jobs?async", { method: "POST", body });
    note.textContent = r.status === 201 ? "Scheduled." : "Not scheduled: " + (await r.text());
    if (r.status === 201) setTimeout(() => location.reload(), 500);
  } }, "Retrigger");

  let agentName = "";
  function render() {
    const info = job.buildInfo;
    stateEl.textContent = job.state;
    stateEl.className = "state-" + job.state;
    const rows = [["Project", project], ["ID", id], ["Group", info.Group], ["Agent", agentLink(agentName)], ["Started", job.startedAt],
      ["Duration", duration(info.Duration)], ["ExitCode", job.state === "ready" ? info.ExitCode : ""],
      ["ErrBuild", info.ErrBuild], ["Cached", info.Cached], ["Coalesced", info.Coalesced],
      ["Incremental", info.Incremental], ["Path", info.Path], ["TransportMethod", info.TransportMethod], ["URL", info.URL]];
    fields.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, ...(Array.isArray(v) ? v : [v]))]));
    const ps = Object.entries(info.Params || {});
    params.replaceChildren(...(ps.length ? ps.map(([k, v]) => el("li", {}, el("code", {}, k), " = ", el("code", { class: "param-value" }, v))) : [el("li", { class: "muted" }, "none")]));
  }
  const refreshAgent = async () => {
    const a = (await jobAgents("?project=" + encodeURIComponent(project) + "&id=" + encodeURIComponent(id)))[project + "/" + id] || "";
    if (a !== agentName) { agentName = a; render(); }
  };
  refreshAgent();

  const runEl = el("p", { id: "job-run" });
  jobRuns().then((runs) => {
    const l = runLink(runs[project + "/" + id]);
    if (l.length) runEl.replaceChildren("Pipeline run: ", ...l);
  });
  app.replaceChildren(
    el("h1", {}, project, " / ", id.slice(0, 12), " ", stateEl), runEl,
    fields, el("h2", {}, "Params"), params,
    el("div", { class: "actions" }, retrigger, el("label", {}, rebuild, " rebuild"), note),
    el("h2", {}, "Log"), more, log);
  render();

  async function showLog(all) {
    const r = await fetch("/api/logtail/" + base + (all ? "" : "?bytes=" + TAIL));
    const size = Number(r.headers.get("x-log-size") || 0);
    const text = await r.text();
    log.replaceChildren();
    if (!all && size > TAIL) { more.hidden = false; log.append(el("span", { class: "muted" }, "… (" + (size - TAIL) + " earlier bytes)\n")); }
    else more.hidden = true;
    appendAnsi(log, text);
  }
  more.addEventListener("click", () => showLog(true));

  if (job.state === "pending") {
    // New lines as they come, then the final state without a reload.
    const es = new EventSource("/log/" + base);
    es.onmessage = (ev) => { appendAnsi(log, ev.data + "\n"); log.scrollTop = log.scrollHeight; };
    const finish = async () => {
      es.close();
      job = await (await fetch("/api/job/" + base)).json();
      render();
      refreshAgent();
      await showLog(false);
    };
    es.onerror = finish;
    const poll = setInterval(async () => {
      const j = await (await fetch("/api/job/" + base)).json();
      if (j.state !== "pending") { clearInterval(poll); finish(); }
    }, 1000);
  } else {
    await showLog(false);
  }
}

// --- A pipeline run: its DAG as inline SVG, followed live ------------------------------------
const SVG = "http://www.w3.org/2000/svg";
const BOX_W = 210, BOX_H = 70, COL_GAP = 70, ROW_GAP = 24, PAD = 16;

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

// Each job's column: its depth in the DAG (0 without needs, else 1 + its deepest need's).
function depths(jobs) {
  const byName = new Map(jobs.map((j) => [j.name, j]));
  const depth = new Map();
  const of = (j, seen) => {
    if (depth.has(j.name)) return depth.get(j.name);
    if (seen.has(j.name)) return 0;
    seen.add(j.name);
    let d = 0;
    for (const n of j.needs || []) if (byName.has(n)) d = Math.max(d, 1 + of(byName.get(n), seen));
    depth.set(j.name, d);
    return d;
  };
  for (const j of jobs) of(j, new Set());
  return depth;
}

function clip(s, n) { return s.length > n ? s.slice(0, n - 1) + "…" : s; }

function drawDag(rec) {
  const depth = depths(rec.jobs);
  const cols = [];
  for (const j of rec.jobs) (cols[depth.get(j.name)] ||= []).push(j);
  const pos = new Map();
  cols.forEach((col, c) => col.forEach((j, r) => pos.set(j.name, { x: PAD + c * (BOX_W + COL_GAP), y: PAD + r * (BOX_H + ROW_GAP) })));
  const width = PAD * 2 + cols.length * BOX_W + Math.max(0, cols.length - 1) * COL_GAP;
  const height = PAD * 2 + Math.max(1, ...cols.map((c) => c.length)) * (BOX_H + ROW_GAP) - ROW_GAP;
  const root = svg("svg", { id: "dag", class: "dag", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" },
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: "auto-start-reverse" },
      svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }))));
  for (const j of rec.jobs) {
    const to = pos.get(j.name);
    for (const n of j.needs || []) {
      const from = pos.get(n);
      if (!from) continue;
      const x1 = from.x + BOX_W, y1 = from.y + BOX_H / 2, x2 = to.x, y2 = to.y + BOX_H / 2, mx = (x1 + x2) / 2;
      root.append(svg("path", { class: "edge", "data-from": n, "data-to": j.name, d: `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`, "marker-end": "url(#arrow)" }));
    }
  }
  for (const j of rec.jobs) {
    const { x, y } = pos.get(j.name);
    const marks = ["cached", "coalesced", "incremental"].filter((k) => j[k]);
    const box = svg("g", { class: "job state-" + j.state, "data-job": j.name, transform: `translate(${x},${y})` },
      svg("title", {}, j.name + " (" + j.project + "): " + j.state + (j.err_build ? " — " + j.err_build : "")),
      svg("rect", { width: BOX_W, height: BOX_H, rx: 6 }),
      svg("text", { class: "job-name", x: 10, y: 20 }, clip(j.name, 26)),
      svg("text", { class: "job-project", x: 10, y: 38 }, clip(j.project, 30)),
      svg("text", { class: "job-state", x: 10, y: 58 }, j.state),
      svg("text", { class: "job-marks", x: 80, y: 58 }, marks.join(" ")));
    if (j.id) {
      const base = encodeURIComponent(j.project) + "/" + encodeURIComponent(j.id);
      root.append(svg("a", { class: "job-link", href: "/job/" + base }, box));
      root.append(svg("a", { class: "log-link", href: "/api/logtail/" + base },
        svg("text", { x: x + BOX_W - 10, y: y + 58, "text-anchor": "end" }, "log")));
    } else root.append(box);
  }
  return root;
}

function runAnchor(link, id) {
  if (!link) return "—";
  if (link.error) return el("span", { class: "muted" }, link.pipeline + ": " + link.error);
  return el("a", { href: "/" + link.url, ...(id ? { id } : {}) }, link.pipeline + " " + link.run.slice(0, 12));
}

async function runPage(name, run) {
  const url = "/pipeline/" + encodeURIComponent(name) + "/" + encodeURIComponent(run);
  let rec;
  try {
    const r = await fetch(url, { headers: { Accept: "application/json" } });
    if (r.status === 404) { app.replaceChildren(el("p", {}, "Unknown pipeline run ", name, "/", run)); return; }
    rec = await r.json();
  } catch (e) { app.replaceChildren(el("p", {}, "Cannot reach the server.")); return; }

  const stateEl = el("span", { id: "run-state" });
  const fields = el("dl", { id: "run-fields" });
  const params = el("ul", { id: "run-params" });
  const dag = el("div", { id: "dag-box" });
  const jobs = el("tbody", { id: "run-jobs" });
  const note = el("span", { id: "retrigger-note", class: "muted" });
  const retrigger = async (body, what) => {
    note.textContent = "";
    let r;
    try {
      r = await fetch("/pipelines?async", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    } catch (e) { note.textContent = what + " not started: the server is unreachable"; return; }
    if (r.status !== 201) { note.textContent = what + " not started: " + (await r.text()); return; }
    const started = await r.json();
    if ("/" + started.url === url) { note.textContent = what + " started."; update(started); follow(); }
    else location.assign("/" + started.url);
  };
  const again = el("button", { id: "retrigger-run", onclick: () => retrigger({ pipeline: rec.pipeline, params: rec.params, rebuild: true }, "Rebuild") }, "Retrigger run");
  const failed = el("button", { id: "retrigger-failed", onclick: () => retrigger({ pipeline: rec.pipeline, params: rec.params }, "Retry") }, "Retrigger failed jobs");

  function update(r) {
    rec = r;
    stateEl.textContent = rec.state;
    stateEl.className = "state-" + rec.state;
    const links = (ls) => ls.length ? ls.map((l) => runAnchor(l)).flatMap((a, i) => i ? [", ", a] : [a]) : ["—"];
    const rows = [["Pipeline", rec.pipeline], ["Run", rec.run], ["State", rec.state], ["Started", rec.started_at],
      ["Duration", duration(rec.duration)], ["Failed", (rec.failed || []).join(", ")],
      ["Caused by", [runAnchor(rec.caused_by, "caused-by")]], ["Triggered", links(rec.triggered || [])]];
    if (rec.rebuild) rows.push(["Rebuild", ["#" + rec.rebuild + " of ", runAnchor(rec.rebuild_of, "rebuild-of")]]);
    if (rec.error) rows.push(["Error", rec.error]);
    fields.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, ...(Array.isArray(v) ? v : [v]))]));
    const ps = Object.entries(rec.params || {});
    params.replaceChildren(...(ps.length ? ps.map(([k, v]) => el("li", {}, el("code", {}, k), " = ", el("code", { class: "param-value" }, v))) : [el("li", { class: "muted" }, "none")]));
    dag.replaceChildren(drawDag(rec));
    jobs.replaceChildren(...rec.jobs.map((j) => el("tr", { "data-job": j.name },
      el("td", {}, j.name), el("td", {}, j.project), el("td", {}, (j.needs || []).join(", ")),
      el("td", { class: "state-" + j.state }, j.state),
      el("td", {}, j.state === "ready" || j.state === "failed" ? (j.exit_code === -999 ? "" : j.exit_code) : ""),
      el("td", {}, ...["cached", "coalesced", "incremental"].filter((k) => j[k]).map((k) => el("span", { class: "badge " + k }, k))),
      el("td", { class: "err" }, j.err_build || ""))));
    failed.disabled = rec.state !== "failed";
    again.disabled = rec.state === "running";
  }

  let es = null;
  function follow() {
    if (es) es.close();
    es = new EventSource(url + "/events");
    es.onmessage = (ev) => {
      const r = JSON.parse(ev.data);
      update(r);
      if (r.state !== "running") { es.close(); es = null; }
    };
    // The stream ends with the run: no reconnecting.
    es.onerror = () => { if (es) { es.close(); es = null; } };
  }

  app.replaceChildren(
    el("h1", {}, "Pipeline ", rec.pipeline, " ", el("small", { class: "muted" }, rec.run.slice(0, 12)), " ", stateEl),
    fields, el("h2", {}, "Params"), params,
    el("div", { class: "actions" }, again, failed, note),
    el("h2", {}, "Jobs"), dag,
    el("table", { id: "run-table" }, el("thead", {}, el("tr", {},
      ...["Job", "Project", "Needs", "State", "Exit", "", "Error"].map((h) => el("th", {}, h)))), jobs));
  update(rec);
  if (rec.state === "running") follow();
}

// --- The agents page (/agents): every agent of the cluster, or this one alone ------------------
function agentsPage() {
  const selected = new URLSearchParams(location.search).get("agent");
  const body = el("tbody", { id: "agents" });
  const note = el("p", { class: "muted", id: "agents-note" });
  app.replaceChildren(el("h1", {}, "Agents"), note,
    el("table", {}, el("thead", {}, el("tr", {},
      ...["Agent", "State", "Running", "Capacity", "Last heartbeat", "Version", "URL", ""].map((h) => el("th", {}, h)))), body));
  async function refresh() {
    let r, agents;
    try {
      r = await fetch("/agents", { headers: { Accept: "application/json" } });
      if (!r.ok) {
        statusEl.textContent = "";
        note.textContent = (await r.text()) || ("HTTP " + r.status);
        note.className = "err";
        return;
      }
      agents = await r.json();
      statusEl.textContent = "";
    } catch (e) {
      statusEl.textContent = "server unreachable";
      return;
    }
    note.className = "muted";
    note.textContent = agents.length === 1 && agents[0].this ? "This agent." : agents.filter((a) => a.alive).length + " of " + agents.length + " agents alive.";
    body.replaceChildren(...agents.map((a) => el("tr", { "data-agent": a.name, class: (a.this ? "this-agent" : "") + (a.name === selected ? " selected-agent" : "") },
      el("td", {}, a.name, a.this ? " (this one)" : ""),
      el("td", { class: "agent-" + a.state }, a.state),
      el("td", {}, a.running), el("td", {}, a.capacity),
      el("td", { title: a.last_heartbeat }, a.heartbeat_age < 1 ? "just now" : Math.round(a.heartbeat_age) + "s ago"),
      el("td", {}, a.version),
      el("td", {}, el("a", { href: a.advertise_url }, a.advertise_url)),
      el("td", {}, el("a", { class: "agent-jobs", href: "/?agent=" + encodeURIComponent(a.name) }, "jobs")))));
  }
  refresh();
  setInterval(refresh, 2000);
}

const m = location.pathname.match(/^\/job\/([^/]+)\/([^/]+)$/);
const pm = location.pathname.match(/^\/pipeline\/([^/]+)\/([^/]+)$/);
if (m) jobPage(decodeURIComponent(m[1]), decodeURIComponent(m[2]));
else if (pm) runPage(decodeURIComponent(pm[1]), decodeURIComponent(pm[2]));
else if (location.pathname === "/agents") agentsPage();
else listPage();
