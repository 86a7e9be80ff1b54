// The aggregator's live page: history once from the JSON API, then server-sent events (/events).
// No framework, no build step, nothing fetched from outside this aggregator.
"use strict";

const MAX_ROWS = 20;        // results in the table
const TRAIL = 5;            // windows of estimates drawn on the map, the latest darkest
const DETECTION_SCORE = 0.5;
const view = { site: null, nodes: [], results: [] };

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function el(tag, attrs = {}, text = "") {
  const node = tag.startsWith("svg:")
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== "") node.textContent = text;
  return node;
}

function softmax(logits) {
  const top = Math.max(...logits);
  const e = logits.map((v) => Math.exp(v - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

function className(index) {
  const names = view.site.class_names;
  return names && names[index] !== undefined ? names[index] : String(index);
}

// What a result says, as [{x, y, label}] points for the map and one line of text.
function estimates(result) {
  const out = result.outputs || {};
  const points = [];
  if (out.position) points.push({ x: out.position[0], y: out.position[1], label: result.class || "" });
  if (out.hypocentre) {
    const [x, y, z] = out.hypocentre;
    points.push({ x, y, label: `depth ${distance(z)}`, quake: true });
  }
  if (out.detection_logits && out.detection_positions) {
    out.detection_logits.forEach((logits, q) => {
      const p = softmax(logits);
      const real = p.slice(0, -1);
      const best = real.indexOf(Math.max(...real));
      if (real[best] >= DETECTION_SCORE) {
        const [x, y] = out.detection_positions[q];
        points.push({ x, y, label: `${className(best)} ${(real[best] * 100).toFixed(0)}%` });
      }
    });
  }
  return points;
}

function distance(metres) {
  return Math.abs(metres) >= 10000 ? `${(metres / 1000).toFixed(1)} km` : `${metres.toFixed(1)} m`;
}

function describe(result) {
  const points = estimates(result);
  const out = result.outputs || {};
  if (out.detection_logits) return points.length ? points.map((p) => `${p.label} at (${distance(p.x)}, ${distance(p.y)})`).join("; ") : "no vehicle";
  if (out.hypocentre) return `hypocentre (${distance(out.hypocentre[0])}, ${distance(out.hypocentre[1])}), ${distance(out.hypocentre[2])} deep`;
  const parts = [];
  if (result.class) parts.push(result.class);
  if (out.position) parts.push(`at (${distance(out.position[0])}, ${distance(out.position[1])})`);
  return parts.join(" ") || Object.keys(out).join(", ");
}

function bounds() {
  const xs = [], ys = [];
  const add = (p) => { if (p && p.length >= 2) { xs.push(p[0]); ys.push(p[1]); } };
  view.site.layout.forEach((n) => add(n.position));
  view.nodes.forEach((n) => add(n.position));
  view.results.slice(-TRAIL).forEach((r) => estimates(r).forEach((p) => add([p.x, p.y])));
  const minX = Math.min(...xs), maxX = Math.max(...xs), minY = Math.min(...ys), maxY = Math.max(...ys);
  const pad = 0.08 * Math.max(maxX - minX, maxY - minY, 1);
  return { minX: minX - pad, maxY: maxY + pad, w: maxX - minX + 2 * pad, h: maxY - minY + 2 * pad };
}

function drawMap() {
  const svg = document.getElementById("map");
  if (!view.site) return;
  const b = bounds();
  const scale = 100 / Math.max(b.w, b.h);  // metres -> viewBox units, north up
  const px = (x) => (x - b.minX) * scale, py = (y) => (b.maxY - y) * scale;
  svg.setAttribute("viewBox", `0 0 ${(b.w * scale).toFixed(2)} ${(b.h * scale).toFixed(2)}`);
  svg.replaceChildren();
  const trail = view.results.slice(-TRAIL);
  trail.forEach((result, i) => {
    const opacity = (i + 1) / trail.length;
    for (const p of estimates(result)) {
      const g = el("svg:g", { class: "estimate", "data-window": result.window_start_ns, opacity: opacity.toFixed(2) });
      const cx = px(p.x), cy = py(p.y);
      g.append(p.quake ? el("svg:path", { d: `M${cx - 2} ${cy - 2}L${cx + 2} ${cy + 2}M${cx - 2} ${cy + 2}L${cx + 2} ${cy - 2}` })
                       : el("svg:circle", { cx, cy, r: 1.8 }));
      if (i === trail.length - 1) g.append(el("svg:text", { x: cx + 2.4, y: cy + 0.8 }, p.label));
      svg.append(g);
    }
  });
  for (const node of view.nodes) {
    if (!node.position) continue;
    const g = el("svg:g", { class: "node", "data-node": node.id, "data-state": node.state });
    g.append(el("svg:circle", { cx: px(node.position[0]), cy: py(node.position[1]), r: 1.6, class: node.state }));
    g.append(el("svg:text", { x: px(node.position[0]) + 2, y: py(node.position[1]) - 1.6 }, node.id));
    svg.append(g);
  }
}

function when(ns) {
  return ns ? new Date(Number(ns) / 1e6).toISOString().replace("T", " ").slice(0, 19) : "";
}

function drawResults() {
  const body = document.querySelector("#results tbody");
  body.replaceChildren(...view.results.slice(-MAX_ROWS).reverse().map((r) => {
    const tr = el("tr", { "data-window": r.window_start_ns });
    const e2e = r.latency_ms && r.latency_ms.end_to_end;
    tr.append(el("td", {}, when(r.window_start_ns)), el("td", { class: "num" }, `${r.nodes_present}/${r.nodes.length}`),
              el("td", {}, describe(r)), el("td", {}, r.closed_by || ""),
              el("td", { class: "num" }, e2e == null ? "" : `${Math.round(e2e)} ms`));
    return tr;
  }));
}

function drawNodes() {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren(...view.nodes.map((n) => {
    const tr = el("tr", { "data-node": n.id, "data-state": n.state });
    const state = el("span", { class: `state ${n.state}`, title: n.why || "" }, n.state);
    const cell = el("td");
    cell.append(state);
    tr.append(el("td", {}, n.id), cell, el("td", { class: "num" }, n.messages_per_s.toFixed(1)),
              el("td", { class: "num" }, n.kb_per_s.toFixed(1)), el("td", {}, when(n.last_message_ns)));
    return tr;
  }));
}

function drawSummary(summary) {
  const dl = document.getElementById("summary");
  const pct = (v) => (v == null ? "–" : `${(v * 100).toFixed(1)} %`);
  const ms = (v) => (v == null ? "–" : `${Math.round(v)} ms`);
  const rows = [["windows", summary.windows], ["complete", pct(summary.complete_share)],
                ["latency p50 / p95", `${ms(summary.latency_ms.p50)} / ${ms(summary.latency_ms.p95)}`],
                ["messages/s", summary.messages_per_s.toFixed(1)], ["kB/s", summary.kb_per_s.toFixed(1)]];
  dl.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-key": k }, String(v))]));
  const reasons = Object.entries(summary.rejected || {}).filter(([, n]) => n > 0);
  drawHour(summary.minutes || []);
  document.getElementById("rejected").replaceChildren(
    ...(reasons.length ? reasons.map(([why, n]) => el("li", { "data-reason": why }, `${why}: ${n}`)) : [el("li", {}, "none")]));
}

function drawHour(minutes) {
  // x: minutes ago (60 on the left, now on the right); y: share complete, and median latency / the hour's max
  const svg = document.getElementById("hour");
  const top = Math.max(1, ...minutes.map((m) => m.latency_p50_ms || 0));
  const series = { complete: (m) => m.complete_share,
                   latency: (m) => (m.latency_p50_ms == null ? null : Math.max(0, m.latency_p50_ms) / top) };
  const parts = [];
  for (const [name, value] of Object.entries(series)) {
    const xy = minutes.filter((m) => value(m) != null)
      .map((m) => [(120 * (59 - m.minutes_ago) / 59).toFixed(1), (38 - 36 * value(m)).toFixed(1)]);
    // a one-minute series is a short tick, so the first minute already shows
    const points = xy.length === 1 ? [[xy[0][0] - 1, xy[0][1]], xy[0]] : xy;
    parts.push(el("svg:polyline", { class: name, points: points.map((p) => p.join(",")).join(" ") }));
  }
  svg.replaceChildren(...parts);
}

function addResult(result) {
  if (view.results.some((r) => r.window_start_ns === result.window_start_ns)) return;
  view.results.push(result);
  view.results.sort((a, b) => a.window_start_ns - b.window_start_ns);
  if (view.results.length > 200) view.results.splice(0, view.results.length - 200);
  drawResults();
  drawMap();
}

function connect() {
  const events = new EventSource("events");
  const live = document.getElementById("live");
  events.onopen = () => { document.body.dataset.live = "yes"; live.textContent = "live"; };
  events.onerror = () => { document.body.dataset.live = "no"; live.textContent = "reconnecting…"; };
  events.addEventListener("result", (e) => addResult(JSON.parse(e.data)));
  events.addEventListener("state", (e) => {
    const state = JSON.parse(e.data);
    view.nodes = state.nodes;
    drawNodes();
    drawMap();
    drawSummary(state.summary);
  });
}

async function main() {
  view.site = await getJSON("api/site");
  document.getElementById("site-title").textContent = `site ${view.site.site}`;
  document.getElementById("model").textContent = `model ${view.site.model} · ${view.site.window_s} s windows`;
  view.nodes = await getJSON("api/nodes");
  (await getJSON(`api/results?limit=${MAX_ROWS}`)).forEach((r) => view.results.push(r));
  drawNodes();
  drawResults();
  drawMap();
  drawSummary(await getJSON("api/summary"));
  connect();
}

main().catch((error) => { document.getElementById("live").textContent = `error: ${error.message}`; });
