"""The fleet database (issue 18's targets), on a throw-away PostgreSQL (tests/pgserver.py):

  a  replication lag, run end -> its row in PostgreSQL, p50/p99: 10 real daemons as separate nodes
     (--node-name, --node-ip, a directory each) running 100 runs/s in all (target p99 <= 2 s);
     baseline: a one-row INSERT's round trip to the same server, timed meanwhile
  b  a database outage (60 s) under the same load: the time from the server's return until every
     run that ended before it is in PostgreSQL (target <= 10 s); baseline: the server's own restart
  c  scale: 1,000 simulated nodes, the fleet agent's own code (fleetagent.Agent's heartbeat and
     write, fleetrows' statements) driven by a load generator in 4 processes, heartbeating every
     5 s and shipping 200 runs/s in all: the database's CPU (the server's processes), p99 write
     latency, rows and bytes per run, `fleet status`'s query over the 1,000 nodes; baselines: the
     server idle, and a `SELECT 1` round trip timed meanwhile
  d  node cost: the agent's idle CPU and RSS over 60 s (targets < 1% of a core, < 40 MB; baseline:
     the supervisor beside it), then bench_launch.py --quick with the fleet off and on in one run

  e  `run: once` launch lateness: 100 tasks every second on 3 real daemons, as `run: once` and
     as `each` (each task pinned to one node, the same runs per second), p50/p99 of each and the
     p99 difference (target <= 20 ms); the rows the claims write per fire (pg_stat_user_tables:
     new rows, and updates, on torchcore.claims and torchcore.slots; target <= 1.05 new rows)
  f  claims at scale: 1,000 simulated nodes, claims.py's statements (claim, slot, start, renew,
     release) for 1,000 `once` fires per second in all, each task with a pool of 3 nodes, from 8
     processes (a connection each): claim p99, the database's CPU, every fire won once and none twice
  g  failover of a `run: once` daemon after kill -9 of its node (every process of it), 3 nodes,
     fleet.lease 6 s, 20 trials: p50/p99 (target p99 <= lease + 2 s)

The load generator multiplexes its 1,000 nodes over 4 connections (the throw-away server takes
300; a real fleet holds one per node): each node's heartbeat and batch is its own transaction, as
the agent sends it.  Everything runs on this machine, with the database, the daemons and the
generator sharing its cores: read the figures with the machine line printed first.

Usage: python benchmarks/bench_fleet.py [--quick] [--parts abcdefg]
"""

import argparse
import collections
import dataclasses
import heapq
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import benchlib  # noqa: E402
import pgserver  # noqa: E402

from torchcore import fleetdb  # noqa: E402

FULL = dict(nodes=10, tasks=10, window=60, outage=60, sim_nodes=1000, sim_runs=200,
            sim_window=60, idle=60, workers=4, once_tasks=100, once_window=30, claim_nodes=1000,
            claim_tasks=1000, claim_window=30, claim_workers=8, trials=20)
QUICK = dict(nodes=3, tasks=5, window=8, outage=10, sim_nodes=100, sim_runs=20,
             sim_window=8, idle=8, workers=2, once_tasks=20, once_window=8, claim_nodes=100,
             claim_tasks=100, claim_window=8, claim_workers=2, trials=3)
HEARTBEAT = 5


def percentiles(values):
    if not values:
        return float("nan"), float("nan"), float("nan")
    return benchlib.percentile(values, 0.5), benchlib.percentile(values, 0.99), max(values)


# ---- real daemons as nodes (a, b, d) ----------------------------------------------------------

class Node:
    def __init__(self, root, name, ip, url, tasks, schedule="* * * * * *", heartbeat=HEARTBEAT):
        self.name, self.dir = name, os.path.join(root, name)
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "tasks.yaml")
        benchlib.write_taskfile(self.path, [(f"t{i}", schedule, "true") for i in range(tasks)],
                                settings=["  state_dir: state", "  fleet:",
                                          f"    database: '{url}'", f"    heartbeat: {heartbeat}s"])
        self.daemon = benchlib.Daemon(self.path, extra=["--node-name", name, "--node-ip", ip])
        self.db = os.path.join(self.dir, "state", "torchcore.db")

    def ended_before(self, epoch):
        """Runs of this node that ended before ``epoch``, as its SQLite has them."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute("SELECT count(*) FROM runs WHERE ended IS NOT NULL AND ended < ?",
                                (epoch,)).fetchone()[0]
        finally:
            conn.close()

    def agent(self):
        for child in self.daemon.process.children():
            if "fleet agent" in " ".join(child.cmdline()):
                return child
        return None


def wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def round_trips(conn, seconds, sql):
    """Round trips of ``sql`` every 50 ms for ``seconds``: their durations in seconds."""
    times, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        conn.execute(sql)
        times.append(time.perf_counter() - start)
        time.sleep(0.05)
    return times


def part_a(server, cfg, root):
    url = server.create_db("bench_fleet_nodes")
    with fleetdb.connect(url) as conn:
        fleetdb.migrate(conn, url)
        conn.execute("CREATE TABLE probe (at float8)")
    nodes = [Node(root, f"node-{i}", f"10.7.0.{i + 1}", url, cfg["tasks"]) for i in range(cfg["nodes"])]
    rate = cfg["nodes"] * cfg["tasks"]
    conn = fleetdb.connect(url)
    wait_until(lambda: conn.execute("SELECT count(DISTINCT node) FROM torchcore.runs").fetchone()[0]
               == len(nodes), 60, "every node shipping")
    time.sleep(3)
    start = time.time()
    floor = round_trips(conn, cfg["window"], "INSERT INTO probe VALUES (1)")
    end = time.time()
    time.sleep(3)
    lags = [row[0] for row in conn.execute(
        "SELECT extract(epoch FROM shipped - ended)::float8 FROM torchcore.runs "
        "WHERE ended >= to_timestamp(%s) AND ended < to_timestamp(%s)", (start, end))]
    local = sum(n.ended_before(end) - n.ended_before(start) for n in nodes)
    p50, p99, worst = percentiles(lags)
    f50, f99, _ = percentiles(floor)
    print(f"\n(a) replication lag, run end -> row in PostgreSQL: {len(nodes)} daemons, "
          f"{rate} runs/s in all, {cfg['window']} s")
    print(f"  runs ended in the window: {local} on the nodes, {len(lags)} in PostgreSQL 3 s later "
          f"({local - len(lags)} not yet); {len(lags) / cfg['window']:.1f} runs/s")
    print(f"  lag p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms "
          f"(the agent looks at its journal every 0.5 s)")
    print(f"  baseline, a one-row INSERT's round trip meanwhile: p50 {f50 * 1000:.2f} ms, "
          f"p99 {f99 * 1000:.2f} ms; lag p99 / INSERT p99 {benchlib.ratio(p99, f99)}")
    met = p99 <= 2.0 and local == len(lags)
    print(f"  target p99 <= 2 s, every run shipped: {'MET' if met else 'NOT MET'}")
    return nodes, url, conn


def shipped_by(url, back_at):
    with fleetdb.connect(url) as conn:
        return dict(conn.execute("SELECT node, count(*) FROM torchcore.runs WHERE ended IS NOT NULL "
                                 "AND ended < to_timestamp(%s) GROUP BY node", (back_at,)).fetchall())


def outage(server, cfg, nodes, url, conn):
    conn.close()
    before = shipped_by(url, time.time())
    server.stop()
    stopped = time.monotonic()
    time.sleep(cfg["outage"])
    restart = time.monotonic()
    server.start_again()
    back, back_at = time.monotonic(), time.time()
    local = {n.name: n.ended_before(back_at) for n in nodes}
    done = None
    while time.monotonic() - back < 60:
        try:
            have = shipped_by(url, back_at)
        except fleetdb.FleetError:
            have = {}
        if all(have.get(name, 0) >= count for name, count in local.items()):
            done = time.monotonic() - back
            break
        time.sleep(0.1)
    with fleetdb.connect(url) as conn:
        first = [row[0] for row in conn.execute(
            "SELECT min(extract(epoch FROM shipped))::float8 - %s FROM torchcore.runs "
            "WHERE shipped >= to_timestamp(%s) GROUP BY node", (back_at, back_at))]
    backlog = sum(local.values()) - sum(before.values())
    print(f"\n(b) a {cfg['outage']} s database outage under the same load "
          f"(down {restart - stopped:.0f} s)")
    print(f"  backlog: {backlog} runs ended while the database was away")
    print(f"  baseline, the server's own restart (pg_ctl start to ready): {back - restart:.2f} s")
    if first:
        print(f"  each agent's first write after the return: p50 {benchlib.percentile(first, .5):.2f} s,"
              f" last {max(first):.2f} s")
    if done is None:
        print("  backlog not shipped within 60 s of the return; target <= 10 s: NOT MET")
    else:
        print(f"  backlog shipped {done:.2f} s after the return ({backlog / done:.0f} runs/s); "
              f"target <= 10 s: {'MET' if done <= 10 else 'NOT MET'}")


def part_d(server, cfg, root):
    url = server.create_db("bench_fleet_idle")
    with fleetdb.connect(url) as conn:
        fleetdb.migrate(conn, url)
    node = Node(root, "idle", "10.7.1.1", url, 20, schedule="0 0 3 1 1 *")
    wait_until(lambda: node.agent() is not None, 30, "the agent")
    with fleetdb.connect(url) as conn:
        wait_until(lambda: conn.execute("SELECT count(*) FROM torchcore.nodes").fetchone()[0], 30,
                   "the registration")
    time.sleep(HEARTBEAT + 1)       # past the first heartbeats and git's first answer
    agent, supervisor = node.agent(), node.daemon.process
    before = (benchlib.cpu_precise(agent), benchlib.cpu_precise(supervisor), time.monotonic())
    rss = []
    end = time.monotonic() + cfg["idle"]
    while time.monotonic() < end:
        rss.append((agent.memory_info().rss, supervisor.memory_info().rss))
        time.sleep(1)
    span = time.monotonic() - before[2]
    a_cpu = (benchlib.cpu_precise(agent) - before[0]) / span
    s_cpu = (benchlib.cpu_precise(supervisor) - before[1]) / span
    a_rss, s_rss = max(r[0] for r in rss) / 1e6, max(r[1] for r in rss) / 1e6
    node.daemon.stop()
    print(f"\n(d) node cost, idle over {cfg['idle']} s (heartbeat {HEARTBEAT} s, 20 tasks none due)")
    print(f"  fleet agent: CPU {a_cpu * 1000:.3f} ms/s ({a_cpu * 100:.3f}% of a core), RSS {a_rss:.1f} MB")
    print(f"  baseline, its supervisor beside it: CPU {s_cpu * 1000:.3f} ms/s, RSS {s_rss:.1f} MB; "
          f"agent / supervisor: CPU {benchlib.ratio(a_cpu, s_cpu)}, RSS {benchlib.ratio(a_rss, s_rss)}")
    met = a_cpu < 0.01 and a_rss < 40
    print(f"  target under 1% of a core and 40 MB RSS: {'MET' if met else 'NOT MET'}")
    launch_url = server.create_db("bench_fleet_launch")
    with fleetdb.connect(launch_url) as conn:
        fleetdb.migrate(conn, launch_url)
    print("\n(d) bench_launch.py --quick, the fleet off and on in one run:", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, "bench_launch.py"), "--quick", "--systems",
                    "floor,torchcore,torchcore+fleet"],
                   env=dict(os.environ, TORCHCORE_DATABASE_URL=launch_url), check=False)


# ---- 1,000 simulated nodes (c) ---------------------------------------------------------------

class _Store:
    """What Agent.heartbeat asks of the node's SQLite: how many records wait."""

    def waiting(self):
        return 0


def simulate(spec):
    """Child: ``spec`` = url, first, count, runs_per_node_s, seconds, t0 (JSON).  Prints one JSON
    line: write and heartbeat latencies, runs shipped, how late the events were at most."""
    from torchcore import fleetagent, fleetrows, taskspec
    from torchcore.fleetspec import FleetSettings
    from torchcore.runrecord import RunRecord

    s = json.loads(spec)
    conn = fleetrows.connect(s["url"])
    settings = taskspec.default_settings("/etc/torchcore/tasks.yaml")
    settings = dataclasses.replace(settings, fleet=FleetSettings(database=s["url"], heartbeat=HEARTBEAT))
    agents, events = [], []
    period = 1.0 / s["runs_per_node_s"]
    for k in range(s["count"]):
        i = s["first"] + k
        agent = fleetagent.Agent(_Store(), settings, f"sim-{i:04d}", s["url"],
                                 connect=lambda url: conn)
        agent.conn = conn
        agent.live = {"pid": 100000 + i, "started": s["t0"] - 3600, "digest": "d" * 64,
                      "node": {"addresses": [f"10.8.{i // 256}.{i % 256}"]},
                      "stats": {"started": 0, "failed": 0}, "tasks": {}}
        agent.git_asked = ("d" * 64, float("inf"))     # the commit: asked of git once a minute
        agent.run_id = 0
        agents.append(agent)
        phase = (i * 7919 % 1000) / 1000.0
        heapq.heappush(events, (s["t0"] + phase * HEARTBEAT, 0, k))
        heapq.heappush(events, (s["t0"] + phase * period, 1, k))
    end = s["t0"] + s["seconds"]
    writes, beats, late = [], [], 0.0
    output = output_example()
    benchlib.sleep_until(s["t0"])
    while events and events[0][0] < end:
        at, kind, k = heapq.heappop(events)
        benchlib.sleep_until(at)
        late = max(late, time.time() - at)
        agent = agents[k]
        start = time.perf_counter()
        if kind == 0:
            agent.heartbeat()
            beats.append(time.perf_counter() - start)
            heapq.heappush(events, (at + HEARTBEAT, 0, k))
        else:
            agent.run_id += 1
            now = time.time()
            record = RunRecord(agent.run_id, f"task-{agent.run_id % 20}", agent.node,
                               int(now - 1), now - 0.5, now, 0, pid=4242)
            agent.write([fleetrows.run_row(agent.node, record, output)])
            writes.append(time.perf_counter() - start)
            heapq.heappush(events, (at + period, 1, k))
    print(json.dumps({"writes": writes, "beats": beats, "late": late}), flush=True)


def server_processes(server):
    with open(os.path.join(server.data, "postmaster.pid")) as handle:
        postmaster = psutil.Process(int(handle.readline()))
    return [postmaster] + postmaster.children(recursive=True)


def server_cpu(server):
    total = 0.0
    for proc in server_processes(server):
        try:
            total += benchlib.cpu_seconds(proc)
        except psutil.Error:
            pass
    return total


def part_c(server, cfg):
    url = server.create_db("bench_fleet_scale")
    with fleetdb.connect(url) as conn:
        fleetdb.migrate(conn, url)
    nodes, workers = cfg["sim_nodes"], cfg["workers"]
    per_node = cfg["sim_runs"] / nodes
    idle_span = min(10, cfg["sim_window"])
    cpu0, t = server_cpu(server), time.monotonic()
    time.sleep(idle_span)
    idle_cpu = (server_cpu(server) - cpu0) / (time.monotonic() - t)
    t0 = time.time() + 3
    procs = []
    for w in range(workers):
        first, count = w * nodes // workers, (w + 1) * nodes // workers - w * nodes // workers
        spec = json.dumps({"url": url, "first": first, "count": count, "runs_per_node_s": per_node,
                           "seconds": cfg["sim_window"], "t0": t0})
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--simulate", spec],
                                      stdout=subprocess.PIPE, text=True))
    benchlib.sleep_until(t0 + 1)        # the connections are made, the first heartbeats sent
    conn = fleetdb.connect(url)
    cpu0, t = server_cpu(server), time.monotonic()
    probe = round_trips(conn, cfg["sim_window"] - 2, "SELECT 1")
    db_cpu = (server_cpu(server) - cpu0) / (time.monotonic() - t)
    results = [json.loads(p.communicate(timeout=cfg["sim_window"] + 120)[0].splitlines()[-1])
               for p in procs]
    writes = [x for r in results for x in r["writes"]]
    beats = [x for r in results for x in r["beats"]]
    rows = conn.execute("SELECT count(*), count(DISTINCT (node, run_id)) FROM torchcore.runs").fetchone()
    size = conn.execute("SELECT pg_total_relation_size('torchcore.runs')").fetchone()[0]
    registered = conn.execute("SELECT count(*) FROM torchcore.nodes").fetchone()[0]
    from torchcore import fleetquery
    status = benchlib.best_of(3, lambda: fleetquery.nodes(conn))
    conn.close()
    w50, w99, wmax = percentiles(writes)
    b50, b99, _ = percentiles(beats)
    s50, s99, _ = percentiles(probe)
    print(f"\n(c) scale: {nodes} simulated nodes (the agent's own heartbeat and write, {workers} "
          f"generator processes), heartbeat {HEARTBEAT} s, {cfg['sim_runs']} runs/s in all, "
          f"{cfg['sim_window']} s")
    print(f"  shipped {len(writes)} runs ({len(writes) / cfg['sim_window']:.0f}/s) and {len(beats)} "
          f"heartbeats ({len(beats) / cfg['sim_window']:.0f}/s); events at most "
          f"{max(r['late'] for r in results) * 1000:.0f} ms late; {registered} nodes registered")
    print(f"  database CPU (its processes): {db_cpu * 100:.1f}% of a core; baseline, the server idle "
          f"before: {idle_cpu * 100:.2f}%")
    print(f"  write latency (one run, one transaction): p50 {w50 * 1000:.2f} ms, p99 {w99 * 1000:.2f} ms, "
          f"max {wmax * 1000:.1f} ms; heartbeat p50 {b50 * 1000:.2f} ms, p99 {b99 * 1000:.2f} ms")
    print(f"  baseline, SELECT 1 meanwhile: p50 {s50 * 1000:.2f} ms, p99 {s99 * 1000:.2f} ms; "
          f"write p99 / SELECT 1 p99 {benchlib.ratio(w99, s99)}")
    print(f"  rows per run {rows[0] / max(1, len(writes)):.2f} ({rows[0]} rows, {rows[1]} keys); "
          f"bytes per run {size / max(1, rows[0]):.0f} (pg_total_relation_size, with indexes; "
          f"{len(output_example())} bytes of output each)")
    print(f"  fleetquery.nodes over the {registered} nodes (fleet status's query), best of 3: "
          f"{status * 1000:.0f} ms (target < 1 s)")


def output_example():
    return "".join(f"line {n} of what the task printed\n" for n in range(4)) + \
        "[torchcore] run ended: ok (exit 0) after 0.01s\n"


# ---- run: once (e, f, g) ----------------------------------------------------------------------

def once_node(root, name, ip, url, tasks, lease=None):
    """A daemon as node ``name`` on the task file ``tasks`` (the lines after ``tasks:``)."""
    folder = os.path.join(root, name)
    os.makedirs(folder)
    path = os.path.join(folder, "tasks.yaml")
    lines = ["settings:", "  timezone: UTC", "  max_running: 5000", "  watch: false",
             "  state_dir: state", "  fleet:", f"    database: '{url}'",
             f"    heartbeat: {HEARTBEAT}s", *([f"    lease: {lease}s"] if lease else []), "tasks:"]
    with open(path, "w") as handle:
        handle.write("\n".join(lines + tasks) + "\n")
    return benchlib.Daemon(path, extra=["--node-name", name, "--node-ip", ip])


def lateness(folder, first, last):
    """started - scheduled of the runs of [first, last] a node started, and its skips by reason."""
    conn = sqlite3.connect(f"file:{os.path.join(folder, 'state', 'torchcore.db')}?mode=ro", uri=True,
                           timeout=10)
    try:
        late = [row[0] for row in conn.execute(
            "SELECT started - scheduled FROM runs WHERE scheduled BETWEEN ? AND ? AND started IS "
            "NOT NULL AND skipped IS NULL AND manual = 0", (first, last))]
        skips = conn.execute("SELECT skipped, count(*) FROM runs WHERE scheduled BETWEEN ? AND ? "
                             "AND skipped IS NOT NULL GROUP BY skipped", (first, last)).fetchall()
    finally:
        conn.close()
    return late, dict(skips)


WRITES = """SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_user_tables
    WHERE schemaname = 'torchcore' AND relname IN ('claims', 'slots', 'runs')"""


def writes(conn):
    return {name: (ins, upd) for name, ins, upd in conn.execute(WRITES)}


def part_e(server, cfg, root):
    """Launch lateness of `once` tasks against the same tasks as `each` (each one pinned to one
    node by its ips, so that both phases start the same runs per second), and the rows the
    claims write per fire."""
    count, window = cfg["once_tasks"], cfg["once_window"]
    results = {}
    for run in ("each", "once"):
        url = server.create_db(f"bench_fleet_late_{run}")
        with fleetdb.connect(url) as conn:
            fleetdb.migrate(conn, url)
        tasks = []
        for i in range(count):
            tasks += [f"  - name: t{i}", '    schedule: "* * * * * *"', "    command: 'true'"]
            tasks += ["    run: once"] if run == "once" else [f"    ips: [10.7.2.{i % 3 + 1}]"]
        folder = os.path.join(root, f"late-{run}")
        nodes = [once_node(folder, f"n{k + 1}", f"10.7.2.{k + 1}", url, tasks) for k in range(3)]
        conn = fleetdb.connect(url)
        time.sleep(8)                   # past the start-up seconds (registry, connections)
        first = int(time.time()) + 1
        before = writes(conn)
        benchlib.sleep_until(first + window)
        time.sleep(1.5)                 # the statistics are flushed every second or so
        after = writes(conn)
        last = first + window - 1
        late, skips = [], collections.Counter()
        for node in nodes:
            node_late, node_skips = lateness(os.path.dirname(node.taskfile), first, last)
            late += node_late
            skips.update(node_skips)
        delta = {name: (after.get(name, (0, 0))[0] - before.get(name, (0, 0))[0],
                        after.get(name, (0, 0))[1] - before.get(name, (0, 0))[1])
                 for name in ("claims", "slots", "runs")}
        conn.close()
        for node in nodes:
            node.stop()
        results[run] = (late, skips, delta)
    print(f"\n(e) launch lateness, {count} tasks every second on 3 nodes ({window} s each): `each` "
          f"(each task pinned to one node by ips) against `run: once` (every node eligible); "
          f"lateness = started - scheduled as the supervisor records it")
    p99s = {}
    for run, (late, skips, delta) in results.items():
        p50, p99, worst = percentiles(late)
        p99s[run] = p99
        print(f"  {run:>4}: {len(late)} runs ({len(late) / window:.0f}/s), p50 {p50 * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.0f} ms; skipped: {dict(skips) or 0}")
    diff = p99s["once"] - p99s["each"]
    print(f"  p99 once - each: {diff * 1000:+.1f} ms; once / each p99 {benchlib.ratio(p99s['once'], p99s['each'])}"
          f"; target <= 20 ms: {'MET' if diff <= 0.020 else 'NOT MET'}")
    late, _, delta = results["once"]
    fires = count * window              # the (task, second) pairs due in the window, run or not
    ins = delta["claims"][0] + delta["slots"][0]
    upd = delta["claims"][1] + delta["slots"][1]
    each_runs = results["each"][2]["runs"]
    print(f"  rows written per fire ({fires} (task, second) pairs due in the window; "
          f"pg_stat_user_tables, claims + slots): new rows "
          f"(n_tup_ins) {ins / fires:.3f}, updates (n_tup_upd) {upd / fires:.2f}, together "
          f"{(ins + upd) / fires:.2f}; target <= 1.05 new rows per fire: "
          f"{'MET' if ins / fires <= 1.05 else 'NOT MET'}")
    print(f"  for comparison, the fleet agent's rows of torchcore.runs (ins+upd) per fire: once "
          f"{sum(delta['runs']) / fires:.2f}, each {sum(each_runs) / fires:.2f}")


def claim_sim(spec):
    """Child: ``spec`` = url, nodes (first, count), total nodes, tasks, seconds, t0 (JSON).  Each
    simulated node runs the claims process's statements for the tasks whose pool (3 nodes) it is
    in: its preferred claims at S - 1.5 s, the others at S - 0.5 s, a slot for each won claim at
    S - 0.25 s, the start (START, RENEW) at S and the end (RELEASE) at S + 0.3 s.  Prints one JSON
    line: claim latencies, the claims won, how late the phases were at most."""
    from torchcore import claims

    s = json.loads(spec)
    conn = fleetdb.connect(s["url"])
    total, tasks = s["total"], s["tasks"]
    mine = range(s["first"], s["first"] + s["count"])
    pools = {}                          # node -> [(task, pool)]
    for t in range(tasks):
        pool = [f"sim-{(t + k) % total:04d}" for k in range(3)]
        for name in pool:
            pools.setdefault(name, []).append((f"task-{t:04d}", pool))
    names = [f"sim-{i:04d}" for i in mine]
    if s["first"] == 0:
        for t in range(tasks):
            conn.execute(claims.MAKE_SLOTS, {"task": f"task-{t:04d}", "max": 1})
    latencies, won, late = [], [], 0.0
    for second in range(s["t0"], s["t0"] + s["seconds"]):
        got = {}
        for phase, at in (("preferred", second - 1.5), ("others", second - 0.5),
                          ("slot", second - 0.25), ("start", second), ("end", second + 0.3)):
            benchlib.sleep_until(at)
            late = max(late, time.time() - at)
            for name in names:
                if phase in ("preferred", "others"):
                    keys = [(task, second) for task, pool in pools.get(name, ())
                            if (claims.preferred(task, second, pool) == name) == (phase == "preferred")]
                    if not keys:
                        continue
                    start = time.perf_counter()
                    rows = conn.execute(claims.CLAIM, {"node": name, **claims.columns(keys)}).fetchall()
                    latencies.append(time.perf_counter() - start)
                    for task, sec, fence in rows:
                        got.setdefault(name, []).append((task, int(sec), int(fence)))
                        won.append([task, int(sec), name])
                elif name in got and phase == "slot":
                    conn.execute(claims.TAKE_SLOTS, {
                        "node": name, **claims.columns([(t, sec) for t, sec, _ in got[name]]),
                        "fences": [f for _, _, f in got[name]], "maxes": [1] * len(got[name])})
                elif name in got and phase == "start":
                    keys = [(task, sec) for task, sec, _ in got[name]]
                    fences = [fence for _, _, fence in got[name]]
                    conn.execute(claims.START, {"node": name, **claims.columns(keys), "fences": fences})
                    conn.execute(claims.RENEW, {"node": name, "lease": 15, "fences": fences,
                                                "tasks": [task for task, _ in keys]})
                elif name in got and phase == "end":
                    conn.execute(claims.RELEASE, {"node": name, "tasks": [t for t, _, _ in got[name]],
                                                  "fences": [f for _, _, f in got[name]]})
    print(json.dumps({"claims": latencies, "won": won, "late": late,
                      "elapsed": time.time() - (s["t0"] - 1.5)}), flush=True)


def part_f(server, cfg):
    url = server.create_db("bench_fleet_claims")
    with fleetdb.connect(url) as conn:
        fleetdb.migrate(conn, url)
    total, tasks, workers, seconds = cfg["claim_nodes"], cfg["claim_tasks"], \
        cfg["claim_workers"], cfg["claim_window"]
    cpu0, t = server_cpu(server), time.monotonic()
    time.sleep(min(10, seconds))
    idle_cpu = (server_cpu(server) - cpu0) / (time.monotonic() - t)
    t0 = int(time.time()) + 5
    procs = []
    for w in range(workers):
        first, count = w * total // workers, (w + 1) * total // workers - w * total // workers
        spec = json.dumps({"url": url, "first": first, "count": count, "total": total,
                           "tasks": tasks, "seconds": seconds, "t0": t0})
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--claim-sim", spec],
                                      stdout=subprocess.PIPE, text=True))
    benchlib.sleep_until(t0 - 1.5)
    cpu0, t = server_cpu(server), time.monotonic()
    conn = fleetdb.connect(url)
    probe = round_trips(conn, seconds - 1, "SELECT 1")
    db_cpu = (server_cpu(server) - cpu0) / (time.monotonic() - t)
    results = [json.loads(p.communicate(timeout=seconds + 300)[0].splitlines()[-1]) for p in procs]
    conn.close()
    latencies = [x for r in results for x in r["claims"]]
    won = collections.Counter((task, second) for r in results for task, second, _ in r["won"])
    doubled = sum(1 for n in won.values() if n > 1)
    expected = tasks * seconds
    c50, c99, cmax = percentiles(latencies)
    s50, s99, _ = percentiles(probe)
    print(f"\n(f) claims at scale: {total} simulated nodes ({workers} processes, one connection each), "
          f"{tasks} `once` tasks every second, each with a pool of 3 nodes: {tasks} fires/s, "
          f"{seconds} s; claims.py's statements (claim, slot, start, renew, release)")
    print(f"  claim statements: {len(latencies)} ({len(latencies) / seconds:.0f}/s, one per node "
          f"per phase with keys); p50 {c50 * 1000:.2f} ms, p99 {c99 * 1000:.2f} ms, max "
          f"{cmax * 1000:.1f} ms; the phases at most {max(r['late'] for r in results) * 1000:.0f} ms late")
    print(f"  baseline, SELECT 1 meanwhile: p50 {s50 * 1000:.2f} ms, p99 {s99 * 1000:.2f} ms; claim p99 / "
          f"SELECT 1 p99 {benchlib.ratio(c99, s99)}")
    print(f"  database CPU (its processes): {db_cpu * 100:.1f}% of a core, over the first "
          f"{seconds - 1} s; baseline, idle before: {max(0.0, idle_cpu) * 100:.2f}%")
    elapsed = max(r["elapsed"] for r in results)
    print(f"  the generator's pace: {expected} fires in {elapsed:.1f} s, {expected / elapsed:.0f} "
          f"fires/s of the {tasks} asked ({'kept up' if elapsed < seconds + 3 else 'fell behind'})")
    print(f"  fires won: {len(won)} of {expected}; won twice: {doubled} (target 0: "
          f"{'MET' if doubled == 0 else 'NOT MET'})")


SINGLETON = ["  - name: single", "    type: daemon", "    run: once", "    kill_grace: 1s",
             "    command: echo \"$(date +%s.%N) {node}\" >> {out}; exec sleep 3600"]


def part_g(server, cfg, root):
    """Failover of a `run: once` daemon: kill -9 of its node (every process of it), the time
    until another node's instance writes its first line; the killed node started again."""
    url = server.create_db("bench_fleet_failover")
    with fleetdb.connect(url) as conn:
        fleetdb.migrate(conn, url)
    lease = 6
    out = os.path.join(root, "failover.txt")
    folder = os.path.join(root, "failover")

    def stamps():
        if not os.path.exists(out):
            return []
        with open(out) as handle:
            return [(float(at), node) for at, node in (line.split() for line in handle if line.strip())]

    nodes = {}
    for k in (1, 2, 3):
        body = [line.format(node=f"n{k}", out=out) for line in SINGLETON]
        nodes[f"n{k}"] = once_node(folder, f"n{k}", f"10.7.3.{k}", url, body, lease=lease)
    wait_until(lambda: stamps(), 30, "the singleton's first start")
    times = []
    for _ in range(cfg["trials"]):
        time.sleep(2)
        _, holder = stamps()[-1]
        daemon = nodes[holder]
        procs = [daemon.process] + daemon.process.children(recursive=True)
        for proc in procs:
            try:
                proc.suspend()
            except psutil.Error:
                pass
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        killed = time.time()
        daemon.proc.wait()
        wait_until(lambda: stamps()[-1][0] > killed, lease + 30, "the singleton to move")
        times.append(stamps()[-1][0] - killed)
        nodes[holder] = benchlib.Daemon(daemon.taskfile, extra=["--node-name", holder, "--node-ip",
                                                                f"10.7.3.{holder[1:]}"])
    for daemon in nodes.values():
        daemon.stop()
    p50, p99, worst = percentiles(times)
    print(f"\n(g) failover of a `run: once` daemon, kill -9 of its node (all of its processes), "
          f"3 nodes, fleet.lease {lease} s, {len(times)} trials (the killed node started again)")
    print(f"  kill -> the next instance's first line: p50 {p50:.2f} s, p99 {p99:.2f} s, max "
          f"{worst:.2f} s (min {min(times):.2f} s); target p99 <= lease + 2 s = {lease + 2} s: "
          f"{'MET' if p99 <= lease + 2 else 'NOT MET'}")
    print(f"  baseline, the lease itself: {lease} s; p50 / lease {benchlib.ratio(p50, lease)}")


# ---- main -------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a couple of minutes")
    parser.add_argument("--parts", default="abcdefg")
    parser.add_argument("--simulate", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--claim-sim", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simulate:
        return simulate(args.simulate)
    if args.claim_sim:
        return claim_sim(args.claim_sim)
    why = pgserver.missing()
    if why:
        sys.exit(f"cannot run: {why}")
    cfg = QUICK if args.quick else FULL
    print(f"bench_fleet {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}{' (quick)' * args.quick}"
          f"; {benchlib.machine()}; the database, the nodes and the load share these cores")
    root = tempfile.mkdtemp(prefix="tc-bench-fleet-")
    server = pgserver.PgServer().start()      # its own directory, which the postgres user can reach
    nodes = []
    try:
        if "a" in args.parts or "b" in args.parts:
            nodes, url, conn = part_a(server, cfg, root)
            if "b" in args.parts:
                outage(server, cfg, nodes, url, conn)
            else:
                conn.close()
            for node in nodes:
                node.daemon.stop()
            nodes = []
        if "c" in args.parts:
            part_c(server, cfg)
        if "d" in args.parts:
            part_d(server, cfg, root)
        if "e" in args.parts:
            part_e(server, cfg, root)
        if "f" in args.parts:
            part_f(server, cfg)
        if "g" in args.parts:
            part_g(server, cfg, root)
        print(f"\nload at the end: {os.getloadavg()[0]:.2f}")
    finally:
        for node in nodes:
            node.daemon.stop()
        server.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
