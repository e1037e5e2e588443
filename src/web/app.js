// The agents page, and which page a path draws (the pages are in jobs.js and pipelines.js,
// the shared pieces in common.js).
"use strict";

// --- The agents page (/agents): every agent of the cluster, or this one alone ------------------
function agentsPage() {
  document.title = "Agents · mistry";
  const selected = new URLSearchParams(location.search).get("agent");
  const body = el("tbody", { id: "agents" });
  const note = el("p", { class: "muted", id: "agents-note" });
  app.replaceChildren(el("h1", {}, "Agents"), note,
    el("div", { class: "table-box" }, el("table", { class: "agents-table" }, el("thead", {}, el("tr", {},
      ...["Agent", "State", "Running", "Capacity", "Last heartbeat", "Version", "URL", "Jobs"].map((h) => el("th", { scope: "col" }, h)))), body)));
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
else if (location.pathname === "/pipelines") pipelinesPage();
else if (/^\/pipeline\/[^/]+$/.test(location.pathname)) pipelinePage(decodeURIComponent(location.pathname.slice(10)));
else if (/^\/project\/[^/]+$/.test(location.pathname)) projectPage(decodeURIComponent(location.pathname.slice(9)));
else listPage();
