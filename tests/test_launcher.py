"""Launchers: the small processes that fork executors on the supervisor's behalf."""

import json
import os
import selectors
import signal
import time

import psutil
from daemon_harness import Daemon, processes_with, wait_for

from torchcore.executor import Job
from torchcore.launcher import Launcher


def answers_until(launcher, predicate, timeout=15):
    sel = selectors.DefaultSelector()
    sel.register(launcher.sock, selectors.EVENT_READ)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate(seen):
        if sel.select(0.2):
            got = launcher.answers()
            assert got is not None, "the launcher died"
            seen.extend(got)
    sel.close()
    return seen


def test_a_launcher_forks_the_executor_and_reports_its_pid_and_exit(tmp_path):
    report_r, report_w = os.pipe()
    launcher = Launcher(report_w)
    try:
        wait_for(lambda: "torchcore: launcher" in " ".join(psutil.Process(launcher.pid).cmdline()),
                 10, "the launcher's title")
        job = Job(run_id=7, name="echo", argv=("sh", "-c", "echo hi; exit 3"),
                  log_dir=str(tmp_path), db_path=str(tmp_path / "db"))
        launcher.submit(job)
        seen = answers_until(launcher, lambda s: any("exited" in a for a in s))
        forked = next(a for a in seen if "forked" in a)
        exited = next(a for a in seen if "exited" in a)
        assert forked["forked"] == exited["exited"] == 7 and forked["pid"] == exited["pid"]
        assert os.waitstatus_to_exitcode(exited["status"]) == 0
        reports = [json.loads(line) for line in os.read(report_r, 65536).splitlines()]
        assert [r["e"] for r in reports] == ["start", "end"] and reports[1]["exit_code"] == 3
        assert "hi" in (tmp_path / "echo.log").read_text()
    finally:
        launcher.close()
        assert launcher.proc.wait(5) == 0          # it leaves when the supervisor hangs up
        os.close(report_r)
        os.close(report_w)


def test_executors_are_children_of_launchers_not_of_the_supervisor(tmp_path):
    d = Daemon(tmp_path, """tasks:
  - {name: nap, schedule: "* * * * * *", command: "sleep 5.31"}
""").start()
    try:
        wait_for(lambda: processes_with("sleep 5.31"), 10, "a run")
        supervisor = psutil.Process(d.proc.pid)
        launchers = [c for c in supervisor.children() if "launcher" in " ".join(c.cmdline())]
        assert len(launchers) == max(1, min(4, os.cpu_count()))
        executors = [p for launcher in launchers for p in launcher.children()]
        assert any("torchcore: nap [run " in " ".join(p.cmdline()) for p in executors)
    finally:
        d.stop()


def test_a_killed_launcher_is_replaced_and_its_run_still_recorded(tmp_path):
    d = Daemon(tmp_path, """tasks:
  - {name: nap, schedule: "* * * * * *", command: "sleep 2.31; echo slept", max: 3}
""").start()
    try:
        wait_for(lambda: processes_with("sleep 2.31"), 10, "a run")
        supervisor = psutil.Process(d.proc.pid)
        victim = next(c for c in supervisor.children() if "launcher" in " ".join(c.cmdline())
                      and c.children())
        victim.send_signal(signal.SIGKILL)
        d.wait_log("died; starting another")
        count = max(1, min(4, os.cpu_count()))
        wait_for(lambda: len([c for c in supervisor.children()
                              if "launcher" in " ".join(c.cmdline())]) == count,
                 10, "a replacement launcher")
        done = wait_for(lambda: [r for r in d.runs("nap") if r["ended"] and r["exit_code"] == 0],
                        15, "runs to end and be recorded")
        assert done
        assert d.stop() == 0
        unfinished = [r for r in d.runs("nap") if r["started"] and not r["ended"]]
        assert unfinished == []
    finally:
        d.kill()
