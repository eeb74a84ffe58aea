"""`fleet status`, `fleet tasks`, `history --fleet` and `logs --fleet` against a real PostgreSQL:
what they print, their --json shapes, exit codes, and bad input or a database that cannot be
used as one-line errors (never a traceback, never a password)."""

import json
import re
import subprocess
import sys

import fleetrows
import pgserver
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchcore.commands import main
from torchcore.commands.history import run_json
from torchcore.runrecord import RunRecord

pytestmark = pytest.mark.process

_TASKS = """
settings:
  timezone: UTC
  fleet:
    database: {url}
tasks:
  - name: backup
    command: echo backup
    schedule: "0 3 * * *"
  - name: report
    command: echo report
    schedule: "*/5 * * * *"
    hosts: [web-*]
"""


@pytest.fixture
def fleet(pg, tmp_path, monkeypatch):
    """A schema'd database, a task file naming it (-c), and a connection to write rows with."""
    monkeypatch.delenv("TORCHCORE_DATABASE_URL", raising=False)
    path = tmp_path / "tasks.yaml"
    path.write_text(_TASKS.format(url=pg.url))
    conn = fleetrows.init(pg.url)
    conn.path, conn.url = str(path), pg.url
    yield conn
    conn.close()


def _run(fleet, capsys, *argv):
    code = main([*argv, "-c", fleet.path])
    out, err = capsys.readouterr()
    return code, out, err


def _healthy(fleet, digest="d1"):
    for name in ("web-1", "web-2", "web-3"):
        fleetrows.add_node(fleet, name, digest=digest, addresses=[f"10.0.0.{name[-1]}"],
                           commit="0123456789abcdef")


# ---- fleet status ------------------------------------------------------------------------------

def test_fleet_status_table_and_exit_codes(fleet, capsys):
    code, out, _ = _run(fleet, capsys, "fleet", "status")
    assert code == 0 and "no node has registered" in out
    _healthy(fleet)
    code, out, _ = _run(fleet, capsys, "fleet", "status")
    assert code == 0, out
    header, *rows, summary = out.splitlines()
    assert header.split() == ["NODE", "ADDRESSES", "VERSION", "FILE", "STATE", "RUNNING",
                              "FAILED", "24H", "CLOCK"]
    assert rows[0].split()[:4] == ["web-1", "10.0.0.1", "1.0", "0123456789ab"]
    assert "up since" in rows[0] and "+0.000s" in rows[0]
    assert summary == "3 node(s): 3 up"
    fleetrows.add_node(fleet, "web-4", age=3, digest="d1")               # late: still exit 0
    fleetrows.add_node(fleet, "web-5", age=60, digest="d1", stopped=0)   # stopped: exit 0
    assert _run(fleet, capsys, "fleet", "status")[0] == 0
    fleetrows.add_node(fleet, "web-6", age=60, digest="d1")              # down: exit 1
    code, out, _ = _run(fleet, capsys, "fleet", "status")
    assert code == 1 and "down since" in out and "1 down" in out


def test_fleet_status_exits_1_on_drift_and_shows_since_when(fleet, capsys):
    _healthy(fleet)
    fleetrows.add_node(fleet, "web-2", digest="d2", commit=None, file_age=300,
                       addresses=["10.0.0.2"], clock_offset=2.5)
    code, out, _ = _run(fleet, capsys, "fleet", "status")
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("web-2"))
    assert re.search(r"\bd2 \(drifted 5m(\ds)?\)", row) and "+2.500s (off)" in row
    assert "1 drifted from the file most up nodes run" in out
    assert "1 with a clock more than 1s off" in out


def test_fleet_status_json(fleet, capsys):
    _healthy(fleet)
    fleetrows.add_run(fleet, "web-1", 1, "backup", exit_code=2)
    code, out, _ = _run(fleet, capsys, "fleet", "status", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["database"] == fleet.url
    assert data["counts"] == {"up": 3, "late": 0, "down": 0, "stopped": 0, "drifted": 0,
                              "clock_flagged": 0}
    node = data["nodes"][0]
    assert {"name", "hostname", "addresses", "version", "pid", "started", "last_seen",
            "heartbeat", "state", "since", "clock_offset", "clock_flagged", "file_digest",
            "file_commit", "file_since", "drifted", "drifted_since", "running", "failed_24h",
            "waiting", "now"} <= set(node)
    assert node["failed_24h"] == 1 and node["state"] == "up"
    assert node["last_seen"].endswith("+00:00")              # ISO 8601, the file's zone (UTC)


def test_the_url_comes_from_the_environment_or_database_option(fleet, capsys, monkeypatch,
                                                              tmp_path):
    _healthy(fleet)
    elsewhere = tmp_path / "other.yaml"
    elsewhere.write_text("tasks: []\n")                      # no settings.fleet in this file
    assert main(["fleet", "status", "-c", str(elsewhere)]) == 78
    assert "settings: fleet: not set" in capsys.readouterr().err
    assert main(["fleet", "status", "-c", str(elsewhere), "--database", fleet.url]) == 0
    assert "3 node(s)" in capsys.readouterr().out
    monkeypatch.setenv("TORCHCORE_DATABASE_URL", fleet.url)
    assert main(["fleet", "status", "-c", str(tmp_path / "missing.yaml")]) == 0


# ---- fleet tasks -------------------------------------------------------------------------------

def test_fleet_tasks_exit_codes_table_and_json(fleet, capsys):
    _healthy(fleet)
    fleetrows.add_run(fleet, "web-1", 1, "report")
    fleetrows.add_run(fleet, "web-2", 1, "report")
    code, out, _ = _run(fleet, capsys, "fleet", "tasks")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["TASK", "SHOULD"]
    assert lines[2].startswith("report") and "web-1, web-2, web-3" in lines[2]
    assert "ok on 2" in lines[2]
    assert "problems:" not in out
    fleetrows.add_run(fleet, "web-3", 1, "report", exit_code=1)          # failing on one node
    fleetrows.add_run(fleet, "web-3", 2, "gone", age=100)                # not in the file
    fleetrows.add_node(fleet, "db-1", hostname="db-1", addresses=["10.1.0.1"])
    code, out, _ = _run(fleet, capsys, "fleet", "tasks")
    assert code == 1
    assert "  failing: report: fails on web-3, not on web-1, web-2" in out
    assert "  drift: web-3 ran gone in the last day" in out
    code, out, _ = _run(fleet, capsys, "fleet", "tasks", "--json")
    data = json.loads(out)
    assert code == 1 and data["database"] == fleet.url
    assert [p["kind"] for p in data["problems"]] == ["failing", "drift"]
    assert [t["name"] for t in data["tasks"]] == ["backup", "report"]
    assert data["tasks"][1]["should"] == ["web-1", "web-2", "web-3"]
    assert set(data["tasks"][1]["ran"][0]) == {"node", "last_at", "last_run", "last_result",
                                               "failed", "runs", "failures"}


def test_fleet_tasks_finds_an_orphan(fleet, capsys):
    fleetrows.add_node(fleet, "db-1", addresses=["10.1.0.1"])
    code, out, _ = _run(fleet, capsys, "fleet", "tasks")
    assert code == 1 and "orphan: report: its targets (hosts web-*) select no registered node" in out


def test_fleet_tasks_needs_a_valid_file(fleet, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"settings:\n  fleet:\n    database: {fleet.url}\ntasks: 3\n")
    assert main(["fleet", "tasks", "-c", str(bad)]) == 78
    assert "tasks" in capsys.readouterr().err


# ---- history --fleet ---------------------------------------------------------------------------

def _history_rows(fleet):
    _healthy(fleet)
    for number, node in enumerate(("web-1", "web-2", "web-3"), 1):
        fleetrows.add_run(fleet, node, 1, "backup", age=7200 + number)
        fleetrows.add_run(fleet, node, 2, "report", age=60 + number,
                          exit_code=4 if node == "web-3" else 0)


def test_history_fleet_table_filters_and_json(fleet, capsys):
    _history_rows(fleet)
    code, out, _ = _run(fleet, capsys, "history", "--fleet")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["RUN", "TASK", "WHEN", "DURATION", "RESULT", "NODE"]
    assert len(lines) == 7 and lines[1].split()[-1] == "web-1" and "ago" in lines[1]
    assert "exit 4" in lines[3] and lines[3].endswith("web-3")

    def nodes_runs(*argv):
        code, out, _ = _run(fleet, capsys, "history", "--fleet", "--json", *argv)
        assert code == 0
        return [(r["node"], r["run_id"]) for r in json.loads(out)]

    assert nodes_runs("backup") == [("web-1", 1), ("web-2", 1), ("web-3", 1)]
    assert nodes_runs("--node", "web-2") == [("web-2", 2), ("web-2", 1)]
    assert nodes_runs("--failed") == [("web-3", 2)]
    assert nodes_runs("--since", "1h") == [("web-1", 2), ("web-2", 2), ("web-3", 2)]
    assert nodes_runs("--limit", "2") == [("web-1", 2), ("web-2", 2)]
    assert nodes_runs("report", "--node", "web-3", "--failed", "--since", "1d") == [("web-3", 2)]
    assert nodes_runs("backup", "--failed") == []
    code, out, _ = _run(fleet, capsys, "history", "--fleet", "--json")
    assert set(json.loads(out)[0]) == set(run_json(RunRecord(1, "t", "n", 0)))
    code, out, _ = _run(fleet, capsys, "history", "--fleet", "backup", "--failed")
    assert code == 0 and out == "no matching runs in the fleet database\n"


def test_history_fleet_bad_input_is_a_clear_error(fleet, capsys):
    _history_rows(fleet)
    code, _, err = _run(fleet, capsys, "history", "--fleet", "--node", "db")
    assert code == 1 and err == ("torchcore: no node 'db' in the fleet database; the nodes are "
                                 "web-1, web-2, web-3\n")
    code, _, err = _run(fleet, capsys, "history", "--fleet", "--node", "web-9")
    assert code == 1 and "no node 'web-9' in the fleet database (did you mean 'web-" in err
    code, _, err = _run(fleet, capsys, "history", "--fleet", "--limit", "10000000000000000000000")
    assert code == 1 and "--limit: expected 0 (all) to 1,000,000 runs" in err
    code, _, err = _run(fleet, capsys, "history", "--fleet", "bakup")
    assert code == 1 and "no task 'bakup'" in err and "did you mean 'backup'" in err
    with pytest.raises(SystemExit) as exit_:
        main(["history", "--fleet", "--since", "last tuesday", "-c", fleet.path])
    assert exit_.value.code == 2
    assert "--since: expected a duration" in capsys.readouterr().err
    code, _, err = _run(fleet, capsys, "history", "--node", "web-1")
    assert code == 1 and "--node reads the fleet database: add --fleet" in err
    code, _, err = _run(fleet, capsys, "history", "--database", fleet.url)
    assert code == 1 and "add --fleet" in err


# ---- logs --fleet ------------------------------------------------------------------------------

def test_logs_fleet_prints_the_stored_tail(fleet, capsys):
    _healthy(fleet)
    fleetrows.add_run(fleet, "web-1", 7, "backup", output="one\ntwo\nthree\n")
    fleetrows.add_run(fleet, "web-2", 7, "backup", exit_code=1, output="bad\x1b[31m\n")
    fleetrows.add_run(fleet, "web-2", 8, "backup", output=None)
    code, out, err = _run(fleet, capsys, "logs", "backup", "--fleet", "--run", "7", "--node",
                          "web-1")
    assert code == 0 and out == "one\ntwo\nthree\n"
    assert err.startswith("run 7 of 'backup' on web-1") and err.endswith(": ok\n")
    code, out, _ = _run(fleet, capsys, "logs", "backup", "--fleet", "--run", "7", "--node",
                        "web-1", "-n", "2")
    assert out == "two\nthree\n"
    code, out, err = _run(fleet, capsys, "logs", "backup", "--fleet", "--run", "7", "--node",
                          "web-2")
    assert out == "bad\\x1b[31m\n" and err.endswith(": exit 1\n")        # escaped, not sent
    code, out, err = _run(fleet, capsys, "logs", "backup", "--fleet", "--run", "8", "--node",
                          "web-2")
    assert code == 1 and out == "" and "stored no output" in err
    code, _, err = _run(fleet, capsys, "logs", "backup", "--fleet", "--run", "7")
    assert code == 1 and "is on several nodes (web-1, web-2): name one with --node" in err
    code, out, _ = _run(fleet, capsys, "logs", "backup", "--fleet")       # the newest with output
    assert code == 0 and out == "bad\\x1b[31m\n"
    code, out, _ = _run(fleet, capsys, "logs", "backup", "--fleet", "--run", "7", "--node",
                        "web-1", "--json")
    data = json.loads(out)
    assert data["output"] == "one\ntwo\nthree\n" and data["node"] == "web-1"
    assert set(data) == set(run_json(RunRecord(1, "t", "n", 0))) | {"output"}


def test_logs_fleet_bad_input(fleet, capsys):
    _healthy(fleet)
    code, _, err = _run(fleet, capsys, "logs", "backup", "--fleet", "--run", "3", "--node",
                        "web-1")
    assert code == 1 and err == "torchcore: no run 3 of 'backup' on web-1 in the fleet database\n"
    code, _, err = _run(fleet, capsys, "logs", "backup", "--fleet", "--run", "3", "--node",
                        "nope")
    assert code == 1 and "no node 'nope'" in err
    code, _, err = _run(fleet, capsys, "logs", "bakup", "--fleet")
    assert code == 1 and "has no task 'bakup' (did you mean 'backup'?)" in err
    code, _, err = _run(fleet, capsys, "logs", "backup", "--fleet", "--follow")
    assert code == 1 and "leave out --follow or --fleet" in err
    code, _, err = _run(fleet, capsys, "logs", "backup", "--json")
    assert code == 1 and "--json reads the fleet database: add --fleet" in err


# ---- a database that cannot be used ------------------------------------------------------------

def test_no_schema_unreachable_and_wrong_password_are_one_line_errors(pg, capsys, tmp_path):
    empty = tmp_path / "tasks.yaml"
    empty.write_text("tasks: []\n")
    for argv in (["fleet", "status"], ["fleet", "tasks"], ["history", "--fleet"],
                 ["logs", "x", "--fleet"]):
        assert main([*argv, "-c", str(empty), "--database", pg.url]) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "run `torchcore fleet init` once" in err, err
    wrong = pg.server.url(pg.name, user=f"{pgserver.PASSWORD_ROLE}:not-the-password")
    assert main(["fleet", "status", "-c", str(empty), "--database", wrong]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not-the-password" not in err and ":***@" in err
    assert "password authentication failed" in err
    right = pg.server.url(pg.name, user=f"{pgserver.PASSWORD_ROLE}:{pgserver.PASSWORD}")
    assert main(["fleet", "status", "-c", str(empty), "--database", right]) == 1
    err = capsys.readouterr().err
    assert pgserver.PASSWORD not in err and "fleet init" in err


def test_an_unreachable_database_from_the_command_line(tmp_path):
    empty = tmp_path / "tasks.yaml"
    empty.write_text("tasks: []\n")
    url = f"postgresql://torchcore:hunter2@127.0.0.1:{pgserver.free_port()}/torchcore"
    for argv in (["fleet", "status"], ["history", "--fleet", "--node", "a"]):
        result = subprocess.run([sys.executable, "-m", "torchcore", *argv, "-c", str(empty),
                                 "--database", url], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith("torchcore: cannot connect to the fleet database "
                                        "postgresql://torchcore:***@127.0.0.1:")
        assert result.stderr.count("\n") == 1 and "hunter2" not in result.stderr
        assert "Traceback" not in result.stderr


# ---- what other nodes wrote is shown, never obeyed ---------------------------------------------

_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")      # every control character but newline
_HOSTILE = st.text(st.characters(max_codepoint=0xa0, blacklist_characters="\x00"), min_size=1,
                   max_size=8).map(lambda text: "n" + text)


@settings(derandomize=True, max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_HOSTILE, _HOSTILE, _HOSTILE)
def test_control_characters_from_the_database_are_escaped_not_sent(fleet, capsys, node, task, text):
    """The fleet database is written by every node (and anyone with its password): a node name,
    task name, version or error holding an escape sequence, a bell or a carriage return is printed
    escaped by every fleet command, never sent to the terminal."""
    fleet.execute("DELETE FROM torchcore.nodes; DELETE FROM torchcore.runs")
    fleetrows.add_node(fleet, node, addresses=[text], version=text, commit=text, digest="d2")
    fleetrows.add_node(fleet, "web-1", digest="d1")
    fleetrows.add_run(fleet, node, 1, "backup", exit_code=1, error=text, output="x")
    fleetrows.add_run(fleet, node, 2, task, skipped=text)
    fleetrows.add_run(fleet, "web-1", 1, "backup", exit_code=0)
    for argv in (["fleet", "status"], ["fleet", "tasks"], ["history", "--fleet"],
                 ["logs", "backup", "--fleet", "--run", "1", "--node", node],
                 ["logs", "backup", "--fleet", "--run", "1"], ["history", "--fleet", "--node", "x"]):
        _, out, err = _run(fleet, capsys, *argv)
        assert not _CONTROL.search(out + err), (argv, out + err)


def test_logs_fleet_splits_lines_as_a_local_log_does(fleet, capsys):
    """Only a newline ends a line of output: a carriage return, a form feed or a file separator
    is a character of the line, shown escaped as `logs` shows it in a local log."""
    _healthy(fleet)
    fleetrows.add_run(fleet, "web-1", 7, "backup", output="a\rb\x0cc\x1cd\x85e\u2028f\nlast\n")
    code, out, _ = _run(fleet, capsys, "logs", "backup", "--fleet", "--run", "7", "--node", "web-1")
    assert code == 0 and out == "a\\x0db\\x0cc\\x1cd\x85e\u2028f\nlast\n"
    code, out, _ = _run(fleet, capsys, "logs", "backup", "--fleet", "--run", "7", "--node", "web-1",
                        "-n", "1")
    assert out == "last\n"
