// torchcore's dashboard: plain JavaScript over the JSON API (/api/v1/), no framework, no network
// beyond this service.  Every URL is relative, so the pages work under any base_path.
"use strict";

const REFRESH_MS = 5000;
const PAGE = 100;
const TOKEN_KEY = "torchcore-token";
let timer = null;
let follow = null;      // the AbortController of the log follow going on
let asking = false;     // the token form is shown (settings.http.auth: all)

// -- helpers ---------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const svg = ["svg", "rect", "line", "text", "g", "title"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// The token, once given, goes with every request as a header (never in a URL): needed for the
// actions, and for everything when the service runs with settings.http.auth: all.
function withToken(headers) {
  const value = sessionStorage.getItem(TOKEN_KEY);
  return value ? { ...(headers || {}), Authorization: `Bearer ${value}` } : { ...(headers || {}) };
}

// A 401: the token kept (if any) is wrong; a read refused means the service wants it for everything.
function refused(method) {
  const had = sessionStorage.getItem(TOKEN_KEY) !== null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (!method || method === "GET") askToken(had);
}

async function api(path, options) {
  options = { ...(options || {}) };
  options.headers = withToken(options.headers);
  const response = await fetch("api/v1/" + path, options);
  if (response.status === 401) refused(options.method);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = (body && body.error) || (response.status === 401 ? "wrong or missing token" : response.statusText);
    const error = new Error(`${response.status}: ${message}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function relative(iso) {
  if (!iso) return "-";
  const seconds = (new Date(iso).getTime() - Date.now()) / 1000;
  const abs = Math.abs(seconds);
  const text = abs < 60 ? `${Math.round(abs)}s` : abs < 3600 ? `${Math.round(abs / 60)}m`
    : abs < 86400 ? `${(abs / 3600).toFixed(1)}h` : `${(abs / 86400).toFixed(1)}d`;
  return seconds >= 0 ? `in ${text}` : `${text} ago`;
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  if (value < 1) return `${Math.round(value * 1000)}ms`;
  return value < 10 ? `${value.toFixed(2)}s` : value < 600 ? `${value.toFixed(0)}s` : `${(value / 60).toFixed(1)}m`;
}

function resultOf(run) {
  if (run.missed) return "missed";
  if (run.skipped) return "skipped";
  if (!run.ended) return "running";
  if (run.failed) return "failure";
  if (run.stopped) return "stopped";
  return "success";
}

function describe(run) {
  if (run.missed) return "missed";
  if (run.skipped) return `skipped: ${run.skip_reason}`;
  if (!run.ended) return "running";
  if (run.error) return `failed: ${run.error}`;
  if (run.timed_out) return "timed out";
  if (run.signal !== null) return `killed by signal ${run.signal}`;
  if (run.stopped) return `stopped (${run.stopped})`;
  return run.exit_code === 0 ? "ok" : `exit ${run.exit_code}`;
}

function stateBadge(state) {
  return h("span", { class: `state state-${state.replace(/ /g, "-")}` }, state);
}

function message(text, error) {
  return h("div", { class: error ? "message error" : "message", role: "status" }, text);
}

function token() {
  let value = sessionStorage.getItem(TOKEN_KEY);
  if (!value) {
    value = window.prompt("The token (settings.http.token_file) for actions:");
    if (value) sessionStorage.setItem(TOKEN_KEY, value.trim());
  }
  return value;
}

async function act(path) {
  if (!token()) throw new Error("no token given");
  return await api(path, { method: "POST" });
}

// settings.http.auth: all: nothing shows without the token; ask for it once (kept for the tab).
function askToken(wrong) {
  if (asking) return;
  asking = true;
  clearInterval(timer);
  stopFollow();
  const input = h("input", { type: "password", id: "token-input", autocomplete: "off", placeholder: "token", required: true });
  const form = h("form", { id: "token-form", class: "toolbar", onsubmit: (e) => {
    e.preventDefault();
    const value = input.value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    asking = false;
    route();
  } }, h("label", { for: "token-input" }, "Token"), input, h("button", { type: "submit" }, "Open"));
  show(h("h2", {}, "This service needs its token"),
    wrong ? message("That token was refused.", true) : "",
    message("Every request needs the token of settings.http.token_file (settings.http.auth: all); " +
      "it is kept for this browser tab only."), form);
  document.getElementById("daemon").textContent = "token needed";
  input.focus();
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function stamp() {
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function header() {
  const el = document.getElementById("daemon");
  try {
    const status = await api("status");
    const d = status.daemon;
    el.textContent = d.answering
      ? `running · pid ${d.pid} · ${status.tasks} tasks · ${status.running} running · version ${(d.version || "").slice(0, 12)}`
      : "torchcore is not running";
  } catch (e) {
    el.textContent = asking ? "token needed" : e.message;
  }
}

// -- the task list ---------------------------------------------------------------------------

const listState = { q: "", state: "", offset: 0 };

async function tasksPage() {
  const search = h("input", { type: "search", id: "search", placeholder: "search tasks", value: listState.q });
  const states = h("select", { id: "state-filter" },
    ["", "ok", "failing", "crash-looping", "skipped by max", "never ran", "disabled", "not on this node"]
      .map((s) => h("option", { value: s, selected: s === listState.state }, s || "any state")));
  const body = h("div", { id: "task-list" });
  const reload = () => { listState.offset = 0; renderTasks(body); };
  let typing = null;
  search.addEventListener("input", () => { listState.q = search.value; clearTimeout(typing); typing = setTimeout(reload, 250); });
  states.addEventListener("change", () => { listState.state = states.value; reload(); });
  show(h("div", { class: "toolbar" }, search, states), body);
  await renderTasks(body);
  return () => renderTasks(body);
}

async function renderTasks(body) {
  const query = new URLSearchParams({ offset: listState.offset, limit: PAGE });
  if (listState.q) query.set("q", listState.q);
  if (listState.state) query.set("state", listState.state);
  let page;
  try { page = await api(`tasks?${query}`); } catch (e) { body.replaceChildren(message(e.message, true)); return; }
  const rows = page.tasks.map((t) => h("tr", { "data-task": t.name },
    h("td", {}, h("a", { href: `#/task/${encodeURIComponent(t.name)}` }, t.name)),
    h("td", { class: "state-cell" }, stateBadge(t.state)),
    h("td", {}, t.schedule || "-", h("div", { class: "desc" }, t.description)),
    h("td", {}, t.last ? h("span", { class: t.last.failed ? "failed" : "" }, `${t.last.result}, ${relative(t.last.ended)}`) : "-"),
    h("td", {}, relative(t.next_run)),
    h("td", { class: "running" }, t.running.length ? t.running.map((r) => `run ${r.run_id}`).join(", ") : "-")));
  const last = Math.min(page.offset + page.limit, page.total);
  const pager = h("div", { class: "pager" },
    h("button", { disabled: page.offset === 0, onclick: () => { listState.offset = Math.max(0, page.offset - PAGE); renderTasks(body); } }, "‹ previous"),
    h("span", { class: "muted" }, page.total ? `${page.offset + 1}–${last} of ${page.total}` : "no tasks match"),
    h("button", { disabled: last >= page.total, onclick: () => { listState.offset = page.offset + PAGE; renderTasks(body); } }, "next ›"));
  body.replaceChildren(h("table", { id: "tasks" },
    h("thead", {}, h("tr", {}, ["Task", "State", "Schedule", "Last result", "Next run", "Running now"].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows)), pager);
}

// -- one task --------------------------------------------------------------------------------

async function taskPage(name) {
  const top = h("div", {});
  const runs = h("div", {});
  const note = h("div", {});
  const pre = h("pre", { class: "log", id: "log" });
  const fleet = h("div", { id: "task-fleet" });
  const followBox = h("input", { type: "checkbox", id: "follow" });
  followBox.addEventListener("change", () => followLog(name, pre, followBox.checked));
  show(h("h2", {}, name), note, top, h("h3", {}, "Recent runs"), runs,
    h("h3", {}, "Across the fleet"), fleet,
    h("h3", {}, "Log ", h("label", { class: "muted" }, followBox, " follow")), pre);
  let logPath = `tasks/${encodeURIComponent(name)}/log?lines=200`;
  const pick = (path) => { logPath = path; showLog(pre, path); };
  const render = async () => {
    taskFleet(name, fleet);     // not waited for: the fleet database never holds this page up
    let task, history;
    try {
      [task, history] = await Promise.all([api(`tasks/${encodeURIComponent(name)}`),
        api(`history?task=${encodeURIComponent(name)}&limit=100`)]);
    } catch (e) { top.replaceChildren(message(e.message, true)); return; }
    const button = (label, id, path, done) => h("button", { id, onclick: async () => {
      try { const reply = await act(path); note.replaceChildren(message(done(reply))); refresh(); }
      catch (e) { note.replaceChildren(message(e.message, true)); }
    } }, label);
    top.replaceChildren(
      h("div", { class: "toolbar" },
        button("Run now", "run-now", `tasks/${encodeURIComponent(name)}/run`, (r) => `started run ${r.run_id}`),
        task.disabled_until_reload
          ? button("Enable", "enable", `tasks/${encodeURIComponent(name)}/enable`, () => "enabled until the next reload")
          : button("Disable until reload", "disable", `tasks/${encodeURIComponent(name)}/disable`, () => "disabled until the next reload")),
      h("dl", { class: "grid" },
        h("dt", {}, "state"), h("dd", { id: "task-state" }, stateBadge(task.state)),
        h("dt", {}, "schedule"), h("dd", {}, `${task.schedule || "-"} `, h("span", { class: "desc" }, task.description)),
        h("dt", {}, "command"), h("dd", {}, h("code", {}, Array.isArray(task.command) ? JSON.stringify(task.command) : task.command)),
        h("dt", {}, "last result"), h("dd", {}, task.last ? `${task.last.result}, ${relative(task.last.ended)}` : "-"),
        h("dt", {}, "running now"), h("dd", {}, task.running.length ? task.running.map((r) => `run ${r.run_id} (${r.pid ? "pid " + r.pid : r.state || "starting"})`).join(", ") : "-"),
        h("dt", {}, "next runs"), h("dd", {}, task.next_runs.length ? task.next_runs.map((t) => new Date(t).toLocaleString()).join(" · ") : "-")));
    runs.replaceChildren(strip(history, pick), durationChart(history));
    if (!follow) showLog(pre, logPath);
  };
  await render();
  return render;
}

function strip(history, pick) {
  const items = history.slice().reverse().map((run) => h("span", {
    class: `run r-${resultOf(run)}`, "data-run": run.run_id, title: `run ${run.run_id}: ${describe(run)}, ${relative(run.started || run.scheduled)}`,
    onclick: () => { stopFollow(); document.getElementById("follow").checked = false; pick(`runs/${run.run_id}/log`); },
  }));
  return h("div", { class: "strip", id: "runs-strip" }, items.length ? items : h("span", { class: "muted" }, "no runs recorded yet"));
}

function durationChart(history) {
  const runs = history.filter((r) => r.duration !== null).reverse();
  const width = 600, height = 120, pad = 24;
  const max = Math.max(0.001, ...runs.map((r) => r.duration));
  const step = runs.length ? Math.min(12, (width - pad) / runs.length) : 0;
  const bars = runs.map((r, i) => {
    const height_ = Math.max(1, (r.duration / max) * (height - 20));
    return h("rect", { x: pad + i * step, y: height - height_, width: Math.max(1, step - 1), height: height_,
      class: r.failed ? "r-failure" : "", "data-run": r.run_id }, h("title", {}, `run ${r.run_id}: ${seconds(r.duration)}`));
  });
  return h("svg", { class: "chart", id: "duration-chart", width, height, viewBox: `0 0 ${width} ${height}` },
    h("text", { x: 2, y: 12 }, seconds(max)), h("text", { x: 2, y: height - 2 }, "0"), bars);
}

async function showLog(pre, path) {
  try {
    const log = await api(path);
    pre.textContent = log.lines.length ? log.lines.join("\n") : "(nothing printed)";
    pre.scrollTop = pre.scrollHeight;
  } catch (e) { pre.textContent = e.message; }
}

// The follow is read with fetch() as a stream (an EventSource cannot send the token's header):
// server-sent events, one "data:" line per log line, ":" lines to keep the connection.
async function followLog(name, pre, on) {
  stopFollow();
  if (!on) return;
  pre.textContent = "";
  const controller = new AbortController();
  follow = controller;
  const add = (line) => {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(line + "\n");
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  };
  try {
    const response = await fetch(`api/v1/tasks/${encodeURIComponent(name)}/log/follow?lines=200`,
      { headers: withToken({ Accept: "text/event-stream" }), signal: controller.signal, cache: "no-store" });
    if (!response.ok) {
      if (response.status === 401) refused("GET");
      let text = response.statusText;
      try { text = (await response.json()).error || text; } catch (e) { /* no body */ }
      throw new Error(`${response.status}: ${text}`);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer.slice(0, end).split("\n").filter((l) => l.startsWith("data:"));
        buffer = buffer.slice(end + 2);
        if (data.length) add(data.map((l) => l.slice(5).replace(/^ /, "")).join("\n"));
      }
    }
    if (follow === controller) add("(the follow ended: the service stopped)");
  } catch (e) {
    if (e.name !== "AbortError" && follow === controller) add(`(the follow ended: ${e.message})`);
  } finally {
    if (follow === controller) {
      follow = null;
      const box = document.getElementById("follow");
      if (box) box.checked = false;
    }
  }
}

function stopFollow() {
  if (follow) { const controller = follow; follow = null; controller.abort(); }
}

// -- the timeline ----------------------------------------------------------------------------

const timelineState = { hours: 3, q: "" };

async function timelinePage() {
  const hours = h("select", { id: "hours" }, [0.25, 1, 3, 6, 12, 24].map((n) => h("option", { value: n, selected: n === timelineState.hours },
    n < 1 ? `last ${n * 60} min` : `last ${n} h`)));
  const search = h("input", { type: "search", id: "timeline-search", placeholder: "only tasks containing", value: timelineState.q });
  const box = h("div", { id: "timeline-box" });
  hours.addEventListener("change", () => { timelineState.hours = Number(hours.value); render(); });
  search.addEventListener("change", () => { timelineState.q = search.value.trim().toLowerCase(); render(); });
  show(h("div", { class: "toolbar" }, hours, search, h("span", { class: "muted" }, "one row per task, one bar per run")), box);
  const render = async () => {
    let runs;
    try { runs = await api(`history?since=${Math.round(timelineState.hours * 60)}m&limit=10000`); } catch (e) { box.replaceChildren(message(e.message, true)); return; }
    const full = runs.length >= 10000;
    if (timelineState.q) runs = runs.filter((r) => r.task.toLowerCase().includes(timelineState.q));
    box.replaceChildren(timeline(runs, timelineState.hours),
      full ? message("only the latest 10,000 runs of the window are drawn; a shorter window shows all") : "");
  };
  await render();
  return render;
}

function timeline(runs, hours) {
  const now = Date.now(), start = now - hours * 3600e3;
  const names = [...new Set(runs.map((r) => r.task))].sort();
  if (!names.length) return message("no runs in this window");
  const label = 160, width = 1000, row = 18, height = names.length * row + 20;
  const x = (t) => label + ((t - start) / (now - start)) * (width - label);
  const items = [];
  for (let i = 0; i <= 6; i++) {
    const t = start + (i / 6) * (now - start);
    items.push(h("line", { x1: x(t), x2: x(t), y1: 0, y2: height - 14 }),
      h("text", { x: x(t), y: height - 2, "text-anchor": i === 6 ? "end" : i === 0 ? "start" : "middle" },
        new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })));
  }
  names.forEach((name, i) => items.push(h("text", { x: 2, y: i * row + 13 }, name.length > 24 ? name.slice(0, 23) + "…" : name)));
  for (const run of runs) {
    const from = new Date(run.started || run.scheduled).getTime();
    const to = run.ended ? new Date(run.ended).getTime() : (run.started ? now : from);
    const left = Math.max(label, x(from));
    items.push(h("rect", { class: `bar r-${resultOf(run)}`, "data-run": run.run_id, "data-task": run.task,
      x: left, y: names.indexOf(run.task) * row + 3, width: Math.max(2, x(to) - left), height: row - 6 },
    h("title", {}, `${run.task} run ${run.run_id}: ${describe(run)}, ${seconds(run.duration)}`)));
  }
  return h("svg", { class: "timeline", id: "timeline", width, height, viewBox: `0 0 ${width} ${height}` }, items);
}

// -- history ---------------------------------------------------------------------------------

const historyState = { task: "", since: "", failed: false, limit: 100 };

async function historyPage() {
  const task = h("input", { id: "h-task", placeholder: "task", value: historyState.task });
  const since = h("input", { id: "h-since", placeholder: "since (2h, today, 2026-11-24)", value: historyState.since });
  const failed = h("input", { type: "checkbox", id: "h-failed", checked: historyState.failed });
  const limit = h("select", { id: "h-limit" }, [50, 100, 500, 1000].map((n) => h("option", { value: n, selected: n === historyState.limit }, `${n} runs`)));
  const box = h("div", {});
  const render = async () => {
    Object.assign(historyState, { task: task.value.trim(), since: since.value.trim(), failed: failed.checked, limit: Number(limit.value) });
    const query = new URLSearchParams({ limit: historyState.limit });
    if (historyState.task) query.set("task", historyState.task);
    if (historyState.since) query.set("since", historyState.since);
    if (historyState.failed) query.set("failed", "true");
    let runs;
    try { runs = await api(`history?${query}`); } catch (e) { box.replaceChildren(message(e.message, true)); return; }
    box.replaceChildren(runs.length ? h("table", { id: "history" },
      h("thead", {}, h("tr", {}, ["Run", "Task", "When", "Duration", "Result", "Node"].map((c) => h("th", {}, c)))),
      h("tbody", {}, runs.map((r) => h("tr", { "data-run": r.run_id },
        h("td", {}, r.run_id), h("td", {}, h("a", { href: `#/task/${encodeURIComponent(r.task)}` }, r.task)),
        h("td", {}, relative(r.started || r.scheduled)), h("td", {}, seconds(r.duration)),
        h("td", { class: r.failed ? "failed" : "" }, describe(r) + (r.manual ? " (manual)" : "")), h("td", {}, r.node)))))
      : message("no matching runs recorded"));
  };
  const form = h("form", { class: "toolbar", onsubmit: (e) => { e.preventDefault(); render(); } },
    task, since, h("label", {}, failed, " failed only"), limit, h("button", { type: "submit" }, "Show"));
  show(form, box);
  await render();
  return render;
}

// The Fleet view and a task's nodes: fleet.js (fleetPage, taskFleet).

// -- routing ---------------------------------------------------------------------------------

let refresh = () => {};

// A name from the URL; a broken escape (%E0) is kept as written: the page then says no such task.
function decoded(text) {
  try { return decodeURIComponent(text); } catch (e) { return text; }
}

async function route() {
  asking = false;           // a page refused without the token asks for it again
  clearInterval(timer);
  stopFollow();
  const hash = location.hash.replace(/^#\/?/, "");
  const [page, ...rest] = hash.split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === (page || "tasks"));
  let again;
  if (page === "task" && rest.length) again = await taskPage(decoded(rest.join("/")));
  else if (page === "timeline") again = await timelinePage();
  else if (page === "history") again = await historyPage();
  else if (page === "fleet") again = await fleetPage();
  else again = await tasksPage();
  refresh = async () => { await header(); if (again) await again(); stamp(); };
  await header();
  stamp();
  if (asking) return;       // the token form waits for its token
  timer = setInterval(() => { if (!document.hidden && !asking) refresh(); }, REFRESH_MS);
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
