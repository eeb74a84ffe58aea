"""``torchcore check`` and ``torchcore next`` through the real command-line entry point."""

import json
import os
import socket
import textwrap
from datetime import datetime, timezone

import pytest

from torchcore.commands import tasks as cmd_tasks
from torchcore.commands import main
from torchcore.describe import describe_schedule, plain_duration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOW = datetime(2026, 1, 5, 12, 0, 0, tzinfo=timezone.utc)  # a Monday
FILE = """\
settings:
  timezone: UTC
tasks:
  - name: backup-db
    schedule: "0 30 2 * * *"
    command: backup.sh
    ips: [10.0.0.5]
  - name: web-logs
    schedule: "0 */15 * * * *"
    command: rotate.sh
    ips: [10.0.1.0/24]
    hosts: [web-*]
  - name: everywhere
    schedule: "@every 90s"
    command: uptime
  - name: berlin
    schedule: "0 0 9 * * MON-FRI"
    timezone: Europe/Berlin
    command: date
  - name: keeper
    type: daemon
    max: 2
    command: sleep 100
  - name: boot
    schedule: "@reboot"
    command: echo up
  - name: retired
    schedule: "@daily"
    command: x
    enabled: false
"""


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(cmd_tasks, "now", lambda: NOW)
    monkeypatch.delenv("TORCHCORE_NODE_IP", raising=False)
    monkeypatch.delenv("TORCHCORE_NODE_HOSTNAME", raising=False)
    monkeypatch.delenv("TORCHCORE_TASKS", raising=False)


@pytest.fixture
def taskfile(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(FILE)
    return str(path)


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def row(out, name):
    return next(line for line in out.splitlines() if line.startswith(name + " "))


# -- check --------------------------------------------------------------------------------------


def test_check_prints_the_task_table(capsys, taskfile):
    status, out, err = run(capsys, "check", "-c", taskfile, "--node-ip", "10.0.0.5")
    assert status == 0 and err == ""
    assert out.splitlines()[0].split() == ["NAME", "TYPE", "SCHEDULE", "READING", "NEXT", "RUN", "HERE"]
    assert row(out, "backup-db").split()[-1] == "yes"
    assert "At 02:30" in row(out, "backup-db")
    assert "2026-01-06 02:30:00 UTC (in 14h30m)" in row(out, "backup-db")
    assert row(out, "web-logs").split()[-1] == "no"
    assert "Every 1 minute 30 seconds" in row(out, "everywhere")
    assert "2026-01-05 12:01:30 UTC (in 1m30s)" in row(out, "everywhere")
    assert "2026-01-06 09:00:00 CET" in row(out, "berlin")
    assert "Kept running (2 instances)" in row(out, "keeper")
    assert "at start" in row(out, "boot")
    assert row(out, "retired").split()[-1] == "disabled"
    assert out.rstrip().splitlines()[-1].endswith("valid, 7 tasks; 5 run on this node, "
                                                  f"{socket.gethostname()} (10.0.0.5)")


def test_check_counts_what_runs_on_the_node_given(capsys, taskfile):
    out = run(capsys, "check", "-c", taskfile, "--node-ip", "192.0.2.1")[1]
    assert "valid, 7 tasks; 4 run on this node" in out


def test_check_reports_every_error_on_stderr_and_exits_1(capsys, tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(FILE.replace("0 30 2 * * *", "0 61 2 * * *").replace("max: 2", "maxx: 2"))
    status, out, err = run(capsys, "check", "-c", str(path))
    assert status == 1 and out == ""
    assert f"{path}:5: task 'backup-db': schedule: minute: value 61 is out of range 0-59" in err
    assert f"{path}:22: task 'keeper': maxx: unknown key (did you mean 'max'?)" in err
    assert err.rstrip().endswith(": 2 problems")


def test_check_json_on_error(capsys, tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n")
    status, out, err = run(capsys, "check", "-c", str(path), "--json")
    assert status == 1
    assert json.loads(out)["valid"] is False and "tasks: expected a list" in json.loads(out)["errors"][0]


def test_check_missing_file(capsys, tmp_path):
    status, out, err = run(capsys, "check", "-c", str(tmp_path / "nope.yaml"))
    assert status == 1 and "nope.yaml: no such task file" in err


def test_check_finds_the_file_in_the_environment_then_the_directory(capsys, taskfile, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHCORE_TASKS", taskfile)
    assert run(capsys, "check", "--node-ip", "10.0.0.5")[0] == 0
    monkeypatch.delenv("TORCHCORE_TASKS")
    monkeypatch.chdir(tmp_path)
    status, out, _ = run(capsys, "check", "--node-ip", "10.0.0.5")
    assert status == 0 and out.rstrip().splitlines()[-1].startswith("tasks.yaml: valid")


def test_check_bad_node_ip_is_a_clear_error(capsys, taskfile):
    status, out, err = run(capsys, "check", "-c", taskfile, "--node-ip", "10.0.0")
    assert status == 1 and "--node-ip: '10.0.0' is not an IPv4 or IPv6 address" in err


def test_check_applies_node_problems_for_this_node_only(capsys, tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(FILE.replace("command: backup.sh", "command: backup.sh\n    user: no-such-user-zz"))
    assert run(capsys, "check", "-c", str(path), "--node-ip", "192.0.2.1")[0] == 0
    status, out, err = run(capsys, "check", "-c", str(path), "--node-ip", "10.0.0.5")
    assert status == 1 and "task 'backup-db': user: no user 'no-such-user-zz' on this node" in err


def test_check_json(capsys, taskfile):
    status, out, _ = run(capsys, "check", "-c", taskfile, "--json", "--node-ip", "10.0.1.7")
    data = json.loads(out)
    assert status == 0 and data["valid"] is True and data["node"]["addresses"] == ["10.0.1.7"]
    tasks = {t["name"]: t for t in data["tasks"]}
    assert tasks["web-logs"]["runs_here"] and not tasks["backup-db"]["runs_here"]
    assert tasks["berlin"]["next"] == "2026-01-06T09:00:00+01:00"
    assert tasks["keeper"]["next"] is None and tasks["keeper"]["schedule"] is None


def test_check_by_node_lists_what_runs_where(capsys, tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(FILE + textwrap.indent(textwrap.dedent("""\
        - {name: whole-net, schedule: "@daily", command: x, ips: [10.0.0.0/8]}
    """), "  "))
    status, out, _ = run(capsys, "check", "-c", str(path), "--by-node", "--node-ip", "10.0.0.5")
    assert status == 0
    lines = {line.split("  ")[0]: line for line in out.splitlines()[1:]}
    assert lines["every node"].split()[2] == "5"
    assert "everywhere, berlin, keeper, boot, retired (disabled)" in lines["every node"]
    assert "backup-db, whole-net" in lines["10.0.0.5 (this node)"]
    assert "web-logs, whole-net" in lines["10.0.1.0/24"]
    assert "web-logs" in lines["host web-*"] and "whole-net" not in lines["host web-*"]
    assert "whole-net" in lines["10.0.0.0/8 (this node)"]


def test_check_by_node_json(capsys, taskfile):
    data = json.loads(run(capsys, "check", "-c", taskfile, "--by-node", "--json", "--node-ip", "10.0.1.1")[1])
    targets = {t["target"]: t for t in data["targets"]}
    assert targets["10.0.0.5"]["kind"] == "address" and targets["10.0.0.5"]["tasks"] == ["backup-db"]
    assert targets["10.0.1.0/24"]["this_node"] and not targets["10.0.0.5"]["this_node"]
    assert targets["web-*"]["kind"] == "hosts"
    assert targets["every node"]["tasks"] == ["everywhere", "berlin", "keeper", "boot", "retired"]


def test_the_shipped_task_file_passes_check(capsys):
    status, out, err = run(capsys, "check", "-c", os.path.join(ROOT, "tasks.yaml"))
    assert status == 0, err
    assert "heartbeat-loop" in out


# -- next ---------------------------------------------------------------------------------------


def test_next_one_task(capsys, taskfile):
    status, out, _ = run(capsys, "next", "-c", taskfile, "berlin", "-n", "3")
    assert status == 0
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["berlin", "0"]
    assert "2026-01-06 09:00:00 CET  in 20h" in lines[1]
    assert "2026-01-07 09:00:00 CET" in lines[2] and "2026-01-08 09:00:00 CET" in lines[3]
    assert len(lines) == 4


def test_next_every_task_defaults_to_five(capsys, taskfile):
    out = run(capsys, "next", "-c", taskfile)[1]
    assert out.count("UTC") == 5 * 4  # backup-db, web-logs, everywhere, retired
    assert out.count("CET") == 5
    assert "kept running (daemon)" in out and "when torchcore starts" in out
    assert "retired (disabled)" in out


def test_next_json_in_the_task_zone(capsys, taskfile):
    data = json.loads(run(capsys, "next", "-c", taskfile, "everywhere", "-n", "2", "--json")[1])
    assert data["tasks"][0]["next"] == ["2026-01-05T12:01:30+00:00", "2026-01-05T12:03:00+00:00"]


def test_next_unknown_task(capsys, taskfile):
    status, out, err = run(capsys, "next", "-c", taskfile, "backup")
    assert status == 1 and "no task named 'backup' (did you mean 'backup-db'?)" in err


def test_next_rejects_a_bad_count(capsys, taskfile):
    with pytest.raises(SystemExit) as info:
        main(["next", "-c", taskfile, "-n", "0"])
    assert info.value.code == 2
    assert "expected a whole number >= 1" in capsys.readouterr().err


# -- schedule readings --------------------------------------------------------------------------


@pytest.mark.parametrize("text, reading", [
    ("0 30 2 * * *", "At 02:30"),
    ("30 2 * * *", "At 02:30"),
    ("*/10 * * * * *", "Every 10 seconds"),
    ("0 0 9 * * MON-FRI", "At 09:00, Monday through Friday"),
    ("0 0 12 ? * MON", "At 12:00, only on Monday"),
    ("0 0 0 L * *", "At 00:00, on the last day of the month"),
    ("@daily", "Every day at 00:00"),
    ("@reboot", "Once, when torchcore starts"),
    ("@every 2h", "Every 2 hours"),
    ("@every nonsense", ""),
    ("not a schedule", ""),
])
def test_describe_schedule(text, reading):
    assert describe_schedule(text) == reading


def test_plain_duration():
    assert plain_duration(3661) == "1 hour 1 minute 1 second"
    assert plain_duration(0) == "0 seconds"
