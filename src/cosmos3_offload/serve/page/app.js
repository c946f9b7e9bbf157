// The page of `cosmos3-offload serve`: a request form, a job's live progress, its video, and the history.
// Plain JS against the server's own API (/health, /v1/videos); no build step, nothing from elsewhere.
"use strict";

// Cosmos3's frame sizes: tier -> [aspect, width, height] (model/tiers.py).
const TIERS = {
  256: [["16,9", 320, 192], ["9,16", 192, 320], ["1,1", 256, 256], ["4,3", 320, 256], ["3,4", 256, 320]],
  480: [["16,9", 832, 480], ["9,16", 480, 832], ["1,1", 640, 640], ["4,3", 736, 544], ["3,4", 544, 736]],
  720: [["16,9", 1280, 720], ["9,16", 720, 1280], ["1,1", 960, 960], ["4,3", 1104, 832], ["3,4", 832, 1104]],
  768: [["16,9", 1360, 768], ["9,16", 768, 1360], ["1,1", 1024, 1024], ["4,3", 1184, 880], ["3,4", 880, 1184]],
};
const POLL_MS = 500;
const $ = (id) => document.getElementById(id);
let playerUrl = null;

function apiKey() {
  return localStorage.getItem("cosmos3-api-key") || "";
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
  if (!$("prompt").value.trim()) return showError("Write a prompt first.");
  $("submit").disabled = true;
  try {
    const job = await json(await call("/v1/videos", { method: "POST", body: requestForm() }));
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

// The video as a blob (the key travels in a header, which a <video src> cannot send).
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

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(label, className, action) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.className = className;
  element.addEventListener("click", action);
  return element;
}

async function refreshHistory() {
  let list;
  try {
    list = await json(await call("/v1/videos?limit=50"));
  } catch (error) {
    return showError(error.message);
  }
  const body = $("history").querySelector("tbody");
  body.replaceChildren();
  for (const job of list.data) {
    const p = job.parameters || {};
    const row = document.createElement("tr");
    row.dataset.job = job.id;
    const created = new Date(job.created_at * 1000).toLocaleString();
    row.append(cell(created), cell(job.prompt || "", "prompt"), cell(job.size), cell(p.frames), cell(p.steps));
    row.append(cell(p.seed), cell(job.status === "in_progress" ? `in_progress ${job.progress}%` : job.status, "state"));
    const actions = document.createElement("td");
    if (job.status === "completed") actions.append(button("play", "play", () => play(job.id).catch((e) => showError(e.message))));
    actions.append(button("delete", "delete", () => remove(job.id)));
    row.append(actions);
    body.append(row);
  }
}

async function remove(id) {
  try {
    await json(await call(`/v1/videos/${encodeURIComponent(id)}`, { method: "DELETE" }));
    if ($("player").dataset.job === id) $("player").hidden = true;
  } catch (error) {
    showError(error.message);
  }
  refreshHistory();
}

async function start() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("cosmos3-api-key", $("api-key").value.trim());
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
