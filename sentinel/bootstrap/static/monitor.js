// Sentinel swarm monitor: polls /api/state and renders it. No framework, no build step.
//
// Every string shown here (peer ids, ban reasons) comes from DHT records written by untrusted
// peers, so the page builds DOM nodes and sets textContent only; it never assigns innerHTML.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const WORKER_STATES = ["ONLINE", "JOINING", "OFFLINE", "STALE", "BANNED"];
let lastOk = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmtLoss(v) { return v === null || v === undefined ? "\u2013" : Number(v).toFixed(4); }
function fmtInt(v) { return Number(v || 0).toLocaleString("en-US"); }
function fmtRate(v) {
  const n = Number(v || 0);
  return n.toLocaleString("en-US", { maximumFractionDigits: n >= 100 ? 0 : 1 });
}
function fmtPct(v) { return (100 * Number(v || 0)).toFixed(1) + "%"; }

function setKpi(id, text, value, bad) {
  const node = document.getElementById(id);
  node.textContent = text;
  node.dataset.value = value === null || value === undefined ? "" : String(value);
  node.classList.toggle("bad", Boolean(bad));
}

function stateLabel(state) {
  return el("span", { class: "state-text" }, el("span", { class: "dot state-" + state }), state);
}

function renderKpis(s) {
  const p = s.progress;
  const workers = s.stages.flatMap((st) => st.workers);
  const online = workers.filter((w) => w.state === "ONLINE").length;
  const liveVerifiers = s.verifiers.filter((v) => v.state === "ONLINE").length;
  setKpi("kpi-step", fmtInt(p.step), p.step);
  setKpi("kpi-train-loss", fmtLoss(p.latest_train_loss), p.latest_train_loss);
  setKpi("kpi-val-loss", fmtLoss(p.latest_val_loss), p.latest_val_loss);
  setKpi("kpi-tps", fmtRate(p.tokens_per_s), p.tokens_per_s);
  setKpi("kpi-workers", online + " / " + workers.length, online);
  setKpi("kpi-verifiers", liveVerifiers + " / " + s.verifiers.length, liveVerifiers);
  setKpi("kpi-bans", String(s.counts.bans), s.counts.bans, s.counts.bans > 0);
}

function renderLegend() {
  const legend = document.getElementById("legend");
  if (legend.childElementCount) return;
  for (const st of WORKER_STATES) {
    legend.append(el("span", { class: "key" }, el("span", { class: "dot state-" + st }), st.toLowerCase()));
  }
}

function renderGrid(s) {
  const grid = document.getElementById("grid");
  const rows = [];
  for (const st of s.stages) {
    const starved = st.online === 0;
    const label = el("div", { class: "stage-label" + (starved ? " starved" : "") },
      el("span", { class: "name" }, "Stage " + st.stage),
      el("span", { class: "sub" }, starved ? "no worker online" : st.online + " online"));
    const cells = el("div", { class: "cells" });
    for (const w of st.workers) {
      const age = w.state === "STALE" || w.state === "OFFLINE" ? " \u00b7 " + Math.round(w.age_s) + "s ago" : "";
      cells.append(el("div", {
        class: "worker-cell state-" + w.state, "data-peer": w.peer, "data-state": w.state,
        "data-stage": st.stage, title: w.peer + (w.reported_state ? " (announced " + w.reported_state + ")" : ""),
      },
      el("div", { class: "peer mono" }, "\u2026" + w.short),
      el("div", { class: "state" }, w.state),
      el("div", { class: "meta" }, "step " + fmtInt(w.step) + age)));
    }
    if (!st.workers.length) cells.append(el("div", { class: "empty-cell" }, "no replica"));
    rows.push(el("div", { class: "stage-row", "data-stage": st.stage }, label, cells));
  }
  grid.replaceChildren(...rows);
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(Number(v.toPrecision(10)));
  return out;
}

function renderChart(s) {
  const train = s.progress.train_loss || [];
  const val = s.progress.val_loss || [];
  const W = 520, H = 300, L = 48, R = 14, T = 12, B = 34;
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "loss curve",
    "data-train-points": train.length, "data-val-points": val.length,
  });
  const all = train.concat(val);
  const bans = (s.bans || []).filter((b) => b.effective);
  if (!all.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
      "waiting for the first loss value\u2026"));
    document.getElementById("loss-chart").replaceChildren(root);
    return;
  }
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  const pad = (y1 - y0) * 0.08 || Math.max(0.05, Math.abs(y0) * 0.05);
  y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);

  for (const t of niceTicks(y0, y1, 5)) {
    root.append(svg("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "gridline" }));
    root.append(svg("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, t.toFixed(2)));
  }
  for (const t of niceTicks(x0, x1, 6).filter((v) => Number.isInteger(v))) {
    root.append(svg("line", { x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 4, class: "axis" }));
    root.append(svg("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle", class: "tick" }, String(t)));
  }
  root.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  root.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  root.append(svg("text", { x: W - R, y: H - 4, "text-anchor": "end", class: "axis-title" }, "step"));

  let shown = 0;
  for (const b of bans.slice().sort((a, c) => a.step - c.step)) {  // when each ban took effect
    if (b.step < x0 || b.step > x1) continue;
    const x = sx(b.step);
    const nearRight = x > W - R - 90;  // keep the label inside the plot
    root.append(svg("line", { x1: x, x2: x, y1: T, y2: H - B, class: "ban-line" }));
    root.append(svg("text", { x: x + (nearRight ? -4 : 4), y: T + 10 + 12 * shown, class: "ban-label",
      "text-anchor": nearRight ? "end" : "start" }, "ban \u2026" + b.short));
    shown += 1;
  }
  const path = (pts) => pts.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
  if (train.length) {
    root.append(svg("path", { d: path(train), class: "train-line", "data-n": train.length,
      "data-last": train[train.length - 1][1] }));
  }
  if (val.length) {
    root.append(svg("path", { d: path(val), class: "val-line", "data-n": val.length,
      "data-last": val[val.length - 1][1] }));
    for (const p of val) {
      const c = svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3.5, class: "val-point", "data-step": p[0],
        "data-loss": p[1] });
      c.append(svg("title", {}, "step " + p[0] + ": val loss " + fmtLoss(p[1])));
      root.append(c);
    }
  }
  document.getElementById("loss-chart").replaceChildren(root);
}

function rateCell(b) {
  if (!b) return el("td", {}, "\u2013");
  const bar = el("div", { class: "bar" + (b.rate > 0.2 ? " hot" : b.rate > 0.05 ? " warn" : "") });
  bar.append(el("span", { style: "width:" + Math.min(100, Math.max(b.rate > 0 ? 2 : 0, 100 * b.rate)) + "%" }));
  return el("td", { "data-rate": b.rate, "data-flags": b.flags },
    el("div", { class: "rate" }, bar, el("span", { class: "pct" }, fmtPct(b.rate)),
      el("span", { class: "count" }, fmtInt(b.flags) + " flagged")));
}

function renderFlags(s) {
  const body = document.querySelector("#flags-table tbody");
  const by = {};
  for (const b of s.boundaries) by[b.stage + "/" + b.direction] = b;
  const rows = [];
  for (let st = 0; st < s.num_stages; st++) {
    rows.push(el("tr", { "data-stage": st }, el("td", {}, "Stage " + st),
      rateCell(by[st + "/forward"]), rateCell(by[st + "/backward"])));
  }
  body.replaceChildren(...rows);
}

function emptyRow(cols, text) {
  return el("tr", { class: "empty-row" }, el("td", { colspan: cols }, text));
}

function renderVerifiers(s) {
  const body = document.querySelector("#verifiers-table tbody");
  const rows = s.verifiers.map((v) => el("tr", { "data-peer": v.peer, "data-state": v.state },
    el("td", { class: "mono", title: v.peer }, "\u2026" + v.short),
    el("td", {}, stateLabel(v.state)),
    el("td", {}, v.in_committee ? el("span", { class: "badge member" }, "member") : el("span", { class: "muted" }, "\u2013")),
    el("td", { class: "num" }, fmtInt(v.step)),
    el("td", { class: "num" }, fmtRate(v.tokens_per_s)),
    el("td", { class: "num" }, fmtLoss(v.train_loss)),
    el("td", { class: "num" }, String(v.accusations))));
  body.replaceChildren(...(rows.length ? rows : [emptyRow(7, "no verifier has announced itself yet")]));
  const members = s.committee.map((c) => "\u2026" + c.short).join(", ");
  document.getElementById("committee-summary").textContent =
    s.committee.length ? "committee of " + s.committee.length + ": " + members : "no committee yet";
}

function evidenceText(e) {
  if (!e) return "\u2013";
  const parts = [];
  parts.push(e.flagged_messages + " flagged message" + (e.flagged_messages === 1 ? "" : "s"));
  if (e.steps && e.steps.length === 2) {
    parts.push(e.steps[0] === e.steps[1] ? "step " + e.steps[0] : "steps " + e.steps[0] + "\u2013" + e.steps[1]);
  }
  if (e.directions && e.directions.length) parts.push(e.directions.join("/"));
  if (e.worst_ratio && e.worst_ratio.length) {
    parts.push(e.worst_ratio.map((w) => w.distance + " " + Number(w.ratio).toFixed(1) + "\u00d7 fence").join(", "));
  }
  return parts.join(" \u00b7 ");
}

function renderBans(s) {
  const body = document.querySelector("#bans-table tbody");
  const committee = s.counts.committee;
  const rows = s.bans.map((b) => el("tr", { "data-peer": b.peer, "data-effective": b.effective },
    el("td", { class: "mono", title: b.peer }, "\u2026" + b.short),
    el("td", {}, b.effective ? el("span", { class: "badge banned" }, "BANNED")
      : el("span", { class: "badge pending" }, "accused")),
    el("td", { class: "num" }, b.stage >= 0 ? String(b.stage) : "\u2013"),
    el("td", { class: "num" }, String(b.step)),
    el("td", {}, b.votes.length + (committee ? " / " + committee : "") + " ",
      el("span", { class: "muted mono" }, b.votes.map((v) => "\u2026" + v.slice(-6)).join(" "))),
    el("td", {}, ...(b.reasons.length ? b.reasons.map((r) => el("span", { class: "chip" }, r)) : ["\u2013"])),
    el("td", {}, evidenceText(b.evidence))));
  body.replaceChildren(...(rows.length ? rows : [emptyRow(7, "no worker has been accused")]));
}

function render(s) {
  document.getElementById("run-id").textContent = s.run;
  renderKpis(s);
  renderLegend();
  renderGrid(s);
  renderChart(s);
  renderFlags(s);
  renderVerifiers(s);
  renderBans(s);
  const m = s.monitor || {};
  document.getElementById("footer-info").textContent =
    (m.bootstrap ? "bootstrap \u2026" + String(m.bootstrap).slice(-8) + " \u00b7 " : "") +
    (m.fingerprint ? "manifest " + String(m.fingerprint).slice(0, 12) + " \u00b7 " : "") +
    "refreshed every " + (m.interval_s || 2) + " s" + (m.error ? " \u00b7 last refresh failed: " + m.error : "");
  document.body.dataset.seq = String(s.seq);
  document.body.dataset.generatedAt = String(s.generated_at);
}

function setConnection(ok, generatedAt) {
  const pill = document.getElementById("conn-pill");
  const age = generatedAt ? Date.now() / 1000 - generatedAt : null;
  if (ok && age !== null && age < 30) {
    pill.className = "pill pill-live"; pill.textContent = "live";
  } else if (ok) {
    pill.className = "pill pill-wait"; pill.textContent = "state is old";
  } else {
    pill.className = "pill pill-down"; pill.textContent = "disconnected";
  }
  if (lastOk) {
    const d = new Date(lastOk);
    document.getElementById("updated").textContent = "updated " + d.toLocaleTimeString("en-GB");
  }
}

async function poll() {
  try {
    const resp = await fetch("/api/state", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const state = await resp.json();
    render(state);
    lastOk = Date.now();
    setConnection(true, state.generated_at);
  } catch (err) {
    setConnection(false, null);
    console.warn("monitor poll failed:", err);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
