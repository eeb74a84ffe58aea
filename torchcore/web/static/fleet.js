// torchcore's dashboard, the fleet's pages: the nodes, the fleet history and, on a task's page,
// the nodes that ran it (over /api/v1/fleet/).  Loaded after app.js, whose helpers it uses
// (h, api, message, stateBadge, describe, resultOf, relative, seconds, show).
"use strict";

const fleetState = { task: "", node: "", failed: false, limit: 100 };

// Seconds as a short duration: 45s, 12m, 3.5h, 2.1d.
function span(value) {
  const abs = Math.max(0, value);
  return abs < 60 ? `${Math.round(abs)}s` : abs < 3600 ? `${Math.round(abs / 60)}m`
    : abs < 86400 ? `${(abs / 3600).toFixed(1)}h` : `${(abs / 86400).toFixed(1)}d`;
}

function between(fromIso, toIso) {
  return (new Date(toIso).getTime() - new Date(fromIso).getTime()) / 1000;
}

function clock(time) {
  return new Date(time).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function notSetUp() {
  return h("div", { id: "fleet-not-set-up" },
    message("The fleet is not set up: this node runs its own share of the task file and " +
      "reports to no fleet database."),
    h("p", {}, "To see every node here (their state, drift and clock, the history of all of " +
      "them), give the task file a fleet database, on every node:"),
    h("ol", {},
      h("li", {}, "install the PostgreSQL client: ", h("code", {}, "pip install 'torchcore[fleet]'")),
      h("li", {}, "add to the task file (no password in it: PGPASSWORD, PGPASSFILE or ~/.pgpass):",
        h("pre", { class: "snippet" }, "settings:\n  fleet:\n    database: postgresql://torchcore@db.internal/torchcore")),
      h("li", {}, "create the schema once, from any node: ", h("code", {}, "torchcore fleet init")),
      h("li", {}, "then ", h("code", {}, "torchcore reload"), " (docs/fleet.md says more).")));
}

// The fleet's database as /api/v1/status names it, or null when the fleet is not set up: asked
// first, so that a node without a fleet is never sent a request that is bound to be a 404.
async function fleetDatabase() {
  const status = await api("status");
  return status.fleet ? status.fleet.database : null;
}

// -- the Fleet view --------------------------------------------------------------------------

async function fleetPage() {
  let database;
  try { database = await fleetDatabase(); } catch (e) {
    if (!asking) show(h("h2", {}, "Fleet"), message(e.message, true));     // else: the token form
    return null;
  }
  if (!database) {
    show(h("h2", {}, "Fleet"), notSetUp());
    // set up by a reload later: the next refresh finds it and shows the fleet
    return async () => { try { if (await fleetDatabase()) route(); } catch (e) { /* not yet */ } };
  }
  const summary = h("p", { id: "fleet-summary", class: "muted" });
  const nodesBox = h("div", { id: "fleet-nodes" });
  const task = h("input", { id: "fh-task", placeholder: "task", value: fleetState.task });
  const node = h("select", { id: "fh-node" }, h("option", { value: "" }, "any node"));
  const failed = h("input", { type: "checkbox", id: "fh-failed", checked: fleetState.failed });
  const limit = h("select", { id: "fh-limit" }, [50, 100, 500, 1000].map((n) =>
    h("option", { value: n, selected: n === fleetState.limit }, `${n} runs`)));
  const historyBox = h("div", { id: "fleet-history-box" });
  const output = h("div", { id: "fleet-run" });
  const form = h("form", { class: "toolbar", id: "fleet-filters", onsubmit: (e) => { e.preventDefault(); renderHistory(); } },
    task, node, h("label", {}, failed, " failed only"), limit, h("button", { type: "submit" }, "Show"));

  const renderNodes = async () => {
    let body;
    try { body = await api("fleet/nodes"); } catch (e) {
      summary.textContent = database;
      nodesBox.replaceChildren(message(e.message, true));
      return;
    }
    summary.textContent = fleetSummary(body);
    nodesBox.replaceChildren(nodesTable(body));
    const chosen = node.options.length > 1 ? node.value : fleetState.node;   // kept across refreshes
    const names = body.nodes.map((n) => n.name);
    if (chosen && !names.includes(chosen)) names.push(chosen);
    node.replaceChildren(h("option", { value: "" }, "any node"),
      ...names.map((name) => h("option", { value: name, selected: name === chosen }, name)));
  };
  const renderHistory = async () => {
    Object.assign(fleetState, { task: task.value.trim(), node: node.value, failed: failed.checked, limit: Number(limit.value) });
    const query = new URLSearchParams({ limit: fleetState.limit });
    if (fleetState.task) query.set("task", fleetState.task);
    if (fleetState.node) query.set("node", fleetState.node);
    if (fleetState.failed) query.set("failed", "true");
    let runs;
    try { runs = await api(`fleet/history?${query}`); } catch (e) { historyBox.replaceChildren(message(e.message, true)); return; }
    historyBox.replaceChildren(runs.length ? h("table", { id: "fleet-history" },
      h("thead", {}, h("tr", {}, ["Run", "Task", "Node", "When", "Duration", "Result"].map((c) => h("th", {}, c)))),
      h("tbody", {}, runs.map((r) => h("tr", { "data-node": r.node, "data-run": r.run_id, class: "clickable",
        title: "show what it printed", onclick: () => showRun(output, r.node, r.run_id) },
      h("td", {}, r.run_id), h("td", {}, h("a", { href: `#/task/${encodeURIComponent(r.task)}` }, r.task)),
      h("td", {}, r.node), h("td", {}, relative(r.started || r.scheduled)), h("td", {}, seconds(r.duration)),
      h("td", { class: r.failed ? "failed" : "" }, describe(r) + (r.manual ? " (manual)" : ""))))))
      : message("no matching runs in the fleet database"));
  };

  show(h("h2", {}, "Fleet"), summary, nodesBox, h("h3", {}, "Fleet history"), form, historyBox, output);
  await renderNodes();
  await renderHistory();
  return async () => { await renderNodes(); await renderHistory(); };
}

function fleetSummary(body) {
  const c = body.counts;
  if (!body.nodes.length) return `no node has registered in the fleet database ${body.database} yet`;
  let text = `${body.nodes.length} node(s): ` + ["up", "late", "down", "stopped"]
    .filter((s) => c[s]).map((s) => `${c[s]} ${s}`).join(", ");
  if (c.drifted) text += `; ${c.drifted} drifted from the file most up nodes run`;
  if (c.clock_flagged) text += `; ${c.clock_flagged} with a clock more than 1 s off`;
  return `${text} · ${body.database}`;
}

function nodesTable(body) {
  if (!body.nodes.length) return message("Nodes appear here once their fleet agent reports.");
  const now = body.now;
  const rows = body.nodes.map((n) => {
    const file = (n.file_commit || n.file_digest || "-").slice(0, 12);
    const offset = n.clock_offset === null ? "-" : `${n.clock_offset >= 0 ? "+" : ""}${n.clock_offset.toFixed(3)}s`;
    return h("tr", { "data-node": n.name, class: n.state === "down" ? "node-down" : "" },
      h("td", {}, h("strong", {}, n.name),
        h("div", { class: "desc" }, [n.hostname !== n.name ? n.hostname : null, n.addresses.join(", ")].filter(Boolean).join(" · "))),
      h("td", { class: "node-state" }, stateBadge(n.state),
        n.since ? h("div", { class: "desc" }, `since ${clock(n.since)} (${span(between(n.since, now))})`) : null),
      h("td", { class: "node-file", title: n.file_path || "" }, h("code", {}, file),
        n.drifted ? h("div", { class: "failed drift" }, `drifted for ${span(between(n.drifted_since, now))}`) : null),
      h("td", { class: n.clock_flagged ? "node-clock failed" : "node-clock" },
        offset, n.clock_flagged ? h("div", { class: "desc failed" }, "off by more than 1 s") : null),
      h("td", { class: "node-running" }, n.running),
      h("td", { class: n.failed_24h ? "node-failed failed" : "node-failed" }, n.failed_24h),
      h("td", {}, n.version, h("div", { class: "desc" }, `heard ${span(n.age)} ago`)));
  });
  return h("table", { id: "fleet-nodes-table" },
    h("thead", {}, h("tr", {}, ["Node", "State", "Task file", "Clock offset", "Running", "Failed 24 h", "Version"]
      .map((c) => h("th", {}, c)))), h("tbody", {}, rows));
}

async function showRun(box, node, runId) {
  try {
    const run = await api(`fleet/runs/${encodeURIComponent(node)}/${runId}`);
    box.replaceChildren(h("h3", {}, `Run ${run.run_id} of ${run.task} on ${run.node}: ${describe(run)}`),
      h("pre", { class: "log", id: "fleet-output" }, run.lines.length ? run.lines.join("\n")
        : run.output === null ? "(no output stored)" : "(nothing printed)"));
  } catch (e) { box.replaceChildren(message(e.message, true)); }
}

// -- a task's page: the nodes that ran it ----------------------------------------------------

// A `run: once` task: the node that ran its last second, and who holds each of its slots.
function onceHolders(once) {
  const parts = [];
  if (once.last) parts.push(`its last second, ${clock(once.last.second)}, ran on ${once.last.node} (fence ${once.last.fence})`);
  for (const s of once.slots) {
    parts.push(`slot ${s.slot} is held by ${s.node}` + (s.second ? ` (second ${clock(s.second)})` : "")
      + (s.lease_until ? `, lease until ${clock(s.lease_until)}` : ""));
  }
  return h("p", { id: "task-fleet-once" }, `Run once: ${parts.length ? parts.join("; ") : "no run and no slot held yet"}.`);
}

async function taskFleet(name, box) {
  let view;
  try {
    if (!(await fleetDatabase())) {
      box.replaceChildren(h("p", { class: "muted" }, "The fleet is not set up (the Fleet view says how)."));
      return;
    }
    view = await api(`fleet/tasks?task=${encodeURIComponent(name)}`);
  } catch (e) { box.replaceChildren(message(e.message, true)); return; }
  const task = view.tasks[0];
  if (!task) { box.replaceChildren(); return; }
  const ran = new Map(task.ran.map((r) => [r.node, r]));
  const names = [...task.should, ...task.ran.map((r) => r.node).filter((n) => !task.should.includes(n))];
  const rows = names.map((node) => {
    const r = ran.get(node);
    return h("tr", { "data-node": node },
      h("td", {}, node, task.should.includes(node) ? null : h("span", { class: "desc" }, " (not a target now)")),
      h("td", { class: r && r.failed ? "fleet-result failed" : "fleet-result" }, r ? r.last_result : "no run in the last day"),
      h("td", {}, r ? relative(r.last_at) : "-"),
      h("td", {}, r ? r.runs : 0), h("td", { class: r && r.failures ? "failed" : "" }, r ? r.failures : 0));
  });
  box.replaceChildren(
    h("p", { class: "muted" }, task.should.length ? `Should run on ${task.should.length} of ${view.nodes} registered node(s) (${task.targets}).`
      : `Its targets (${task.targets}) select none of the ${view.nodes} registered node(s).`),
    task.once ? onceHolders(task.once) : null,
    ...view.problems.map((p) => message(p.text, true)),
    rows.length ? h("table", { id: "task-fleet-table" },
      h("thead", {}, h("tr", {}, ["Node", "Last result", "When", "Runs (1 day)", "Failures"].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows)) : null);
}
