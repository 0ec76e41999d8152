// The taskpods web UI. Reads only the JSON API under /api/. Everything a task produced (output, labels,
// messages, result documents) is attacker-controlled: it is written with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const OUTPUT_KEEP = 8 << 20; // characters of output kept on the page while following; older ones are dropped
const PAGE_BYTES = 2 << 20;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === undefined || c === null) continue;
    node.append(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return node;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  if (response.status === 401) { showLogin(); throw new Error("sign in needed"); }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// ---- time -------------------------------------------------------------------------------------------
// The API writes nanoseconds; Date.parse is only specified for milliseconds.
function parseTime(iso) {
  return Date.parse(String(iso).replace(/(\.\d{3})\d+/, "$1"));
}
function duration(ms) {
  if (ms === undefined || ms === null || isNaN(ms)) return "";
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  let s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m ${String(s).padStart(2, "0")}s`;
  if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
  return `${s}s`;
}
// A time in the viewer's zone, UTC on hover.
function timeEl(iso) {
  if (!iso) return el("span", { class: "muted" }, "–");
  const d = new Date(parseTime(iso));
  return el("time", { datetime: iso, title: d.toISOString().replace(".000Z", "Z") + " (UTC)" }, d.toLocaleString());
}
// A duration that ticks every second from `since` (or stays fixed when `until` is set).
function tickingEl(since, until) {
  const span = el("span", { class: "num" });
  if (!since) return span;
  span.dataset.since = since;
  if (until) span.dataset.until = until;
  span.textContent = duration((until ? parseTime(until) : Date.now()) - parseTime(since));
  span.title = "since " + new Date(parseTime(since)).toISOString();
  return span;
}
setInterval(() => {
  const now = Date.now();
  for (const node of document.querySelectorAll("[data-since]:not([data-until])")) {
    node.textContent = duration(now - parseTime(node.dataset.since));
  }
}, 1000);

// ---- state chips: the state's name and a symbol, never colour alone -----------------------------
const SYMBOL = { accepted: "◌", scheduled: "◔", starting: "◑", running: "▶", cancelling: "■…",
  succeeded: "✓", failed: "✗", timed_out: "⏱", cancelled: "■", rejected: "⊘" };
const TONE = { succeeded: "ok", failed: "bad", timed_out: "bad", rejected: "bad", cancelled: "warn",
  cancelling: "warn", running: "live", starting: "live", scheduled: "live", accepted: "live" };
function reasonText(v) {
  if (!v.reason) return "";
  const r = v.reason;
  return r.code === "non_zero_exit" ? `non_zero_exit (${r.exit_code})` : r.code;
}
function chip(v) {
  const name = v.state;
  const node = el("span", { class: "chip " + (TONE[name] || "") }, `${SYMBOL[name] || "?"} ${name}`);
  node.dataset.state = name;
  return node;
}
function stateCell(v) {
  const cell = el("td", { dataset: { label: "State" } }, chip(v));
  const why = reasonText(v) || (v.cancel && v.cancel.reason ? "cancel: " + v.cancel.reason : "");
  if (why) cell.append(el("span", { class: "reason" }, why));
  return cell;
}
function labelsEl(labels) {
  if (!labels || Object.keys(labels).length === 0) return null;
  const box = el("span", { class: "labels" });
  for (const [k, v] of Object.entries(labels || {})) box.append(el("span", { class: "label" }, `${k}=${v}`));
  return box;
}
function taskLink(id) {
  return el("a", { href: "#/task/" + id, title: id }, el("code", {}, id.slice(0, 8)));
}

// ---- header status ----------------------------------------------------------------------------------
function showStatus(s) {
  const node = $("status");
  const parts = [];
  if (!s.nats) parts.push("NATS unreachable");
  parts.push(`views: generation ${s.generation}, ${s.events_behind} events (${s.seconds_behind.toFixed(1)} s) behind`);
  parts.push(`engine: ${s.engine.state}` + (s.engine.commands_waiting ? `, ${s.engine.commands_waiting} commands waiting` : ""));
  node.textContent = (s.stale ? "⚠ STALE · " : "") + parts.join(" · ");
  node.classList.toggle("stale", !!s.stale || !s.nats || s.engine.state === "stalled");
  node.title = s.error || "";
}

// ---- Active -----------------------------------------------------------------------------------------
const active = { rows: new Map(), views: new Map(), source: null };
function activeRow(v) {
  const tr = el("tr", { dataset: { task: v.task } });
  const progress = el("td", { dataset: { label: "Progress" } });
  if (v.progress) {
    if (typeof v.progress.percent === "number") {
      progress.append(el("progress", { max: "100", value: String(v.progress.percent), "aria-label": `${v.progress.percent}%` }), " ", `${v.progress.percent}% `);
    }
    progress.append(v.progress.message);
  }
  tr.append(
    el("td", { dataset: { label: "Task" } }, taskLink(v.task)),
    stateCell(v),
    el("td", { class: "num", dataset: { label: "In state" } }, tickingEl(v.state_since || v.updated_at)),
    el("td", { class: "num", dataset: { label: "Elapsed" } }, tickingEl(v.accepted_at)),
    progress,
    el("td", { dataset: { label: "Requester" } }, v.requester || ""),
    el("td", { dataset: { label: "Labels" } }, labelsEl(v.labels)),
    el("td", { dataset: { label: "Toolbox" } }, v.toolbox || v.image || ""),
  );
  tr.dataset.search = [v.task, v.state, reasonText(v), v.requester, v.toolbox, v.image,
    ...Object.entries(v.labels || {}).map(([k, x]) => `${k}=${x}`)].join(" ").toLowerCase();
  return tr;
}
function activeUpsert(v) {
  const old = active.views.get(v.task);
  if (old && old.seq >= v.seq) return;
  active.views.set(v.task, v);
  const row = activeRow(v);
  const existing = active.rows.get(v.task);
  if (existing) {
    // Update in place, keeping the link cell, so keyboard focus on a row survives its updates.
    const cells = [...row.cells];
    for (let i = 1; i < cells.length; i++) existing.cells[i].replaceWith(cells[i]);
    existing.dataset.search = row.dataset.search;
    applyActiveFilter(existing);
    return;
  }
  $("active-rows").append(row);
  active.rows.set(v.task, row);
  applyActiveFilter(row);
}
function activeRemove(task) {
  const row = active.rows.get(task);
  if (row) row.remove();
  active.rows.delete(task);
  active.views.delete(task);
}
function activeSnapshot(snapshot) {
  active.rows.clear(); active.views.clear();
  const body = $("active-rows");
  const fragment = document.createDocumentFragment();
  for (const v of snapshot.tasks) {
    const row = activeRow(v);
    active.rows.set(v.task, row); active.views.set(v.task, v);
    applyActiveFilter(row);
    fragment.append(row);
  }
  body.replaceChildren(fragment);
}
function activeSummary() {
  const n = active.rows.size;
  $("active-count").textContent = `(${n})`;
  $("active-empty").hidden = n !== 0;
  const shown = [...active.rows.values()].filter((r) => !r.hidden).length;
  $("active-summary").textContent = shown === n ? `${n} live` : `${shown} of ${n} live shown`;
}
function applyActiveFilter(row) {
  const q = $("active-filter").value.trim().toLowerCase();
  row.hidden = q !== "" && !row.dataset.search.includes(q);
}
let summaryPending = false;
function scheduleSummary() {
  if (summaryPending) return;
  summaryPending = true;
  requestAnimationFrame(() => { summaryPending = false; activeSummary(); });
}
function startLive() {
  if (active.source) return;
  const source = new EventSource("/api/live");
  active.source = source;
  source.addEventListener("snapshot", (e) => { activeSnapshot(JSON.parse(e.data)); scheduleSummary(); });
  source.addEventListener("upsert", (e) => { activeUpsert(JSON.parse(e.data)); scheduleSummary(); });
  source.addEventListener("remove", (e) => { activeRemove(JSON.parse(e.data).task); scheduleSummary(); });
  source.addEventListener("status", (e) => showStatus(JSON.parse(e.data)));
  source.onerror = () => {
    $("status").textContent = "⚠ disconnected from the server; retrying…";
    $("status").classList.add("stale");
  };
}

// ---- Task detail ------------------------------------------------------------------------------------
const detail = { task: null, source: null, next: 0, end: false, kept: 0, lines: 0, doc: null, filesKey: null };
function stopDetail() {
  if (detail.source) detail.source.close();
  detail.source = null;
  detail.task = null;
}
function fact(dl, name, value) {
  if (value === undefined || value === null || value === "") return;
  dl.append(el("dt", {}, name), el("dd", {}, value));
}
function renderTask(doc) {
  detail.doc = doc;
  const v = doc.task;
  $("t-state").replaceWith(Object.assign(chip(v), { id: "t-state" }));
  const dl = $("t-facts");
  dl.replaceChildren();
  fact(dl, "Reason", reasonText(v) || null);
  fact(dl, "Message", v.message);
  fact(dl, "Requester", v.requester);
  fact(dl, "Labels", Object.keys(v.labels || {}).length ? labelsEl(v.labels) : null);
  fact(dl, "Toolbox / image", [v.toolbox, v.image].filter(Boolean).join(" · "));
  fact(dl, "Accepted", v.accepted_at ? timeEl(v.accepted_at) : null);
  if (!isTerminal(v)) fact(dl, "In state for", tickingEl(v.state_since || v.updated_at));
  fact(dl, "Elapsed", v.accepted_at ? tickingEl(v.accepted_at, v.finished_at) : null);
  fact(dl, "Deadline", v.deadline ? timeEl(v.deadline) : null);
  fact(dl, "Finished", v.finished_at ? timeEl(v.finished_at) : null);
  fact(dl, "Exit code", v.exit_code !== undefined ? String(v.exit_code) : null);
  fact(dl, "Duration", v.duration_ms !== undefined ? duration(v.duration_ms) + ` (${v.duration_ms} ms)` : null);
  fact(dl, "Output size", v.output_bytes !== undefined ? `${v.output_bytes} bytes` + (v.output_truncated ? " (truncated)" : "") : null);
  fact(dl, "Progress", v.progress ? `${v.progress.percent !== undefined ? v.progress.percent + "% " : ""}${v.progress.message}` : null);
  fact(dl, "Cancel", v.cancel ? `requested${v.cancel.requester ? " by " + v.cancel.requester : ""}${v.cancel.reason ? ": " + v.cancel.reason : ""}` : null);
  fact(dl, "Job / pod", [v.job, v.pod, v.node].filter(Boolean).join(" · "));
  fact(dl, "Reaped", v.reaped ? "yes" : null);
  $("t-spec").textContent = doc.spec ? JSON.stringify(doc.spec, null, 2) : "(no launch spec: the launch was rejected)";
  $("t-result").textContent = v.result !== undefined ? JSON.stringify(v.result, null, 2) : "(no result document)";
  $("t-replay").textContent = doc.replay_command;
  const timeline = $("t-timeline");
  timeline.replaceChildren();
  for (const entry of (doc.history ? doc.history.entries : [])) {
    timeline.append(el("li", { dataset: { kind: entry.kind } }, timeEl(entry.at), " ",
      el("span", { class: "kind" }, entry.kind), ` → ${entry.state}`, entry.detail ? ` · ${entry.detail}` : ""));
  }
  if (doc.history && doc.history.dropped) timeline.append(el("li", { class: "muted" }, `${doc.history.dropped} older entries not kept`));
  refreshFiles(v);
  const cancel = $("t-cancel");
  cancel.hidden = !(whoami.role === "operator") || isTerminal(v) || v.state === "cancelling";
}
// ---- Files: inputs and artifacts, each a download link served by the API ---------------------------
function bytesText(n) {
  if (n === undefined || n === null) return "";
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB"];
  let value = n / 1024, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return `${value.toFixed(1)} ${units[unit]} (${n} bytes)`;
}
// A path from a task goes into the URL one encoded component at a time, so it cannot name another route.
function fileHref(task, kind, path) {
  return `/api/tasks/${encodeURIComponent(task)}/${kind}/` + path.split("/").map(encodeURIComponent).join("/");
}
function fileRow(task, kind, path, label, size, digest) {
  const name = path.split("/").pop();
  return el("tr", { dataset: { path } },
    el("td", { dataset: { label: kind === "inputs" ? "Name" : "Path" } },
      el("a", { href: fileHref(task, kind, path), download: name, class: "file" }, label)),
    el("td", { class: "num", dataset: { label: "Size" } }, bytesText(size)),
    el("td", { dataset: { label: "Digest" } }, el("code", { class: "digest" }, digest || "")));
}
async function loadFiles(task) {
  let files;
  try {
    files = await api(`/api/tasks/${task}/files`);
  } catch (e) {
    if (detail.task === task) $("t-files-info").textContent = "could not list the files: " + e.message;
    return;
  }
  if (detail.task !== task) return;
  const inputs = document.createDocumentFragment();
  for (const i of files.inputs) inputs.append(fileRow(task, "inputs", i.name, i.path === i.name ? i.name : `${i.name} → ${i.path}`, i.size, i.digest));
  $("t-inputs").replaceChildren(inputs);
  const artifacts = document.createDocumentFragment();
  for (const a of files.artifacts) artifacts.append(fileRow(task, "artifacts", a.path, a.path, a.size, a.digest));
  $("t-artifacts").replaceChildren(artifacts);
  const cut = files.artifacts_truncated;
  $("t-artifacts-truncated").hidden = !cut;
  $("t-artifacts-truncated").textContent = cut ? `⚠ ${cut.files} more files (${bytesText(cut.bytes)}) were not kept: over the per-task artifact caps` : "";
  $("t-artifacts-skipped").replaceChildren(...files.artifacts_skipped.map((s) => el("li", {}, `not stored: ${s.path} (${s.reason})`)));
  const total = files.artifacts.reduce((sum, a) => sum + a.size, 0);
  const count = (n, what) => `${n} ${what}${n === 1 ? "" : "s"}`;
  $("t-files-info").textContent = count(files.inputs.length, "input") + " · " + (files.artifacts_from === "none"
    ? (detail.doc && isTerminal(detail.doc.task) ? "no artifacts: the code never ran" : "artifacts are stored when the code exits")
    : `${count(files.artifacts.length, "artifact")}, ${bytesText(total)}` + (files.artifacts_from === "bucket" ? " (as stored: the task reported no outcome)" : ""));
}
// Lists the files once per state the page shows (they change when the task ends).
function refreshFiles(v) {
  const key = `${v.task}/${v.state}`;
  if (detail.filesKey === key) return;
  detail.filesKey = key;
  loadFiles(v.task);
}
function isTerminal(v) {
  return ["succeeded", "failed", "timed_out", "cancelled", "rejected"].includes(v.state);
}
// Adds chunks to the output. While following (`trim`), the oldest output is dropped past OUTPUT_KEEP
// characters so a chatty task cannot exhaust the page; "Load from start" reloads from the beginning.
function appendOutput(chunks, trim, scroll = true) {
  const pre = $("t-output");
  const fragment = document.createDocumentFragment();
  for (const c of chunks) {
    if (c.stream === "stdout") fragment.append(document.createTextNode(c.text));
    else if (c.stream === "stderr") fragment.append(el("span", { class: "stderr", title: "stderr" }, c.text));
    else if (c.stream === "truncated") fragment.append(el("span", { class: "truncated", role: "note" }, "⚠ " + c.text));
    else if (c.stream === "end") detail.end = true;
    detail.kept += c.text.length;
    detail.lines += (c.text.match(/\n/g) || []).length;
    detail.next = Math.max(detail.next, c.seq);
  }
  pre.append(fragment);
  if (trim && detail.kept > OUTPUT_KEEP) {
    let gap = pre.querySelector(":scope > .gap");
    if (!gap) {
      gap = el("span", { class: "gap" }, "… earlier output is not shown here: use “Load from start” or Download");
      pre.prepend(gap);
    }
    while (detail.kept > OUTPUT_KEEP && gap.nextSibling) {
      const node = gap.nextSibling;
      detail.kept -= (node.textContent || "").length;
      node.remove();
    }
  }
  if (scroll && $("t-follow").checked) pre.scrollTop = pre.scrollHeight;
  outputInfo();
}
function outputInfo() {
  $("t-output-info").textContent = `${detail.lines} lines` + (detail.end ? " · output complete" : " · live");
}
async function loadOutputFromStart() {
  const task = detail.task;
  if (detail.source) { detail.source.close(); detail.source = null; }
  detail.next = 0; detail.end = false; detail.kept = 0; detail.lines = 0;
  $("t-output").replaceChildren();
  let after = 0;
  for (;;) {
    const page = await api(`/api/tasks/${task}/output?after=${after}&max_bytes=${PAGE_BYTES}`);
    if (detail.task !== task) return;
    // Scrolling forces a layout of everything so far: do it once, after the last page.
    appendOutput(page.chunks, false, false);
    if (page.end || page.next === after) { detail.next = page.next; break; }
    after = page.next;
    if (detail.kept >= OUTPUT_KEEP) {
      // More than the page keeps: show the start and offer the file (following would drop the start).
      $("t-output").append(el("span", { class: "gap" }, "… more output follows: Download it for all of it"));
      $("t-output-info").textContent = "showing the first part of a large output";
      return;
    }
  }
  outputInfo();
  if ($("t-follow").checked) $("t-output").scrollTop = $("t-output").scrollHeight;
  if (detail.task === task && !(detail.end && detail.doc && isTerminal(detail.doc.task))) followTask(task);
}
function followTask(task) {
  const source = new EventSource(`/api/tasks/${task}/live?after=${detail.next}`);
  detail.source = source;
  source.addEventListener("task", (e) => { if (detail.task === task) renderTask(JSON.parse(e.data)); });
  source.addEventListener("output", (e) => { if (detail.task === task) appendOutput([JSON.parse(e.data)], true); });
  source.addEventListener("done", () => { source.close(); if (detail.source === source) detail.source = null; outputInfo(); });
  source.onerror = () => {
    // EventSource reconnects by itself; reconnect from the last chunk shown instead.
    source.close();
    if (detail.task !== task) return;
    setTimeout(() => { if (detail.task === task && detail.source === source) followTask(task); }, 1000);
  };
}
async function showTask(task) {
  stopDetail();
  detail.task = task;
  $("t-id").textContent = task;
  $("t-missing").hidden = true;
  $("t-output").replaceChildren();
  $("t-timeline").replaceChildren();
  $("t-facts").replaceChildren();
  $("t-inputs").replaceChildren();
  $("t-artifacts").replaceChildren();
  $("t-artifacts-skipped").replaceChildren();
  $("t-artifacts-truncated").hidden = true;
  $("t-files-info").textContent = "";
  detail.filesKey = null;
  $("t-cancel-msg").textContent = "";
  $("t-download").href = `/api/tasks/${task}/output.txt`;
  $("t-download").setAttribute("download", `${task}.log`);
  try {
    renderTask(await api(`/api/tasks/${task}`));
  } catch (e) {
    $("t-missing").textContent = e.message;
    $("t-missing").hidden = false;
    return;
  }
  await loadOutputFromStart();
}
async function cancelTask() {
  const task = detail.task;
  $("t-cancel").disabled = true;
  $("t-cancel-msg").textContent = "cancelling…";
  try {
    const r = await api(`/api/tasks/${task}/cancel`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Taskpods-Request": "1" },
      body: JSON.stringify({ reason: "cancelled from the web UI" }),
    });
    $("t-cancel-msg").textContent = `cancel recorded: ${r.state}`;
  } catch (e) {
    $("t-cancel-msg").textContent = "cancel failed: " + e.message;
  } finally {
    $("t-cancel").disabled = false;
  }
}

// ---- History ----------------------------------------------------------------------------------------
const FILTERS = ["state", "reason", "requester", "label", "since", "until"];
function historyRow(v) {
  return el("tr", { dataset: { task: v.task } },
    el("td", { dataset: { label: "Task" } }, taskLink(v.task)),
    stateCell(v),
    el("td", { class: "num", dataset: { label: "Finished" } }, timeEl(v.finished_at)),
    el("td", { class: "num", dataset: { label: "Duration" } }, v.duration_ms !== undefined ? duration(v.duration_ms) : ""),
    el("td", { class: "num", dataset: { label: "Exit" } }, v.exit_code !== undefined ? String(v.exit_code) : ""),
    el("td", { dataset: { label: "Requester" } }, v.requester || ""),
    el("td", { dataset: { label: "Labels" } }, labelsEl(v.labels)),
    el("td", { dataset: { label: "Message" } }, (v.message || "") + (v.output_truncated ? " (output truncated)" : "")),
  );
}
function toLocalInput(iso) {
  if (!iso) return "";
  const d = new Date(parseTime(iso));
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
async function showHistory(params) {
  for (const f of FILTERS) {
    const input = $("h-" + f);
    const value = params.get(f) || "";
    input.value = (f === "since" || f === "until") ? toLocalInput(value) : value;
  }
  const query = new URLSearchParams();
  for (const f of FILTERS) if (params.get(f)) query.set(f, params.get(f));
  if (params.get("before")) query.set("before", params.get("before"));
  query.set("limit", params.get("limit") || "50");
  $("h-info").textContent = "loading…";
  let page;
  try {
    page = await api("/api/history?" + query.toString());
  } catch (e) {
    $("h-info").textContent = "could not load: " + e.message;
    return;
  }
  const fragment = document.createDocumentFragment();
  for (const v of page.tasks) fragment.append(historyRow(v));
  $("h-rows").replaceChildren(fragment);
  const older = $("h-older");
  older.disabled = page.next === null || page.next === undefined;
  older.dataset.next = page.next === null || page.next === undefined ? "" : String(page.next);
  $("h-newest").disabled = !params.get("before");
  $("h-info").textContent = `${page.tasks.length} shown` + (page.tasks.length === 0 && page.next ? ` (searched ${page.scanned} tasks; press Older to search further back)` : "")
    + (page.next === null || page.next === undefined ? " · end of history" : "");
}
function historyParamsFromForm() {
  const params = new URLSearchParams();
  for (const f of FILTERS) {
    const value = $("h-" + f).value.trim();
    if (!value) continue;
    params.set(f, (f === "since" || f === "until") ? new Date(value).toISOString() : value);
  }
  return params;
}

// ---- routing ----------------------------------------------------------------------------------------
let whoami = { role: "reader" };
function showPage(name) {
  for (const page of ["login", "active", "task", "history"]) $("page-" + page).hidden = page !== name;
  $("nav-active").toggleAttribute("aria-current", name === "active");
  if (name === "active") $("nav-active").setAttribute("aria-current", "page");
  $("nav-history").toggleAttribute("aria-current", name === "history");
  if (name === "history") $("nav-history").setAttribute("aria-current", "page");
}
function showLogin() {
  showPage("login");
  $("login-token").focus();
}
function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  if (!path.startsWith("/task/")) stopDetail();
  if (path.startsWith("/task/")) {
    showPage("task");
    document.title = "taskpods · task";
    showTask(decodeURIComponent(path.slice("/task/".length)));
  } else if (path === "/history") {
    showPage("history");
    document.title = "taskpods · history";
    showHistory(params);
  } else {
    showPage("active");
    document.title = "taskpods · active";
  }
}

async function start() {
  try {
    whoami = await api("/api/whoami");
  } catch (e) {
    return;
  }
  startLive();
  route();
}

document.addEventListener("DOMContentLoaded", () => {
  window.addEventListener("hashchange", () => { route(); $("main").focus({ preventScroll: true }); });
  $("active-filter").addEventListener("input", () => { for (const row of active.rows.values()) applyActiveFilter(row); activeSummary(); });
  $("t-cancel").addEventListener("click", cancelTask);
  $("t-load-start").addEventListener("click", () => loadOutputFromStart());
  $("h-form").addEventListener("submit", (e) => { e.preventDefault(); location.hash = "#/history?" + historyParamsFromForm().toString(); });
  $("h-clear").addEventListener("click", () => { location.hash = "#/history"; });
  $("h-newest").addEventListener("click", () => { location.hash = "#/history?" + historyParamsFromForm().toString(); });
  $("h-older").addEventListener("click", () => {
    const params = historyParamsFromForm();
    params.set("before", $("h-older").dataset.next);
    location.hash = "#/history?" + params.toString();
  });
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await api("/api/session", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Taskpods-Request": "1" },
        body: JSON.stringify({ token: $("login-token").value }),
      });
      $("login-error").textContent = "";
      start();
    } catch (err) {
      $("login-error").textContent = err.message;
    }
  });
  start();
});
