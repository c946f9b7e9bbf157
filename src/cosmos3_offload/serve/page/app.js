// The page of `cosmos3-offload serve`: a request form (with an action panel where the model has action heads),
// a job's live progress, its video (and its predicted actions, plotted), and the history.
// A running job is followed through its Server-Sent Events: phase, step, time left and a live preview.
// Plain JS against the server's own API (/health, /v1/videos); no build step, nothing from elsewhere.
"use strict";

// Cosmos3's frame sizes: tier -> [aspect, width, height], as model/tiers.py registers them (a test compares).
const TIERS = {
  256: [["16,9", 320, 192], ["9,16", 192, 320], ["1,1", 256, 256], ["4,3", 320, 256], ["3,4", 256, 320]],
  480: [["16,9", 832, 480], ["9,16", 480, 832], ["1,1", 640, 640], ["4,3", 736, 544], ["3,4", 544, 736]],
  720: [["16,9", 1280, 720], ["9,16", 720, 1280], ["1,1", 960, 960], ["4,3", 1104, 832], ["3,4", 832, 1104]],
  768: [["16,9", 1360, 768], ["9,16", 768, 1360], ["1,1", 1024, 1024], ["4,3", 1184, 880], ["3,4", 880, 1184]],
};
const POLL_MS = 500;
const KEY_STORAGE = "cosmos3-api-key";
// What each mode makes, shown as the option's tooltip.
const MODE_TITLES = {
  forward_dynamics: "a video rolled out of the image and given actions (the actions file)",
  inverse_dynamics: "the actions that connect the frames of a clip",
  policy: "a video and its actions, rolled out of the image",
};
const ACTION_INPUTS = ["action-domain", "action-chunk", "action-view", "action-tier", "action-file", "action-clip"];
const SVG_NS = "http://www.w3.org/2000/svg";
const PLOT = { width: 640, height: 260, left: 56, right: 12, top: 12, bottom: 30 }; // the SVG's viewBox and margins
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const $ = (id) => document.getElementById(id);
let playerUrl = null;
let actionsUrl = null;
let shown = 0; // only the latest job asked for may fill the player and the plot
let historyRequests = 0; // only the latest history request may fill the table
let followed = null; // the job whose progress shows
let run = {}; // where the followed job's run stands, from its events
const preview = { url: null, loading: false, wanted: null }; // the live preview's blob URL and its next fetch
const cancelled = new Set(); // jobs the Cancel button deleted

// The key field is the one source of the key: filled from localStorage at start, saved there as it is typed.
function apiKey() {
  return $("api-key").value.trim();
}

// fetch with the key when one is set; a 401 reveals the key field. Returns the response.
async function call(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("Authorization", `Bearer ${apiKey()}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) $("key-row").hidden = false;
  return response;
}

// The JSON body of a response, or an Error carrying the server's OpenAI-shaped message.
async function json(response) {
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(response.status === 401 ? `${message} (enter the API key above)` : message);
  }
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function fillSizes(defaults) {
  const select = $("size");
  for (const [tier, sizes] of Object.entries(TIERS)) {
    const group = document.createElement("optgroup");
    group.label = `${tier}p`;
    for (const [aspect, width, height] of sizes) {
      const option = new Option(`${width}x${height} (${aspect.replace(",", ":")})`, `${width}x${height}`);
      option.selected = Number(tier) === defaults.resolution && aspect === defaults.aspect_ratio;
      group.append(option);
    }
    select.append(group);
  }
  $("frames").value = defaults.frames;
  $("steps").value = defaults.steps;
  $("guidance").value = defaults.guidance;
}

// The action panel from the server's choices (/health `actions`); it stays hidden for a model without heads.
function fillActions(choices) {
  if (!choices) return;
  for (const mode of choices.modes) {
    const option = new Option(mode.replace(/_/g, " "), mode);
    option.title = MODE_TITLES[mode] || "";
    $("action-mode").append(option);
  }
  for (const domain of choices.domains) $("action-domain").append(new Option(domain, domain));
  for (const view of choices.views) $("action-view").append(new Option(view.replace(/_/g, " "), view));
  for (const tier of choices.tiers) $("action-tier").append(new Option(`${tier}p`, tier, false, tier === choices.tier));
  $("action-chunk").placeholder = choices.chunk_size;
  $("action-mode").addEventListener("change", actionModeChanged);
  $("action-panel").hidden = false;
}

// With an action mode the chunk and the image fix the frames and the size: those fields step aside.
function actionModeChanged() {
  const acting = $("action-mode").value !== "";
  for (const id of ACTION_INPUTS) $(id).disabled = !acting;
  $("action-file").disabled = $("action-mode").value !== "forward_dynamics";
  for (const id of ["size", "frames"]) {
    $(id).disabled = acting;
    $(id).title = acting ? "an action run's chunk and image fix this" : "";
  }
}

function actionObject() {
  const action = { mode: $("action-mode").value, domain: $("action-domain").value, view: $("action-view").value };
  action.tier = Number($("action-tier").value);
  if ($("action-chunk").value !== "") action.chunk_size = Number($("action-chunk").value);
  return action;
}

function requestForm() {
  const form = new FormData();
  const acting = $("action-mode").value !== "";
  form.append("prompt", $("prompt").value);
  if ($("negative").value.trim()) form.append("negative_prompt", $("negative").value);
  if (!acting) form.append("size", $("size").value);
  for (const name of acting ? ["steps", "guidance", "seed"] : ["frames", "steps", "guidance", "seed"]) {
    if ($(name).value !== "") form.append(name, $(name).value);
  }
  if ($("image").files.length) form.append("input_reference", $("image").files[0]);
  if (acting) {
    form.append("action", JSON.stringify(actionObject()));
    if (!$("action-file").disabled && $("action-file").files.length) form.append("actions", $("action-file").files[0]);
    if ($("action-clip").files.length) form.append("input_video", $("action-clip").files[0]);
  }
  return form;
}

async function submit(event) {
  event.preventDefault();
  showError("");
  if (!$("prompt").value.trim()) {
    $("prompt").focus();
    return showError("Write a prompt first.");
  }
  $("submit").disabled = true;
  try {
    const job = await json(await call("/v1/videos", { method: "POST", body: requestForm() }));
    refreshHistory(); // the queued job shows at once
    await follow(job);
  } catch (error) {
    showError(error.message);
  } finally {
    $("submit").disabled = false;
    refreshHistory();
  }
}

// Follow the job until it ends, through its event stream (fetch: the key travels in a header, which an
// EventSource cannot send), or by polling where the stream cannot be read; then show its video, or why not.
async function follow(job) {
  $("job").hidden = false;
  $("player").pause();
  $("player").hidden = true;
  $("preview").hidden = true;
  run = { phase: null, step: null, steps: null, piece: null, pieces: null, eta: null, percent: 0 };
  followed = job.id;
  $("cancel").dataset.job = job.id;
  $("cancel").disabled = false;
  $("cancel").hidden = false;
  showJob(job);
  try {
    let ended = null;
    try {
      ended = await streamEvents(job.id);
    } catch (error) {
      console.warn("the job's event stream failed; polling instead:", error);
    }
    if (!ended) ended = await poll(job.id);
    if (ended.object === "video.deleted") {
      $("status").textContent = "cancelled";
      return showRun("cancelled");
    }
    showJob(ended);
    if (ended.status === "failed") throw new Error(`the job failed: ${ended.error ? ended.error.message : "unknown"}`);
    $("run").hidden = true;
    $("preview").hidden = true;
    await show(ended);
  } finally {
    $("cancel").hidden = true;
  }
}

// The job's events as they come; returns the final job (`done`), or null when the stream ended without it.
async function streamEvents(id) {
  const response = await call(`/v1/videos/${encodeURIComponent(id)}/events`, { headers: { Accept: "text/event-stream" } });
  if (!response.ok || !response.body) return null; // polling says why
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer += value.replace(/\r/g, "");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event && event.kind === "done") {
        reader.cancel().catch(() => {});
        return event.data;
      }
      if (event) heard(event.kind, event.data, id);
    }
  }
}

// One Server-Sent Event's name and JSON data (null for a comment, the stream's heartbeat).
function parseEvent(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    const colon = line.indexOf(":");
    if (colon === 0) continue;
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") kind = value;
    if (field === "data") data.push(value);
  }
  return data.length ? { kind, data: JSON.parse(data.join("\n")) } : null;
}

// What an event says: the job's state (on connect, and when it starts), a phase, a step, a decode piece, a preview.
function heard(kind, data, id) {
  if (kind === "state") {
    Object.assign(run, { ...data.run, percent: Math.max(run.percent, data.progress) });
    showJob({ status: data.status, progress: run.percent });
    if (data.run && data.run.preview) loadPreview(data.run.preview, id);
    return showRun();
  }
  if (kind === "phase_started") Object.assign(run, { phase: data.phase, step: null, piece: null });
  if (kind === "step") Object.assign(run, { step: data.index, steps: data.total });
  if (kind === "piece") Object.assign(run, { piece: data.index, pieces: data.total });
  if (kind === "preview") loadPreview(data.url, id, data.index);
  if (data.eta != null) run.eta = data.eta;
  run.percent = Math.max(run.percent, Math.min(99, Math.round(data.progress * 100)));
  showJob({ status: "in_progress", progress: run.percent });
  showRun();
}

// The bar and the status line (the bar first: a watcher of the status reads it).
function showJob(job) {
  $("progress").value = job.progress;
  $("status").textContent = `${job.status} ${job.progress}%`;
}

const PHASE_WORDS = {
  probe: "measuring the GPU", load: "loading", encode: "encoding the input", prefill: "reading the prompt",
  denoise: "denoising", decode: "decoding", sound: "decoding the sound", write: "writing the video",
};

// The phase (with its step or piece) and the time left, or `said` in their place.
function showRun(said) {
  $("run").hidden = false;
  let phase = said || (run.phase ? PHASE_WORDS[run.phase] || run.phase : "waiting in the queue");
  if (!said && run.phase === "denoise" && run.step) phase += `: step ${run.step} of ${run.steps}`;
  if (!said && run.phase === "decode" && run.piece) phase += `: piece ${run.piece} of ${run.pieces}`;
  $("phase").textContent = phase;
  $("phase").dataset.phase = said || run.phase || "queued";
  $("eta").textContent = !said && run.eta != null ? `· about ${duration(run.eta)} left` : "";
}

function duration(seconds) {
  const whole = Math.max(1, Math.round(seconds));
  return whole < 60 ? `${whole} s` : `${Math.floor(whole / 60)} min ${whole % 60} s`;
}

// The job's latest preview as a blob (the key travels in a header); one fetch at a time, the newest wins.
async function loadPreview(url, id, step) {
  preview.wanted = { url, id, step };
  if (preview.loading) return;
  preview.loading = true;
  try {
    while (preview.wanted) {
      const wanted = preview.wanted;
      preview.wanted = null;
      const response = await call(wanted.url);
      if (!response.ok || followed !== wanted.id) continue; // none yet, or another job's
      const blob = await response.blob();
      if (preview.url) URL.revokeObjectURL(preview.url);
      preview.url = URL.createObjectURL(blob);
      $("preview").src = preview.url;
      $("preview").dataset.job = wanted.id;
      if (wanted.step) $("preview").dataset.step = wanted.step;
      $("preview").hidden = !$("player").hidden;
    }
  } catch (error) {
    console.warn("a preview could not be read:", error);
  } finally {
    preview.loading = false;
  }
}

// Ask the job's state every POLL_MS until it completes or fails; a job deleted by the Cancel button is cancelled.
async function poll(id) {
  while (true) {
    const response = await call(`/v1/videos/${encodeURIComponent(id)}`);
    if (response.status === 404 && cancelled.has(id)) return { id, object: "video.deleted" };
    const job = await json(response);
    if (job.status === "completed" || job.status === "failed") return job;
    run.percent = Math.max(run.percent, job.progress);
    showJob({ status: job.status, progress: run.percent });
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// The Cancel button: the server's DELETE stops a running job at its next step or decode piece (and removes it).
async function cancel() {
  const id = $("cancel").dataset.job;
  $("cancel").disabled = true;
  try {
    await json(await call(`/v1/videos/${encodeURIComponent(id)}`, { method: "DELETE" }));
    cancelled.add(id);
  } catch (error) {
    $("cancel").disabled = false;
    showError(error.message);
  }
}

// A completed job: its video, and the plot of its predicted actions where it has them.
async function show(job) {
  const request = ++shown;
  const action = job.parameters && job.parameters.action;
  $("actions-figure").hidden = true;
  await play(job.id, request);
  if (action && action.mode !== "forward_dynamics") await plotActions(job.id, request);
}

// The video as a blob (the key travels in a header, which a <video src> cannot send); an error response throws.
async function play(id, request) {
  const response = await call(`/v1/videos/${encodeURIComponent(id)}/content`);
  if (!response.ok) return json(response);
  const blob = await response.blob();
  if (request !== shown) return; // another job was asked for meanwhile
  if (playerUrl) URL.revokeObjectURL(playerUrl);
  playerUrl = URL.createObjectURL(blob);
  const player = $("player");
  player.src = playerUrl;
  player.dataset.job = id;
  player.hidden = false;
}

// "number k" beside a swatch of its line's colour (an SVG: the page allows no inline style).
function legendItem(column) {
  const item = document.createElement("li");
  const swatch = svg("svg", { width: 12, height: 12, viewBox: "0 0 12 12", "aria-hidden": "true" });
  swatch.append(svg("rect", { width: 12, height: 12, rx: 2, fill: COLORS[column % COLORS.length] }));
  item.append(swatch, ` number ${column + 1}`);
  return item;
}

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// The predicted actions under the video: one line per number of the row, over the chunk's steps.
async function plotActions(id, request) {
  const response = await call(`/v1/videos/${encodeURIComponent(id)}/actions`);
  const text = await response.clone().text();
  const data = await json(response);
  if (request !== shown) return;
  const rows = data.actions;
  const values = rows.flat();
  let low = values.reduce((a, b) => Math.min(a, b), Infinity);
  let high = values.reduce((a, b) => Math.max(a, b), -Infinity);
  if (!(high > low)) [low, high] = [low - 1, high + 1];
  const right = PLOT.width - PLOT.right, bottom = PLOT.height - PLOT.bottom;
  const x = (step) => PLOT.left + (rows.length > 1 ? step / (rows.length - 1) : 0.5) * (right - PLOT.left);
  const y = (value) => PLOT.top + ((high - value) / (high - low)) * (bottom - PLOT.top);
  const parts = [
    svg("line", { x1: PLOT.left, y1: PLOT.top, x2: PLOT.left, y2: bottom, class: "axis" }),
    svg("line", { x1: PLOT.left, y1: bottom, x2: right, y2: bottom, class: "axis" }),
    svg("text", { x: PLOT.left - 6, y: PLOT.top + 4, "text-anchor": "end", class: "tick" }, high.toPrecision(3)),
    svg("text", { x: PLOT.left - 6, y: bottom, "text-anchor": "end", class: "tick" }, low.toPrecision(3)),
    svg("text", { x: PLOT.left, y: PLOT.height - 8, class: "tick" }, "step 1"),
    svg("text", { x: right, y: PLOT.height - 8, "text-anchor": "end", class: "tick" }, `step ${rows.length}`),
  ];
  if (low < 0 && high > 0) parts.push(svg("line", { x1: PLOT.left, y1: y(0), x2: right, y2: y(0), class: "zero" }));
  for (let column = 0; column < data.width; column++) {
    const color = COLORS[column % COLORS.length];
    const line = svg("g", { class: "dimension", "data-dimension": column, stroke: color, fill: color });
    line.append(svg("title", {}, `number ${column + 1} of each row`));
    const points = rows.map((row, step) => `${x(step).toFixed(1)},${y(row[column]).toFixed(1)}`);
    line.append(svg("polyline", { points: points.join(" "), fill: "none" }));
    for (const point of points) {
      const [cx, cy] = point.split(",");
      line.append(svg("circle", { cx, cy, r: 2.5, stroke: "none" }));
    }
    parts.push(line);
  }
  $("actions-plot").replaceChildren(...parts);
  $("actions-legend").replaceChildren(...Array.from({ length: data.width }, (_, column) => legendItem(column)));
  $("actions-plot").dataset.job = id;
  $("actions-caption").textContent =
    `${data.rows} predicted actions of ${data.domain} (${data.mode.replace(/_/g, " ")}), ` +
    `${data.width} numbers each: a line per number.`;
  if (actionsUrl) URL.revokeObjectURL(actionsUrl);
  actionsUrl = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  $("actions-download").href = actionsUrl;
  $("actions-download").download = `${id}.actions.json`;
  $("actions-figure").hidden = false;
}

// A history cell; `label` names it where a narrow window stacks the row (no header above it there).
function cell(text, className, label = "") {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  td.className = className;
  if (label) td.dataset.label = label;
  return td;
}

function button(label, className, what, action) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.className = className;
  element.setAttribute("aria-label", `${label} ${what}`);
  element.addEventListener("click", action);
  return element;
}

async function refreshHistory() {
  const request = ++historyRequests;
  let list;
  try {
    list = await json(await call("/v1/videos?limit=50"));
  } catch (error) {
    return showError(error.message);
  }
  if (request !== historyRequests) return; // a later refresh is on its way
  const body = $("history").querySelector("tbody");
  body.replaceChildren(...list.data.map(historyRow));
  $("history-empty").hidden = list.data.length > 0;
}

// One job as a row: its parameters, its state (with the progress while it runs), play and delete.
function historyRow(job) {
  const p = job.parameters || {};
  const row = document.createElement("tr");
  row.dataset.job = job.id;
  const created = new Date(job.created_at * 1000).toLocaleString();
  const state = job.status === "in_progress" ? `in_progress ${job.progress}%` : job.status;
  row.append(cell(created, "created"), cell(job.prompt, "prompt"), cell(job.size, "size", "size"));
  row.append(cell(p.frames, "frames", "frames"), cell(p.steps, "steps", "steps"), cell(p.seed, "seed", "seed"));
  row.append(cell(state, "state", "status"));
  if (job.error) row.lastChild.title = job.error.message;
  const actions = cell("", "actions");
  const label = `${job.prompt} (${job.id})`;
  if (job.status === "completed") {
    const open = () => show(job).then(() => $("player").scrollIntoView({ block: "nearest" }));
    actions.append(button("play", "play", label, () => open().catch((e) => showError(e.message))));
  }
  actions.append(button("delete", "delete", label, () => remove(job.id)));
  row.append(actions);
  return row;
}

async function remove(id) {
  try {
    await json(await call(`/v1/videos/${encodeURIComponent(id)}`, { method: "DELETE" }));
    if ($("player").dataset.job === id) {
      $("player").pause();
      $("player").hidden = true;
      $("actions-figure").hidden = true;
    }
  } catch (error) {
    showError(error.message);
  }
  refreshHistory();
}

async function start() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("input", () => localStorage.setItem(KEY_STORAGE, apiKey()));
  $("api-key").addEventListener("change", () => {
    showError("");
    refreshHistory();
  });
  $("request").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  const health = await (await fetch("/health")).json();
  $("model").textContent = `${health.model} on ${health.device}; queue ${health.queue_length} of ${health.queue_size}`;
  if (health.auth && !apiKey()) $("key-row").hidden = false;
  fillSizes(health.defaults);
  fillActions(health.actions);
  refreshHistory();
}

start().catch((error) => showError(`cannot reach the server: ${error.message}`));
