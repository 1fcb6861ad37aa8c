// The cllmd dashboard: one live feed (/api/events, server-sent events read through fetch so the
// bearer token can travel in a header), canvas curves, an SVG ring of the 12 spheres, training
// controls, the queue and a chat panel streaming from /v1/chat/completions. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "cllm-http-token";
const state = {
  stats: {}, config: {}, controls: {}, models: [],
  loss: [], val: [], lr: [],
  lastTokens: {}, activity: {},
  chat: [], generating: null,
};

// ---------------------------------------------------------------------------- formatting

function num(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(2);
  return v.toFixed(digits).replace(/\.?0+$/, (m) => (m.startsWith(".") ? "" : m)) || "0";
}
function count(v) {
  if (v === null || v === undefined) return "–";
  for (const [d, s] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (Math.abs(v) >= d) return (v / d).toFixed(v / d >= 100 ? 0 : 1) + s;
  }
  return String(Math.round(v));
}
function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  if (s < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
function bytes(n) {
  if (n === null || n === undefined) return "";
  for (const [d, s] of [[1 << 30, "GiB"], [1 << 20, "MiB"], [1 << 10, "KiB"]]) if (n >= d) return (n / d).toFixed(1) + " " + s;
  return n + " B";
}
function clock(t) {
  const d = t ? new Date(t * 1000) : new Date();
  return d.toTimeString().slice(0, 8);
}

// ---------------------------------------------------------------------------- HTTP with the token

function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

let askingToken = null;
function askToken() {
  if (!askingToken) {
    askingToken = new Promise((resolve) => {
      const dlg = $("login");
      dlg.addEventListener("close", () => {
        localStorage.setItem(TOKEN_KEY, $("token").value.trim());
        askingToken = null;
        resolve();
      }, { once: true });
      dlg.showModal();
    });
  }
  return askingToken;
}

async function api(path, options = {}) {
  for (;;) {
    const headers = { ...(options.headers || {}) };
    if (token()) headers.Authorization = "Bearer " + token();
    if (options.json !== undefined) {
      headers["Content-Type"] = "application/json";
      options = { ...options, method: options.method || "POST", body: JSON.stringify(options.json) };
    }
    const resp = await fetch(path, { ...options, headers });
    if (resp.status !== 401) return resp;
    await askToken();
  }
}

async function apiJson(path, options) {
  const resp = await api(path, options);
  const body = await resp.json();
  if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
  return body;
}

// Server-sent events from a fetch response: yields {event, data}.
async function* sse(resp, signal) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message"; const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data.push(line.slice(6));
        }
        if (data.length) yield { event, data: data.join("\n") };
      }
    }
  } finally {
    if (signal === undefined || !signal.aborted) reader.cancel().catch(() => {});
  }
}

// ---------------------------------------------------------------------------- the live feed

function setLive(live, reason) {
  $("conn").classList.toggle("live", live);
  $("conn").title = live ? "live: following the daemon's events" : "not connected: " + (reason || "");
  if (!live) {
    const pill = $("state");
    pill.textContent = "unreachable";
    pill.className = "pill down";
  }
}

async function follow() {
  let wait = 500;
  for (;;) {
    try {
      const resp = await api("/api/events");
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      for await (const { event, data } of sse(resp)) {
        wait = 500;
        onEvent(event, JSON.parse(data));
      }
      setLive(false, "the gateway closed the feed");
    } catch (e) {
      setLive(false, e.message);
    }
    await new Promise((r) => setTimeout(r, wait));
    wait = Math.min(wait * 2, 8000);
  }
}

function onEvent(kind, p) {
  switch (kind) {
    case "hello":
      state.controls = p.controls || {};
      state.loss = (p.history && p.history.loss) || [];
      state.val = (p.history && p.history.val_loss) || [];
      state.lr = (p.history && p.history.lr) || [];
      if (p.down) { setLive(false, p.down); return; }
      setLive(true);
      state.config = p.config || {};
      fillConfig();
      setModels(p.models || []);
      applyStats(p.stats);
      showQueue(p.queue);
      break;
    case "stats": setLive(true); applyStats(p); break;
    case "down": setLive(false, p.reason); break;
    case "train":
      state.stats.train = { ...(state.stats.train || {}), ...p, spheres: mergeSpheres(p.spheres) };
      noteTrain(state.stats.train);
      render();
      break;
    case "queue":
      state.stats.queue = { ...(state.stats.queue || {}), ...(p.counts || {}), current: p.current };
      if (p.change) {
        const c = p.change;
        if (c.state === "done" || c.state === "failed") {
          addLog(p.time, c.state === "failed" ? "error" : "info", `${c.name} → ${c.state}${c.reason ? ": " + c.reason : ""}`);
        }
        refreshQueue();
      }
      renderQueueCounts();
      break;
    case "checkpoint":
      addLog(p.time, "info", `${p.kind || "checkpoint"} at step ${p.step} (${bytes(p.bytes)}, ${num(p.seconds, 2)} s)`);
      break;
    case "model":
      addLog(p.time, "info", `model ${p.active} is active (was ${p.previous})`);
      state.loss = []; state.val = []; state.lr = [];
      refreshModels();
      break;
    case "log": addLog(p.time, p.level, `${p.logger}: ${p.message}`); break;
    case "error": addLog(p.time, "error", `${p.source}: ${p.message}`); break;
  }
}

// train events come between steps, when every sphere is idle: keep the states the polls saw
function mergeSpheres(spheres) {
  const polled = {};
  for (const s of (state.stats.train && state.stats.train.spheres) || []) polled[s.id] = s;
  return (spheres || []).map((s) => ({ ...s, state: (polled[s.id] || s).state }));
}

function applyStats(stats) {
  if (!stats) return;
  state.stats = stats;
  noteTrain(stats.train || {});
  render();
}

function push(curve, step, value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return;
  if (curve.length && curve[curve.length - 1][0] >= step) return;
  curve.push([step, value]);
  if (curve.length > 4000) curve.splice(0, curve.length - 4000);
}

function noteTrain(t) {
  if (typeof t.step !== "number") return;
  push(state.loss, t.step, t.loss);
  if (typeof t.val_loss === "number" && (!state.val.length || state.val[state.val.length - 1][1] !== t.val_loss)) push(state.val, t.step, t.val_loss);
  push(state.lr, t.step, t.lr);
  for (const s of t.spheres || []) {
    const before = state.lastTokens[s.id];
    if (before !== undefined && s.tokens > before) state.activity[s.id] = performance.now();
    state.lastTokens[s.id] = s.tokens;
  }
}

// ---------------------------------------------------------------------------- drawing

function render() {
  const s = state.stats, t = s.train || {}, m = s.model || {};
  const pill = $("state");
  const label = { running: "training", stopping: "training", paused: "paused", idle: "idle" }[t.state] || t.state || "–";
  pill.textContent = label;
  pill.className = "pill " + label;
  $("pause").textContent = t.state === "paused" ? "Resume" : "Pause";
  $("h-step").textContent = count(t.step);
  $("h-tokens").textContent = count(t.tokens_seen);
  $("h-tps").textContent = count(t.tokens_per_second);
  $("h-params").textContent = count(m.parameters);
  $("t-loss").textContent = num(t.loss);
  $("t-val").textContent = num(t.val_loss);
  const ppl = t.perplexity ?? (typeof t.loss === "number" ? Math.exp(Math.min(t.loss, 700)) : null);
  $("t-ppl").textContent = num(ppl, 2);
  $("t-lr").textContent = num(t.lr);
  $("t-gn").textContent = num(t.grad_norm);
  $("t-eta").textContent = t.state === "running" ? duration(t.eta_s) : "–";
  drawCurves();
  drawRing(t);
  renderQueueCounts();
}

function drawChart(canvas, series, { yLabel = (v) => num(v), logY = false } = {}) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const css = getComputedStyle(document.documentElement);
  const pts = series.flatMap((s) => s.points);
  const pad = { l: 52, r: 10, t: 8, b: 20 };
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = css.getPropertyValue("--dim");
  if (!pts.length) {
    ctx.textAlign = "center";
    ctx.fillText("waiting for training steps…", w / 2, h / 2);
    return;
  }
  const f = logY ? (v) => Math.log10(Math.max(v, 1e-12)) : (v) => v;
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  let y0 = Math.min(...pts.map((p) => f(p[1]))), y1 = Math.max(...pts.map((p) => f(p[1])));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const span = y1 - y0, floor = y0;
  y0 -= span * 0.06; y1 += span * 0.06;
  if (!logY && floor >= 0) y0 = Math.max(y0, 0);   // losses and rates never go below zero
  const X = (x) => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
  const Y = (y) => pad.t + (1 - (f(y) - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  // grid and labels
  ctx.strokeStyle = css.getPropertyValue("--edge");
  ctx.lineWidth = 1;
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  const rows = h > 120 ? 4 : 2;
  for (let i = 0; i <= rows; i++) {
    const yv = y0 + (y1 - y0) * i / rows, py = pad.t + (1 - i / rows) * (h - pad.t - pad.b);
    ctx.beginPath(); ctx.moveTo(pad.l, py + 0.5); ctx.lineTo(w - pad.r, py + 0.5); ctx.stroke();
    ctx.fillText(yLabel(logY ? 10 ** yv : yv), pad.l - 6, py);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + (x1 - x0) * i / 4;
    ctx.fillText(count(Math.round(xv)), X(xv), h - pad.b + 5);
  }
  for (const s of series) {
    if (!s.points.length) continue;
    ctx.strokeStyle = css.getPropertyValue(s.color);
    ctx.fillStyle = ctx.strokeStyle;
    ctx.lineWidth = s.width || 1.6;
    ctx.lineJoin = "round";
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.dots) for (const [x, y] of s.points) { ctx.beginPath(); ctx.arc(X(x), Y(y), 2.6, 0, 7); ctx.fill(); }
  }
}

function drawCurves() {
  const loss = $("loss-chart");
  loss.dataset.points = String(state.loss.length);
  drawChart(loss, [
    { points: state.loss, color: "--loss", width: 1.8 },
    { points: state.val, color: "--val", width: 2, dots: true },
  ]);
  drawChart($("lr-chart"), [{ points: state.lr, color: "--lr", width: 1.6 }], { yLabel: (v) => v.toExponential(1) });
}

const NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, parent) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

const RING_R = 112, SPHERE_R = 21, BUSY_R = 27;
let ringBuilt = false;
function buildRing() {
  const root = $("ring");
  svg("circle", { class: "orbit", r: RING_R }, root);
  for (let i = 0; i < 12; i++) {
    const a = (i / 12) * 2 * Math.PI - Math.PI / 2, x = Math.cos(a) * RING_R, y = Math.sin(a) * RING_R;
    svg("line", { class: "spoke", x1: Math.cos(a) * 44, y1: Math.sin(a) * 44, x2: Math.cos(a) * (RING_R - BUSY_R), y2: Math.sin(a) * (RING_R - BUSY_R) }, root);
    const g = svg("g", { id: "sphere-" + (i + 1), transform: `translate(${x.toFixed(1)} ${y.toFixed(1)})` }, root);
    svg("circle", { class: "track", r: BUSY_R }, g);
    const c = 2 * Math.PI * BUSY_R;
    svg("circle", { class: "busy", r: BUSY_R, transform: "rotate(-90)", "stroke-dasharray": `0 ${c}` }, g);
    svg("circle", { class: "sphere idle", r: SPHERE_R }, g);
    svg("text", { y: -4 }, g).textContent = String(i + 1);
    svg("text", { class: "sub", y: 9 }, g).textContent = "";
    const title = svg("title", {}, g);
    title.textContent = "sphere " + (i + 1);
  }
  svg("circle", { class: "core", r: 40, id: "core" }, root);
  svg("text", { class: "core-label", y: -7 }, root).textContent = "node 0";
  svg("text", { class: "sub", y: 10, id: "core-sub" }, root).textContent = "";
  // the brand mark: the same ring, small
  const dots = $("brand-dots");
  for (let i = 0; i < 12; i++) {
    const a = (i / 12) * 2 * Math.PI;
    svg("circle", { cx: 12 + Math.cos(a) * 8.5, cy: 12 + Math.sin(a) * 8.5, r: 1.6 }, dots);
  }
  ringBuilt = true;
}

function drawRing(t) {
  if (!ringBuilt) buildRing();
  const spheres = t.spheres || [];
  const now = performance.now();
  const c = 2 * Math.PI * BUSY_R;
  let working = 0;
  for (const s of spheres) {
    const g = $("sphere-" + s.id);
    if (!g) continue;
    const recent = now - (state.activity[s.id] || 0) < 1500;
    const st = s.state === "idle" && recent && t.state === "running" ? "working" : s.state;
    if (st === "working") working++;
    const [, busy, ball, label, sub, title] = g.children;
    ball.setAttribute("class", "sphere " + (["working", "waiting", "idle", "stopped"].includes(st) ? st : "idle"));
    const frac = s.busy_s + s.idle_s > 0 ? s.busy_s / (s.busy_s + s.idle_s) : 0;
    busy.setAttribute("stroke-dasharray", `${(frac * c).toFixed(1)} ${c.toFixed(1)}`);
    sub.textContent = count(s.tokens);
    title.textContent = `sphere ${s.id}: ${s.state}; ${count(s.batches)} micro-batches, ${count(s.tokens)} tokens, ` +
      `mean loss ${num(s.mean_loss)}, busy ${num(s.busy_s, 1)} s, idle ${num(s.idle_s, 1)} s`;
  }
  $("core").setAttribute("class", "core" + (t.state === "running" ? " active" : ""));
  $("core-sub").textContent = t.threads ? `${t.threads} thread${t.threads > 1 ? "s" : ""}` : "";
  $("ring").dataset.working = String(working);
}

// ---------------------------------------------------------------------------- queue and log

function renderQueueCounts() {
  const q = state.stats.queue || {};
  for (const k of ["incoming", "processing", "done", "failed"]) $("q-" + k).textContent = q[k] ?? "–";
  $("q-current").textContent = q.current ? "now: " + q.current : "";
}

function showQueue(listing) {
  if (!listing) return;
  const ul = $("files");
  ul.replaceChildren();
  for (const f of listing.files || []) {
    const li = document.createElement("li");
    const name = document.createElement("span"); name.className = "name"; name.textContent = f.name;
    if (f.reason) name.title = f.reason.reason;
    const size = document.createElement("span"); size.className = "size"; size.textContent = bytes(f.bytes);
    const badge = document.createElement("span"); badge.className = "badge " + f.state; badge.textContent = f.state;
    li.append(name, size, badge);
    ul.appendChild(li);
  }
  if (!ul.children.length) {
    const li = document.createElement("li"); li.textContent = "no files yet: drop some into the queue"; ul.appendChild(li);
  }
}

let queueTimer = null;
function refreshQueue() {
  if (queueTimer) return;
  queueTimer = setTimeout(async () => {
    queueTimer = null;
    try { showQueue(await apiJson("/api/queue")); } catch (e) { /* the feed says when it is down */ }
  }, 300);
}

function addLog(time, level, text) {
  const ul = $("log");
  const li = document.createElement("li");
  const t = document.createElement("time"); t.textContent = clock(time);
  const span = document.createElement("span"); span.className = level; span.textContent = text;
  li.append(t, span);
  ul.prepend(li);
  while (ul.children.length > 100) ul.lastChild.remove();
}

// ---------------------------------------------------------------------------- controls

function say(text, error = false) {
  const p = $("control-msg");
  p.textContent = text;
  p.className = "msg" + (error ? " error" : "");
}

async function train(action) {
  try {
    const t = await apiJson("/api/train", { json: { action } });
    state.stats.train = { ...(state.stats.train || {}), ...t, spheres: mergeSpheres(t.spheres) };
    render();
    say(`${action}: sent`);
  } catch (e) { say(e.message, true); }
}

function fillConfig() {
  const form = $("config");
  for (const [key, meta] of Object.entries(state.controls)) {
    const input = form.elements[key];
    if (!input) continue;
    if (state.config[key] !== undefined && document.activeElement !== input) input.value = state.config[key];
    if (meta.lo !== null) input.min = meta.lo;
    if (meta.hi !== null) input.max = meta.hi;
    input.title = meta.doc;
  }
}

async function applyConfig(ev) {
  ev.preventDefault();
  const changes = {};
  for (const [key, meta] of Object.entries(state.controls)) {
    const input = $("config").elements[key];
    if (!input || input.value === "") continue;
    const value = meta.kind === "int" ? parseInt(input.value, 10) : parseFloat(input.value);
    if (value !== state.config[key]) changes[key] = value;
  }
  if (!Object.keys(changes).length) { say("nothing changed"); return; }
  try {
    const r = await apiJson("/api/config", { json: changes });
    state.config = r.config;
    fillConfig();
    say(`applied ${Object.keys(changes).join(", ")} from step ${r.applies_at_step}`);
  } catch (e) { say(e.message, true); }
}

function setModels(models) {
  state.models = models;
  const sel = $("model");
  sel.replaceChildren();
  for (const m of models) {
    const o = document.createElement("option");
    o.value = m.name; o.textContent = m.name + (m.parameters ? ` (${count(m.parameters)})` : "");
    o.selected = !!m.active;
    sel.appendChild(o);
  }
  sel.disabled = models.length < 2 || state.switching;
}

async function refreshModels() {
  try { setModels((await apiJson("/api/models")).models); } catch (e) { /* the feed says when it is down */ }
}

async function useModel() {
  const name = $("model").value;
  state.switching = true;
  $("model").disabled = true;
  say(`switching to ${name}…`);
  try {
    await apiJson("/api/models/use", { json: { name } });
    say(`${name} is active`);
    state.chat = [];
    $("messages").replaceChildren();
  } catch (e) { say(e.message, true); }
  state.switching = false;
  refreshModels();
}

// ---------------------------------------------------------------------------- chat

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "bubble " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function sendChat(ev) {
  ev.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || state.generating) return;
  input.value = "";
  bubble("user", text);
  state.chat.push({ role: "user", content: text });
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.chat);
  const out = bubble("assistant streaming", "");
  out.dataset.chunks = "0";
  const abort = new AbortController();
  state.generating = abort;
  $("send").disabled = true; $("chat-stop").disabled = false;
  const t0 = performance.now();
  let first = null, pieces = 0, usage = null, reply = "";
  try {
    const resp = await api("/v1/chat/completions", {
      json: { model: $("model").value, messages, stream: true, max_tokens: 200, stream_options: { include_usage: true } },
      signal: abort.signal,
    });
    if (!resp.ok) {
      const body = await resp.json();
      throw new Error((body.error && body.error.message) || resp.statusText);
    }
    for await (const { data } of sse(resp, abort.signal)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (piece) {
        if (first === null) first = performance.now();
        pieces++;
        reply += piece;
        out.textContent = reply;
        out.dataset.chunks = String(pieces);
        $("messages").scrollTop = $("messages").scrollHeight;
        showChatStats(pieces, first, t0);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { out.classList.add("error"); out.textContent = reply || e.message; }
  } finally {
    out.classList.remove("streaming");
    state.generating = null;
    $("send").disabled = false; $("chat-stop").disabled = true;
  }
  if (usage) pieces = usage.completion_tokens;
  showChatStats(pieces, first, t0);
  if (reply) state.chat.push({ role: "assistant", content: reply.trim() });
}

function showChatStats(tokens, first, t0) {
  $("c-tokens").textContent = String(tokens);
  const secs = (performance.now() - (first ?? t0)) / 1000;
  $("c-tps").textContent = first !== null && secs > 0 && tokens > 1 ? ((tokens - 1) / secs).toFixed(1) : "–";
  $("c-ttft").textContent = first !== null ? ((first - t0) / 1000).toFixed(2) + " s" : "–";
}

// ---------------------------------------------------------------------------- start

window.addEventListener("DOMContentLoaded", () => {
  buildRing();
  $("pause").addEventListener("click", () => train((state.stats.train || {}).state === "paused" ? "resume" : "pause"));
  $("start").addEventListener("click", () => train("start"));
  $("stop").addEventListener("click", () => train("stop"));
  $("config").addEventListener("submit", applyConfig);
  $("chat-form").addEventListener("submit", sendChat);
  $("model").addEventListener("change", useModel);
  $("chat-stop").addEventListener("click", () => state.generating && state.generating.abort());
  window.addEventListener("resize", drawCurves);
  render();
  follow();
});

// for tests and curious people at the console
window.cllm = { state, lossPoints: () => state.loss.length };
