// GenCLIP Inspect live page: plain JavaScript, no build step, nothing fetched from outside.
// Reads /api/session, /api/state, then server-sent events (/api/events); each tile shows its camera's MJPEG
// stream (/stream/<camera>.mjpg); operator actions POST JSON and show the agent's answer.
"use strict";

const MAX_STREAMS = 4; // browsers hold ~6 connections per server: the rest of the tiles refresh snapshots
const SNAPSHOT_MS = 1000;
const $ = (selector, root = document) => root.querySelector(selector);
const page = { session: null, state: null, opacity: 40, tiles: new Map(), ng: [], ngMax: 12, events: null, current: null };

function fmt(value, digits = 3) {
  return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "–";
}

function notice(text, isError = true) {
  const el = $("#notice");
  el.textContent = text;
  el.style.color = isError ? "" : "var(--ok)";
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  let answer = {};
  try { answer = await response.json(); } catch (e) { answer = { error: response.statusText }; }
  return { status: response.status, ok: response.ok, answer };
}

// --- session and login --------------------------------------------------------------------------------
async function loadSession() {
  page.session = await (await fetch("/api/session", { credentials: "same-origin" })).json();
  const s = page.session;
  $("#who").textContent = s.user ? `logged in: ${s.user}` : "not logged in";
  $("#login").hidden = !!s.user || !(s.login.token || s.login.password);
  $("#login-token").hidden = !s.login.token;
  $("#login-user").hidden = !s.login.password;
  $("#login-password").hidden = !s.login.password;
  $("#logout").hidden = !s.user;
  document.body.classList.toggle("operator", !!s.user);
  if (s.can_view && !page.events) start();
  if (!s.can_view) notice("log in to watch this line");
}

$("#login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("#login-token").value;
  const body = token ? { token } : { username: $("#login-user").value, password: $("#login-password").value };
  const { ok, answer } = await post("/api/login", body);
  if (!ok) { notice(`login refused: ${answer.error}`); return; }
  $("#login-token").value = $("#login-password").value = "";
  notice(`logged in as ${answer.user}`, false);
  await loadSession();
});

$("#logout").addEventListener("click", async () => {
  await post("/api/logout", {});
  notice("logged out", false);
  await loadSession();
});

// --- state and events ---------------------------------------------------------------------------------
async function start() {
  const response = await fetch("/api/state", { credentials: "same-origin" });
  if (!response.ok) { notice("log in to watch this line"); return; }
  const state = await response.json();
  renderState(state);
  state.latest.forEach(showPart);
  state.ng_parts.slice().reverse().forEach(addNg);
  const events = new EventSource("/api/events");
  page.events = events;
  events.addEventListener("open", () => setBadge($("#events-state"), "events: live", "up"));
  events.addEventListener("error", () => setBadge($("#events-state"), "events: reconnecting", "down"));
  events.addEventListener("state", (e) => renderState(JSON.parse(e.data)));
  events.addEventListener("part", (e) => {
    const part = JSON.parse(e.data);
    showPart(part);
    if (part.verdict === "NG" && part.picture) addNg(part);
  });
}

function setBadge(el, text, kind) {
  if (el.dataset.base === undefined) el.dataset.base = [...el.classList].filter((c) => c !== "badge").join(" ");
  el.textContent = text;
  el.className = `${el.dataset.base} badge ${kind || ""}`;
}

function renderState(state) {
  page.state = state;
  $("#line-name").textContent = `${state.line.name} (${state.line.id})`;
  const status = state.status || { state: "starting", reasons: [] };
  setBadge($("#line-state"), status.state, status.state);
  $("#reasons").replaceChildren(...status.reasons.map((r) => Object.assign(document.createElement("li"), { textContent: r })));
  $("#brokers").replaceChildren(...state.brokers.map((b) => {
    const el = document.createElement("span");
    el.id = `broker-${b.sink}`;
    setBadge(el, `${b.sink}: ${b.up ? "up" : "down"}`, b.up ? "up" : "down");
    el.title = b.detail;
    return el;
  }));
  const m = state.model || {};
  $("#model").textContent = `prompts ${m.prompt_version || "?"} · ${m.backbone || "?"} on ${m.device || "?"}`;
  $("#model").dataset.promptVersion = m.prompt_version || "";
  state.cameras.forEach((camera, index) => renderCamera(camera, index));
  renderClasses(state.classes, state.class_errors);
}

function tileFor(camera, index) {
  let tile = page.tiles.get(camera.id);
  if (tile) return tile;
  tile = $("#tile-template").content.firstElementChild.cloneNode(true);
  tile.dataset.camera = camera.id;
  $(".cam", tile).textContent = camera.id;
  $(".live", tile).dataset.mode = index < MAX_STREAMS ? "stream" : "snapshot";
  $(".pause", tile).addEventListener("click", () => cameraAction(camera.id, "pause"));
  $(".resume", tile).addEventListener("click", () => cameraAction(camera.id, "resume"));
  $("#tiles").append(tile);
  page.tiles.set(camera.id, tile);
  connectImage(tile);
  return tile;
}

function connectImage(tile) {
  const img = $(".live", tile);
  const camera = encodeURIComponent(tile.dataset.camera);
  if (img.dataset.mode === "stream") {
    img.src = `/stream/${camera}.mjpg?overlay=${page.opacity}`;
  } else {
    clearInterval(img._timer);
    const refresh = () => { img.src = `/snapshot/${camera}.jpg?overlay=${page.opacity}&t=${Date.now()}`; };
    refresh();
    img._timer = setInterval(refresh, SNAPSHOT_MS);
  }
}

function renderCamera(camera, index) {
  const tile = tileFor(camera, index);
  $(".cls", tile).textContent = camera.product_class;
  setBadge($(".cam-state", tile), camera.state, camera.state);
  $(".cam-state", tile).title = camera.detail || "";
  $(".paused", tile).hidden = !camera.paused;
  const c = camera.counters;
  $(".count-parts", tile).textContent = c.parts;
  for (const verdict of ["OK", "NG", "ERROR"]) $(`.count-${verdict}`, tile).textContent = c[verdict];
  $(".count-missed", tile).textContent = c.missed_triggers == null ? "–" : c.missed_triggers;
  const drops = Object.entries(c.dropped).map(([reason, n]) => `${reason} ${n}`).join(", ");
  $(".drops", tile).textContent = drops ? `dropped: ${drops}` : "";
}

function showPart(part) {
  const tile = page.tiles.get(part.camera);
  if (!tile) return;
  const verdict = $(".verdict", tile);
  verdict.textContent = part.verdict;
  verdict.className = `verdict ${part.verdict}`;
  $(".score", tile).textContent = part.score == null ? (part.error || "") : `score ${fmt(part.score)}`;
  $(".part", tile).textContent = part.part_id;
  $(".threshold", tile).textContent = part.threshold == null ? "–" : `${fmt(part.threshold)} (${part.threshold_source})`;
  $(".latency", tile).textContent = `${fmt(part.latency_ms, 1)} ms`;
  $(".defects", tile).textContent = (part.defects || []).map((d) => `${d.type} ${fmt(d.score, 2)}`).join(", ") || "none";
  tile.dataset.lastPart = part.part_id;
}

// --- NG parts -----------------------------------------------------------------------------------------
function addNg(part) {
  if (page.ng.some((p) => p.n === part.n)) return;
  page.ng.unshift(part);
  const figure = document.createElement("figure");
  figure.className = "ng-part";
  figure.dataset.n = part.n;
  const img = document.createElement("img");
  img.src = `/api/parts/${part.n}/thumb.jpg`;
  img.alt = `NG part ${part.part_id}`;
  img.addEventListener("error", () => figure.remove()); // no longer kept by the agent
  const caption = document.createElement("figcaption");
  caption.textContent = `${part.camera} · ${part.part_id} · ${fmt(part.score)}`;
  figure.append(img, caption);
  figure.addEventListener("click", () => openPart(part));
  $("#ng").prepend(figure);
  while (page.ng.length > page.ngMax) {
    const old = page.ng.pop();
    const el = $(`#ng figure[data-n="${old.n}"]`);
    if (el) el.remove();
  }
}

function openPart(part) {
  page.current = part;
  $("#part-title").textContent = `${part.verdict} · ${part.camera} · ${part.part_id}`;
  $("#part-frame").src = `/api/parts/${part.n}/frame.jpg`;
  $("#part-map").src = `/api/parts/${part.n}/map.jpg`;
  $("#part-map").style.opacity = $("#part-opacity").value / 100;
  const [width, height] = part.frame_size || [1, 1];
  const svg = $("#part-boxes");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren(...(part.defects || []).flatMap((d) => {
    const [x, y, w, h] = d.bbox;
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    Object.entries({ x, y, width: w, height: h }).forEach(([k, v]) => rect.setAttribute(k, v));
    const text = document.createElementNS("http://www.w3.org/2000/svg", "text");
    text.setAttribute("x", x);
    text.setAttribute("y", Math.max(12, y - 3));
    text.textContent = `${d.type} ${fmt(d.score, 2)}`;
    return [rect, text];
  }));
  const facts = {
    score: fmt(part.score), threshold: `${fmt(part.threshold)} (${part.threshold_source})`,
    class: part.product_class, "prompt version": part.prompt_version, captured: part.captured_at,
    latency: `${fmt(part.latency_ms, 1)} ms`, "map key": part.map_key || "–",
  };
  $("#part-facts").replaceChildren(...Object.entries(facts).flatMap(([k, v]) => [
    Object.assign(document.createElement("dt"), { textContent: k }),
    Object.assign(document.createElement("dd"), { textContent: v }),
  ]));
  $("#mark-result").textContent = "";
  $("#part").showModal();
}

$("#part-opacity").addEventListener("input", (e) => { $("#part-map").style.opacity = e.target.value / 100; });
for (const label of ["good", "defect"]) {
  $(`#mark-${label}`).addEventListener("click", async () => {
    const part = page.current;
    const { ok, answer } = await post(`/api/parts/${part.n}/review`, { label });
    $("#mark-result").textContent = ok
      ? `recorded as ${label} (${answer.entry})${answer.memory ? "; " + answer.memory : ""}`
      : `refused: ${answer.error}`;
  });
}

// --- classes and thresholds ---------------------------------------------------------------------------
function calibrationText(c) {
  if (!c) return "not calibrated here: no good-part figures (threshold from config, a command or the default)";
  const rate = c.false_reject_rate == null ? "?" : `${(100 * c.false_reject_rate).toFixed(1)} %`;
  return `${c.images} good images: min ${fmt(c.score_min)}, median ${fmt(c.score_median)}, p95 ${fmt(c.score_p95)}, ` +
    `max ${fmt(c.score_max)}; calibrated ${fmt(c.threshold)} (${c.rule}, quantile ${c.quantile}); ` +
    `expected false rejects ${rate} of good parts (prompts ${c.prompt_version})`;
}

function renderClasses(classes, errors) {
  const root = $("#classes");
  for (const cls of classes) {
    let box = root.querySelector(`.class[data-class="${CSS.escape(cls.name)}"]`);
    if (!box) {
      box = document.createElement("div");
      box.className = "class";
      box.dataset.class = cls.name;
      box.innerHTML = `<h2></h2><div class="word"></div><div>threshold <b class="value"></b> <span class="source"></span></div>
        <div class="calibration"></div>
        <div class="actions"><input type="number" min="0" max="1" step="0.001" class="new-threshold">
        <button class="set-threshold">Set threshold</button></div>`;
      $(".set-threshold", box).addEventListener("click", () => setThreshold(cls.name, $(".new-threshold", box).value));
      root.append(box);
    }
    $("h2", box).textContent = cls.name;
    $(".word", box).textContent = `class word "${cls.class_word}" (${cls.class_word_source})`;
    $(".value", box).textContent = fmt(cls.threshold, 4);
    $(".source", box).textContent = `from ${cls.threshold_source}`;
    $(".calibration", box).textContent = calibrationText(cls.calibration) + (cls.stale_reason ? ` · stale: ${cls.stale_reason}` : "");
  }
  for (const [name, why] of Object.entries(errors || {})) notice(`class ${name}: ${why}`);
}

async function setThreshold(name, value) {
  const number = Number(value);
  if (value === "" || !isFinite(number)) { notice("enter a threshold from 0 to 1"); return; }
  const { ok, status, answer } = await post(`/api/classes/${encodeURIComponent(name)}/threshold`, { value: number });
  if (ok) notice(`threshold of ${answer.product_class} set to ${answer.threshold} by ${answer.user}`, false);
  else notice(status === 401 ? `refused: ${answer.error}: log in first` : `refused: ${answer.error}`);
}

async function cameraAction(camera, action) {
  const { ok, status, answer } = await post(`/api/cameras/${encodeURIComponent(camera)}/${action}`, {});
  if (ok) notice(`${action}: ${answer.cameras.join(", ")} (by ${answer.user})`, false);
  else notice(status === 401 ? `refused: ${answer.error}: log in first` : `refused: ${answer.error}`);
}

// --- heat-map opacity of the live tiles -----------------------------------------------------------------
let opacityTimer = null;
$("#opacity").addEventListener("input", (e) => {
  page.opacity = Number(e.target.value);
  $("#opacity-value").textContent = `${page.opacity} %`;
  clearTimeout(opacityTimer);
  opacityTimer = setTimeout(() => page.tiles.forEach(connectImage), 300); // a new stream at the new opacity
});

loadSession().catch((err) => notice(`the agent does not answer: ${err}`));
