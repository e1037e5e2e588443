// The mistry web view: the job list at /, a job's page at /job/{project}/{id}.
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

// --- The job list -----------------------------------------------------------------------
function listPage() {
  const params = new URLSearchParams(location.search);
  const project = el("select", { id: "filter-project" }, el("option", { value: "" }, "all projects"));
  const state = el("select", { id: "filter-state" },
    el("option", { value: "" }, "all states"), el("option", { value: "pending" }, "pending"),
    el("option", { value: "ready" }, "ready"), el("option", { value: "failed" }, "failed"));
  const body = el("tbody", { id: "jobs" });
  app.replaceChildren(
    el("div", { class: "filters" }, project, state),
    el("table", {}, el("thead", {}, el("tr", {},
      ...["ID", "Project", "Group", "State", "Started", "Duration", "Exit", ""].map((h) => el("th", {}, h)))), body));
  const known = new Set();
  async function refresh() {
    let jobs;
    try {
      jobs = await (await fetch("/index/")).json();
      statusEl.textContent = "";
    } catch (e) {
      statusEl.textContent = "server unreachable";
      return;
    }
    for (const j of jobs) {
      if (!known.has(j.project)) {
        known.add(j.project);
        project.append(el("option", { value: j.project }, j.project));
      }
    }
    project.value = params.get("project") || project.value;
    const rows = jobs.filter((j) => !project.value || j.project === project.value).filter((j) => {
      const failed = j.state === "ready" && (j.buildInfo.ExitCode !== 0 || j.buildInfo.ErrBuild);
      return !state.value || (state.value === "failed" ? failed : j.state === state.value);
    }).map((j) => el("tr", { "data-id": j.id },
      el("td", { class: "id" }, el("a", { href: "/job/" + encodeURIComponent(j.project) + "/" + encodeURIComponent(j.id) }, j.id.slice(0, 12))),
      el("td", {}, j.project), el("td", {}, j.buildInfo.Group),
      el("td", { class: "state-" + j.state }, j.state), el("td", {}, j.startedAt),
      el("td", {}, duration(j.buildInfo.Duration)), el("td", {}, j.state === "ready" ? j.buildInfo.ExitCode : ""),
      el("td", {}, ...(j.state === "ready" ? badges(j.buildInfo) : []))));
    body.replaceChildren(...rows);
    if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No jobs.")));
  }
  project.addEventListener("change", refresh);
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

  function render() {
    const info = job.buildInfo;
    stateEl.textContent = job.state;
    stateEl.className = "state-" + job.state;
    const rows = [["Project", project], ["ID", id], ["Group", info.Group], ["Started", job.startedAt],
      ["Duration", duration(info.Duration)], ["ExitCode", job.state === "ready" ? info.ExitCode : ""],
      ["ErrBuild", info.ErrBuild], ["Cached", info.Cached], ["Coalesced", info.Coalesced],
      ["Incremental", info.Incremental], ["Path", info.Path], ["TransportMethod", info.TransportMethod], ["URL", info.URL]];
    fields.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, v)]));
    const ps = Object.entries(info.Params || {});
    params.replaceChildren(...(ps.length ? ps.map(([k, v]) => el("li", {}, el("code", {}, k), " = ", el("code", { class: "param-value" }, v))) : [el("li", { class: "muted" }, "none")]));
  }

  app.replaceChildren(
    el("h1", {}, project, " / ", id.slice(0, 12), " ", stateEl),
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

const m = location.pathname.match(/^\/job\/([^/]+)\/([^/]+)$/);
if (m) jobPage(decodeURIComponent(m[1]), decodeURIComponent(m[2]));
else listPage();
