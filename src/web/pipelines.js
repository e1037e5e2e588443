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

