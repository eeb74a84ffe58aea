"""A run's outcome as the daemon records it, and as history --failed and status read it:
an executor that dies is a failure with its reason, a planned stop is not a failure."""

import json
import signal

import psutil
import pytest
from daemon_harness import Daemon, wait_for

from torchcore.commands import main

pytestmark = [pytest.mark.process, pytest.mark.slow]


@pytest.fixture
def daemon(tmp_path):
    made = []

    def factory(body):
        made.append(Daemon(tmp_path, body))
        return made[-1]

    yield factory
    for d in made:
        d.kill()


def _executor(d, task):
    """The executor of a running run of ``task`` (found among this daemon's own descendants)."""
    for proc in psutil.Process(d.proc.pid).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(f"torchcore: {task} [run "):
                return proc
        except psutil.Error:
            pass
    return None


def _cli_json(capsys, *args):
    capsys.readouterr()
    main(list(args))
    return json.loads(capsys.readouterr().out)


def _state(capsys, d, task):
    status = _cli_json(capsys, "status", "--json", "-c", d.path)
    return next(row["state"] for row in status["tasks"] if row["name"] == task)


def test_a_run_whose_executor_is_killed_failed_with_its_reason_everywhere(daemon, capsys):
    d = daemon("""tasks:
  - {name: victim, schedule: "@every 1h", command: "sleep 60"}
  - {name: other, type: daemon, command: "sleep 600"}
""").start()
    main(["run", "victim", "-c", d.path])
    executor = wait_for(lambda: _executor(d, "victim"), 15, "the victim's executor")
    wait_for(lambda: any(r["pid"] for r in d.runs("victim")), 10, "the victim's command")
    executor.send_signal(signal.SIGKILL)
    (run,) = wait_for(lambda: [r for r in d.runs("victim") if r["ended"]], 15, "its record")
    assert run["exit_code"] is None and "executor ended without a report" in run["error"]
    assert "signal 9" in run["error"] and run["stopped"] is None
    failed = _cli_json(capsys, "history", "--failed", "--json", "-c", d.path)
    assert [(r["task"], r["failed"]) for r in failed] == [("victim", True)]
    assert _state(capsys, d, "victim") == "failing"
    assert "victim run" in d.log and "failed: executor ended without a report" in d.log
    d.stop()


def test_runs_ended_by_a_reload_or_a_stop_are_stopped_not_failed(daemon, capsys):
    d = daemon("""tasks:
  - {name: keep, type: daemon, command: "sleep 600"}
  - {name: gone, type: daemon, command: "sleep 600"}
""").start()
    wait_for(lambda: _executor(d, "keep") and _executor(d, "gone"), 15, "both daemons")
    wait_for(lambda: len([r for r in d.runs() if r["pid"]]) == 2, 15, "both commands")
    d.write("""tasks:
  - {name: keep, type: daemon, command: "sleep 600"}
""")
    (gone,) = wait_for(lambda: [r for r in d.runs("gone") if r["ended"]], 20, "gone's record")
    assert gone["stopped"] == "task removed by reload" and gone["error"] is None
    assert d.stop() == 0
    (keep,) = [r for r in d.runs("keep") if r["ended"]]
    assert keep["stopped"] == "shutdown" and keep["signal"] == signal.SIGTERM
    assert _cli_json(capsys, "history", "--failed", "--json", "-c", d.path) == []
    history = _cli_json(capsys, "history", "--json", "-c", d.path)
    assert {r["task"]: r["stopped"] for r in history} == {"keep": "shutdown",
                                                          "gone": "task removed by reload"}
    assert _state(capsys, d, "keep") == "ok"
    assert "ended: stopped: shutdown after" in d.log
