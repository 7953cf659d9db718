// The tickerd board: one WebSocket (/v1/stream, proto3 JSON), a row per symbol,
// redrawn at a steady frame rate (never per tick), resuming every symbol from its last
// seq after a reconnect, and saying so when ticks were missed. A symbol the server
// rejects (unknown, not entitled, a bad name) keeps its row, marked with the reason, so
// the user sees which one failed; it is asked for again after a reconnect (the
// server's symbols or the token may have changed) and a tick clears the mark.
"use strict";

const FRAME_MS = 100;          // redraw at most 10 times a second, however hot a symbol is
const SPARK_POINTS = 60;
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];
const MAX_NOTICES = 8;

const rows = new Map();        // symbol -> row state
let socket = null;
let authNeeded = false;
let token = sessionStorage.getItem("tickerd-token") || "";
let attempt = 0;
let retryTimer = null;

const $ = (sel) => document.querySelector(sel);

function setState(state, text) {
  const el = $("#state");
  el.dataset.state = state;
  el.textContent = text || state;
}

function notice(text) {
  const li = document.createElement("li");
  li.textContent = new Date().toLocaleTimeString() + "  " + text;
  const list = $("#notices");
  list.prepend(li);
  while (list.children.length > MAX_NOTICES) list.lastChild.remove();
}

function send(msg) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(msg));
}

function keepAddress() {
  const url = new URL(location.href);
  url.searchParams.set("symbols", [...rows.keys()].join(","));
  history.replaceState(null, "", url);
}

function subscribe(row) {
  const msg = { symbol: row.symbol, action: "ACTION_SUBSCRIBE" };
  if (row.seq > 0 && row.epoch) {
    msg.resumeFromSeq = String(row.seq);
    msg.epoch = row.epoch;
    row.resuming = true;
  }
  send(msg);
}

function addSymbol(symbol) {
  symbol = symbol.trim().toUpperCase();
  if (!symbol || rows.has(symbol)) return;
  const tr = document.createElement("tr");
  tr.dataset.symbol = symbol;
  for (const cls of ["sym", "last", "chg", "pct", "high", "low", "rate", "latency", "lagged", "seq", "trend", "act"]) {
    const td = document.createElement("td");
    td.className = cls;
    tr.append(td);
  }
  tr.querySelector(".sym").textContent = symbol;
  const canvas = document.createElement("canvas");
  canvas.width = 120; canvas.height = 24;
  tr.querySelector(".trend").append(canvas);
  const remove = document.createElement("button");
  remove.className = "remove";
  remove.textContent = "✕";
  remove.title = "remove " + symbol;
  remove.addEventListener("click", () => removeSymbol(symbol));
  tr.querySelector(".act").append(remove);
  $("#board tbody").append(tr);
  const row = { symbol, tr, canvas, last: null, open: null, high: null, low: null, seq: 0,
    epoch: null, lagged: 0, latencyMs: null, times: [], spark: [], dirty: true, resuming: false,
    rejected: null };
  rows.set(symbol, row);
  keepAddress();
  subscribe(row);
}

function removeSymbol(symbol) {
  const row = rows.get(symbol);
  if (!row) return;
  // A rejected symbol has no subscription to end (and a bad name would be rejected again).
  if (row.rejected === null) send({ symbol, action: "ACTION_UNSUBSCRIBE" });
  row.tr.remove();
  rows.delete(symbol);
  keepAddress();
}

function markRejected(row, detail) {
  row.rejected = detail;
  row.tr.classList.toggle("rejected", detail !== null);
  row.tr.title = detail === null ? "" : "rejected: " + detail;
  row.dirty = true;
}

function price(row, ltp, seq, epoch) {
  if (row.rejected !== null) markRejected(row, null);
  row.last = ltp;
  if (row.open === null) row.open = ltp;
  row.high = row.high === null ? ltp : Math.max(row.high, ltp);
  row.low = row.low === null ? ltp : Math.min(row.low, ltp);
  row.seq = seq;
  row.epoch = epoch;
  row.spark.push(ltp);
  if (row.spark.length > SPARK_POINTS) row.spark.shift();
  row.dirty = true;
}

function onMessage(event) {
  let msg;
  try { msg = JSON.parse(event.data); } catch { return; }
  const kind = msg.kind || "KIND_TICK";  // proto3 JSON omits the zero value
  const row = rows.get(msg.symbol);
  switch (kind) {
    case "KIND_TICK":
      if (!row) return;
      price(row, msg.ltp || 0, Number(msg.seq || 0), msg.epoch || row.epoch);
      row.times.push(performance.now());
      // Sub-millisecond wall clock; clock skew between hosts shows here too.
      row.latencyMs = Math.max(0, performance.timeOrigin + performance.now() - Number(msg.eventTimeUnixNanos || 0) / 1e6);
      attempt = 0;
      break;
    case "KIND_SNAPSHOT":
      if (row) price(row, msg.ltp || 0, Number(msg.seq || 0), msg.epoch || null);
      break;
    case "KIND_SUBSCRIBED":
      if (row && row.resuming && !msg.recovered) {
        notice(msg.symbol + ": ticks were missed while disconnected (the server's history did not cover the outage); showing the latest value");
      }
      if (row) {
        row.resuming = false;
        if (row.rejected !== null) markRejected(row, null);
      }
      setState("live");
      break;
    case "KIND_LAGGED":
      if (row) { row.lagged += Number(msg.dropped || 0); row.dirty = true; }
      notice(msg.symbol + ": " + (msg.dropped || 0) + " ticks missed (this page fell behind)");
      break;
    case "KIND_REJECTED":
      if (row) markRejected(row, msg.detail || "");
      notice((msg.symbol ? msg.symbol + ": " : "") + "rejected: " + (msg.detail || ""));
      break;
    case "KIND_STALE":
      setState("stale", "stale: server lost its market-data bus");
      break;
    case "KIND_LIVE":
      setState("live");
      break;
  }
}

function connect() {
  clearTimeout(retryTimer);
  setState(attempt ? "reconnecting" : "connecting");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(scheme + "//" + location.host + "/v1/stream");
  socket.addEventListener("open", () => {
    if (authNeeded) send({ token });
    for (const row of rows.values()) subscribe(row);
    setState("live");
  });
  socket.addEventListener("message", onMessage);
  socket.addEventListener("close", (event) => {
    socket = null;
    if (event.code === 4016) {
      setState("closed", "unauthenticated: " + (event.reason || "enter a token"));
      $("#token-form").hidden = false;
      return;  // wait for a token
    }
    const wait = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)] * (0.75 + Math.random() / 2);
    attempt += 1;
    setState("reconnecting", "reconnecting in " + (wait / 1000).toFixed(1) + " s" + (event.reason ? " (" + event.reason + ")" : ""));
    retryTimer = setTimeout(connect, wait);
  });
}

function fmt(x, digits) { return x === null ? "" : x.toFixed(digits); }

function draw(row, now) {
  while (row.times.length && now - row.times[0] > 1000) row.times.shift();
  const c = row.tr.children;
  const chg = row.last === null ? null : row.last - row.open;
  const cls = chg > 0 ? "up" : chg < 0 ? "down" : "";
  // A rejected row shows so where its price would be (the same width: the columns hold
  // still), rather than a last price that is no longer live.
  c[1].textContent = row.rejected === null ? fmt(row.last, 4) : "rejected";
  c[2].textContent = fmt(chg, 4); c[2].className = "chg " + cls;
  c[3].textContent = chg === null || !row.open ? "" : (100 * chg / row.open).toFixed(2) + "%";
  c[3].className = "pct " + cls;
  c[4].textContent = fmt(row.high, 4);
  c[5].textContent = fmt(row.low, 4);
  c[6].textContent = String(row.times.length);
  c[7].textContent = row.latencyMs === null ? "" : row.latencyMs.toFixed(1) + " ms";
  c[8].textContent = String(row.lagged);
  c[9].textContent = String(row.seq);
  const g = row.canvas.getContext("2d");
  g.clearRect(0, 0, row.canvas.width, row.canvas.height);
  if (row.spark.length > 1) {
    const lo = Math.min(...row.spark), hi = Math.max(...row.spark), span = hi - lo || 1;
    g.strokeStyle = cls === "down" ? "#f85149" : "#3fb950";
    g.beginPath();
    row.spark.forEach((p, i) => {
      const x = (i / (SPARK_POINTS - 1)) * row.canvas.width;
      const y = row.canvas.height - 2 - ((p - lo) / span) * (row.canvas.height - 4);
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
  }
  row.dirty = false;
}

let lastFrame = 0;
function frame(now) {
  if (now - lastFrame >= FRAME_MS) {
    lastFrame = now;
    // Rates decay even without ticks, so every row is looked at once a frame.
    for (const row of rows.values()) if (row.dirty || row.times.length) draw(row, now);
  }
  requestAnimationFrame(frame);
}

async function start() {
  $("#add-form").addEventListener("submit", (e) => {
    e.preventDefault();
    addSymbol($("#add-symbol").value);
    $("#add-symbol").value = "";
  });
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("#token").value.trim();
    sessionStorage.setItem("tickerd-token", token);
    $("#token-form").hidden = true;
    attempt = 0;
    connect();
  });
  try {
    const info = await (await fetch("/v1/info")).json();
    authNeeded = Boolean(info.auth);
  } catch { /* assume none; a 4016 close asks for a token */ }
  if (authNeeded && !token) $("#token-form").hidden = false;
  const wanted = new URL(location.href).searchParams.get("symbols") || "";
  for (const s of wanted.split(",")) addSymbol(s);
  requestAnimationFrame(frame);
  if (!authNeeded || token) connect();
  else setState("closed", "enter a token");
}

start();
