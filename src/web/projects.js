// A project's page (/project/{name}): its trends (duration and success rate, SVG rendered by the
// server: GET /trends/{project}/*.svg) and its last builds linking to their pages. Uses
// common.js and pipelines.js (scrollBox, when).
"use strict";

// The server's SVG, put in the page (so that it follows the page's colour scheme); "" when the
// server refused.
async function inlineSvg(url, box) {
  try {
    const r = await fetch(url);
    if (!r.ok) { box.replaceChildren(el("p", { class: "err" }, (await r.text()) || "HTTP " + r.status)); return; }
    const doc = new DOMParser().parseFromString(await r.text(), "image/svg+xml");
    const root = doc.documentElement;
    if (root.nodeName !== "svg") { box.replaceChildren(el("p", { class: "err" }, "The chart did not load.")); return; }
    box.replaceChildren(document.importNode(root, true));
  } catch (e) { box.replaceChildren(el("p", { class: "err" }, "Cannot reach the server.")); }
}

async function projectPage(name) {
  const base = encodeURIComponent(name);
  document.title = name + " · Projects · mistry";
  const durations = el("figure", { class: "trend-box", id: "trend-duration-box" });
  const rates = el("figure", { class: "trend-box", id: "trend-success-box" });
  const body = el("tbody", { id: "project-builds" });
  app.replaceChildren(
    el("h1", {}, "Project ", name),
    el("p", {}, el("a", { href: "/?project=" + base, id: "project-jobs-link" }, "All jobs of " + name)),
    el("h2", {}, "Trends"), el("div", { class: "trends" }, durations, rates),
    el("h2", {}, "Last builds"),
    scrollBox(el("table", { id: "project-builds-table" }, el("thead", {}, el("tr", {},
      ...["ID", "State", "Group", "Started", "Duration"].map((h) => el("th", { scope: "col" }, h)))), body), "Last builds of " + name));
  const chart = (url, box, caption) => {
    const holder = el("div");
    box.replaceChildren(el("figcaption", {}, caption), holder);
    inlineSvg(url, holder);
  };
  chart("/trends/" + base + "/duration.svg", durations, "Duration of each of the last builds (failures hatched)");
  chart("/trends/" + base + "/success.svg", rates, "Success rate per 5 builds");
  let builds;
  try {
    const r = await fetch("/api/project/" + base + "/builds?limit=20");
    if (!r.ok) { body.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "err" }, await r.text()))); return; }
    builds = await r.json();
  } catch (e) { statusEl.textContent = "server unreachable"; return; }
  body.replaceChildren(...builds.map((j) => el("tr", { "data-id": j.id },
    el("td", { class: "id" }, el("a", { href: "/job/" + base + "/" + encodeURIComponent(j.id) }, j.id.slice(0, 12))),
    el("td", {}, stateBadge(jobState(j))),
    el("td", {}, j.buildInfo.Group),
    el("td", {}, when(j.buildInfo.StartedAt)),
    el("td", {}, duration(j.buildInfo.Duration)))));
  if (!builds.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No builds yet.")));
}
