"""`fleet status` over 1,000 nodes: the query alone and the command end to end (target < 1 s).

Starts a throw-away PostgreSQL (tests/pgserver.py), writes 1,000 node rows and a day of fleet
history at 200 runs/s (17,280,000 runs; fewer with a second argument, e.g. 2000000) straight into
the tables, as the nodes' agents would, then times ``fleetquery.nodes`` (best of 5) and
``python -m torchcore fleet status`` (best of 3, interpreter start included).

Usage: python benchmarks/bench_fleet_status.py [NODES] [RUNS]
"""

import os
import subprocess
import sys
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
    conn.execute(f"""INSERT INTO {S}.runs (node, run_id, task, scheduled, started, ended,
            exit_code, failed, at, output)
        SELECT 'node-' || (i %% %s + 1), i, 'task-' || (i %% 200),
               now() - make_interval(secs => i * %s), now() - make_interval(secs => i * %s),
               now() - make_interval(secs => i * %s - 0.5), CASE WHEN i %% 50 = 0 THEN 1 ELSE 0 END,
               i %% 50 = 0, now() - make_interval(secs => i * %s), 'line ' || i
        FROM generate_series(1, %s) AS i""", (nodes, step, step, step, step, runs))
    conn.execute(f"VACUUM ANALYZE {S}.runs")
    heartbeat(conn)


def heartbeat(conn):
    """Every node heard from now (most up, one in nine late, one in 45 down), as the agents'
    heartbeats would have it: filling the history takes longer than a node stays up unheard."""
    conn.execute(f"""UPDATE {S}.nodes SET last_seen = now() - make_interval(secs =>
        CASE WHEN substr(name, 6)::int % 45 = 0 THEN 120
             WHEN substr(name, 6)::int % 9 = 0 THEN 15 ELSE 2 END)""")
    conn.execute(f"ANALYZE {S}.nodes")


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
    finally:
        server.close()


if __name__ == "__main__":
    main()
