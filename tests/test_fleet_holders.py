"""Who runs the `run: once` tasks (holders.py): the node that ran each one's last second and the
holder of each slot, as ``fleet tasks`` (text and --json) and ``status`` show them; and the
warning of a node whose clock is more than 1 s off the fleet database's.

The statement runs on a real PostgreSQL (tests/pgserver.py) over rows written as the claims
process writes them; ``status`` is asked of real daemons as nodes of one database (as in
test_fleet_once.py), one of them under libfaketime for the clock."""

import datetime
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from daemon_harness import wait_for

from torchcore import claimer, claims, fleetdb, fleetquery, fleetstore, holders
from torchcore.commands import main

S = fleetdb.SCHEMA


# ---- the pure part ---------------------------------------------------------------------------

def _iso(epoch, timespec="seconds"):
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(timespec=timespec)


def test_collect_keeps_the_newest_started_second_and_the_held_slots_only():
    rows = [("tick", 100, 100000, "n1", 100.1, None, None, False),
            ("tick", 102, 102001, "n2", 103.2, None, None, False),   # taken over: fence + 1
            ("tick", 101, 101000, "n1", 101.1, None, None, False),
            ("tick", 102, 102001, "n2", 103.2, 0, 120.0, True),      # its slot, held
            ("tick", 99, 99000, "n3", 99.1, 1, 98.0, False),         # a slot whose lease ended
            ("single", None, 5555, "n3", None, 0, 130.0, True)]      # a daemon's slot
    found = holders.collect(rows)
    assert found["tick"] == {"last": [102, 102001, "n2", 103.2],
                             "slots": [[0, "n2", 102001, 102, 120.0]]}
    assert found["single"] == {"last": None, "slots": [[0, "n3", 5555, None, 130.0]]}
    shown = holders.as_json(found["single"], _iso)
    assert shown == {"last": None, "slots": [{"slot": 0, "node": "n3", "fence": 5555, "second": None,
                                              "lease_until": _iso(130.0)}]}
    assert holders.as_json(None, _iso) == {"last": None, "slots": []}
    today = datetime.date(1970, 1, 1)
    assert holders.lines("tick", holders.as_json(found["tick"], _iso), me="n2", today=today) == [
        "tick: last second 00:01:42 (fence 102001) ran on n2 (this node)",
        "tick: slot 0 held by n2 (this node), running second 00:01:42, lease until 00:02:00"]
    assert holders.lines("single", shown, today=datetime.date(2000, 1, 1)) == [
        "single: slot 0 held by n3, lease until 1970-01-01 00:02:10"]
    assert holders.lines("idle", holders.as_json(None, _iso)) == [
        "idle: no run and no slot held yet"]


def test_the_supervisor_adds_its_own_starts_and_slots_to_the_last_report():
    known = holders.Known()
    assert known.of("tick", "n1", {}) == ({"last": None, "slots": []}, None)
    known.reported({"at": 50.0, "tasks": {
        "tick": {"last": [40, 40000, "n2", 40.1], "slots": []},
        "single": {"last": None, "slots": [[1, "n2", 7, None, 60.0]]}}})
    known.ran("tick", 39, 39000, "n1", 39.1)         # older than the report's: not shown
    assert known.of("tick", "n1", {})[0]["last"] == [40, 40000, "n2", 40.1]
    known.ran("tick", 42, 42000, "n1", 42.1)         # newer: this node's own start
    assert known.of("tick", "n1", {}) == ({"last": [42, 42000, "n1", 42.1], "slots": []}, 50.0)
    # a slot this node took since the report, beside the one the report has
    assert known.of("single", "n1", {0: 9, 1: 7})[0]["slots"] == [[0, "n1", 9, None, None],
                                                                  [1, "n2", 7, None, 60.0]]


def test_a_slot_this_node_took_since_the_report_shows_this_node_not_its_former_holder():
    """The report read slot 0 held by n2 (its lease running out); n2 is gone and this node took
    the slot since (another fence): status says what this node did as current."""
    known = holders.Known()
    known.reported({"at": 50.0, "tasks": {"single": {"last": None,
                                                     "slots": [[0, "n2", 7, None, 55.0]]}}})
    assert known.of("single", "n1", {0: 8})[0]["slots"] == [[0, "n1", 8, None, None]]
    assert known.of("single", "n1", {})[0]["slots"] == [[0, "n2", 7, None, 55.0]]


def test_node_names_from_the_database_are_shown_escaped_and_cut_in_status_and_fleet_tasks():
    """A node name is whatever a row of the fleet database says: its control characters (an
    escape sequence, a newline) are written as \\xNN and a long one is cut, in every line."""
    from torchcore.commands import status

    hostile = "web-1\x1b]0;pwned\x07\nfake line" + "y" * 5000
    entry = {"last": [100, 100000, hostile, 100.5], "slots": [[0, hostile, 7, None, 200.0]],
             "at": 150.0}
    row = {"name": "tick", "type": "common", "schedule": "* * * * * *", "next_run": None,
           "state": "enabled", "running_runs": [], "last": None, "once": entry}
    shown = status._once_text([row], me="web-2")
    shown += holders.lines("tick", holders.as_json(entry, _iso), today=datetime.date(1970, 1, 1))
    holder_lines = [line for line in shown if "tick:" in line]
    assert len(holder_lines) == 4
    for line in holder_lines:
        assert "\\x1b]0;pwned\\x07\\x0afake line" in line
        assert not any(ord(ch) < 0x20 or 0x7f <= ord(ch) < 0xa0 for ch in line)
        assert len(line) < 200


def test_the_fleet_lines_of_status_show_the_database_s_error_text_escaped():
    """An error the fleet database sent (its text may hold a row's values) is shown, not obeyed."""
    state = {"state": "refused", "since": 0, "waiting": 0, "database": "postgresql://h/db",
             "node": "web-1", "error": "ERROR: Key (node)=(x\x1b]0;pwned\x07\ny) exists"}
    shown = fleetstore.summary(state)
    assert any("x\\x1b]0;pwned\\x07\\x0ay" in line for line in shown)
    assert not any(ch in line for line in shown for ch in "\x1b\x07\n")


def test_the_clock_warning_says_how_far_and_which_way_beyond_one_second():
    assert fleetstore.clock_warning({"clock_offset": 1.0}) is None
    assert fleetstore.clock_warning({"clock_offset": None}) is None
    assert fleetstore.clock_warning({}) is None
    ahead = fleetstore.clock_warning({"clock_offset": 1.8})
    assert ahead.startswith("warning: this node's clock is 1.8 s ahead of the fleet database's")
    assert "1.5 s behind the fleet database's" in fleetstore.clock_warning({"clock_offset": -1.5})
    state = {"state": "up", "waiting": 0, "database": "postgresql://db/x", "node": "n1",
             "clock_offset": 2.0}
    assert fleetstore.summary(state)[-1].startswith("warning: this node's clock is 2.0 s ahead")
    assert len(fleetstore.summary(state, live=False)) == 0      # the agent is not running
    assert len(fleetstore.summary({**state, "clock_offset": 0.1})) == 1


# ---- against PostgreSQL ----------------------------------------------------------------------

def _claim(conn, task, second, node, *, started=None, ended=None, fence=None, takeovers=0):
    """A claims row; ``started``/``ended``: seconds after the second (None: not)."""
    conn.execute(
        f"""INSERT INTO {S}.claims (task, second, fence, node, expires, started, ended, takeovers)
            VALUES (%(task)s, %(second)s, %(fence)s, %(node)s, to_timestamp(%(second)s + 1),
                    to_timestamp(%(second)s + %(started)s::float8),
                    to_timestamp(%(second)s + %(ended)s::float8), %(takeovers)s)""",
        {"task": task, "second": second, "node": node, "started": started, "ended": ended,
         "fence": fence or claims.first_fence(second) + takeovers, "takeovers": takeovers})


def _slot(conn, task, slot, node, fence, second=None, lease=10.0):
    """A slots row held for ``lease`` more seconds (negative: it ended that long ago)."""
    conn.execute(
        f"""INSERT INTO {S}.slots (task, slot, second, fence, node, lease_until)
            VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s))""",
        (task, slot, second, fence, node, lease))


def _fill(conn):
    """tick: its last second run on n2 (a taken-over claim), the next one decided full and the
    one after claimed, not started; long: a run of n3 holding its one slot for 100 s, every
    second since decided full; single: a daemon held by n1 in slot 0, slot 1's lease over."""
    now = int(time.time())
    _claim(conn, "tick", now - 3, "n1", started=0.01, ended=0.4)
    _claim(conn, "tick", now - 2, "n2", started=1.2, takeovers=1)
    _claim(conn, "tick", now - 1, "n1", started=-0.2, ended=-0.2)     # fleet max reached
    _claim(conn, "tick", now + 1, "n1")
    _claim(conn, "long", now - 100, "n3", started=0.01)
    for second in range(now - 99, now):
        _claim(conn, "long", second, "n1", started=-0.2, ended=-0.2)
    _slot(conn, "long", 0, "n3", claims.first_fence(now - 100), now - 100)
    _slot(conn, "single", 0, "n1", 1_700_000_000_123)
    _slot(conn, "single", 1, "n2", 1_700_000_000_100, lease=-5)
    return now


@pytest.mark.process
def test_the_holders_statement_on_postgresql(fleet):
    with fleetdb.connect(fleet.url) as conn:
        now = _fill(conn)
        found = fleetquery.holders_of(conn, ["tick", "long", "single", "never"])
    assert found["tick"]["last"][:3] == [now - 2, claims.first_fence(now - 2) + 1, "n2"]
    assert found["tick"]["slots"] == []
    assert found["long"]["last"][:3] == [now - 100, claims.first_fence(now - 100), "n3"]
    assert [s[:4] for s in found["long"]["slots"]] == [[0, "n3", claims.first_fence(now - 100),
                                                        now - 100]]
    assert found["single"]["last"] is None
    assert [s[:4] for s in found["single"]["slots"]] == [[0, "n1", 1_700_000_000_123, None]]
    assert found["single"]["slots"][0][4] > time.time() + 5
    assert "never" not in found


@pytest.mark.process
def test_the_holders_statement_reads_a_bounded_part_of_a_node_name(fleet):
    """A row's node name of a megabyte (any writer of the database): the claims process sends
    the holders to the supervisor every few seconds, so it reads no more of a name than is shown."""
    huge = "n" * (1 << 20)
    now = int(time.time())
    with fleetdb.connect(fleet.url) as conn:
        _claim(conn, "tick", now - 2, huge, started=0.1)
        _slot(conn, "single", 0, huge, 1_700_000_000_123)
        found = fleetquery.holders_of(conn, ["tick", "single"])
    assert 0 < len(found["tick"]["last"][2]) <= 4 * holders.NODE_SHOWN
    assert 0 < len(found["single"]["slots"][0][1]) <= 4 * holders.NODE_SHOWN
    assert len(json.dumps(found)) < 2000


_TASKS = """settings:
  timezone: UTC
  fleet:
    database: {url}
tasks:
  - {{name: tick, schedule: "* * * * * *", run: once, command: "true"}}
  - {{name: long, schedule: "* * * * * *", run: once, command: "sleep 200"}}
  - {{name: single, type: daemon, run: once, max: 2, command: "sleep 100"}}
  - {{name: backup, schedule: "0 3 * * *", command: "true"}}
"""


@pytest.mark.process
def test_fleet_tasks_shows_who_ran_the_last_second_and_who_holds_each_slot(fleet, tmp_path,
                                                                             capsys, monkeypatch):
    monkeypatch.delenv("TORCHCORE_DATABASE_URL", raising=False)
    path = tmp_path / "tasks.yaml"
    path.write_text(_TASKS.format(url=fleet.url))
    with fleetdb.connect(fleet.url) as conn:
        now = _fill(conn)
    main(["fleet", "tasks", "--json", "-c", str(path)])
    view = json.loads(capsys.readouterr().out)
    tasks = {task["name"]: task for task in view["tasks"]}
    assert tasks["backup"]["run"] == "each" and tasks["backup"]["once"] is None
    assert tasks["tick"]["run"] == "once"
    assert tasks["tick"]["once"] == {"last": {
        "second": _iso(now - 2), "fence": claims.first_fence(now - 2) + 1, "node": "n2",
        "started": tasks["tick"]["once"]["last"]["started"]}, "slots": []}
    started = datetime.datetime.fromisoformat(tasks["tick"]["once"]["last"]["started"])
    assert abs(started.timestamp() - (now - 2 + 1.2)) < 1
    assert tasks["long"]["once"]["last"]["node"] == "n3"
    assert [(s["slot"], s["node"], s["second"]) for s in tasks["long"]["once"]["slots"]] == [
        (0, "n3", _iso(now - 100))]
    single = tasks["single"]["once"]
    assert single["last"] is None
    assert [(s["slot"], s["node"], s["fence"], s["second"]) for s in single["slots"]] == [
        (0, "n1", 1_700_000_000_123, None)]
    assert datetime.datetime.fromisoformat(single["slots"][0]["lease_until"]).timestamp() > now
    main(["fleet", "tasks", "-c", str(path)])
    out = capsys.readouterr().out
    clock = time.strftime("%H:%M:%S", time.gmtime(now - 2))
    assert "run: once:\n" in out
    assert f"  tick: last second {clock} (fence {claims.first_fence(now - 2) + 1}) ran on n2\n" in out
    assert "  single: slot 0 held by n1, lease until " in out
    long_ago = time.strftime("%H:%M:%S", time.gmtime(now - 100))
    assert f"  long: slot 0 held by n3, running second {long_ago}" in out
    assert "  backup: " not in out.split("run: once:")[1].split("problems:")[0]    # run: each


@pytest.mark.process
def test_the_web_api_s_fleet_tasks_has_the_holders_as_its_openapi_document_says(fleet, tmp_path):
    pytest.importorskip("prometheus_client")
    from test_web_fleet import schema_of, serve

    path = tmp_path / "tasks.yaml"
    path.write_text(_TASKS.format(url=fleet.url).replace("timezone: UTC\n",
                                                          "timezone: UTC\n  state_dir: state\n"))
    with fleetdb.connect(fleet.url) as conn:
        now = _fill(conn)
    site = serve(str(path))
    try:
        status, view = site.get("api/v1/fleet/tasks")
        assert status == 200, view
        schema_of("/api/v1/fleet/tasks")(view)
        tasks = {task["name"]: task for task in view["tasks"]}
        assert tasks["backup"]["once"] is None and tasks["backup"]["run"] == "each"
        assert tasks["tick"]["once"]["last"]["node"] == "n2"
        assert tasks["tick"]["once"]["last"]["second"] == _iso(now - 2)
        assert [(s["slot"], s["node"]) for s in tasks["single"]["once"]["slots"]] == [(0, "n1")]
        status, one = site.get("api/v1/fleet/tasks?task=single")
        assert status == 200 and [t["name"] for t in one["tasks"]] == ["single"]
        assert one["tasks"][0]["once"]["slots"][0]["fence"] == 1_700_000_000_123
    finally:
        site.stop()


@pytest.mark.process
def test_the_claims_process_reports_the_holders_of_the_tasks_it_is_told_to_watch(fleet):
    with fleetdb.connect(fleet.url) as conn:
        now = _fill(conn)
    ours, theirs = socket.socketpair()
    proc = claimer.Claimer(theirs)
    proc.handle({"hello": {"url": fleet.url, "node": "n1", "takeover": 0.5, "lease": 15}})
    proc.due()
    ours.setblocking(False)
    with pytest.raises(BlockingIOError):
        ours.recv(100)                  # no task to watch: nothing read, nothing sent
    proc.handle({"watch": ["tick", "single"]})
    proc.due()
    time.sleep(0.1)
    messages = claims.decode_lines(b"", ours.recv(1 << 16))[0]
    holding = [m["holding"] for m in messages if "holding" in m]
    assert len(holding) == 1 and abs(holding[0]["at"] - time.time()) < 5
    assert holding[0]["tasks"]["tick"]["last"][:3] == [now - 2, claims.first_fence(now - 2) + 1, "n2"]
    assert holding[0]["tasks"]["single"]["slots"][0][:2] == [0, "n1"]
    proc.due()                          # not again before holders.EVERY
    with pytest.raises(BlockingIOError):
        ours.recv(100)


@pytest.mark.process
def test_the_fleet_agent_keeps_its_clock_offset_for_status(fleet, tmp_path):
    import dataclasses

    from torchcore import fleetagent, fleetspec, paths, records, taskspec
    from torchcore.commands import status

    path = paths.records_db(str(tmp_path))
    records.Records(path).close()
    settings = dataclasses.replace(taskspec.default_settings(str(tmp_path / "tasks.yaml")),
                                   fleet=fleetspec.FleetSettings(database=fleet.url))
    ahead = [1.84]
    agent = fleetagent.Agent(fleetstore.Store(path), settings, "n1", fleet.url,
                             clock=lambda: time.time() + ahead[0])
    try:
        agent.step()
        state = fleetstore.state_in(str(tmp_path))
        assert state["clock_offset"] == 1.8 and state["state"] == "up"
        assert "warning: this node's clock is 1.8 s ahead" in fleetstore.summary(state)[-1]
        assert status._fleet_json(state)["clock_flagged"] is True
        ahead[0] = -0.02                # back in sync: said at the next save
        agent.next_beat = agent.next_save = 0.0
        agent.step()
        state = fleetstore.state_in(str(tmp_path))
        assert state["clock_offset"] in (0.0, -0.0) and fleetstore.clock_warning(state) is None
        assert status._fleet_json(state)["clock_flagged"] is False
    finally:
        agent.close()
        agent.store.close()


# ---- real daemons: status ------------------------------------------------------------------------

NODES = """\
tasks:
  - name: tick
    schedule: "* * * * * *"
    run: once
    max: 10
    ips: [10.0.0.0/24]
    command: echo "$TORCHCORE_SCHEDULED_AT $TORCHCORE_FENCE {node}" >> {out}
  - name: single
    type: daemon
    run: once
    kill_grace: 1s
    command: >-
      echo "{node} $TORCHCORE_FENCE" >> {stamps}; trap 'exit 0' TERM;
      while true; do sleep 0.1; done
"""


def _status(daemon, *extra, env=None):
    done = subprocess.run([sys.executable, "-m", "torchcore", "status", "-c", daemon.path, *extra],
                          capture_output=True, text=True, timeout=30, cwd=daemon.dir, env=env)
    return done.stdout


@pytest.mark.slow
@pytest.mark.process
def test_status_shows_the_daemon_slot_s_holder_and_the_last_second_s_node_on_every_node(
        fleet, daemons, tmp_path):
    out, stamps = tmp_path / "once.txt", tmp_path / "stamps.txt"
    nodes = {}
    for number in (1, 2):
        daemon = daemons(NODES.format(node=f"n{number}", out=out, stamps=stamps),
                         settings=f"  fleet:\n    database: {fleet.url}\n")
        nodes[f"n{number}"] = daemon.start("--node-name", f"n{number}", "--node-ip",
                                           f"10.0.0.{number}")
    try:
        holder = wait_for(lambda: stamps.exists() and stamps.read_text().split(), 15,
                          "the singleton's start")[0]
        other = "n2" if holder == "n1" else "n1"
        # the node that does not hold it learns the holder from its claims process's next read
        text = wait_for(lambda: (t := _status(nodes[other])) and f"single: slot 0 held by {holder}"
                        in t and "tick: last second" in t and t, 20,
                        "the holders in status:\n{}", lambda: _status(nodes[other]))
        assert "run: once (the fleet database at " in text
        assert f"single: slot 0 held by {holder} (this node)" in _status(nodes[holder])
        doc = json.loads(_status(nodes[other], "--json"))
        tasks = {task["name"]: task for task in doc["tasks"]}
        single = tasks["single"]["once"]
        assert [(s["slot"], s["node"], s["second"]) for s in single["slots"]] == [(0, holder, None)]
        assert single["as_of"] and single["slots"][0]["lease_until"]
        fence = int(stamps.read_text().split()[1])
        assert single["slots"][0]["fence"] == fence            # the instance's TORCHCORE_FENCE
        last = tasks["tick"]["once"]["last"]
        ran = {(int(f), n) for _, f, n in (line.split() for line in out.read_text().splitlines())}
        assert (last["fence"], last["node"]) in ran             # as the run itself wrote it
        second = datetime.datetime.fromisoformat(last["second"]).timestamp()
        assert claims.fence_second(last["fence"]) == second and time.time() - second < 10
    finally:
        for daemon in nodes.values():
            daemon.stop()


FAKETIME_LIBS = [path for pattern in ("/usr/lib/*/faketime/libfaketime.so.1",
                                      "/usr/lib/faketime/libfaketime.so.1")
                 for path in __import__("glob").glob(pattern)]


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.skipif(not FAKETIME_LIBS, reason="libfaketime is not installed (Debian package "
                    "`faketime`; tests/setup-system.sh installs it)")
def test_a_node_whose_clock_is_2s_ahead_warns_in_status_and_fleet_status(fleet, daemons, tmp_path,
                                                                         monkeypatch, capsys):
    offset = tmp_path / "faketime-offset"
    offset.write_text("+2\n")
    daemon = daemons("tasks:\n  - {name: idle, schedule: '0 0 3 * * *', command: 'true'}\n",
                     settings=f"  fleet:\n    database: {fleet.url}\n    heartbeat: 1s\n")
    clean = dict(os.environ)
    for key, value in {"LD_PRELOAD": FAKETIME_LIBS[0], "FAKETIME_TIMESTAMP_FILE": str(offset),
                       "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}.items():
        monkeypatch.setenv(key, value)
    daemon.start("--node-name", "skewed")
    for key in ("LD_PRELOAD", "FAKETIME_TIMESTAMP_FILE"):
        monkeypatch.delenv(key)
    try:
        text = wait_for(lambda: "warning: this node's clock is" in (t := _status(daemon, env=clean))
                        and t, 15, "the clock warning in status:\n{}",
                        lambda: _status(daemon, env=clean))
        assert "warning: this node's clock is 2.0 s ahead of the fleet database's" in text
        fleet_json = json.loads(_status(daemon, "--json", env=clean))["fleet"]
        assert fleet_json["clock_flagged"] and fleet_json["clock_offset"] == 2.0
        main(["fleet", "status", "--json", "-c", daemon.path])
        node = {n["name"]: n for n in json.loads(capsys.readouterr().out)["nodes"]}["skewed"]
        assert node["clock_flagged"] and 1.8 < node["clock_offset"] < 2.2
    finally:
        daemon.stop()
