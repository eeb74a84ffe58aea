"""The read side of the fleet database (fleetquery): node states at their boundaries, drift,
history across nodes with every filter, a run's stored output, a file's tasks across the fleet,
and the cost of `fleet status` at 1,000 nodes.  Rows are written as a fleet agent writes them
(tests/fleetrows.py) into a real PostgreSQL (tests/pgserver.py)."""

import datetime
import json

import fleetrows
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchcore import config, fleetquery
from torchcore.commands import history as history_command

pytestmark = pytest.mark.process

UTC = datetime.timezone.utc


@pytest.fixture
def conn(pg):
    connection = fleetrows.init(pg.url)
    yield connection
    connection.close()


def _states(conn):
    return {node["name"]: node for node in fleetquery.nodes(conn, UTC)}


def _at(text):
    return datetime.datetime.fromisoformat(text).timestamp()


# ---- states ----------------------------------------------------------------------------------

def test_states_at_their_boundaries(conn):
    """One transaction: now() is the same for the rows written and the query, so the
    boundaries are exact (heartbeat 1 s: up through 2 s, late through 6 s, then down)."""
    with conn.transaction():
        for name, age, stopped in [("a-up", 0, None), ("b-up-edge", 2.0, None),
                                   ("c-late", 2.001, None), ("d-late-edge", 6.0, None),
                                   ("e-down", 6.001, None), ("f-stopped", 100, 0.0),
                                   ("g-stopped-after", 100, 0.5),
                                   ("h-restarted", 0.5, -30.0)]:
            fleetrows.add_node(conn, name, age=age, heartbeat=1, stopped=stopped)
        nodes = _states(conn)
    assert {name: n["state"] for name, n in nodes.items()} == {
        "a-up": "up", "b-up-edge": "up", "c-late": "late", "d-late-edge": "late",
        "e-down": "down", "f-stopped": "stopped", "g-stopped-after": "stopped",
        "h-restarted": "up"}
    now = _at(nodes["a-up"]["now"])
    # since: late from the second missed heartbeat, down from the sixth, stopped at the stop,
    # up since the daemon started (2 h ago in fleetrows)
    assert _at(nodes["c-late"]["since"]) == pytest.approx(now - 2.001 + 2, abs=1.01)
    assert _at(nodes["e-down"]["since"]) == pytest.approx(now - 6.001 + 6, abs=1.01)
    assert _at(nodes["g-stopped-after"]["since"]) == pytest.approx(now - 99.5, abs=1.01)
    assert _at(nodes["a-up"]["since"]) == pytest.approx(now - 7200, abs=1.01)
    assert all(n["age"] >= 0 for n in nodes.values())


def test_a_longer_heartbeat_stretches_the_boundaries(conn):
    with conn.transaction():
        fleetrows.add_node(conn, "slow", age=55, heartbeat=30)     # 55 s < 2 x 30 s
        fleetrows.add_node(conn, "slower", age=61, heartbeat=30)
        fleetrows.add_node(conn, "gone", age=181, heartbeat=30)
        nodes = _states(conn)
    assert [nodes[n]["state"] for n in ("slow", "slower", "gone")] == ["up", "late", "down"]


_HEARTBEATS = st.sampled_from([0.5, 1, 2, 5, 30, 3600])


@settings(derandomize=True, max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(heartbeat=_HEARTBEATS, missed=st.integers(0, 8), millis=st.sampled_from([-1, 0, 1, 250]),
       stopped=st.sampled_from([None, -5.0, 0.0, 3.0]))
def test_the_sql_state_is_the_python_rule(conn, heartbeat, missed, millis, stopped):
    """Generated (heartbeat, age, stopped): the database's CASE and fleetquery.classify agree,
    at and around each whole number of heartbeats."""
    age = max(0.0, missed * heartbeat + millis / 1000)
    with conn.transaction():
        conn.execute(f"DELETE FROM {fleetrows.S}.nodes")
        fleetrows.add_node(conn, "n", age=age, heartbeat=heartbeat, stopped=stopped)
        [node] = fleetquery.nodes(conn, UTC)
    expected = fleetquery.classify(heartbeat, age, stopped is not None and stopped >= 0)
    assert node["state"] == expected, (heartbeat, age, stopped)
    if stopped is None:
        assert expected == ("up" if age <= 2 * heartbeat else
                            "late" if age <= 6 * heartbeat else "down")


def test_clock_offsets_beyond_a_second_are_flagged(conn):
    fleetrows.add_node(conn, "ok", clock_offset=0.999)
    fleetrows.add_node(conn, "ahead", clock_offset=1.2)
    fleetrows.add_node(conn, "behind", clock_offset=-3.0)
    nodes = _states(conn)
    assert {name: n["clock_flagged"] for name, n in nodes.items()} == {
        "ok": False, "ahead": True, "behind": True}
    assert nodes["behind"]["clock_offset"] == -3.0


# ---- drift -----------------------------------------------------------------------------------

def test_drift_after_one_nodes_digest_changes(conn):
    for name in ("web-1", "web-2", "web-3"):
        fleetrows.add_node(conn, name, digest="d1", file_age=3600)
    assert not any(n["drifted"] for n in _states(conn).values())
    fleetrows.add_node(conn, "web-2", digest="d2", file_age=120)     # its file was edited
    nodes = _states(conn)
    assert {name: n["drifted"] for name, n in nodes.items()} == {
        "web-1": False, "web-2": True, "web-3": False}
    now = _at(nodes["web-1"]["now"])
    assert _at(nodes["web-2"]["drifted_since"]) == pytest.approx(now - 120, abs=2.5)
    assert nodes["web-1"]["drifted_since"] is None
    # the rollout goes on: two of three run d2; now web-1 is the one behind, since d2 arrived
    fleetrows.add_node(conn, "web-3", digest="d2", file_age=60)
    nodes = _states(conn)
    assert {name: n["drifted"] for name, n in nodes.items()} == {
        "web-1": True, "web-2": False, "web-3": False}
    assert _at(nodes["web-1"]["drifted_since"]) == pytest.approx(now - 120, abs=3)


def test_drift_counts_up_nodes_only_and_never_marks_a_stopped_one(conn):
    fleetrows.add_node(conn, "up-1", digest="new")
    fleetrows.add_node(conn, "down-1", digest="old", age=600)
    fleetrows.add_node(conn, "down-2", digest="old", age=600)
    fleetrows.add_node(conn, "stopped", digest="old", age=600, stopped=0)
    nodes = _states(conn)
    assert nodes["down-1"]["drifted"] and nodes["down-2"]["drifted"]   # most *up* nodes run new
    assert not nodes["up-1"]["drifted"] and not nodes["stopped"]["drifted"]


# ---- history ---------------------------------------------------------------------------------

def _three_nodes(conn):
    """web-1..3, each: backup (ok, 1 h ago), report (web-2 fails 30 min ago), a skip."""
    for number, node in enumerate(("web-1", "web-2", "web-3"), 1):
        fleetrows.add_node(conn, node)
        fleetrows.add_run(conn, node, 1, "backup", age=3600 + number, output=f"{node} backup\n")
        fleetrows.add_run(conn, node, 2, "report", age=1800 + number,
                          exit_code=3 if node == "web-2" else 0, output=f"{node} report\n")
        fleetrows.add_run(conn, node, 3, "report", age=60 + number, skipped="max_running")
    fleetrows.add_run(conn, "web-3", 4, "backup", age=3 * 86400, signal=9)


def test_history_across_three_nodes_with_every_filter(conn):
    _three_nodes(conn)
    everything = fleetquery.history(conn, limit=0, tz=UTC)
    assert len(everything) == 10
    ats = [_at(r["started"] or r["scheduled"]) for r in everything]
    assert ats == sorted(ats, reverse=True)                   # newest first
    assert set(everything[0]) == set(history_command.run_json(_local_record()))
    assert {r["node"] for r in everything} == {"web-1", "web-2", "web-3"}
    assert len(fleetquery.history(conn)) == 10 and len(fleetquery.history(conn, limit=4)) == 4

    def keys(**filters):
        return [(r["node"], r["run_id"]) for r in fleetquery.history(conn, **filters)]

    assert keys(task="backup") == [("web-1", 1), ("web-2", 1), ("web-3", 1), ("web-3", 4)]
    assert keys(node="web-2") == [("web-2", 3), ("web-2", 2), ("web-2", 1)]
    assert keys(failed=True) == [("web-2", 2), ("web-3", 4)]
    now = fleetquery.db_now(conn)
    assert len(keys(since=now - 86400)) == 9
    assert keys(since=now - 2400) == [("web-1", 3), ("web-2", 3), ("web-3", 3),
                                      ("web-1", 2), ("web-2", 2), ("web-3", 2)]
    assert keys(since=datetime.datetime.fromtimestamp(now - 2400, UTC), task="report",
                node="web-3", failed=False, limit=1) == [("web-3", 3)]
    assert keys(task="report", failed=True, node="web-1") == []
    assert keys(task="nothing") == []
    failed = fleetquery.history(conn, node="web-2", failed=True, tz=UTC)[0]
    assert (failed["exit_code"], failed["failed"], failed["duration"]) == (3, True, 1.0)
    assert fleetquery.result_text(failed) == "exit 3"
    skip = fleetquery.history(conn, node="web-2", limit=1)[0]
    assert (skip["skipped"], skip["skip_reason"], skip["started"]) == (True, "max_running", None)
    assert fleetquery.result_text(skip) == "skipped: max_running"
    assert json.loads(json.dumps(everything)) == everything


def _local_record():
    from torchcore.runrecord import RunRecord
    return RunRecord(1, "t", "n", 0)


def test_history_refuses_an_unknown_node_and_a_limit_out_of_range(conn):
    _three_nodes(conn)
    with pytest.raises(fleetquery.QueryError, match=r"no node 'web-4' .*did you mean 'web-\d'"):
        fleetquery.history(conn, node="web-4")
    with pytest.raises(fleetquery.QueryError, match=r"no node 'db'.*the nodes are web-1"):
        fleetquery.history(conn, node="db")
    assert fleetquery.history(conn, node="web-1", task="nothing") == []    # a known node
    for limit in (fleetquery.MAX_LIMIT + 1, 10 ** 30, -1):
        with pytest.raises(fleetquery.QueryError, match="--limit: expected 0"):
            fleetquery.history(conn, limit=limit)
    assert len(fleetquery.history(conn, limit=fleetquery.MAX_LIMIT)) == 10


def test_a_run_with_its_stored_output(conn):
    _three_nodes(conn)
    found = fleetquery.run(conn, "web-2", 2, tz=UTC)
    assert found["output"] == "web-2 report\n" and found["exit_code"] == 3
    assert fleetquery.run(conn, "web-2", 99) is None
    assert fleetquery.run(conn, "web-3", 4, task="backup")["signal"] == 9
    assert fleetquery.run(conn, "web-3", 4, task="report") is None
    with pytest.raises(fleetquery.QueryError, match=r"run 2 of 'report' is on several nodes "
                                                    r"\(web-1, web-2, web-3\): name one with --node"):
        fleetquery.run(conn, None, 2, task="report")
    assert fleetquery.run(conn, None, 4, task="backup")["node"] == "web-3"
    with pytest.raises(fleetquery.QueryError, match="no node 'nope'"):
        fleetquery.run(conn, "nope", 1)
    assert fleetquery.last_run_with_output(conn, "report")["node"] == "web-1"
    assert fleetquery.last_run_with_output(conn, "report", "web-3")["run_id"] == 2
    assert fleetquery.last_run_with_output(conn, "nothing") is None


# ---- a file's tasks across the fleet ---------------------------------------------------------

_FILE = """
tasks:
  - name: backup
    command: echo backup
    schedule: "0 3 * * *"
  - name: report
    command: echo report
    schedule: "*/5 * * * *"
    hosts: [web-*]
  - name: db-vacuum
    command: echo vacuum
    schedule: "@daily"
    hosts: [db-*]
  - name: office
    command: echo office
    schedule: "@hourly"
    ips: [192.168.7.0/24]
  - name: retired
    command: echo off
    schedule: "@daily"
    hosts: [nowhere-*]
    enabled: false
"""


def test_task_view_finds_orphans_failures_on_some_nodes_and_drift(conn, tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(_FILE)
    taskfile = config.load(str(path))
    _three_nodes(conn)
    fleetrows.add_node(conn, "laptop", addresses=["192.168.7.20", "fe80::1%wlan0"])
    # a daemon started with --node-name web-4: its name is the hostname `hosts` match
    fleetrows.add_node(conn, "web-4", hostname="buildbox", addresses=["10.9.0.4"])
    fleetrows.add_run(conn, "web-1", 5, "cleanup", age=600)        # a task the file dropped
    fleetrows.add_run(conn, "web-3", 6, "cleanup", age=700)
    fleetrows.add_run(conn, "web-3", 7, "old-sync", age=800)
    view = fleetquery.task_view(conn, taskfile, UTC)
    tasks = {task["name"]: task for task in view["tasks"]}
    assert tasks["backup"]["should"] == ["laptop", "web-1", "web-2", "web-3", "web-4"]
    assert tasks["report"]["should"] == ["web-1", "web-2", "web-3", "web-4"]
    assert tasks["office"]["should"] == ["laptop"]
    assert tasks["db-vacuum"]["should"] == [] and tasks["db-vacuum"]["problems"] == ["orphan"]
    assert tasks["retired"]["problems"] == []                       # disabled: not an orphan
    # backup ran on all three in the last day (web-3's failure 3 days ago is older than that)
    assert [(r["node"], r["failed"], r["last_result"]) for r in tasks["backup"]["ran"]] == [
        ("web-1", False, "ok"), ("web-2", False, "ok"), ("web-3", False, "ok")]
    assert tasks["backup"]["problems"] == []
    report = {r["node"]: r for r in tasks["report"]["ran"]}
    # the last finished run decides (the later skip does not), and the skip is the last record
    assert report["web-2"]["failed"] is True and report["web-2"]["failures"] == 1
    assert report["web-2"]["last_result"] == "skipped: max_running"
    assert report["web-1"]["runs"] == 1
    assert tasks["report"]["problems"] == ["failing"]
    problems = {(p["kind"], p.get("task") or p.get("node")): p for p in view["problems"]}
    assert set(problems) == {("failing", "report"), ("orphan", "db-vacuum"),
                             ("drift", "web-1"), ("drift", "web-3")}
    assert problems["failing", "report"]["failing"] == ["web-2"]
    assert problems["failing", "report"]["ok"] == ["web-1", "web-3"]
    assert problems["drift", "web-3"]["tasks"] == ["cleanup", "old-sync"]
    assert "no longer has them" in problems["drift", "web-3"]["text"]
    assert view["nodes"] == 5 and view["nodes_on_file"] == []
    assert json.loads(json.dumps(view)) == view


def test_task_view_of_one_task_reads_its_runs_alone(conn, tmp_path):
    """A task's page asks for its task only: the same row and problems as in the whole view,
    its summary (task_hours) read through its key on (task, node, hour), the runs not at all."""
    path = tmp_path / "tasks.yaml"
    path.write_text(_FILE)
    taskfile = config.load(str(path))
    _three_nodes(conn)
    conn.execute(f"""INSERT INTO {fleetrows.S}.runs (node, run_id, task, started, ended,
                         exit_code, at)
                     SELECT 'web-' || (g % 3 + 1), 1000 + g, 'other-' || (g % 200),
                            now() - g * interval '1 second', now() - g * interval '1 second',
                            0, now() - g * interval '1 second'
                     FROM generate_series(1, 50000) g""")
    conn.execute(f"ANALYZE {fleetrows.S}.runs")
    conn.execute(f"ANALYZE {fleetrows.S}.task_hours")
    whole = fleetquery.task_view(conn, taskfile, UTC)
    for name in ("backup", "report", "db-vacuum"):
        one = fleetquery.task_view(conn, taskfile, UTC, task=name)
        assert one["tasks"] == [t for t in whole["tasks"] if t["name"] == name]
        assert one["problems"] == [p for p in whole["problems"] if p.get("task") == name]
        assert {k: v for k, v in one.items() if k not in ("tasks", "problems", "now")} == \
            {k: v for k, v in whole.items() if k not in ("tasks", "problems", "now")}
    sql = fleetquery._RECENT_SQL.format(task="AND task = 'report'")
    [[plan]] = conn.execute("EXPLAIN (FORMAT JSON) " + sql).fetchone()
    steps = _plan_nodes(plan["Plan"], [])
    # the runs are not read at all: their summary is, through its key, which starts with task
    assert not [s for s in steps if s.get("Relation Name") == "runs"]
    kinds = [s["Node Type"] for s in steps if s.get("Relation Name") == "task_hours"]
    indexes = {s["Index Name"] for s in steps if "Index Name" in s}
    assert kinds and "Seq Scan" not in kinds and indexes == {"task_hours_pkey"}, (kinds, indexes)


def test_task_view_without_problems_and_the_nodes_on_this_file(conn, tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n  - name: backup\n    command: echo\n    schedule: '@daily'\n")
    taskfile = config.load(str(path))
    fleetrows.add_node(conn, "web-1", digest=taskfile.digest)
    fleetrows.add_node(conn, "web-2", digest="older")
    fleetrows.add_run(conn, "web-1", 1, "backup")
    fleetrows.add_run(conn, "web-2", 1, "backup", running=True)
    view = fleetquery.task_view(conn, taskfile, UTC)
    assert view["problems"] == [] and view["nodes_on_file"] == ["web-1"]
    [task] = view["tasks"]
    assert [(r["node"], r["failed"]) for r in task["ran"]] == [("web-1", False), ("web-2", None)]
    assert task["ran"][1]["last_result"].startswith("running")


# ---- 1,000 nodes -----------------------------------------------------------------------------

def _thousand_nodes(conn):
    S = fleetrows.S
    # the runs first: the nodes' heartbeat ages are counted from now(), not from before them
    conn.execute(f"""INSERT INTO {S}.runs (node, run_id, task, started, ended, exit_code, failed,
            at)
        SELECT 'node-' || (i % 1000 + 1), i, 'task-' || (i % 50),
               now() - make_interval(secs => i * 13), now() - make_interval(secs => i * 13 - 1),
               CASE WHEN i % 97 = 0 THEN 1 ELSE 0 END, i % 97 = 0,
               now() - make_interval(secs => i * 13)
        FROM generate_series(1, 200000) AS i""")
    conn.execute(f"""INSERT INTO {S}.nodes (name, hostname, addresses, version, heartbeat,
            last_seen, file_digest, file_since, clock_offset)
        SELECT 'node-' || i, 'node-' || i, ARRAY['10.0.' || (i / 256) || '.' || (i % 256)], '1.0',
               5, now() - make_interval(secs => i % 40), CASE WHEN i % 10 = 0 THEN 'b' ELSE 'a' END,
               now() - interval '1 hour', (i % 7) * 0.3
        FROM generate_series(1, 1000) AS i""")
    conn.execute(f"ANALYZE {S}.nodes")
    conn.execute(f"ANALYZE {S}.runs")


def _plan_nodes(plan, found):
    found.append(plan)
    for child in plan.get("Plans", ()):
        _plan_nodes(child, found)
    return found


def test_fleet_status_over_a_thousand_nodes_is_one_statement_using_the_indexes(conn):
    _thousand_nodes(conn)
    executed = []
    original = type(conn.cursor()).execute

    def counting(self, query, *args, **kwargs):
        executed.append(query)
        return original(self, query, *args, **kwargs)

    type(conn.cursor()).execute = counting
    try:
        nodes = fleetquery.nodes(conn)
    finally:
        type(conn.cursor()).execute = original
    assert len(executed) == 1 and len(nodes) == 1000
    assert [n["name"] for n in nodes if n["drifted"]] == \
        [n["name"] for n in nodes if n["file_digest"] == "b"]        # most up nodes run "a"
    assert sum(n["failed_24h"] for n in nodes) == len(
        fleetquery.history(conn, failed=True, since=fleetquery.db_now(conn) - 86400, limit=0))
    [[plan]] = conn.execute("EXPLAIN (FORMAT JSON) " + fleetquery._NODES_SQL).fetchone()
    steps = _plan_nodes(plan["Plan"], [])
    scans = [(s["Node Type"], s.get("Relation Name"), s.get("Index Name")) for s in steps
             if s.get("Relation Name")]
    # the registry is read once; the 200,000 runs only through the partial index of failures
    assert [scan for scan in scans if scan[1] == "nodes"] == [("Seq Scan", "nodes", None)]
    runs = [scan for scan in scans if scan[1] == "runs"]
    assert runs and all(kind != "Seq Scan" and index in ("runs_failed", "runs_node_failed")
                        for kind, _, index in runs), \
        scans


# Times PostgreSQL holds and Python's datetime does not (years 1-9999): what a node whose clock
# is far off, or a hand-written row, can put there
_FAR_TIMES = st.one_of(
    st.sampled_from(["infinity", "-infinity", "4713-01-01 BC", "294276-12-31"]),
    st.integers(10_000, 294_275).map(lambda year: f"{year}-06-15 12:00:00+00"),
    st.integers(1, 4_712).map(lambda year: f"{year:04d}-06-15 12:00:00+00 BC"))


@settings(derandomize=True, max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(started=_FAR_TIMES, ended=_FAR_TIMES, scheduled=_FAR_TIMES)
def test_times_out_of_pythons_range_are_shown_at_its_bounds(conn, tmp_path, started, ended,
                                                           scheduled):
    """A run and a node with times beyond year 9999 (or before year 1, or infinite): every read
    answers, with the times at the nearest bound Python holds, in strict JSON (no NaN)."""
    with conn.transaction():
        conn.execute(f"DELETE FROM {fleetrows.S}.runs")
        conn.execute(f"DELETE FROM {fleetrows.S}.nodes")
        fleetrows.add_node(conn, "web-1")
        conn.execute(f"UPDATE {fleetrows.S}.nodes SET started = %s, file_since = %s",
                     (started, ended))
        conn.execute(f"INSERT INTO {fleetrows.S}.runs (node, run_id, task, scheduled, started, "
                     "ended, exit_code, at) VALUES ('web-1', 1, 'backup', %s, %s, %s, 0, now())",
                     (scheduled, started, ended))
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n  - {name: backup, schedule: '@daily', command: 'true'}\n")
    answers = [fleetquery.history(conn, tz=UTC), fleetquery.run(conn, "web-1", 1, tz=UTC),
               fleetquery.nodes(conn, UTC), fleetquery.task_view(conn, config.load(str(path)), UTC)]

    def no_constant(name):
        raise AssertionError(f"{name} in the JSON")

    json.loads(json.dumps(answers), parse_constant=no_constant)
    [run] = answers[0]
    for key in ("scheduled", "started", "ended"):
        assert run[key][:4] in ("0001", "9999"), run
    assert answers[2][0]["started"][:4] in ("0001", "9999")


@settings(derandomize=True, max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.sampled_from(["NaN", "Infinity", "-Infinity", "0.5", "3"]),
       heartbeat=st.sampled_from(["NaN", "Infinity", "5"]))
def test_a_node_s_numbers_are_json_numbers_or_null(conn, offset, heartbeat):
    """NaN and Infinity, which a real column holds, come back as None (JSON has no such
    number: the dashboard's parser refuses the whole answer)."""
    with conn.transaction():
        conn.execute(f"DELETE FROM {fleetrows.S}.nodes")
        fleetrows.add_node(conn, "web-1")
        conn.execute(f"UPDATE {fleetrows.S}.nodes SET clock_offset = %s::real, "
                     "heartbeat = %s::real", (offset, heartbeat))
    [node] = fleetquery.nodes(conn, UTC)

    def no_constant(name):
        raise AssertionError(f"{name} in the JSON")

    json.loads(json.dumps(node), parse_constant=no_constant)
    assert node["clock_offset"] == ({"0.5": 0.5, "3": 3.0}.get(offset))
    assert node["heartbeat"] == (5 if heartbeat == "5" else None)
