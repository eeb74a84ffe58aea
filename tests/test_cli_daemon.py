"""The operator's commands on a real daemonized torchcore: start, stop, reload, restart, status, run."""

import datetime
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from daemon_harness import SETTINGS, wait_for

pytestmark = pytest.mark.process

TASKS = """tasks:
  - {name: tick, schedule: "* * * * * *", command: "echo tick"}
  - {name: later, schedule: "0 0 0 1 1 *", command: "echo manual run"}
"""


def tc(directory, *args, timeout=30):
    env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9")
    return subprocess.run([sys.executable, "-m", "torchcore", *args, "-c", "tasks.yaml"],
                          capture_output=True, text=True, cwd=directory, env=env, timeout=timeout)


@pytest.fixture
def site(tmp_path):
    (tmp_path / "tasks.yaml").write_text(SETTINGS + TASKS)
    yield tmp_path
    pidfile = tmp_path / "state" / "torchcore.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def test_start_daemonizes_and_stop_finds_it_by_the_pidfile(site):
    out = tc(site, "start")
    assert out.returncode == 0, out.stderr
    pid = int((site / "state" / "torchcore.pid").read_text())
    assert f"pid {pid}" in out.stdout
    assert os.getsid(pid) != os.getsid(0)              # detached into a session of its own
    again = tc(site, "start")
    assert again.returncode == 1
    assert f"torchcore is already running (pid {pid}, pidfile " in again.stderr
    stopped = tc(site, "stop")
    assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout
    assert not (site / "state" / "torchcore.pid").exists()
    assert tc(site, "stop").returncode == 3
    assert "torchcore stopped" in (site / "state" / "logs" / "torchcore.log").read_text()


def test_a_stale_pidfile_is_taken_over(site):
    (site / "state").mkdir(mode=0o700)
    (site / "state" / "torchcore.pid").write_text("999999\n")
    assert tc(site, "status").returncode == 3
    out = tc(site, "start")
    assert out.returncode == 0, out.stderr
    assert int((site / "state" / "torchcore.pid").read_text()) != 999999
    assert tc(site, "stop").returncode == 0


def test_of_many_simultaneous_starts_exactly_one_wins(site):
    env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9")
    procs = [subprocess.Popen([sys.executable, "-m", "torchcore", "start", "-c", "tasks.yaml"],
                              cwd=site, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(5)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1, 1, 1, 1]
    pid = int((site / "state" / "torchcore.pid").read_text())
    assert all(f"pid {pid}" in err for code, err in results if code)
    assert tc(site, "stop").returncode == 0


def test_status_reload_run_and_restart(site):
    (site / "tasks.yaml").write_text(SETTINGS + "  watch: false\n" + TASKS)
    assert tc(site, "start").returncode == 0
    wait_for(lambda: " ok, " in tc(site, "status").stdout, 15, "a finished run in status")
    status = json.loads(tc(site, "status", "--json").stdout)
    assert status["daemon"]["running"] and status["daemon"]["file_changed_since_load"] is False
    rows = {row["name"]: row for row in status["tasks"]}
    assert rows["tick"]["state"] == "ok" and rows["later"]["state"] == "never ran"
    assert datetime.datetime.fromisoformat(rows["later"]["next_run"]).timestamp() > time.time()

    run = tc(site, "run", "later")
    assert run.returncode == 0 and "started later run" in run.stdout
    wait_for(lambda: "manual run" in tc(site, "logs", "later").stdout, 10, "the manual run's output")
    assert tc(site, "run", "nope").returncode == 1

    (site / "tasks.yaml").write_text(SETTINGS + "  watch: false\n" + TASKS.replace("echo tick", "echo tock"))
    reload = tc(site, "reload")
    assert reload.returncode == 0 and "1 changed" in reload.stdout
    (site / "tasks.yaml").write_text(SETTINGS + "  watch: false\ntasks:\n  - {name: x, maxx: 1}\n")
    bad = tc(site, "reload")
    assert bad.returncode == 78
    assert "tasks.yaml:6" in bad.stderr and "did you mean 'max'" in bad.stderr
    shown = tc(site, "status")
    assert "REJECTED" in shown.stdout and "tick" in shown.stdout

    (site / "tasks.yaml").write_text(SETTINGS + TASKS)
    old = int((site / "state" / "torchcore.pid").read_text())
    assert tc(site, "restart").returncode == 0
    assert int((site / "state" / "torchcore.pid").read_text()) != old
    assert tc(site, "stop").returncode == 0


def test_state_dir_and_socket_are_private(site):
    assert tc(site, "start").returncode == 0
    state = site / "state"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "control.sock").st_mode) == 0o600
    assert tc(site, "stop").returncode == 0


def test_a_bad_file_fails_start_with_78_and_the_error(site):
    bad = "tasks:\n  - {name: a, command: x, schedule: '* * * 32 * *'}\n"
    (site / "tasks.yaml").write_text(SETTINGS + bad)
    out = tc(site, "start")
    assert out.returncode == 78
    assert "tasks.yaml:5: task 'a': schedule: day-of-month" in out.stderr
    assert "Traceback" not in out.stderr
