// The job list (/) and a job's page (/job/{project}/{id}). Uses common.js.
"use strict";

// --- The job list -----------------------------------------------------------------------
// One page (at most 100 rows) of GET /api/jobs, filtered on the server; the filters and the
// page are kept in the URL (history.replaceState). The live refresh updates the rows in place
// and never rebuilds the filters, so focus and scroll stay where they were.
const LIST_STATES = ["success", "failed", "running", "queued", "cached"];

// A job's duration, or the time since it started while it runs (updated every second).
function jobTime(j) {
  const info = j.buildInfo || {};
  const st = (j.display && j.display.key) || jobState(j).key;
  if (st === "running") {
    const t = Date.parse(info.StartedAt);
    return isNaN(t) ? "" : duration(Math.max(0, Date.now() - t) * 1e6).replace(/\.\d+s$/, "s");
  }
  return info.Duration > 0 ? duration(info.Duration) : "";
}

function listPage() {
  document.title = "Jobs · mistry";
  const params = new URLSearchParams(location.search);
  const want = { project: params.get("project") || "", state: params.get("state") || "", q: params.get("q") || "",
    agent: params.get("agent") || "", page: Math.max(1, Number(params.get("page")) || 1) };
  const label = (text, control) => el("label", { class: "filter" }, el("span", { class: "filter-label" }, text), control);
  const project = el("select", { id: "filter-project" }, el("option", { value: "" }, "all projects"));
  const state = el("select", { id: "filter-state" }, el("option", { value: "" }, "all states"),
    ...LIST_STATES.map((k) => el("option", { value: k }, STATES[k].icon + " " + STATES[k].label)));
  const agent = el("select", { id: "filter-agent" }, el("option", { value: "" }, "all agents"));
  const text = el("input", { id: "filter-q", type: "search", placeholder: "ID, group, param…", value: want.q });
  const prev = el("button", { id: "page-prev", type: "button" }, "\u2190 Newer");
  const next = el("button", { id: "page-next", type: "button" }, "Older \u2192");
  const pageInfo = el("span", { id: "page-info", "aria-live": "polite" });
  const body = el("tbody", { id: "jobs" });
  const options = (select, values) => {
    const have = new Set([...select.options].map((o) => o.value));
    for (const v of values) if (!have.has(v)) select.append(el("option", { value: v }, v));
  };
  options(project, want.project ? [want.project] : []);
  options(agent, want.agent ? [want.agent] : []);
  project.value = want.project; state.value = want.state; agent.value = want.agent;
  app.replaceChildren(
    el("h1", { class: "sr-only" }, "Jobs"),
    el("form", { class: "filters", role: "search", onsubmit: (e) => e.preventDefault() },
      label("Project", project), label("State", state), label("Agent", agent), label("Search", text)),
    el("div", { class: "table-box" }, el("table", { class: "jobs" }, el("thead", {}, el("tr", {},
      ...["ID", "Project", "Group", "State", "Agent", "Started", "Duration", "Exit", "", "Pipeline run"].map((h) => el("th", { scope: "col" }, h)))), body)),
    el("nav", { class: "pager", "aria-label": "Pages" }, prev, pageInfo, next));

  const rows = new Map(); // "<project>/<id>" -> {tr, sig, job}
  let pages = 1, seq = 0;
  function query() {
    const q = new URLSearchParams();
    if (project.value) q.set("project", project.value);
    if (state.value) q.set("state", state.value);
    if (text.value.trim()) q.set("q", text.value.trim());
    if (agent.value) q.set("agent", agent.value);
    if (want.page > 1) q.set("page", String(want.page));
    return q.toString();
  }
  function cells(j, run) {
    const st = j.display || jobState(j);
    return [
      el("td", { class: "id" }, el("a", { href: "/job/" + encodeURIComponent(j.project) + "/" + encodeURIComponent(j.id) }, j.id.slice(0, 12))),
      el("td", { class: "project" }, el("a", { class: "project-link", href: "/project/" + encodeURIComponent(j.project) }, j.project)), el("td", { class: "group" }, j.buildInfo.Group),
      el("td", { class: "state" }, stateBadge(st)), el("td", { class: "agent" }, ...agentLink(j.agent)),
      el("td", { class: "started" }, j.startedAt), el("td", { class: "time" }, jobTime(j)),
      el("td", { class: "exit" }, j.state === "ready" ? j.buildInfo.ExitCode : ""),
      el("td", { class: "badges" }, ...(j.state === "ready" ? badges(j.buildInfo) : [])),
      el("td", { class: "run" }, ...runLink(run)),
    ];
  }
  async function refresh() {
    const mine = ++seq;
    const q = query();
    history.replaceState(null, "", location.pathname + (q ? "?" + q : ""));
    let list, runs;
    try {
      const r = await fetch("/api/jobs" + (q ? "?" + q : ""));
      if (!r.ok) { statusEl.textContent = (await r.text()) || "HTTP " + r.status; return; }
      [list, runs] = await Promise.all([r.json(), jobRuns()]);
      statusEl.textContent = "";
    } catch (e) {
      statusEl.textContent = "server unreachable";
      return;
    }
    if (mine !== seq) return; // a newer refresh is under way
    options(project, list.projects);
    options(agent, list.agents);
    pages = list.pages;
    const seen = new Set();
    list.jobs.forEach((j, i) => {
      const key = j.project + "/" + j.id;
      const run = runs[key];
      const sig = JSON.stringify([j.state, j.display, j.agent, j.startedAt, j.buildInfo.Duration, j.buildInfo.ExitCode, run]);
      seen.add(key);
      let row = rows.get(key);
      if (!row) {
        const tr = el("tr", { "data-id": j.id, "data-project": j.project });
        row = { tr, sig: "" };
        rows.set(key, row);
      }
      row.job = j;
      const tr = row.tr;
      tr.dataset.agent = j.agent || "";
      tr.dataset.state = (j.display || jobState(j)).key;
      if ("clusterState" in j) { tr.dataset.held = "elsewhere"; tr.dataset.clusterState = j.clusterState; }
      if (row.sig !== sig) { tr.replaceChildren(...cells(j, run)); row.sig = sig; }
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    for (const [key, row] of rows) if (!seen.has(key)) { row.tr.remove(); rows.delete(key); }
    const empty = body.querySelector("tr.empty");
    if (!list.jobs.length && !empty) body.append(el("tr", { class: "empty" }, el("td", { colspan: 10, class: "muted" }, "No jobs.")));
    if (list.jobs.length && empty) empty.remove();
    pageInfo.textContent = list.total ? "Page " + list.page + " of " + list.pages + " \u00b7 " + list.total + " jobs" : "No jobs";
    prev.disabled = list.page <= 1;
    next.disabled = list.page >= list.pages;
    // When the first page was drawn (benches/web.rs reads it).
    if (!performance.getEntriesByName("jobs-drawn").length) performance.mark("jobs-drawn");
  }
  const restart = () => { want.page = 1; refresh(); };
  for (const s of [project, state, agent]) s.addEventListener("change", restart);
  let typing;
  text.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(restart, 250); });
  prev.addEventListener("click", () => { if (want.page > 1) { want.page--; refresh(); } });
  next.addEventListener("click", () => { if (want.page < pages) { want.page++; refresh(); } });
  refresh();
  setInterval(refresh, 2000);
  // Running jobs' elapsed time, every second, without touching anything else.
  setInterval(() => {
    for (const row of rows.values()) {
      if (row.tr.dataset.state !== "running") continue;
      const td = row.tr.querySelector("td.time");
      const t = jobTime(row.job);
      if (td && td.textContent !== t) td.textContent = t;
    }
  }, 1000);
}

// What a retrigger's answer means, in plain words (the server's answers: src/server/error.rs).
function retriggerMessage(project, status, text) {
  const why = text ? " (the server said: " + text.trim() + ")" : "";
  switch (status) {
    case 201: return "Scheduled: a new build of this job is queued.";
    case 0: return "Not scheduled: the server could not be reached. Check your connection and try again.";
    case 400: return "Not scheduled: the server refused this job's request as it was stored; it cannot be re-run as it is" + why + ".";
    case 401: return "Not scheduled: you are not signed in. Reload the page and give your token.";
    case 403: return "Not scheduled: you may look at project " + project + " but not build it (or the request came from another site)" + why + ".";
    case 404: return "Not scheduled: project " + project + " no longer exists on this server, so this job cannot be re-run" + why + ".";
    case 503: return "Not scheduled: the server is too busy to take a job now (its queue is full or the cluster's database is unreachable). Try again in a moment" + why + ".";
    default: return "Not scheduled: the server answered HTTP " + status + why + ".";
  }
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

function humanSize(n) {
  if (n < 1024) return n + " B";
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let i = -1;
  do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
  return n.toFixed(1) + " " + units[i];
}

// A log as lines, each `<span class="line" id="L<n>">` (its number drawn by CSS; `#L<n>` links
// to it). `numbered`: false for a tail whose first line is not the log's first.
function logView(pre) {
  let n = 0, numbered = true, partial = null;
  const addLine = (text) => {
    n++;
    const line = el("span", { class: "line" + (numbered ? "" : " unnumbered"), "data-n": numbered ? n : "" });
    if (numbered) line.id = "L" + n;
    appendAnsi(line, text);
    line.append("\n");
    pre.append(line);
    return line;
  };
  return {
    reset(isNumbered) { pre.replaceChildren(); n = 0; numbered = isNumbered; partial = null; },
    // Text that may end mid-line.
    text(t) {
      const lines = t.split("\n");
      if (lines[lines.length - 1] === "") lines.pop();
      for (const l of lines) addLine(l);
    },
    line: addLine,
    count: () => n,
  };
}

// Search in the log: matches highlighted (CSS highlights, and each matching line marked),
// next/previous, "k of n".
function logSearch(pre, input, count) {
  let lines = [], at = -1;
  const hl = typeof Highlight === "function" && CSS.highlights;
  function clear() {
    for (const l of pre.querySelectorAll(".line.match")) l.classList.remove("match", "match-current");
    if (hl) { CSS.highlights.delete("log-match"); CSS.highlights.delete("log-current"); }
  }
  function run() {
    clear();
    const q = input.value.toLowerCase();
    lines = [];
    at = -1;
    if (!q) { count.textContent = ""; return; }
    const ranges = [];
    for (const line of pre.querySelectorAll(".line")) {
      const t = line.textContent.toLowerCase();
      if (!t.includes(q)) continue;
      line.classList.add("match");
      lines.push(line);
      if (hl) {
        const walker = document.createTreeWalker(line, NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
          const v = node.data.toLowerCase();
          for (let i = v.indexOf(q); i >= 0; i = v.indexOf(q, i + q.length)) {
            const r = new Range(); r.setStart(node, i); r.setEnd(node, i + q.length); ranges.push(r);
          }
        }
      }
    }
    if (hl) CSS.highlights.set("log-match", new Highlight(...ranges));
    count.textContent = lines.length ? "" : "no match";
    if (lines.length) go(1);
  }
  function go(step) {
    if (!lines.length) return;
    if (at >= 0) lines[at].classList.remove("match-current");
    at = (at + step + lines.length) % lines.length;
    const line = lines[at];
    line.classList.add("match-current");
    line.scrollIntoView({ block: "center" });
    count.textContent = (at + 1) + " of " + lines.length;
  }
  return { run, go };
}

async function jobPage(project, id) {
  const base = encodeURIComponent(project) + "/" + encodeURIComponent(id);
  const short = project + "/" + id.slice(0, 12);
  document.title = short + " · mistry";
  let job;
  try {
    const r = await fetch("/api/job/" + base);
    if (r.status === 404) {
      document.title = "Unknown job · mistry";
      app.replaceChildren(el("h1", {}, "Unknown job"), el("p", {}, "No job ", project, "/", id, " here."));
      return;
    }
    job = await r.json();
  } catch (e) { app.replaceChildren(el("p", {}, "Cannot reach the server.")); return; }

  // The state a person reads in the heading; mistry's own (pending / ready) among the fields.
  const badgeBox = el("span", { id: "job-state-box" });
  const stateEl = el("span", { id: "state", class: "mistry-state" }, job.state);
  const timeEl = el("span", { id: "job-time" });
  const fields = el("dl", { id: "fields" });
  const params = el("ul", { id: "params" });
  const pre = el("pre", { id: "log", tabindex: "0", role: "tabpanel", "aria-labelledby": "tab-out" });
  const view = logView(pre);
  const more = el("button", { id: "load-all", type: "button", hidden: "" }, "Load the whole log");
  const rebuild = el("input", { type: "checkbox", id: "rebuild" });
  const note = el("span", { id: "retrigger-note", class: "muted", role: "status" });
  const retrigger = el("button", { id: "retrigger", type: "button", onclick: async () => {
    const body = JSON.stringify({ project, group: job.buildInfo.Group, params: job.buildInfo.Params, rebuild: rebuild.checked });
    note.textContent = "Scheduling…";
    let r;
    try { r = await fetch("/jobs?async", { method: "POST", body }); } catch (e) { r = null; }
    note.textContent = retriggerMessage(project, r ? r.status : 0, r ? await r.text() : "");
    note.className = r && r.status === 201 ? "muted" : "err";
    if (r && r.status === 201) setTimeout(() => location.reload(), 500);
  } }, "Retrigger");

  let agentName = "";
  function elapsed() {
    const st = jobState(job).key;
    if (st !== "running") return job.buildInfo.Duration > 0 ? duration(job.buildInfo.Duration) : "";
    const t = Date.parse(job.buildInfo.StartedAt);
    return isNaN(t) ? "" : duration(Math.max(0, Date.now() - t) * 1e6).replace(/\.\d+s$/, "s") + " so far";
  }
  function render() {
    const info = job.buildInfo;
    const st = jobState(job);
    stateEl.textContent = job.state;
    badgeBox.replaceChildren(stateBadge(st, "job-state"));
    document.title = (STATES[st.key] || { label: st.key }).label + (st.detail ? " (" + st.detail + ")" : "") + " · " + short + " · mistry";
    timeEl.textContent = elapsed();
    const rows = [["Project", project], ["ID", id], ["Group", info.Group], ["Agent", agentLink(agentName)], ["State (mistry)", [stateEl]], ["Started", job.startedAt],
      ["Duration", [timeEl]], ["ExitCode", job.state === "ready" ? info.ExitCode : ""],
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
  const ticker = setInterval(() => { timeEl.textContent = elapsed(); }, 1000);

  const runEl = el("p", { id: "job-run" });
  jobRuns().then((runs) => {
    const l = runLink(runs[project + "/" + id]);
    if (l.length) runEl.replaceChildren("Pipeline run: ", ...l);
  });

  // Artifacts (each file, and the whole tar) and the image.
  const tarLink = el("a", { id: "artifacts-tar", href: "/artifacts/" + base, download: id.slice(0, 12) + ".tar" }, "All artifacts (tar)");
  const files = el("ul", { id: "artifacts", class: "files" });
  const image = el("div", { id: "image" });
  const imageId = el("p", { id: "image-built" });
  async function showFiles() {
    let v;
    try {
      const r = await fetch("/api/artifacts/" + base);
      if (!r.ok) return;
      v = await r.json();
    } catch (e) { return; }
    if (!v.ready) {
      files.replaceChildren(el("li", { class: "muted" }, v.here ? "Not ready yet." : "The build is on another agent: the tar link fetches it here."));
    } else if (!v.files.length) {
      files.replaceChildren(el("li", { class: "muted" }, "No artifacts."));
    } else {
      files.replaceChildren(...v.files.filter((f) => f.kind !== "dir").map((f) => {
        if (f.kind !== "file") return el("li", { class: "artifact-other", "data-path": f.path }, f.path, " ", el("span", { class: "muted" }, f.kind === "link" ? "(a symlink: not followed)" : "(not a file)"));
        const href = "/api/artifact/" + base + "/" + f.path.split("/").map(encodeURIComponent).join("/");
        return el("li", { "data-path": f.path }, el("a", { class: "artifact", href, download: f.path.split("/").pop() }, f.path), " ", el("span", { class: "muted" }, humanSize(f.size)));
      }));
      if (v.truncated) files.append(el("li", { class: "muted" }, "… more: download the tar for all of them."));
    }
    image.replaceChildren(v.dockerfile == null
      ? el("p", { class: "muted" }, "The project's Dockerfile cannot be read.")
      : el("details", {}, el("summary", {}, "Dockerfile of ", project, " (as it is now)"), el("pre", { id: "dockerfile", class: "code", tabindex: "0" }, v.dockerfile)));
  }

  // The log: stdout and stderr together, or stderr alone (tabs); search; follow while live.
  const tabOut = el("button", { type: "button", role: "tab", id: "tab-out", "aria-controls": "log", "aria-selected": "true", tabindex: "0" }, "Output");
  const tabErr = el("button", { type: "button", role: "tab", id: "tab-err", "aria-controls": "log", "aria-selected": "false", tabindex: "-1" }, "Stderr");
  const tabs = el("div", { role: "tablist", "aria-label": "Log", class: "tabs" }, tabOut, tabErr);
  const search = el("input", { id: "log-search", type: "search", placeholder: "Search the log", "aria-label": "Search the log" });
  const prevMatch = el("button", { type: "button", id: "log-prev", "aria-label": "Previous match" }, "\u2191");
  const nextMatch = el("button", { type: "button", id: "log-next", "aria-label": "Next match" }, "\u2193");
  const matchCount = el("span", { id: "log-search-count", class: "muted", "aria-live": "polite" });
  const follow = el("button", { type: "button", id: "follow", "aria-pressed": "true", hidden: "" }, "Following");
  const finder = logSearch(pre, search, matchCount);
  let searching;
  search.addEventListener("input", () => { clearTimeout(searching); searching = setTimeout(finder.run, 200); });
  search.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); finder.go(e.shiftKey ? -1 : 1); } });
  prevMatch.addEventListener("click", () => finder.go(-1));
  nextMatch.addEventListener("click", () => finder.go(1));
  let following = true;
  follow.addEventListener("click", () => {
    following = !following;
    follow.setAttribute("aria-pressed", String(following));
    follow.textContent = following ? "Following" : "Follow";
    if (following) pre.scrollTop = pre.scrollHeight;
  });

  app.replaceChildren(
    el("h1", {}, project, " / ", id.slice(0, 12), " ", badgeBox), runEl,
    fields, el("h2", {}, "Params"), params,
    el("div", { class: "actions" }, retrigger, el("label", {}, rebuild, " rebuild"), note),
    el("h2", {}, "Artifacts"), el("p", {}, tarLink), files,
    el("h2", {}, "Image"), imageId, image,
    el("h2", {}, "Log"),
    el("div", { class: "log-bar" }, tabs, el("div", { class: "log-search", role: "search" }, search, prevMatch, nextMatch, matchCount), follow),
    more, pre);
  render();
  if (job.state === "pending") showFiles();

  let tab = "out";
  function highlightHash() {
    for (const l of pre.querySelectorAll(".line.target")) l.classList.remove("target");
    const m = location.hash.match(/^#L(\d+)$/);
    if (!m) return;
    const line = document.getElementById("L" + m[1]);
    if (line) { line.classList.add("target"); line.scrollIntoView({ block: "center" }); }
    return !!line;
  }
  async function showLog(all) {
    let text, size = 0;
    if (tab === "err") {
      const r = await fetch("/api/stderr/" + base);
      text = r.ok ? await r.text() : "";
      all = true;
    } else {
      const r = await fetch("/api/logtail/" + base + (all ? "" : "?bytes=" + TAIL));
      size = Number(r.headers.get("x-log-size") || 0);
      text = await r.text();
    }
    const cut = !all && size > TAIL;
    view.reset(!cut);
    more.hidden = !cut;
    if (cut) {
      pre.append(el("span", { class: "muted" }, "… (" + (size - TAIL) + " earlier bytes; load the whole log for line links)\n"));
      text = text.slice(text.indexOf("\n") + 1); // the first line is cut
    }
    view.text(text);
    // The image it ran on, as its build log names it (mistry's BuildInfo does not).
    const built = tab === "out" && text.match(/^Successfully built (\S+)$/m);
    const from = tab === "out" && text.match(/^ ---> local image .* \((sha256:[0-9a-f]+)\)$/m);
    if (built) imageId.replaceChildren("Image ", el("code", { id: "image-id" }, built[1]), ...(from ? [" from base ", el("code", { id: "image-base" }, from[1].slice(0, 19))] : []), " (from its build log).");
    if (!text) pre.append(el("span", { class: "muted" }, tab === "err" ? "Nothing on stderr." : "No output."));
    if (location.hash.match(/^#L\d+$/) && !highlightHash() && cut) return showLog(true);
    if (search.value) finder.run();
  }
  more.addEventListener("click", () => showLog(true));
  window.addEventListener("hashchange", highlightHash);
  pre.addEventListener("click", (e) => {
    const line = e.target.closest && e.target.closest(".line[id]");
    if (line && e.offsetX < 0 + parseFloat(getComputedStyle(line).paddingLeft)) {
      history.replaceState(null, "", "#" + line.id);
      highlightHash();
    }
  });
  function select(which) {
    tab = which;
    for (const [t, k] of [[tabOut, "out"], [tabErr, "err"]]) {
      t.setAttribute("aria-selected", String(k === which));
      t.tabIndex = k === which ? 0 : -1;
    }
    pre.setAttribute("aria-labelledby", which === "out" ? "tab-out" : "tab-err");
    if (!live) showLog(false);
  }
  tabs.addEventListener("keydown", (e) => {
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight" && e.key !== "Home" && e.key !== "End") return;
    e.preventDefault();
    const to = tab === "out" ? tabErr : tabOut;
    to.focus();
    select(to === tabOut ? "out" : "err");
  });
  tabOut.addEventListener("click", () => select("out"));
  tabErr.addEventListener("click", () => select("err"));

  let live = job.state === "pending";
  if (live) {
    // New lines as they come, then the final state without a reload.
    follow.hidden = false;
    tabErr.disabled = true;
    view.reset(true);
    const es = new EventSource("/log/" + base);
    es.onmessage = (ev) => {
      view.line(ev.data);
      if (following) pre.scrollTop = pre.scrollHeight;
    };
    let finished = false;
    const finish = async () => {
      if (finished) return;
      finished = true;
      es.close();
      clearInterval(poll);
      job = await (await fetch("/api/job/" + base)).json();
      live = false;
      follow.hidden = true;
      tabErr.disabled = false;
      render();
      refreshAgent();
      showFiles();
      await showLog(false);
    };
    es.onerror = finish;
    const poll = setInterval(async () => {
      const j = await (await fetch("/api/job/" + base)).json();
      if (j.state !== "pending") finish();
    }, 1000);
  } else {
    clearInterval(ticker);
    await Promise.all([showLog(false), showFiles()]);
    // When the page was drawn, its log and artifacts included (benches/web.rs reads it).
    performance.mark("job-drawn");
  }
}
