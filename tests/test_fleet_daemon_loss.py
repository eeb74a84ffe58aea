"""A `run: once` daemon's instance whose node died (claims.TAKE_DAEMON_SLOT, claimloss.py), against
a real PostgreSQL (tests/pgserver.py): the node that takes over its slot, whose lease ended
unrenewed, closes the instance's fleet history row as lost in the same statement, once; a final
row, a slot freed by a clean stop, a node still holding another live slot of the task and a node
taking back its own slot record nothing; a start shipped later never reopens the row."""

import concurrent.futures
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from torchcore import claimloss, claims, fleetdb, fleetrows
from torchcore.runrecord import RunRecord

pytestmark = pytest.mark.process
S = fleetdb.SCHEMA
HISTORY = f"SELECT ended IS NOT NULL, error, failed FROM {S}.runs WHERE node = %s AND run_id = %s"


def _hold(conn, node, task, slot, lease, second=None):
    """``node`` holds ``slot`` of ``task``, its lease ``lease`` s from now (None: freed, as a
    clean stop leaves it; may be negative: ended unrenewed)."""
    conn.execute(f"""INSERT INTO {S}.slots (task, slot, second, fence, node, lease_until)
        VALUES (%s, %s, %s, (extract(epoch FROM now()) * 1000)::bigint + %s, %s,
                now() + make_interval(secs => %s))
        ON CONFLICT (task, slot) DO UPDATE SET node = EXCLUDED.node, fence = EXCLUDED.fence,
            second = EXCLUDED.second, lease_until = EXCLUDED.lease_until""",
                 (task, slot, second, slot, node, lease))


def _ship(conn, node, record):
    conn.execute(fleetrows.UPSERT_RUNS, fleetrows.run_row(node, record, None))


def _instance(conn, node, task, run_id, started=None):
    """A daemon instance's start as the agent ships it (no scheduled second); the record."""
    record = RunRecord.of_start(run_id, task, node, None, started or time.time() - 30, False, 99)
    _ship(conn, node, record)
    return record


def _take(url, node, task="single", most=1, wait=0.0):
    with fleetdb.connect(url) as conn:
        return conn.execute(claims.TAKE_DAEMON_SLOT, {
            "task": task, "max": most, "node": node, "lease": 15, "wait": wait}).fetchall()


def _taken(rows):
    return [(slot, was) for slot, _, _, was in rows if slot is not None]


def test_the_node_taking_a_dead_holders_slot_records_its_instance_lost_once(fleet):
    with fleetdb.connect(fleet.url) as conn:
        _hold(conn, "n1", "single", 0, -2)                 # its lease ended, never freed
        start = _instance(conn, "n1", "single", 7)          # the instance: "running"
        old = _instance(conn, "n1", "single", 5, time.time() - 90)
        _ship(conn, "n1", old.lost(time.time() - 60, "an earlier end"))     # final: untouched
        _ship(conn, "n1", RunRecord.of_start(8, "single", "n1", None, time.time(), True, 9))
        _instance(conn, "n1", "other", 9)                   # another task's instance
        _instance(conn, "n3", "single", 4)                  # another node's
    # four nodes try at once: one takes the slot and records the loss
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda n: _taken(_take(fleet.url, f"n{n + 2}")), range(4)))
    assert sorted(found) == [[]] * 3 + [[(0, "n1")]]
    taker = f"n{2 + found.index([(0, 'n1')])}"
    with fleetdb.connect(fleet.url) as conn:
        assert conn.execute(HISTORY, ("n1", 7)).fetchone() == (
            True, f"lost: node n1 stopped renewing its fleet lease (recorded by {taker})", True)
        assert conn.execute(HISTORY, ("n1", 5)).fetchone() == (True, "lost: an earlier end", True)
        assert conn.execute(HISTORY, ("n1", 8)).fetchone() == (False, None, False)    # manual
        assert conn.execute(HISTORY, ("n1", 9)).fetchone() == (False, None, False)
        assert conn.execute(HISTORY, ("n3", 4)).fetchone() == (False, None, False)
        # the dead node restarts: a start it ships late never reopens the row; its own lost
        # record (adopt.py) replaces the words
        _ship(conn, "n1", start)
        assert conn.execute(HISTORY, ("n1", 7)).fetchone()[0]
        _ship(conn, "n1", start.lost(time.time(), "its supervisor and executor stopped"))
        assert conn.execute(HISTORY, ("n1", 7)).fetchone() == (
            True, "lost: its supervisor and executor stopped", True)
        assert conn.execute(f"SELECT count(*) FROM {S}.runs WHERE node = 'n1' AND run_id = 7"
                            ).fetchone() == (1,)


def test_a_slot_freed_by_a_clean_stop_or_taken_back_by_its_own_node_records_nothing(fleet):
    with fleetdb.connect(fleet.url) as conn:
        _hold(conn, "n1", "single", 0, 15)
        _instance(conn, "n1", "single", 7)
        fence = conn.execute(f"SELECT fence FROM {S}.slots").fetchone()[0]
        conn.execute(claims.RELEASE, {"node": "n1", "tasks": ["single"], "fences": [fence]})
    assert _taken(_take(fleet.url, "n2")) == [(0, None)]
    with fleetdb.connect(fleet.url) as conn:
        assert conn.execute(HISTORY, ("n1", 7)).fetchone() == (False, None, False)
        _hold(conn, "n2", "single", 0, -2)                 # n2's lease ended: n2 takes it back
        _instance(conn, "n2", "single", 3)
    assert _taken(_take(fleet.url, "n2")) == [(0, None)]
    with fleetdb.connect(fleet.url) as conn:
        assert conn.execute(HISTORY, ("n2", 3)).fetchone() == (False, None, False)
        _hold(conn, "n4", "single", 0, -2, second=int(time.time()) - 20)    # a scheduled run's
        _instance(conn, "n4", "single", 1)
    assert _taken(_take(fleet.url, "n2")) == [(0, None)]


def test_a_node_holding_another_live_slot_keeps_its_rows_until_its_last_slot_is_taken(fleet):
    """max: 2, both slots held by n1: one lease ended (a node stopped past it, SIGSTOP, while a
    slot taken later is still leased): its rows cannot be told apart, none is closed; once its
    other slot's lease has ended too, the node taking that one closes them all."""
    with fleetdb.connect(fleet.url) as conn:
        _hold(conn, "n1", "single", 0, -2)
        _hold(conn, "n1", "single", 1, 10)
        _instance(conn, "n1", "single", 7)
        _instance(conn, "n1", "single", 8)
    assert _taken(_take(fleet.url, "n2", most=2)) == [(0, None)]
    with fleetdb.connect(fleet.url) as conn:
        assert conn.execute(HISTORY, ("n1", 7)).fetchone() == (False, None, False)
        conn.execute(f"UPDATE {S}.slots SET lease_until = now() - interval '2 second' "
                     "WHERE slot = 1")
    assert _taken(_take(fleet.url, "n3", most=2)) == [(1, "n1")]
    with fleetdb.connect(fleet.url) as conn:
        for run_id in (7, 8):
            assert conn.execute(HISTORY, ("n1", run_id)).fetchone()[2]


# ---- the rule in Python is the statement's, on generated rows ----------------------------------

_slot = st.fixed_dictionaries({
    "node": st.sampled_from(["n1", "n2", "n3"]),
    "lease": st.sampled_from([None, -5, 5]),            # freed, ended unrenewed, live
    "scheduled": st.booleans(),                         # a scheduled run's slot
})
_run = st.fixed_dictionaries({
    "node": st.sampled_from(["n1", "n2", "n3"]),
    "task": st.sampled_from(["single", "other"]),
    "scheduled": st.booleans(),
    "manual": st.booleans(),
    "end": st.sampled_from(["no", "ended", "skipped", "missed"]),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(slots=st.lists(_slot, min_size=1, max_size=3), runs=st.lists(_run, max_size=8),
       taker=st.sampled_from(["n2", "n3"]))
def test_the_statement_and_the_python_rule_agree_on_which_instances_are_lost(
        fleet, slots, runs, taker):
    second = int(time.time()) - 30
    with fleetdb.connect(fleet.url) as conn:
        conn.execute(f"TRUNCATE {S}.slots, {S}.runs")
        for number, slot in enumerate(slots):
            _hold(conn, slot["node"], "single", number, slot["lease"],
                  second if slot["scheduled"] else None)
        for run_id, run in enumerate(runs):
            end = run["end"]
            _ship(conn, run["node"], RunRecord(
                run_id, run["task"], run["node"], second if run["scheduled"] else None,
                started=None if end in ("skipped", "missed") else time.time() - 20,
                ended=time.time() - 10 if end == "ended" else None,
                skipped="a limit" if end == "skipped" else None, missed=end == "missed",
                manual=run["manual"]))
    now = 0
    rows = [{"slot": n, "task": "single", "node": s["node"],
             "second": second if s["scheduled"] else None, "lease_until": s["lease"]}
            for n, s in enumerate(slots)]
    free = [r for r in rows if r["lease_until"] is None or r["lease_until"] < now]
    expected = set()
    if free:
        for run_id, run in enumerate(runs):
            record = {"node": run["node"], "task": run["task"], "manual": run["manual"],
                      "scheduled": second if run["scheduled"] else None,
                      "ended": 0 if run["end"] == "ended" else None,
                      "skipped": "a limit" if run["end"] == "skipped" else None,
                      "missed": run["end"] == "missed"}
            if claimloss.instance_lost(record, free[0], rows, taker, now):
                expected.add((run["node"], run_id))
    taken = _taken(_take(fleet.url, taker, most=len(slots)))
    assert [slot for slot, _ in taken] == [r["slot"] for r in free[:1]]
    with fleetdb.connect(fleet.url) as conn:
        closed = conn.execute(f"SELECT node, run_id FROM {S}.runs WHERE error LIKE "
                              "'lost: node % stopped renewing its fleet lease%'").fetchall()
    assert set(closed) == expected
    assert [was for _, was in taken] == ([free[0]["node"]] if expected else [None] * len(taken))


# ---- real daemons as nodes: the holder dies ------------------------------------------------------

def _singletons(fleet, daemons, out):
    """Nodes n1 and n2 running the singleton daemon (lease 6 s), their agents shipping their runs
    (they register themselves); (nodes, the instance's first start stamp, rows(node): the
    node's rows of it in the fleet history, (run_id, ended, error, failed, stopped))."""
    from daemon_harness import wait_for
    from test_fleet_once import SINGLETON, _stamps

    nodes = {}
    for number in (1, 2):
        daemon = daemons(SINGLETON.format(node=f"n{number}", out=out), settings=(
            f"  fleet:\n    database: {fleet.url}\n    lease: 6s\n    heartbeat: 1s\n"))
        nodes[f"n{number}"] = daemon.start("--node-name", f"n{number}", "--node-ip",
                                           f"10.0.0.{number}")

    def rows(node):
        with fleetdb.connect(fleet.url) as conn:
            return conn.execute(f"SELECT run_id, ended IS NOT NULL, error, failed, stopped "
                                f"FROM {S}.runs WHERE node = %s AND task = 'single' "
                                "ORDER BY run_id", (node,)).fetchall()
    first = wait_for(lambda: [s for s in _stamps(out) if s[0] == "s"], 20, "an instance")[0]
    wait_for(lambda: rows(first[2]), 10, "the instance's row shipped")
    return nodes, first, rows


def _moved(out, since):
    from daemon_harness import wait_for
    from test_fleet_once import _stamps

    return wait_for(lambda: [s for s in _stamps(out) if s[0] == "s" and s[1] > since], 12,
                    "the instance to move")[0]


@pytest.mark.slow
def test_a_once_daemons_instance_on_a_killed_node_is_lost_in_the_fleet_history_once_moved(
        fleet, daemons, tmp_path):
    """The node running the instance is killed whole: the node that takes its slot closes its
    row as lost; restarted, the dead node closes its own record as lost too, and ships it over
    the row (final, one row)."""
    from daemon_harness import wait_for
    from test_fleet_once import _kill_node

    out = tmp_path / "stamps.txt"
    nodes, first, rows = _singletons(fleet, daemons, out)
    dead = first[2]
    other = "n2" if dead == "n1" else "n1"
    [(run_id, ended, _, _, _)] = rows(dead)
    assert not ended                                                    # "running"
    _kill_node(nodes[dead])
    _moved(out, time.time())
    assert rows(dead) == [(run_id, True, f"lost: node {dead} stopped renewing its fleet lease "
                                         f"(recorded by {other})", True, None)]
    assert "is lost: its lease ended unrenewed" in nodes[other].log
    wait_for(lambda: [r[1] for r in rows(other)] == [False], 5, "the new instance's row")
    nodes[dead].start("--node-name", dead, "--node-ip", f"10.0.0.{dead[1]}", wait=False)
    [local] = wait_for(lambda: [r for r in nodes[dead].runs("single") if r["ended"]], 15,
                       "the restarted node to close its record")
    assert local["run_id"] == run_id and local["error"].startswith("lost: ")
    wait_for(lambda: rows(dead) == [(run_id, True, local["error"], True, None)], 15,
             "its own record shipped over the row")
    time.sleep(1.5)
    nodes[dead].stop()                  # (first: the other's stop frees the slot for nobody)
    nodes[other].stop()
    assert rows(dead) == [(run_id, True, local["error"], True, None)]


@pytest.mark.slow
def test_a_once_daemons_instance_on_a_node_stopped_past_its_lease_ends_final_once(
        fleet, daemons, tmp_path):
    """SIGSTOP of every process of the holder past its lease: the node taking the slot closes
    the row as lost; resumed, the node kills its instance (its lease is refused) and its own
    record of that end replaces the row: one row, final, never "running" again."""
    import psutil
    from daemon_harness import wait_for

    out = tmp_path / "stamps.txt"
    nodes, first, rows = _singletons(fleet, daemons, out)
    frozen = first[2]
    other = "n2" if frozen == "n1" else "n1"
    [(run_id, _, _, _, _)] = rows(frozen)
    root = psutil.Process(nodes[frozen].proc.pid)
    procs = [root] + root.children(recursive=True)

    def each(action):       # the instance's `sleep 0.1`s come and go: one may be gone already
        for proc in procs:
            try:
                getattr(proc, action)()
            except psutil.NoSuchProcess:
                pass
    each("suspend")
    try:
        _moved(out, time.time())
        assert rows(frozen) == [(run_id, True, f"lost: node {frozen} stopped renewing its fleet "
                                               f"lease (recorded by {other})", True, None)]
    finally:
        each("resume")
    [local] = wait_for(lambda: [r for r in nodes[frozen].runs("single") if r["ended"]], 10,
                       "the resumed node to end its instance")
    assert local["run_id"] == run_id and local["stopped"] == "its fleet lease could not be kept"
    final = wait_for(lambda: [r for r in rows(frozen) if r[4]], 10, "its end shipped")
    assert final == [(run_id, True, local["error"], False, local["stopped"])]   # not failed
    time.sleep(1.5)
    nodes[frozen].stop()
    nodes[other].stop()
    assert rows(frozen) == final


def _scans_of(plan, table):
    """The scans of ``table`` in an EXPLAIN (FORMAT JSON) plan, at any depth."""
    found = [plan] if plan.get("Relation Name") == table and "Scan" in plan["Node Type"] else []
    for child in plan.get("Plans", ()):
        found += _scans_of(child, table)
    return found


def test_a_standby_look_that_takes_no_slot_reads_no_row_of_the_fleet_history(fleet):
    """Every look of a standby runs TAKE_DAEMON_SLOT, and most take nothing (the slot is held).
    The close of a lost instance is then not run over ``runs``: on a history where the task's
    open rows are few (as they are), the planner read ``runs`` first, all of it, on every look of
    every node; nothing taken, the close is skipped before ``runs`` is read (a one-time filter)."""
    with fleetdb.connect(fleet.url) as conn:
        conn.execute(f"""INSERT INTO {S}.runs (node, run_id, task, started, ended, at)
            SELECT 'n' || (i % 2), i, 'single', to_timestamp(1e9 + i), to_timestamp(1e9 + i + 1),
                   to_timestamp(1e9 + i) FROM generate_series(1, 2000) AS i""")
        _instance(conn, "n1", "single", 5000)               # the holder's instance: open
        _hold(conn, "n1", "single", 0, 15)                  # ... under a live lease
        conn.execute(f"ANALYZE {S}.runs")
        conn.execute(f"ANALYZE {S}.slots")
        with conn.transaction(force_rollback=True):
            [[plan]] = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + claims.TAKE_DAEMON_SLOT, {
                "task": "single", "max": 1, "node": "n2", "lease": 15, "wait": 0.0}).fetchone()
        scans = _scans_of(plan["Plan"], "runs")
        assert scans and all(scan["Actual Loops"] == 0 for scan in scans), scans
        assert conn.execute(HISTORY, ("n1", 5000)).fetchone() == (False, None, False)
