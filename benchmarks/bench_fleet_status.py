"""`fleet status` and `fleet tasks` over 1,000 nodes: the queries alone and the commands end to
end (target < 1 s).

Starts a throw-away PostgreSQL (tests/pgserver.py), writes 1,000 node rows and a day of fleet
history at 200 runs/s (17,280,000 runs; fewer with a second argument, e.g. 2000000) straight into
the tables, as the nodes' agents would, then times ``fleetquery.nodes`` (best of 5) and
``python -m torchcore fleet status`` (best of 3, interpreter start included); then
``fleetquery.task_view`` of a file of the 200 tasks the runs are of (best of 3), the command
``fleet tasks`` of it, task_view of a file of 10,000 tasks with 50 distinct target sets (matching
them against the 1,000 nodes), and the agent's upsert of 20,000 runs (start and end: 40,000 rows,
in batches of 500), whose cost the summary's trigger adds to.

The history is written with the summary's trigger off, and its hours counted once after
(``recount_hour``): the trigger's cost is the upsert's figure.  The same script runs against a
torchcore without the summary (no torchcore.task_hours), for the figures before it.

Usage: python benchmarks/bench_fleet_status.py [NODES] [RUNS]
"""

import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import benchlib  # noqa: E402
import pgserver  # noqa: E402

from torchcore import fleetdb, fleetquery  # noqa: E402

S = fleetdb.SCHEMA


def fill(conn, nodes, runs):
    conn.execute(f"""INSERT INTO {S}.nodes (name, hostname, addresses, version, heartbeat,
            last_seen, file_digest, file_since, clock_offset, running)
        SELECT 'node-' || i, 'node-' || i, ARRAY['10.' || (i / 65536) || '.' || (i / 256 %% 256)
               || '.' || (i %% 256)], '0.1.0', 5, now() - make_interval(secs => i %% 45),
               CASE WHEN i %% 50 = 0 THEN 'older' ELSE 'current' END, now() - interval '1 hour',
               (i %% 9) * 0.2, i %% 3
        FROM generate_series(1, %s) AS i""", (nodes,))
    step = 86400.0 / runs
    summary = conn.execute(f"SELECT to_regclass('{S}.task_hours')").fetchone()[0] is not None
    if summary:
        conn.execute(f"ALTER TABLE {S}.runs DISABLE TRIGGER runs_count")
    conn.execute(f"""INSERT INTO {S}.runs (node, run_id, task, scheduled, started, ended,
            exit_code, failed, at, output)
        SELECT 'node-' || (i %% %s + 1), i, 'task-' || (i %% 200),
               now() - make_interval(secs => i * %s), now() - make_interval(secs => i * %s),
               now() - make_interval(secs => i * %s - 0.5), CASE WHEN i %% 50 = 0 THEN 1 ELSE 0 END,
               i %% 50 = 0, now() - make_interval(secs => i * %s), 'line ' || i
        FROM generate_series(1, %s) AS i""", (nodes, step, step, step, step, runs))
    if summary:
        start = time.perf_counter()
        conn.execute(f"ALTER TABLE {S}.runs ENABLE TRIGGER runs_count")
        conn.execute(f"""SELECT {S}.recount_hour(task, node, hour) FROM (SELECT DISTINCT task,
            node, date_trunc('hour', at AT TIME ZONE 'UTC') AS hour FROM {S}.runs) h""")
        conn.execute(f"VACUUM ANALYZE {S}.task_hours")
        rows = conn.execute(f"SELECT count(*) FROM {S}.task_hours").fetchone()[0]
        print(f"summary: {rows:,} rows of task_hours, counted in {time.perf_counter() - start:.1f}s")
    conn.execute(f"VACUUM ANALYZE {S}.runs")
    heartbeat(conn)


def heartbeat(conn):
    """Every node heard from now (most up, one in nine late, one in 45 down), as the agents'
    heartbeats would have it: filling the history takes longer than a node stays up unheard."""
    conn.execute(f"""UPDATE {S}.nodes SET last_seen = now() - make_interval(secs =>
        CASE WHEN substr(name, 6)::int % 45 = 0 THEN 120
             WHEN substr(name, 6)::int % 9 = 0 THEN 15 ELSE 2 END)""")
    conn.execute(f"ANALYZE {S}.nodes")


def task_file(path, count, targeted):
    """A task file of ``count`` tasks (task-N); ``targeted``: of 50 distinct target sets (hosts
    or ips), one task in five without any."""
    lines = ["tasks:"]
    for number in range(count):
        lines.append(f"  - {{name: task-{number}, schedule: '@daily', command: 'true'")
        kind = number % 5 if targeted else 0
        if kind in (1, 2):
            lines[-1] += f", hosts: ['node-{number % 25 + 1}*']"
        elif kind in (3, 4):
            lines[-1] += f", ips: ['10.0.{number % 25}.0/24']"
        lines[-1] += "}"
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def upserts(conn, count):
    """Seconds for the agent's upsert of ``count`` runs, a start then an end of each."""
    from torchcore import fleetrows
    from torchcore.runrecord import RunRecord

    now = time.time()
    rows = []
    for number in range(count):
        run_id = 10**9 + number
        node, task, started = f"node-{number % 1000 + 1}", f"task-{number % 200}", now - number
        rows.append(fleetrows.run_row(node, RunRecord.of_start(
            run_id, task, node, int(started), started, False, 4242), None))
        rows.append(fleetrows.run_row(node, RunRecord(
            run_id, task, node, int(started), started, started + 0.5, 0, pid=4242), "ok\n"))
    start = time.perf_counter()
    for first in range(0, len(rows), 500):
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(fleetrows.UPSERT_RUNS, rows[first:first + 500])
    return time.perf_counter() - start


def time_tasks(conn, url, nodes, directory):
    """task_view and `fleet tasks` over the filled database."""
    from torchcore import config

    small = config.load(task_file(os.path.join(directory, "tasks.yaml"), 200, True))
    heartbeat(conn)
    view = benchlib.best_of(3, lambda: fleetquery.task_view(conn, small))
    shown = fleetquery.task_view(conn, small)
    entries = sum(len(task["ran"]) for task in shown["tasks"])
    print(f"fleetquery.task_view of 200 tasks over {nodes:,} nodes ({entries:,} node x task "
          f"entries): {view * 1000:.0f} ms")
    env = dict(os.environ, TORCHCORE_DATABASE_URL=url, COLUMNS="200")
    argv = [sys.executable, "-m", "torchcore", "fleet", "tasks", "-c", small.path]

    def command():
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
        if result.returncode not in (0, 1) or result.stderr or "problems:" not in result.stdout:
            raise SystemExit(f"fleet tasks failed: {result.stderr}")

    heartbeat(conn)
    whole = benchlib.best_of(3, command)
    print(f"`torchcore fleet tasks` end to end: {whole * 1000:.0f} ms")
    big = config.load(task_file(os.path.join(directory, "many.yaml"), 10_000, True))
    heartbeat(conn)
    many = benchlib.best_of(1, lambda: fleetquery.task_view(conn, big))
    print(f"fleetquery.task_view of 10,000 tasks (50 target sets) over {nodes:,} nodes: "
          f"{many * 1000:.0f} ms")
    written = upserts(conn, 20_000)
    print(f"agent upsert of 20,000 runs (start + end, batches of 500): {written:.2f}s, "
          f"{written / 40_000 * 1e6:.0f} us per row")


def main():
    nodes = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 200 * 86400
    why = pgserver.missing()
    if why:
        sys.exit(f"cannot run: {why}")
    server = pgserver.PgServer().start()
    try:
        url = server.create_db("bench_fleet_status")
        with fleetdb.connect(url) as conn:
            fleetdb.migrate(conn, url)
            start = time.perf_counter()
            fill(conn, nodes, runs)
            print(f"{benchlib.machine()}\nfilled {nodes:,} nodes and {runs:,} runs in "
                  f"{time.perf_counter() - start:.1f}s")
            heartbeat(conn)
            query = benchlib.best_of(5, lambda: fleetquery.nodes(conn))
            states = {}
            for node in fleetquery.nodes(conn):
                states[node["state"]] = states.get(node["state"], 0) + 1
                states["drifted"] = states.get("drifted", 0) + node["drifted"]
            heartbeat(conn)
        env = dict(os.environ, TORCHCORE_DATABASE_URL=url, COLUMNS="200")
        argv = [sys.executable, "-m", "torchcore", "fleet", "status", "-c", os.devnull]

        def command():
            result = subprocess.run(argv, env=env, capture_output=True, text=True)
            if result.returncode not in (0, 1):
                raise SystemExit(f"fleet status failed: {result.stderr}")

        whole = benchlib.best_of(3, command)
        print(f"fleetquery.nodes over {nodes:,} nodes ({states}): {query * 1000:.0f} ms")
        print(f"`torchcore fleet status` end to end: {whole * 1000:.0f} ms (target < 1000 ms)")
        with fleetdb.connect(url) as conn, tempfile.TemporaryDirectory() as directory:
            time_tasks(conn, url, nodes, directory)
    finally:
        server.close()


if __name__ == "__main__":
    main()
