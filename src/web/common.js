// The mistry web view, shared by every page: the element builder, durations, the states people
// read, and the lookups of which agent and which pipeline run a job belongs to. The pages are in
// jobs.js (the job list, a job), pipelines.js (pipelines and their runs) and app.js (the agents,
// and which page a path draws). Everything user-controlled (names, params, logs) goes into the
// page as text, never as HTML.
"use strict";

// Signed in with a cookie, the web view's state-changing requests send the CSRF token the server
// set (the mistry_csrf cookie, readable by scripts) in X-CSRF-Token: every same-origin request
// but GET, HEAD and OPTIONS made with fetch, whichever page makes it.
(() => {
  const plainFetch = window.fetch.bind(window);
  window.fetch = (input, init = {}) => {
    const req = input instanceof Request ? input : null;
    const method = (init.method || (req ? req.method : "GET")).toUpperCase();
    const url = new URL(req ? req.url : String(input), location.href);
    const csrf = document.cookie.match(/(?:^|;\s*)mistry_csrf=([^;]*)/);
    if (csrf && url.origin === location.origin && !["GET", "HEAD", "OPTIONS"].includes(method)) {
      const headers = new Headers(init.headers || (req ? req.headers : undefined));
      headers.set("X-CSRF-Token", decodeURIComponent(csrf[1]));
      init = { ...init, headers };
    }
    return plainFetch(input, init);
  };
})();

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


// --- The states people read ---------------------------------------------------------------
// mistry's `ready` means "the build exists", whatever its command's exit: a person reads a green
// "ready" as success. The web view shows one of these instead, as colour plus text plus icon
// (never colour alone); mistry's JSON keeps its states underneath.
const STATES = {
  success: { label: "success", icon: "\u2714" },   // ✔
  failed: { label: "failed", icon: "\u2716" },     // ✖
  running: { label: "running", icon: "\u25B6" },   // ▶
  queued: { label: "queued", icon: "\u25F7" },     // ◷
  cancelled: { label: "cancelled", icon: "\u2298" }, // ⊘
  cached: { label: "cached", icon: "\u21BA" },     // ↺
  waiting: { label: "waiting", icon: "\u2026" },   // …
  skipped: { label: "skipped", icon: "\u2933" },   // ⤳
};

// The state a person reads of a job as /index/, /api/job and /api/cluster/jobs give it
// ({state, buildInfo, clusterState?}): {key, detail} with key one of STATES, detail the exit code
// or build error of a failure ("" otherwise).
function jobState(j) {
  const info = j.buildInfo || {};
  if (j.clusterState === "queued" || j.state === "queued") return { key: "queued", detail: "" };
  if (j.state === "pending" || j.clusterState === "running") return { key: "running", detail: "" };
  if (info.ErrBuild) return { key: "failed", detail: "build error" };
  if (info.ExitCode !== 0 && info.ExitCode !== undefined) return { key: "failed", detail: "exit " + info.ExitCode };
  if (j.clusterState === "failed") return { key: "failed", detail: "" };
  if (info.Cached) return { key: "cached", detail: "" };
  return { key: "success", detail: "" };
}

// A state's badge: icon (hidden from screen readers: the text says it), label and detail.
function stateBadge(st, id) {
  const s = STATES[st.key] || { label: st.key, icon: "?" };
  return el("span", { class: "st st-" + st.key, "data-state": st.key, ...(id ? { id } : {}) },
    el("span", { class: "st-icon", "aria-hidden": "true" }, s.icon), s.label + (st.detail ? " (" + st.detail + ")" : ""));
}
