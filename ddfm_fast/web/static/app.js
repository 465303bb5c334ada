// The page of `ddfm-fast serve`: uploads the two images, asks for a job, follows it by server-sent events.
// Every text from the server is put in the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SLOTS = ["ir", "vis"];
const state = {
  info: null,
  mode: "ivf",
  files: { ir: null, vis: null },   // the File objects, kept so a change of mode can label them again
  uploads: { ir: null, vis: null }, // the server's answers: {token, label, width, height, url}
  pending: { ir: 0, vis: 0 },       // upload generation per slot, so a late answer cannot overwrite a newer one
  job: null,
  events: null,
};
window.ddfm = state; // for the browser test and for curious users

function roles() {
  const modes = state.info ? state.info.modes : { ivf: { ir: "infrared image", vis: "visible image" } };
  return modes[state.mode] || modes.ivf;
}

function capitalise(s) { return s.charAt(0).toUpperCase() + s.slice(1); }

function setText(id, text) { $(id).textContent = text == null ? "" : String(text); }

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function updateRoles() {
  const r = roles();
  setText("role-ir", capitalise(r.ir));
  setText("role-vis", capitalise(r.vis));
  setText("cap-ir", r.ir);
  setText("cap-vis", r.vis);
  $("compare-with").options[0].textContent = r.vis;
  $("compare-with").options[1].textContent = r.ir;
  setText("color-hint", state.mode === "ivf" ? "(the visible image's colours)" : "(the PET / SPECT image's colours)");
  updateCompare();
}

function updateButtons() {
  const running = state.job && (state.job.state === "queued" || state.job.state === "running");
  const ready = state.uploads.ir && state.uploads.vis;
  $("fuse").disabled = !ready || running;
  $("cancel").disabled = !running;
}

function mib(n) { return (n / 1048576).toFixed(1); }

async function upload(slot, file) {
  const generation = ++state.pending[slot];
  state.files[slot] = file;
  state.uploads[slot] = null;
  setText("err-" + slot, "");
  setText("info-" + slot, "reading " + file.name + " …");
  $("thumb-" + slot).hidden = true;
  updateButtons();
  const label = roles()[slot] + " " + file.name;
  const limit = state.info ? state.info.max_upload_bytes : Infinity;
  if (file.size > limit) { // the server says the same; this saves sending a file it will refuse
    setText("info-" + slot, "");
    setText("err-" + slot, `${label}: the file is ${mib(file.size)} MiB; uploads are limited to ` +
      `${(limit / 1048576).toFixed(0)} MiB (ddfm-fast serve --max-upload-mb)`);
    return;
  }
  let answer;
  try {
    const url = `/api/uploads?slot=${slot}&mode=${state.mode}&name=${encodeURIComponent(file.name)}`;
    const response = await fetch(url, { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } });
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
  } catch (err) {
    if (generation !== state.pending[slot]) return;
    setText("info-" + slot, "");
    setText("err-" + slot, err.message);
    updateButtons();
    return;
  }
  if (generation !== state.pending[slot]) return;
  state.uploads[slot] = answer;
  const thumb = $("thumb-" + slot);
  thumb.src = answer.url;
  thumb.alt = answer.label;
  thumb.hidden = false;
  setText("hint-" + slot, "drop or click to replace");
  setText("info-" + slot, `${file.name}: ${answer.width}×${answer.height}${answer.chroma ? ", colour" : ", gray"}`);
  updateButtons();
}

function wireSlot(slot) {
  const drop = $("drop-" + slot);
  const input = $("file-" + slot);
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  input.addEventListener("change", () => { if (input.files.length) upload(slot, input.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) upload(slot, e.dataTransfer.files[0]);
  });
}

function request() {
  const steps = $("steps").value.trim();
  return {
    ir: state.uploads.ir.token, vis: state.uploads.vis.token, mode: state.mode,
    prior: $("prior").value, steps: steps === "" ? null : steps, seed: $("seed").value.trim(),
    color: $("color").checked, size_policy: $("size-policy").value,
  };
}

async function fuse() {
  if ($("fuse").disabled) return;
  $("fuse").disabled = true;  // one click, one job: a second click before the answer arrives does nothing
  showError("");
  $("result").hidden = true;
  $("live").hidden = true;
  setText("live-caption", "the current estimate of the fused image (x0) appears here");
  let answer;
  try {
    const response = await fetch("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request()) });
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
  } catch (err) {
    showError(err.message);
    updateButtons();
    return;
  }
  follow(answer);
}

function follow(job) {
  if (state.events) state.events.close();
  state.job = job;
  render(job);
  const events = new EventSource(`/api/jobs/${job.id}/events`);
  state.events = events;
  events.onmessage = (e) => {
    const snap = JSON.parse(e.data);
    state.job = snap;
    render(snap);
    if (snap.queue) renderQueue(snap.queue);
    if (["done", "error", "cancelled"].includes(snap.state)) {
      events.close();
      if (state.events === events) state.events = null;
    }
  };
  events.onerror = () => { // the server went away; a finished job has closed its stream before this
    if (events.readyState === EventSource.CLOSED) setText("status", "lost the connection to the server");
  };
}

function render(job) {
  const progress = $("progress");
  const em = job.prior === "none";
  if (job.state === "queued") {
    progress.max = 1; progress.value = 0;
    const ahead = job.queue_position || 0;
    setText("status", `queued: ${ahead} job${ahead === 1 ? "" : "s"} ahead`);
  } else if (job.state === "running") {
    progress.max = job.steps; progress.value = job.step;
    setText("status", em ? `EM only: iteration ${job.step} of ${job.steps}` : `step ${job.step} of ${job.steps}`);
  } else if (job.state === "done") {
    progress.max = 1; progress.value = 1;
    setText("status", `done: ${job.steps} ${em ? "EM iterations" : "steps"} in ${job.seconds} s (${job.size[0]}×${job.size[1]})`);
  } else if (job.state === "cancelled") {
    progress.max = Math.max(1, job.steps); progress.value = job.step;
    setText("status", job.error || "cancelled");
  } else if (job.state === "error") {
    progress.max = 1; progress.value = 0;
    setText("status", "failed");
    showError(job.error);
  }
  $("status").dataset.state = job.state;
  if (job.preview) {
    const live = $("live");
    live.src = job.preview;
    live.hidden = false;
    setText("live-caption", em ? `EM estimate after iteration ${job.preview_step} of ${job.steps}`
      : `x0 estimate after step ${job.preview_step} of ${job.steps}`);
  }
  updateButtons();
  if (job.state === "done") showResult(job);
}

function renderQueue(jobs) {
  const list = $("queue");
  list.replaceChildren();
  const shown = jobs.filter((j) => j.state === "queued" || j.state === "running" || (state.job && j.id === state.job.id));
  if (!shown.length) {
    const li = document.createElement("li"); li.className = "muted"; li.textContent = "empty"; list.append(li); return;
  }
  for (const j of shown) {
    const li = document.createElement("li");
    li.dataset.state = j.state;
    const unit = j.prior === "none" ? "iteration" : "step";
    const what = j.state === "running" ? `running, ${unit} ${j.step} of ${j.steps}` : j.state;
    li.textContent = `${j.labels[0]} + ${j.labels[1]}: ${what}${state.job && j.id === state.job.id ? " (this page)" : ""}`;
    list.append(li);
  }
}

function showResult(job) {
  const base = `/api/jobs/${job.id}`;
  const shown = job.outputs.includes("color") ? "color" : "fused";
  $("fused-img").src = `${base}/${shown}.png?inline=1`;
  $("src-ir").src = `${base}/view/ir.png`;
  $("src-vis").src = `${base}/view/vis.png`;
  $("download-png").href = `${base}/fused.png`;
  $("download-png16").href = `${base}/fused16.png`;
  $("download-color").hidden = !job.outputs.includes("color");
  if (job.outputs.includes("color")) $("download-color").href = `${base}/color.png`;
  setText("notes", job.notes.join("; "));
  const head = $("metrics").tHead.rows[0];
  const body = $("metrics").tBodies[0].rows[0];
  head.replaceChildren(); body.replaceChildren();
  const names = state.info ? state.info.metrics : Object.keys(job.metrics || {});
  if (job.metrics) {
    for (const name of names) {
      const th = document.createElement("th"); th.textContent = name; head.append(th);
      const td = document.createElement("td"); const v = job.metrics[name];
      td.textContent = v == null ? "n/a" : v.toFixed(4); td.dataset.metric = name; body.append(td);
    }
  }
  const r = roles();
  setText("metrics-caption", job.metrics
    ? `The 8-bit gray fusion scored as ddfm-fast eval scores files: A = ${job.labels.ir}, B = ${job.labels.vis}.`
    : `metrics not computed: ${job.metrics_note}`);
  updateCompare();
  $("result").hidden = false;
}

function updateCompare() {
  const job = state.job;
  const which = $("compare-with").value;
  setText("tag-left", roles()[which]);
  if (!job || job.state !== "done") return;
  const base = `/api/jobs/${job.id}`;
  $("compare-base").src = `${base}/view/${which}.png`;
  $("compare-top").src = $("fused-img").getAttribute("src");
  moveSlider();
}

function moveSlider() {
  const v = Number($("slider").value);
  $("compare-top").style.clipPath = `inset(0 0 0 ${v}%)`;
  $("divider").style.left = `${v}%`;
}

async function cancel() {
  if (!state.job) return;
  $("cancel").disabled = true;
  try {
    const response = await fetch(`/api/jobs/${state.job.id}/cancel`, { method: "POST" });
    const answer = await response.json();
    if (!response.ok) showError(answer.error || response.statusText);
  } catch (err) { showError(err.message); }
}

async function init() {
  SLOTS.forEach(wireSlot);
  document.querySelectorAll("input[name=mode]").forEach((radio) => radio.addEventListener("change", () => {
    state.mode = document.querySelector("input[name=mode]:checked").value;
    updateRoles();
    for (const slot of SLOTS) if (state.files[slot]) upload(slot, state.files[slot]); // labels follow the mode
  }));
  $("fuse").addEventListener("click", fuse);
  $("cancel").addEventListener("click", cancel);
  $("slider").addEventListener("input", moveSlider);
  $("compare-with").addEventListener("change", updateCompare);
  $("prior").addEventListener("change", () => {
    const info = state.info;
    if (!info) return;
    $("steps").placeholder = $("prior").value === "none"
      ? `${info.em_default_iterations} iterations` : `${info.default_steps ?? 100} (model default)`;
  });
  try {
    state.info = await (await fetch("/api/info")).json();
  } catch (err) {
    setText("server-info", "cannot reach the server: " + err.message);
    return;
  }
  const info = state.info;
  setText("server-info", info.model
    ? `model: ${info.model}, ${info.default_steps ?? 100} steps by default · ${info.device} · uploads up to ${(info.max_upload_bytes / 1048576).toFixed(0)} MiB`
    : `no model loaded: EM only · ${info.device}`);
  if (!info.model) { $("prior").value = "none"; $("prior").options[0].disabled = true; }
  $("prior").dispatchEvent(new Event("change"));
  $("steps").max = info.max_steps;
  updateRoles();
  updateButtons();
  document.body.dataset.ready = "1";
}

init();
