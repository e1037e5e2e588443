// A pipeline run's page (/pipeline/{name}/{run}): its DAG as inline SVG, followed live. Uses
// common.js.
"use strict";

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
  const root = svg("svg", { id: "dag", class: "dag", width, height, viewBox: `0 0 ${width} ${height}`, role: "group", "aria-label": "The jobs of this run and their needs" },
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
    const st = runJobState(j);
    const label = STATES[st.key] ? STATES[st.key].icon + " " + STATES[st.key].label : st.key;
    const box = svg("g", { class: "job state-" + j.state, "data-job": j.name, "data-state": st.key, transform: `translate(${x},${y})` },
      svg("title", {}, j.name + " (" + j.project + "): " + (STATES[st.key] ? STATES[st.key].label : st.key) + (st.detail ? " (" + st.detail + ")" : "") + (j.err_build ? " — " + j.err_build : "")),
      svg("rect", { width: BOX_W, height: BOX_H, rx: 6 }),
      svg("text", { class: "job-name", x: 10, y: 20 }, clip(j.name, 26)),
      svg("text", { class: "job-project", x: 10, y: 38 }, clip(j.project, 30)),
      svg("text", { class: "job-state", x: 10, y: 58 }, label + (st.key === "failed" && st.detail ? " " + st.detail.replace("exit ", "") : "")),
      svg("text", { class: "job-marks", x: 120, y: 58 }, marks.filter((k) => k !== "cached").join(" ")));
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
  // Each job's BuildInfo (its StartedAt and Duration), by ID, once it ended; running ones
  // again at each change.
  const infos = new Map();
  const jobDuration = (j) => {
    const info = infos.get(j.id);
    if (!j.id || !info) return "";
    if (j.state === "pending") {
      const t = Date.parse(info.StartedAt);
      return isNaN(t) ? "" : duration(Math.max(0, Date.now() - t) * 1e6) + " so far";
    }
    return duration(info.Duration);
  };
  const fetchInfos = async () => {
    const todo = rec.jobs.filter((j) => j.id && (j.state === "pending" || !infos.has(j.id) || infos.get(j.id).Duration < 0));
    await Promise.all(todo.map(async (j) => {
      try {
        const r = await fetch("/api/job/" + encodeURIComponent(j.project) + "/" + encodeURIComponent(j.id));
        if (r.ok) infos.set(j.id, (await r.json()).buildInfo);
      } catch (e) { /* shown without a duration */ }
    }));
    for (const td of jobs.querySelectorAll("td.job-duration")) {
      const j = rec.jobs.find((x) => x.name === td.dataset.job);
      if (j) td.textContent = jobDuration(j);
    }
  };
  const fields = el("dl", { id: "run-fields" });
  const params = el("ul", { id: "run-params" });
  const dag = el("div", { id: "dag-box", tabindex: "0", role: "region", "aria-label": "The run's jobs as a graph" });
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
    stateEl.replaceChildren(stateBadge(runState(rec)));
    stateEl.dataset.state = runState(rec).key;
    const links = (ls) => ls.length ? ls.map((l) => runAnchor(l)).flatMap((a, i) => i ? [", ", a] : [a]) : ["—"];
    const rows = [["Pipeline", rec.pipeline], ["Run", rec.run], ["State", [stateBadge(runState(rec))]], ["Started", rec.started_at],
      ["Duration", runDuration(rec)], ["Failed", (rec.failed || []).join(", ")],
      ["Caused by", [runAnchor(rec.caused_by, "caused-by")]], ["Triggered", links(rec.triggered || [])]];
    if (rec.rebuild) rows.push(["Rebuild", ["#" + rec.rebuild + " of ", runAnchor(rec.rebuild_of, "rebuild-of")]]);
    if (rec.error) rows.push(["Error", rec.error]);
    fields.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, ...(Array.isArray(v) ? v : [v]))]));
    const ps = Object.entries(rec.params || {});
    params.replaceChildren(...(ps.length ? ps.map(([k, v]) => el("li", {}, el("code", {}, k), " = ", el("code", { class: "param-value" }, v))) : [el("li", { class: "muted" }, "none")]));
    dag.replaceChildren(drawDag(rec));
    jobs.replaceChildren(...rec.jobs.map((j) => el("tr", { "data-job": j.name },
      el("td", {}, j.name), el("td", {}, j.project), el("td", {}, (j.needs || []).join(", ")),
      el("td", { class: "job-state-cell" }, stateBadge(runJobState(j))),
      el("td", { class: "job-duration", "data-job": j.name }, jobDuration(j)),
      el("td", {}, j.state === "ready" || j.state === "failed" ? (j.exit_code === -999 ? "" : j.exit_code) : ""),
      el("td", {}, ...["cached", "coalesced", "incremental"].filter((k) => j[k]).map((k) => el("span", { class: "badge " + k }, k))),
      el("td", { class: "err" }, j.err_build || ""))));
    // Only when a job failed, and not while the run goes on.
    failed.disabled = rec.state === "running" || !(rec.failed || []).length;
    fetchInfos();
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
    scrollBox(el("table", { id: "run-table" }, el("thead", {}, el("tr", {},
      ...["Job", "Project", "Needs", "State", "Duration", "Exit", "Marks", "Error"].map((h) => el("th", { scope: "col" }, h)))), jobs), "Jobs of this run"));
  update(rec);
  // Elapsed times tick while something runs.
  const tick = setInterval(() => {
    if (rec.state !== "running") { clearInterval(tick); return; }
    for (const td of jobs.querySelectorAll("td.job-duration")) {
      const j = rec.jobs.find((x) => x.name === td.dataset.job);
      if (j && j.state === "pending") td.textContent = jobDuration(j);
    }
    const d = fields.querySelector("[data-field=Duration]");
    if (d) d.textContent = runDuration(rec);
  }, 1000);
  if (rec.state === "running") follow();
}


// --- The states people read of a run and of its jobs (common.js's STATES) ---------------------
// A run's job: waiting, queued, running (mistry's "pending"), success or cached ("ready"), failed
// with its exit code or build error, skipped. (A run cannot be cancelled: no such state.)
function runJobState(j) {
  switch (j.state) {
    case "pending": return { key: "running", detail: "" };
    case "ready": return { key: j.cached ? "cached" : "success", detail: "" };
    case "failed":
      return { key: "failed", detail: j.err_build || j.exit_code === -999 ? "build error" : "exit " + j.exit_code };
    default: return { key: j.state, detail: "" };
  }
}

// A run: running, success ("succeeded") or failed.
function runState(rec) {
  if (rec.state === "running") return { key: "running", detail: "" };
  if (rec.state === "succeeded") return { key: "success", detail: "" };
  const n = (rec.failed || []).length;
  return { key: "failed", detail: n ? n + (n === 1 ? " job" : " jobs") : "" };
}

// "2026-01-02 10:11:12" of an RFC 3339 time ("" when there is none).
function when(t) { return t ? t.replace("T", " ").replace(/\.\d+/, "").replace(/(Z|[+-]\d\d:\d\d)$/, "") : ""; }

// A run's duration, or the time since it started while it runs.
function runDuration(rec) {
  if (rec.state !== "running") return duration(rec.duration);
  const t = Date.parse(rec.started_at);
  return isNaN(t) ? "" : duration(Math.max(0, Date.now() - t) * 1e6) + " so far";
}

// A table in its own horizontally scrolling box (the page never scrolls sideways).
function scrollBox(table, label) {
  return el("div", { class: "scroll-x", tabindex: "0", role: "region", "aria-label": label }, table);
}

// Rows of runs: link, state, started, duration, failed jobs.
function runRows(runs) {
  return runs.map((r) => el("tr", { "data-run": r.run },
    el("td", { class: "id" }, el("a", { class: "run-page-link", href: "/" + r.url }, r.run.slice(0, 12))),
    el("td", {}, stateBadge(runState(r))),
    el("td", {}, when(r.started_at)),
    el("td", { class: "run-duration" }, runDuration(r)),
    el("td", {}, (r.failed || []).join(", "))));
}

function runsTable(id, runs) {
  const body = el("tbody", { id }, ...runRows(runs));
  if (!runs.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No runs yet.")));
  return el("table", { class: "runs" }, el("thead", {}, el("tr", {},
    ...["Run", "State", "Started", "Duration", "Failed jobs"].map((h) => el("th", { scope: "col" }, h)))), body);
}

async function getJson(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  if (!r.ok) throw new Error((await r.text()) || "HTTP " + r.status);
  return r.json();
}

// --- The pipelines (/pipelines): each with its definition and its last runs -----------------
async function pipelinesPage() {
  app.replaceChildren(el("h1", {}, "Pipelines"));
  let list;
  try { list = await getJson("/pipelines"); } catch (e) {
    app.append(el("p", { class: "err", role: "alert" }, "Cannot list the pipelines: " + e.message));
    return;
  }
  if (!list.length) { app.append(el("p", { class: "muted", id: "no-pipelines" }, "No pipelines.")); return; }
  const cards = el("div", { id: "pipelines" });
  app.append(cards);
  for (const p of list) {
    const card = el("section", { class: "pipeline-card", "data-pipeline": p.name, "aria-labelledby": "p-" + p.name });
    card.append(el("h2", { id: "p-" + p.name }, el("a", { class: "pipeline-link", href: "/pipeline/" + encodeURIComponent(p.name) }, p.name)));
    if (p.error) { card.append(el("p", { class: "err" }, p.error)); cards.append(card); continue; }
    if (p.description) card.append(el("p", { class: "description" }, p.description));
    const params = Object.entries(p.params || {});
    card.append(el("p", { class: "pipeline-meta" },
      el("span", { class: "muted" }, "Jobs: "), (p.jobs || []).join(", "),
      el("br"), el("span", { class: "muted" }, "Params: "),
      params.length ? params.map(([k, d]) => k + (d.required ? " (required)" : d.default !== undefined ? " = " + d.default : "")).join(", ") : "none"));
    const runsBox = el("div", {}, el("p", { class: "muted" }, "Loading runs…"));
    card.append(el("h3", {}, "Last runs"), runsBox);
    cards.append(card);
    getJson("/api/pipelines/" + encodeURIComponent(p.name) + "/runs?per_page=5")
      .then((h) => runsBox.replaceChildren(scrollBox(runsTable("runs-" + p.name, h.runs), "Last runs of " + p.name)))
      .catch((e) => runsBox.replaceChildren(el("p", { class: "err" }, e.message)));
  }
}

// --- A pipeline (/pipeline/{name}): its definition, a form to start a run, its history ---------
const HISTORY_PAGE = 20;

// What the server's refusal of a run means, in plain words.
function refusal(status, text) {
  switch (status) {
    case 400: return "The server refused these params: " + text;
    case 401: return "Sign in first (the server asks for a token).";
    case 403: return "You may not start this pipeline: " + text;
    case 404: return "This pipeline no longer exists: " + text;
    case 503: return "The server is busy; try again in a moment. (" + text + ")";
    default: return "The run did not start (HTTP " + status + "): " + text;
  }
}

async function pipelinePage(name) {
  let def;
  try { def = await getJson("/api/pipelines/" + encodeURIComponent(name)); } catch (e) {
    app.replaceChildren(el("h1", {}, "Pipeline ", name), el("p", { class: "err", role: "alert" }, e.message));
    return;
  }
  document.title = name + " · Pipelines · mistry";
  // The definition: jobs with their projects (linking to the project's page) and needs.
  const jobs = el("table", { id: "pipeline-jobs" }, el("thead", {}, el("tr", {},
    ...["Job", "Project", "Needs"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...def.jobs.map((j) => el("tr", { "data-job": j.name },
      el("td", {}, j.name),
      el("td", {}, el("a", { class: "project-link", href: "/project/" + encodeURIComponent(j.project) }, j.project)),
      el("td", {}, j.needs.join(", "))))));

  // The form: one input per declared param, defaults filled, required ones marked.
  const error = el("p", { id: "run-form-error", class: "err", role: "alert" });
  const fields = Object.entries(def.params || {}).map(([k, d], i) => {
    const id = "param-" + i;
    const input = el("input", { id, name: k, type: "text", "data-param": k, autocomplete: "off" });
    if (d.default !== undefined) input.value = d.default;
    if (d.required) { input.required = true; input.setAttribute("aria-required", "true"); }
    const hint = d.description ? el("span", { class: "muted hint", id: id + "-hint" }, d.description) : null;
    if (hint) input.setAttribute("aria-describedby", id + "-hint");
    return el("div", { class: "field" },
      el("label", { for: id }, k, d.required ? el("span", { class: "required" }, " (required)") : ""), input, ...(hint ? [hint] : []));
  });
  const submit = el("button", { type: "submit", id: "run-submit" }, "Start run");
  const form = el("form", { id: "run-form", "aria-labelledby": "run-form-title", novalidate: "" },
    ...(fields.length ? fields : [el("p", { class: "muted" }, "This pipeline takes no params.")]), el("div", { class: "actions" }, submit), error);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    const missing = [...form.querySelectorAll("input[required]")].filter((i) => !i.value).map((i) => i.name);
    if (missing.length) { error.textContent = "Fill in the required params: " + missing.join(", ") + "."; return; }
    const params = {};
    for (const i of form.querySelectorAll("input[data-param]")) if (i.value !== "") params[i.name] = i.value;
    submit.disabled = true;
    let r;
    try {
      r = await fetch("/pipelines?async", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ pipeline: name, params }) });
    } catch (e) { error.textContent = "The server is unreachable."; submit.disabled = false; return; }
    const text = await r.text();
    if (r.status !== 201) { error.textContent = refusal(r.status, text); submit.disabled = false; return; }
    location.assign("/" + JSON.parse(text).url);
  });

  // The history, a page at a time, newest first.
  const history = el("div", { id: "history" });
  const pageNote = el("span", { id: "history-page", class: "muted" });
  const newer = el("button", { type: "button", id: "history-newer" }, "Newer");
  const older = el("button", { type: "button", id: "history-older" }, "Older");
  let page = 1;
  async function showHistory() {
    let h;
    try { h = await getJson("/api/pipelines/" + encodeURIComponent(name) + "/runs?page=" + page + "&per_page=" + HISTORY_PAGE); } catch (e) {
      history.replaceChildren(el("p", { class: "err" }, e.message));
      return;
    }
    const pages = Math.max(1, Math.ceil(h.total / h.per_page));
    history.replaceChildren(scrollBox(runsTable("history-runs", h.runs), "Runs of " + name));
    pageNote.textContent = "Page " + h.page + " of " + pages + " (" + h.total + (h.total === 1 ? " run)" : " runs)");
    newer.disabled = h.page <= 1;
    older.disabled = h.page >= pages;
  }
  newer.addEventListener("click", () => { page = Math.max(1, page - 1); showHistory(); });
  older.addEventListener("click", () => { page += 1; showHistory(); });

  app.replaceChildren(
    el("h1", {}, "Pipeline ", name),
    ...(def.description ? [el("p", { class: "description" }, def.description)] : []),
    el("h2", {}, "Jobs"), scrollBox(jobs, "Jobs of " + name),
    ...(def.on_success.length ? [el("p", {}, el("span", { class: "muted" }, "On success: "), def.on_success.join(", "))] : []),
    el("h2", { id: "run-form-title" }, "Start a run"), form,
    el("h2", {}, "History"), history, el("div", { class: "actions pager" }, newer, pageNote, older));
  showHistory();
}
