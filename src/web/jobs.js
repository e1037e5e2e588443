// The job list (/) and a job's page (/job/{project}/{id}). Uses common.js.
"use strict";

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
      el("td", {}, el("a", { class: "project-link", href: "/project/" + encodeURIComponent(j.project) }, j.project)), el("td", {}, j.buildInfo.Group),
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

