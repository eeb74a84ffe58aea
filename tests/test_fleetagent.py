"""The fleet agent on real daemons and a real PostgreSQL (tests/pgserver.py): the registry and its
heartbeat (a reload is one at once, a killed daemon's row goes stale, two daemons with one name are
told), the history of three nodes on one machine, a database stopped for 30 s under load with a
node restarted meanwhile, a database down at start, a password that stops working, a schema
dropped, and the upsert's promise over generated orders of shipping."""

import hashlib
import json
import socket
import subprocess
import sys
import time

import psutil
import pytest
from daemon_harness import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchcore import __version__, fleetdb

pytestmark = pytest.mark.process

HELLO = """
tasks:
  - name: hello
    schedule: "* * * * * *"
    command: "echo hi from {node}; echo oops >&2"
  - name: fails
    schedule: "*/2 * * * * *"
    command: "exit 3"
  - name: slow
    schedule: "* * * * * *"
    command: "sleep 2.5"
"""


def fleet_settings(url, heartbeat="1s"):
    return f"  fleet:\n    database: '{url}'\n    heartbeat: {heartbeat}\n  shutdown_grace: 3s\n"


def init(url):
    with fleetdb.connect(url) as conn:
        fleetdb.migrate(conn, url)


def query(url, sql, *params):
    with fleetdb.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def node_row(url, name):
    with fleetdb.connect(url) as conn:
        cur = conn.execute("SELECT * FROM torchcore.nodes WHERE name = %s", (name,))
        row = cur.fetchone()
        return None if row is None else dict(zip([c.name for c in cur.description], row))


def pg_runs(url, node):
    """{run_id: row dict} of a node in the fleet history."""
    with fleetdb.connect(url) as conn:
        cur = conn.execute("SELECT run_id, task, extract(epoch FROM ended), exit_code, skipped, "
                           "missed, manual, failed, output, stopped FROM torchcore.runs "
                           "WHERE node = %s", (node,))
        return {row[0]: dict(zip(("run_id", "task", "ended", "exit_code", "skipped", "missed",
                                  "manual", "failed", "output", "stopped"), row)) for row in cur}


def pg_keys(url):
    """[(node, run_id)] of the whole history, as many times as stored."""
    return query(url, "SELECT node, run_id FROM torchcore.runs")


def final(row):
    return row["ended"] is not None or row["skipped"] is not None or bool(row["missed"])


def assert_same_history(url, daemon, node):
    """The node's SQLite records and its rows in PostgreSQL: the same runs, the same states."""
    local = {r["run_id"]: r for r in daemon.runs()}
    shipped = pg_runs(url, node)
    assert set(shipped) == set(local), (set(local) - set(shipped), set(shipped) - set(local))
    for run_id, row in local.items():
        got = shipped[run_id]
        assert (got["task"], got["exit_code"], got["skipped"], bool(got["missed"]),
                bool(got["manual"])) == (row["task"], row["exit_code"], row["skipped"],
                                         bool(row["missed"]), bool(row["manual"])), run_id
        assert (got["ended"] is None) == (row["ended"] is None), run_id
        assert got["stopped"] == row["stopped"], run_id
        if row["ended"] is not None:
            assert abs(float(got["ended"]) - row["ended"]) < 0.01
    return local, shipped


def agent_of(daemon):
    """The daemon's fleet agent process (a child of the supervisor)."""
    def find():
        for child in psutil.Process(daemon.proc.pid).children():
            try:
                if "fleet agent" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                pass
        return None
    return wait_for(find, 15, "the fleet agent to start")


def status(daemon, *extra):
    return subprocess.run([sys.executable, "-m", "torchcore", "status", "-c", daemon.path, *extra],
                          capture_output=True, text=True, timeout=30, cwd=daemon.dir)


def test_registry_heartbeat_stop_and_a_killed_daemon(pg, daemons):
    init(pg.url)
    web1 = daemons(HELLO.format(node="web-1"), fleet_settings(pg.url))
    git = ["git", "-C", web1.dir, "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "tasks.yaml"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "tasks"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    web2 = daemons(HELLO.format(node="web-2"), fleet_settings(pg.url))
    web1.start("--node-name", "web-1", "--node-ip", "10.1.0.1")
    web2.start("--node-name", "web-2")
    row = wait_for(lambda: (r := node_row(pg.url, "web-1")) and r["started_runs"] > 0 and r, 15,
                   "web-1's heartbeat with runs")
    with open(web1.path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert (row["hostname"], row["addresses"], row["version"], row["pid"]) == (
        socket.gethostname(), ["10.1.0.1"], __version__, web1.proc.pid)
    assert (row["file_digest"], row["file_commit"], row["heartbeat"]) == (digest, head, 1.0)
    assert row["stopped"] is None and abs(row["clock_offset"]) < 1.0
    assert row["started"].timestamp() == pytest.approx(psutil.Process(web1.proc.pid).create_time(), abs=3)
    wait_for(lambda: node_row(pg.url, "web-1")["last_seen"] > row["last_seen"], 5, "a heartbeat")
    web2_row = wait_for(lambda: node_row(pg.url, "web-2"), 10, "web-2's registration")
    assert web2_row["addresses"] == ["10.9.9.9"]        # the harness's $TORCHCORE_NODE_IP

    web1.write(HELLO.format(node="web-1 again"), fleet_settings(pg.url))   # reloaded by the watch
    changed = wait_for(lambda: (r := node_row(pg.url, "web-1"))["file_digest"] != digest and r, 15,
                       "the new file's digest")
    assert changed["file_since"] > row["file_since"] and changed["file_commit"] == head + "-dirty"

    agent = agent_of(web2)
    web2.kill()                                 # SIGKILL: its agent sees the pipe's end and exits
    agent.wait(10)
    seen = node_row(pg.url, "web-2")
    time.sleep(2.5)
    assert node_row(pg.url, "web-2")["last_seen"] == seen["last_seen"] and seen["stopped"] is None

    assert web1.stop() == 0
    stopped = node_row(pg.url, "web-1")
    assert stopped["stopped"] is not None and stopped["running"] == 0
    assert_same_history(pg.url, web1, "web-1")          # a clean stop ships what is left
    assert "Traceback" not in web1.log     # (a killed supervisor's launchers may say more)


def test_three_nodes_on_one_machine_ship_their_whole_history(pg, daemons):
    init(pg.url)
    nodes = {}
    for i in (1, 2, 3):
        name = f"n{i}"
        nodes[name] = daemons(HELLO.format(node=name), fleet_settings(pg.url))
        nodes[name].start("--node-name", name, "--node-ip", f"10.2.0.{i}")
    manual = subprocess.run([sys.executable, "-m", "torchcore", "run", "-c", nodes["n2"].path,
                             "hello"], capture_output=True, text=True, timeout=30)
    assert manual.returncode == 0, manual.stderr
    wait_for(lambda: all(len(pg_runs(pg.url, n)) >= 8 for n in nodes), 20, "runs of every node")
    for daemon in nodes.values():
        assert daemon.stop() == 0
    for name, daemon in nodes.items():
        local, shipped = assert_same_history(pg.url, daemon, name)
        hello = [r for r in shipped.values() if r["task"] == "hello" and r["ended"] is not None
                 and r["stopped"] is None]     # a run the stop ended may not have printed yet
        assert hello
        for row in hello:       # what it printed, then torchcore's own line at its end
            lines = row["output"].split("\n")
            assert sorted(lines[:2]) == sorted([f"hi from {name}", "oops"]), row
            assert lines[2].startswith("[torchcore] run ended: ok") and len(lines) == 3, row
        fails = [r for r in shipped.values() if r["task"] == "fails" and r["ended"] is not None
                 and r["stopped"] is None]
        assert fails and all(r["failed"] and r["exit_code"] == 3 for r in fails)
        assert any(r["skipped"] for r in shipped.values() if r["task"] == "slow")
        assert all(not r["failed"] for r in shipped.values() if r["task"] == "hello")
    assert any(r["manual"] for r in pg_runs(pg.url, "n2").values())
    keys = pg_keys(pg.url)
    assert len(keys) == len(set(keys))
    assert sorted(r[0] for r in query(pg.url, "SELECT name FROM torchcore.nodes")) == ["n1", "n2", "n3"]


LOAD = "tasks:\n" + "".join(
    f"  - name: t{i}\n    schedule: '* * * * * *'\n    command: 'echo {i}'\n" for i in range(25))


@pytest.mark.slow
def test_a_30s_outage_under_50_runs_a_second_loses_and_doubles_nothing(pg, daemons, figures):
    init(pg.url)
    try:
        _outage_under_load(pg, daemons, figures)
    finally:
        if not pg.server.running:       # the next tests need it
            pg.server.start_again()


def _outage_under_load(pg, daemons, figures):
    a = daemons(LOAD, fleet_settings(pg.url)).start("--node-name", "a")
    b = daemons(LOAD, fleet_settings(pg.url)).start("--node-name", "b")
    wait_for(lambda: len(pg_runs(pg.url, "a")) > 50 and len(pg_runs(pg.url, "b")) > 50, 20,
             "shipping before the outage")
    pg.server.stop()
    down = time.monotonic()
    shown = wait_for(lambda: "fleet database unreachable since" in (out := status(a).stdout) and out,
                     15, "status to show the outage")
    assert "records waiting" in shown
    assert b.stop() == 0                        # a node restarted during the outage, down 2 s:
    time.sleep(2)                               # its seconds not run are recorded missed
    b.start("--node-name", "b", wait=False)
    wait_for(lambda: b.log.count("torchcore started") == 2, 15, "b started again")
    assert "starting anyway" in b.log
    state = wait_for(lambda: (doc := json.loads(status(b, "--json").stdout)["fleet"])["state"] ==
                     "unreachable" and doc, 10, "b's agent to find the database away")
    assert state["waiting"] > 0 and state["database"] == pg.url
    time.sleep(max(0.0, 30 - (time.monotonic() - down)))
    waiting = json.loads(status(a, "--json").stdout)["fleet"]["waiting"]
    assert waiting > 500                        # 30 s of 25 runs a second, each start and end
    pg.server.start_again()
    wait_for(lambda: "up to date" in status(a).stdout and "up to date" in status(b).stdout, 30,
             "the backlog shipped: {}", lambda: status(a).stdout + status(b).stdout)
    assert a.stop() == 0 and b.stop() == 0
    total = 0
    for daemon, name in ((a, "a"), (b, "b")):
        local, shipped = assert_same_history(pg.url, daemon, name)
        assert all(final(r) for r in shipped.values())
        assert any(r["missed"] for r in shipped.values()) or name == "a"   # b's restart: misses
        total += len(local)
        assert daemon.log.count("fleet agent: cannot connect") <= 2     # once per agent
        assert "Traceback" not in daemon.log
    keys = pg_keys(pg.url)
    assert len(keys) == len(set(keys)) == total
    figures.add(faults=2, runs=total, lost=0, doubled=len(keys) - len(set(keys)))


@pytest.mark.slow
def test_after_a_long_outage_the_agent_is_back_within_seconds(pg, daemons):
    """The backoff of an unreachable database stops at RETRY_UNREACHABLE (4 s), not 30 s: after
    an outage long enough to reach that cap, the agent reconnects within the cap plus a margin
    for a loaded 2-core machine (connect, schema check and registration take ~0.1 s idle)."""
    from torchcore import fleetagent
    init(pg.url)
    node = daemons(HELLO.format(node="back"), fleet_settings(pg.url)).start("--node-name", "back")
    wait_for(lambda: len(pg_runs(pg.url, "back")) >= 3, 15, "shipping")
    pg.server.stop()
    try:
        node.wait_log("(runs go on; trying again at least every 4s", 15)
        time.sleep(20)                  # tries at 1, 2, 4, then every 4 s: the cap is reached
        assert node.log.count("(runs go on;") == 1
    finally:
        pg.server.start_again()
    back = time.monotonic()
    node.wait_log("as back again after", fleetagent.RETRY_UNREACHABLE + 6)
    took = time.monotonic() - back
    assert took <= fleetagent.RETRY_UNREACHABLE + 4, took
    wait_for(lambda: "up to date" in status(node).stdout, 10, "the backlog shipped")
    assert node.stop() == 0
    assert_same_history(pg.url, node, "back")
    assert node.log.count("(runs go on;") == 1 and "Traceback" not in node.log


def test_a_database_down_at_start_warns_and_ships_once_it_is_up(pg, daemons):
    init(pg.url)
    pg.server.stop()
    try:
        node = daemons(HELLO.format(node="late"), fleet_settings(pg.url)).start("--node-name", "late")
        assert "warning: cannot connect to the fleet database" in node.log
        wait_for(lambda: len(node.runs()) >= 6, 15, "runs while the database is down")
        wait_for(lambda: "fleet database unreachable since" in status(node).stdout, 10, "status")
    finally:
        pg.server.start_again()
    wait_for(lambda: "up to date" in status(node).stdout, 40, "the backlog shipped")
    assert node.stop() == 0
    assert_same_history(pg.url, node, "late")


def test_a_password_that_stops_working_is_logged_once_and_runs_go_on(pg, daemons, monkeypatch):
    import pgserver
    init(pg.url)
    url = f"postgresql://{pgserver.PASSWORD_ROLE}@127.0.0.1:{pg.server.port}/{pg.name}"
    monkeypatch.setenv("PGPASSWORD", pgserver.PASSWORD)
    node = daemons(HELLO.format(node="pw"), fleet_settings(url)).start("--node-name", "pw")
    wait_for(lambda: len(pg_runs(pg.url, "pw")) >= 3, 15, "shipping")
    pg.server.psql_as_super(f"ALTER ROLE {pgserver.PASSWORD_ROLE} PASSWORD 'another-one'")
    try:
        pg.server.psql_as_super("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                f"WHERE usename = '{pgserver.PASSWORD_ROLE}'")
        _refused_at_runtime(node)
    finally:                                    # the role is the session server's, for all tests
        pg.server.psql_as_super(f"ALTER ROLE {pgserver.PASSWORD_ROLE} PASSWORD "
                                f"'{pgserver.PASSWORD}'")


def _refused_at_runtime(node):
    import pgserver
    node.wait_log("password authentication failed", 15)
    before = len(node.runs())
    time.sleep(4)                               # tries at 1, 2, 4 s: all refused, said once
    assert node.log.count("password authentication failed") == 1
    assert len(node.runs()) >= before + 3       # scheduling goes on
    assert "fleet database refusing this node since" in status(node).stdout
    assert pgserver.PASSWORD not in node.log and "Traceback" not in node.log
    assert node.stop() == 0


def test_a_schema_dropped_at_runtime_is_logged_once_and_retried(pg, daemons):
    init(pg.url)
    node = daemons(HELLO.format(node="s"), fleet_settings(pg.url)).start("--node-name", "s")
    wait_for(lambda: len(pg_runs(pg.url, "s")) >= 3, 15, "shipping")
    assert json.loads(status(node, "--json").stdout)["fleet"]["state"] == "up"
    pg.server.psql_as_super("DROP SCHEMA torchcore CASCADE", db=pg.name)
    node.wait_log("lacks torchcore's schema", 10)
    time.sleep(3.5)                             # tries at 1 and 2 s: the schema still missing
    assert node.log.count("lacks torchcore's schema") == 1 and "Traceback" not in node.log
    assert "fleet database schema not usable since" in status(node).stdout
    init(pg.url)                                # `fleet init` again: shipping goes on
    node.wait_log("as s again after", 15)
    wait_for(lambda: len(pg_runs(pg.url, "s")) >= 3, 10, "runs shipped after the schema is back")
    assert node.stop() == 0


def test_two_daemons_with_one_node_name_are_told_so(pg, daemons):
    init(pg.url)
    one = daemons(HELLO.format(node="one"), fleet_settings(pg.url)).start("--node-name", "twin")
    wait_for(lambda: node_row(pg.url, "twin"), 10, "the first one's registration")
    other = daemons(HELLO.format(node="other"), fleet_settings(pg.url)).start("--node-name", "twin")
    wait_for(lambda: "reports as node twin too" in one.log + other.log, 10, "the warning")
    assert f"pid {one.proc.pid}" in other.log or f"pid {other.proc.pid}" in one.log
    assert one.stop() == 0 and other.stop() == 0


def test_a_reloaded_file_is_a_heartbeat_at_once(pg, daemons):
    init(pg.url)
    node = daemons(HELLO.format(node="h"), fleet_settings(pg.url, heartbeat="1h")).start(
        "--node-name", "h")
    first = wait_for(lambda: node_row(pg.url, "h"), 10, "the registration")
    node.write(HELLO.format(node="h, edited"), fleet_settings(pg.url, heartbeat="1h"))
    node.wait_log("reloaded (file changed)", 10)
    now = wait_for(lambda: (r := node_row(pg.url, "h"))["file_digest"] != first["file_digest"] and r,
                   5, "the new digest without waiting an hour")
    assert now["last_seen"] > first["last_seen"] and now["file_since"] > first["file_since"]
    assert now["heartbeat"] == 3600
    assert node.stop() == 0


RUN_FATES = st.dictionaries(st.integers(1, 6), st.tuples(
    st.sampled_from(["end", "skip", "running"]), st.integers(0, 3), st.integers(0, 2)), min_size=1)


@settings(derandomize=True, max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(RUN_FATES, st.randoms(use_true_random=False))
def test_shipping_in_any_order_and_any_number_of_times_stores_each_run_once_final(pg, fates, rnd):
    """The upsert's promise, on a real database: whatever order a run's states arrive in and
    however often (an agent killed between its two commits, a restart), its one row ends as the
    run ended (ended with its output, skipped) or, still running, started."""
    from torchcore.fleetrows import UPSERT_RUNS, run_row
    from torchcore.runrecord import RunRecord

    if not getattr(pg, "migrated", False):
        init(pg.url)
        pg.migrated = True
    states = {"running": lambda i: RunRecord(i, "t", "n", 100, 101.0, pid=7),
              "end": lambda i: RunRecord(i, "t", "n", 100, 101.0, 102.0, 1, pid=7),
              "skip": lambda i: RunRecord(i, "t", "n", 100, skipped="max 1 reached")}
    rows = []
    for run_id, (fate, starts, again) in fates.items():
        shipped = [fate] * (1 + again) + (["running"] * starts if fate != "skip" else [])
        rows += [run_row("n", states[kind](run_id), "out" if kind == "end" else None)
                 for kind in shipped]
    rnd.shuffle(rows)
    with fleetdb.connect(pg.url) as conn:
        conn.execute("DELETE FROM torchcore.runs")
        with conn.cursor() as cur:
            for row in rows:
                cur.execute(UPSERT_RUNS, row)
        stored = {r[0]: r[1:] for r in conn.execute(
            "SELECT run_id, ended IS NOT NULL, skipped, exit_code, output FROM torchcore.runs")}
    expected = {"end": (True, None, 1, "out"), "skip": (False, "max 1 reached", None, None),
                "running": (False, None, None, None)}
    assert stored == {run_id: expected[fate] for run_id, (fate, _, _) in fates.items()}
