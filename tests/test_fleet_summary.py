"""torchcore.task_hours, the summary of the fleet history that ``fleet tasks`` reads: exactly what
a count over torchcore.runs says, whatever order and number of times the agent ships the states
of its runs; and the tasks' targets matched once per distinct set, as each task alone would be."""

import math
import random

import fleetrows
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchcore import config, fleetquery, fleetsummary
from torchcore import fleetrows as agent
from torchcore.runrecord import RunRecord

pytestmark = pytest.mark.process

S = fleetrows.S


@pytest.fixture
def conn(pg):
    connection = fleetrows.init(pg.url)
    yield connection
    connection.close()


# ---- the summary is exact --------------------------------------------------------------------

# a run: node, task, kind, hours back, seconds from the hour's start it was due, start delay
_RUN = st.tuples(st.sampled_from(["web-1", "web-2"]), st.sampled_from(["backup", "report"]),
                 st.sampled_from(["ok", "fails", "timeout", "running", "skip", "miss", "fork"]),
                 st.integers(0, 27), st.sampled_from([0, 1, 1800, 3595, 3599]),
                 st.sampled_from([0.0, 0.4, 3.0, 7.5]))


def _states(run_id, node, task, kind, hours, offset, delay, hour0):
    """The records the agent ships of one run, in the order the node writes them."""
    scheduled = int(hour0 - hours * 3600 + offset)
    started = scheduled + delay
    if kind == "skip":
        return [RunRecord.of_skip(run_id, task, node, scheduled, "max_running", False)]
    if kind == "miss":
        return [RunRecord.of_miss(run_id, task, node, scheduled, 2)]
    start = RunRecord.of_start(run_id, task, node, scheduled, started, False, 900 + run_id)
    known = RunRecord.of_start(run_id, task, node, scheduled, started, False, 5000 + run_id)
    if kind == "running":
        return [start, known]
    if kind == "fork":          # the executor could not be forked: not a start after all
        return [start, RunRecord.of_failed_fork(run_id, task, node, scheduled, False, "EAGAIN")]
    end = RunRecord(run_id, task, node, scheduled, started, started + 2.0,
                    exit_code={"ok": 0, "fails": 3, "timeout": None}[kind],
                    signal=9 if kind == "timeout" else None, timed_out=kind == "timeout",
                    pid=5000 + run_id)
    return [start, known, end]


def _expected(rows):
    """task_hours as a count over the rows of torchcore.runs."""
    hours = {}
    for row in rows:
        key = (row["task"], row["node"], row["hour"])
        hours.setdefault(key, []).append(row)
    result = {}
    for key, group in hours.items():
        group.sort(key=lambda r: (r["at"], r["run_id"]), reverse=True)
        last = group[0]
        done = next((r for r in group if r["ended"] is not None and r["skipped"] is None
                     and not r["missed"]), None)
        result[key] = (
            sum(r["started"] is not None for r in group), sum(r["failed"] for r in group),
            last["at"], last["run_id"], last["ended"] is not None, last["exit_code"],
            last["signal"], last["timed_out"], last["skipped"], last["missed"], last["manual"],
            last["pid"], last["error"], last["stopped"],
            done and done["at"], done and done["run_id"], done and done["failed"])
    return result


def _compare(conn):
    cur = conn.cursor()
    cur.execute(f"SELECT *, {fleetsummary.HOUR.format('runs')} AS hour FROM {S}.runs")
    names = [d.name for d in cur.description]
    rows = [dict(zip(names, row)) for row in cur.fetchall()]
    cur.execute(f"SELECT * FROM {S}.task_hours")
    names = [d.name for d in cur.description]
    summary = {}
    for row in cur.fetchall():
        row = dict(zip(names, row))
        summary[row["task"], row["node"], row["hour"]] = tuple(
            row[c] for c in ("runs", "failures", "last_at", "last_run", "last_ended",
                             "last_exit_code", "last_signal", "last_timed_out", "last_skipped",
                             "last_missed", "last_manual", "last_pid", "last_error",
                             "last_stopped", "done_at", "done_run", "done_failed"))
    assert summary == _expected(rows)
    return rows


@settings(derandomize=True, max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(runs=st.lists(_RUN, min_size=1, max_size=10), seed=st.integers(0, 2**32),
       repeats=st.integers(1, 3), batch=st.integers(1, 7), delete=st.integers(0, 3))
def test_the_summary_is_a_count_of_the_runs_whatever_the_shipping(conn, runs, seed, repeats,
                                                                   batch, delete):
    """Each run's states (start, the start again with its command's pid, end; a skip, a miss;
    a start then a failed fork) shipped through the agent's upsert, each up to ``repeats`` times,
    shuffled (an end before its start, a start shipped again after the end), in transactions
    of ``batch`` rows: the summary is what a count over the runs' rows says, and so is what
    task_view reads of it; after the runs still running are recorded lost by another node and
    their own node's ends replace those rows; after deleting runs too."""
    conn.execute(f"TRUNCATE {S}.runs")
    assert conn.execute(f"SELECT count(*) FROM {S}.task_hours").fetchone()[0] == 0
    now = fleetquery.db_now(conn)
    hour0 = math.floor(now / 3600) * 3600
    shipped = []
    for run_id, run in enumerate(runs, 1):
        for record in _states(run_id, *run, hour0):
            shipped.extend([record] * random.Random(seed + run_id).randint(1, repeats))
    random.Random(seed).shuffle(shipped)
    for first in range(0, len(shipped), batch):
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(agent.UPSERT_RUNS, [
                agent.run_row(r.node, r, "out\n" if r.ended else None)
                for r in shipped[first:first + batch]])
    rows = _compare(conn)
    _compare_view(conn, rows)
    # the runs still running recorded lost by another node (claimloss.py: an UPDATE of the open
    # row), then their own node's final records of them shipped, each up to ``repeats`` times:
    # a final row replaced by another final state
    lost = [(run_id, run) for run_id, run in enumerate(runs, 1) if run[2] == "running"]
    if lost:
        conn.execute(f"""UPDATE {S}.runs SET ended = now(), failed = true,
                         error = 'lost: node ' || node || ' stopped renewing its fleet lease'
                         WHERE ended IS NULL AND skipped IS NULL AND NOT missed""")
        _compare(conn)
        pick = random.Random(seed)
        own = []
        for run_id, (node, task, _, hours, offset, delay) in lost:
            scheduled = int(hour0 - hours * 3600 + offset)
            started = scheduled + delay
            own += [pick.choice([
                RunRecord(run_id, task, node, scheduled, started, started + 1.0, signal=9,
                          stopped="its fleet lease could not be kept", pid=5000 + run_id),
                RunRecord(run_id, task, node, scheduled, started, started + 1.0, exit_code=0,
                          pid=5000 + run_id),
                RunRecord(run_id, task, node, scheduled, started, started + 1.0,
                          error="lost: its supervisor and executor stopped before recording "
                                "an end", pid=5000 + run_id)])] * pick.randint(1, repeats)
        pick.shuffle(own)
        for record in own:
            conn.execute(agent.UPSERT_RUNS, agent.run_row(record.node, record, None))
        rows = _compare(conn)
        _compare_view(conn, rows)
    if delete:
        conn.execute(f"DELETE FROM {S}.runs WHERE run_id %% %s = 0", (delete + 1,))
        _compare_view(conn, _compare(conn))


def _compare_view(conn, rows):
    """What task_view reads of the summary, as the same question asked of the runs' rows."""
    since = conn.execute(f"SELECT {fleetsummary.SINCE}").fetchone()[0]
    expected = {}
    for row in sorted(rows, key=lambda r: (r["at"], r["run_id"]), reverse=True):
        if row["hour"] < since:
            continue
        key = (row["node"], row["task"])
        entry = expected.setdefault(key, {"last": row, "runs": 0, "failures": 0, "done": None})
        entry["runs"] += row["started"] is not None
        entry["failures"] += row["failed"]
        if entry["done"] is None and row["ended"] is not None and row["skipped"] is None \
                and not row["missed"]:
            entry["done"] = row
    got = {(row[0], row[1]): row for row in conn.execute(
        fleetquery._RECENT_SQL.format(task="")).fetchall()}
    assert set(got) == set(expected)
    for key, entry in expected.items():
        fields = dict(zip(fleetsummary.LAST_FIELDS, got[key]))
        last = entry["last"]
        assert (fields["run_id"], fields["pid"], fields["ended"], fields["skipped"],
                fields["runs"], fields["failures"], fields["last_failed"]) == \
            (last["run_id"], last["pid"], last["ended"] is not None, last["skipped"],
             entry["runs"], entry["failures"], entry["done"] and entry["done"]["failed"])
        assert fields["at"] == pytest.approx(last["at"].timestamp())


def test_a_final_row_is_counted_once_and_a_truncate_empties_the_summary(conn):
    end = RunRecord(1, "backup", "web-1", 1_700_000_000, 1_700_000_000.5, 1_700_000_002.0,
                    exit_code=1)
    start = RunRecord.of_start(1, "backup", "web-1", 1_700_000_000, 1_700_000_000.5, False, 7)
    for record in (end, end, start, end, start):
        conn.execute(agent.UPSERT_RUNS, agent.run_row("web-1", record, None))
    assert conn.execute(f"SELECT runs, failures, last_ended, done_failed "
                        f"FROM {S}.task_hours").fetchall() == [(1, 1, True, True)]
    conn.execute(f"TRUNCATE {S}.runs")
    assert conn.execute(f"SELECT count(*) FROM {S}.task_hours").fetchone()[0] == 0


# ---- targets matched once per distinct set ---------------------------------------------------

_GLOBS = ["web-*", "db?", "*.internal", "WEB-1", "build*", "nope"]
_NETS = ["10.0.0.0/8", "10.1.0.0/16", "192.168.7.0/24", "fe80::/10", "2001:db8::/32",
         "10.0.0.5/32"]


@settings(derandomize=True, max_examples=40, deadline=None)
@given(tasks=st.lists(st.tuples(st.lists(st.sampled_from(_NETS), max_size=2, unique=True),
                                st.lists(st.sampled_from(_GLOBS), max_size=2, unique=True),
                                st.booleans()), min_size=1, max_size=25),
       nodes=st.lists(st.tuples(st.sampled_from(["web-1", "web-2", "db1", "a.internal",
                                                 "buildbox", "laptop"]),
                                st.sampled_from(["10.0.0.5", "10.1.2.3", "192.168.7.20",
                                                 "fe80::1%wlan0", "2001:db8::7", "bad"]),
                                st.booleans()), max_size=12))
def test_targets_grouped_match_as_each_task_alone(tmp_path_factory, tasks, nodes):
    """The grouped matching (_matcher) says, of generated task files and node sets, what
    matching every task against every node says."""
    lines = ["tasks:"]
    for number, (ips, hosts, enabled) in enumerate(tasks):
        lines.append(f"  - name: t{number}\n    command: 'true'\n    schedule: '@daily'"
                     f"\n    enabled: {'true' if enabled else 'false'}")
        if ips:
            lines.append(f"    ips: [{', '.join(repr(i) for i in ips)}]")
        if hosts:
            lines.append(f"    hosts: [{', '.join(repr(h) for h in hosts)}]")
    path = tmp_path_factory.mktemp("grouped") / "tasks.yaml"
    path.write_text("\n".join(lines) + "\n")
    taskfile = config.load(str(path))
    registered = [{"name": f"n{number}-{hostname}" if named else hostname,
                   "hostname": hostname, "addresses": [address]}
                  for number, (hostname, address, named) in enumerate(nodes)]
    machines = [(row["name"], fleetquery._node_of(row),
                 fleetquery.Node(addresses=(), hostname=row["name"])) for row in registered]
    should_of = fleetquery._matcher(registered)
    for task in taskfile.tasks:
        assert should_of(task) == fleetquery.should_run(task, machines), task.name
