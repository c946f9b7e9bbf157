// The page of `cosmos3-offload serve`: a request form, a job's live progress, its video, and the history.
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
const $ = (id) => document.getElementById(id);
let playerUrl = null;
let historyRequests = 0; // only the latest history request may fill the table

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

function requestForm() {
  const form = new FormData();
  form.append("prompt", $("prompt").value);
  if ($("negative").value.trim()) form.append("negative_prompt", $("negative").value);
  form.append("size", $("size").value);
  for (const name of ["frames", "steps", "guidance", "seed"]) {
    if ($(name).value !== "") form.append(name, $(name).value);
  }
  if ($("image").files.length) form.append("input_reference", $("image").files[0]);
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

// Poll the job until it completes or fails, moving the progress bar; then show its video.
async function follow(job) {
  $("job").hidden = false;
  $("player").pause();
  $("player").hidden = true;
  while (true) {
    $("progress").value = job.progress;
    $("status").textContent = `${job.status} ${job.progress}%`;
    if (job.status === "completed") return play(job.id);
    if (job.status === "failed") throw new Error(`the job failed: ${job.error ? job.error.message : "unknown"}`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    job = await json(await call(`/v1/videos/${encodeURIComponent(job.id)}`));
  }
}

// The video as a blob (the key travels in a header, which a <video src> cannot send); an error response throws.
async function play(id) {
  const response = await call(`/v1/videos/${encodeURIComponent(id)}/content`);
  if (!response.ok) return json(response);
  if (playerUrl) URL.revokeObjectURL(playerUrl);
  playerUrl = URL.createObjectURL(await response.blob());
  const player = $("player");
  player.src = playerUrl;
  player.dataset.job = id;
  player.hidden = false;
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
    const show = () => play(job.id).then(() => $("player").scrollIntoView({ block: "nearest" }));
    actions.append(button("play", "play", label, () => show().catch((e) => showError(e.message))));
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
  const health = await (await fetch("/health")).json();
  $("model").textContent = `${health.model} on ${health.device}; queue ${health.queue_length} of ${health.queue_size}`;
  if (health.auth && !apiKey()) $("key-row").hidden = false;
  fillSizes(health.defaults);
  refreshHistory();
}

start().catch((error) => showError(`cannot reach the server: ${error.message}`));
