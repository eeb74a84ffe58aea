"""Launchers: the small processes that fork executors on the supervisor's behalf."""

import json
import os
import selectors
import signal
import time

import psutil
import pytest
from daemon_harness import Daemon, processes_with, titled, wait_for

from torchcore.jobspec import Job
from torchcore import wire
from torchcore.launcher import Launcher

pytestmark = pytest.mark.process


@pytest.fixture
def launched():
    """A launcher and the read end of its report pipe; closed (and waited for) after the test."""
    report_r, report_w = os.pipe()
    launcher = Launcher(report_w)
    yield launcher, report_r
    launcher.close()
    launcher.proc.wait(5)
    os.close(report_r)
    os.close(report_w)


def answers_until(launcher, predicate, timeout=15):
    sel = selectors.DefaultSelector()
    sel.register(launcher.sock, selectors.EVENT_READ)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate(seen):
        if sel.select(0.2):
            got = launcher.answers()
            assert got is not None, "the launcher died"
            seen.extend(wire.fields(answer) for answer in got)    # as they travel
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
        launchers = titled(supervisor.children(), "launcher")
        assert len(launchers) == max(1, min(4, os.cpu_count()))
        executors = [p for launcher in launchers for p in launcher.children()]
        assert titled(executors, "torchcore: nap [run ")
    finally:
        d.stop()


def test_a_killed_launcher_is_replaced_and_its_run_still_recorded(tmp_path):
    d = Daemon(tmp_path, """tasks:
  - {name: nap, schedule: "* * * * * *", command: "sleep 2.31; echo slept", max: 3}
""").start()
    try:
        supervisor = psutil.Process(d.proc.pid)
        victim = wait_for(lambda: next((c for c in titled(supervisor.children(), "launcher")
                                        if c.children()), None), 10, "a launcher with a run")
        victim.send_signal(signal.SIGKILL)
        d.wait_log("died; starting another")
        count = max(1, min(4, os.cpu_count()))
        wait_for(lambda: len(titled(supervisor.children(), "launcher")) == count,
                 10, "a replacement launcher")
        done = wait_for(lambda: [r for r in d.runs("nap") if r["ended"] and r["exit_code"] == 0],
                        15, "runs to end and be recorded")
        assert done
        assert d.stop() == 0
        unfinished = [r for r in d.runs("nap") if r["started"] and not r["ended"]]
        assert unfinished == []
    finally:
        d.kill()


# ---- prepared runs: go pipes held by the launcher, commands waiting at the gate ----------

def _prepared(tmp_path, run_id, argv, **fields):
    fields.setdefault("env", (_mine(tmp_path),))
    return Job(run_id=run_id, name=f"p{run_id}", argv=argv, log_dir=str(tmp_path),
               db_path=str(tmp_path / "db"), scheduled=int(time.time()) + 2, prepared=True,
               **fields)


def _mine(tmp_path):
    """The environment entry that marks this test's commands (and their gates)."""
    return ("TC_TEST_DIR", str(tmp_path))


def _gates(tmp_path):
    return processes_with("torchcore-gate", env=_mine(tmp_path))


def _reports(fd):
    os.set_blocking(fd, False)
    data = b""
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    return [json.loads(line) for line in data.splitlines()]


def _exits(launcher, run_ids):
    seen = answers_until(launcher, lambda s: {a.get("exited") for a in s} >= set(run_ids))
    return {a["exited"]: a for a in seen if "exited" in a}


def test_prepared_runs_start_on_go_and_leave_no_trace_on_cancel(tmp_path, launched):
    launcher, report_r = launched
    marker = tmp_path / "ran"
    go_job = _prepared(tmp_path, 11, ("sh", "-c", f"echo go >> {marker}; echo out"))
    cancel_job = _prepared(tmp_path, 12, ("sh", "-c", f"echo cancelled >> {marker}"))
    popen_job = _prepared(tmp_path, 13, ("sh", "-c", f"echo popen >> {marker}; pwd"),
                          cwd=str(tmp_path))          # a cwd takes the Popen path
    for job in (go_job, cancel_job, popen_job):
        launcher.submit(job)
    answers_until(launcher, lambda s: len([a for a in s if "forked" in a]) == 3)
    wait_for(lambda: len(_gates(tmp_path)) >= 2, 10, "two gates")
    time.sleep(0.3)
    assert not marker.exists(), "a prepared command ran before its go"
    before = time.time()
    launcher.go([11, 13])
    launcher.cancel([12])
    exits = _exits(launcher, [11, 12, 13])
    assert all(os.waitstatus_to_exitcode(a["status"]) == 0 for a in exits.values())
    assert sorted(marker.read_text().split()) == ["go", "popen"]
    reports = _reports(report_r)
    gates = {r["run"]: r["pid"] for r in reports if r["e"] == "gate"}
    assert set(gates) == {11, 12}           # plain commands wait at a gate, reported ahead
    ends = {r["run"]: r for r in reports if r["e"] == "end"}
    assert set(ends) == {11, 13}            # the cancelled run leaves no result
    assert [r["run"] for r in reports if r["e"] == "start"] == [13]   # the Popen path
    assert before - 0.01 <= ends[11]["started"] <= before + 2
    assert ends[11]["exit_code"] == 0 and ends[13]["exit_code"] == 0
    log = (tmp_path / "p11.log").read_text()
    assert "run 11 out| out" in log
    assert str(tmp_path) in (tmp_path / "p13.log").read_text()
    assert not _gates(tmp_path)


def test_a_command_that_cannot_start_at_the_gate_is_reported(tmp_path, launched):
    launcher, report_r = launched
    launcher.submit(_prepared(tmp_path, 21, ("no-such-command-tc",)))
    answers_until(launcher, lambda s: any("forked" in a for a in s))
    wait_for(lambda: _gates(tmp_path), 10, "the gate")
    launcher.go([21])
    _exits(launcher, [21])
    ends = [r for r in _reports(report_r) if r["e"] == "end"]
    assert ends[0]["exit_code"] == 127 and "No such file" in ends[0]["error"]
    assert "cannot start" in (tmp_path / "p21.log").read_text()


def test_prepared_runs_never_start_without_their_launcher_or_executor(tmp_path):
    marker = tmp_path / "ran"
    report_r, report_w = os.pipe()
    launcher = Launcher(report_w)
    try:
        launcher.submit(_prepared(tmp_path, 31, ("sh", "-c", f"echo 31 >> {marker}")))
        launcher.submit(_prepared(tmp_path, 32, ("sh", "-c", f"echo 32 >> {marker}")))
        seen = answers_until(launcher, lambda s: len([a for a in s if "forked" in a]) == 2)
        wait_for(lambda: len(_gates(tmp_path)) == 2, 10, "two gates")
        executor_32 = next(a["pid"] for a in seen if a.get("forked") == 32)
        os.kill(executor_32, signal.SIGKILL)        # its gate sees the status pipe lose its reader
        wait_for(lambda: len(_gates(tmp_path)) == 1, 10, "run 32's gate to give up")
        launcher.go([32])
        launcher.proc.kill()                        # its go pipes close: run 31 is cancelled
        launcher.proc.wait(5)
        wait_for(lambda: not _gates(tmp_path), 10, "every gate to give up")
        time.sleep(0.2)
        assert not marker.exists()
        assert not [r for r in _reports(report_r) if r["e"] != "gate"]
    finally:
        launcher.close()
        os.close(report_r)
        os.close(report_w)


def test_a_prepared_run_nobody_starts_gives_up_after_its_wait(tmp_path, monkeypatch):
    import torchcore.executor as executor_module

    marker = tmp_path / "ran"
    monkeypatch.setattr(executor_module, "GO_WAIT", 0.0)
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    job = Job(run_id=41, name="late", argv=("sh", "-c", f"echo x > {marker}"), log_dir=str(tmp_path),
              scheduled=int(time.time()), prepared=True)
    pid = os.fork()
    if pid == 0:
        executor_module.execute(job, report_w, go_r)
    os.close(go_r)
    started = time.monotonic()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and time.monotonic() - started < 5
    os.close(go_w)
    os.close(report_w)
    assert not marker.exists() and [r["e"] for r in _reports(report_r)] == ["gate"]
    os.close(report_r)


def test_a_go_that_overtakes_its_job_line_still_starts_the_run(tmp_path, launched):
    launcher, report_r = launched
    marker = tmp_path / "ran"
    launcher.submit(_prepared(tmp_path, 60, ("true",)))
    launcher.go([61])               # sent first: nothing is pending for the socket
    launcher.submit(_prepared(tmp_path, 61, ("sh", "-c", f"echo 61 > {marker}")))
    _exits(launcher, [61])
    assert marker.read_text() == "61\n"
    launcher.cancel([60])
    _exits(launcher, [60])


def test_the_process_that_forks_executors_stays_without_threading_and_logging():
    """threading's at-fork hook runs in every forked child (about 0.4 ms more per fork and
    exit, measured); logging and subprocess bring it in, and dataclasses brings inspect.
    A launcher with what an executor needs loaded, title set, must have none of them."""
    import subprocess
    import sys

    import torchcore

    root = os.path.dirname(os.path.dirname(torchcore.__file__))
    code = ("import sys; import torchcore.launcher, torchcore.executor, torchcore.jobspec, "
            "torchcore.spawn, torchcore.wire, torchcore.outcome, torchcore.proctitle as t; "
            "t.set_title('torchcore: probe'); "
            "print(' '.join(sorted(m for m in ('threading', 'logging', 'subprocess', "
            "'dataclasses', 'inspect', 'setproctitle') if m in sys.modules)))")
    # -S: without site (whose .pth files may import anything); the same path as this process.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in sys.path if p]))
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []


def test_a_job_travels_as_json_unchanged_and_is_fixed_once_made():
    job = Job(run_id=3, name="n", argv=("sh", "-c", "true"), env=(("A", "1"),), timeout=5,
              scheduled=1_767_225_600, prepared=True, hold_until=1_767_225_600.4)
    assert Job.from_json(job.to_json()) == job
    assert Job.from_json(job.to_json()) != Job(run_id=3, name="n", argv=("sh", "-c", "true"))
    with pytest.raises(AttributeError):
        job.timeout = 6
    with pytest.raises(TypeError, match="no field colour"):
        Job(run_id=1, name="n", argv=("true",), colour="red")
    with pytest.raises(TypeError, match="needs argv"):
        Job(run_id=1, name="n")


# ---- runs of a burst hold their wrap-up until the burst's starts are over -------------------

def test_a_run_in_a_burst_reports_after_its_hold_with_its_command_s_own_end(tmp_path, launched):
    launcher, report_r = launched
    hold_until = time.time() + 8    # room for the forks and gates on a loaded machine
    launcher.submit(_prepared(tmp_path, 71, ("sh", "-c", "echo held"), hold_until=hold_until))
    launcher.submit(_prepared(tmp_path, 72, ("sh", "-c", "echo never"), hold_until=hold_until))
    answers_until(launcher, lambda s: len([a for a in s if "forked" in a]) == 2)
    wait_for(lambda: len(_gates(tmp_path)) == 2, 10, "two gates")
    went = time.time()
    launcher.go([71])
    launcher.cancel([72])
    exits = _exits(launcher, [72])
    assert time.time() < hold_until - 0.5       # a cancelled run has nothing to hold for
    assert [r["e"] for r in _reports(report_r)] == ["gate", "gate"]
    exits = _exits(launcher, [71])
    reported = time.time()
    end = next(r for r in _reports(report_r) if r["e"] == "end")
    assert reported >= hold_until - 0.05         # the wrap-up waited for the hold...
    assert went - 0.01 <= end["started"] <= end["ended"] < hold_until - 1.0   # ...not the end
    assert end["exit_code"] == 0 and os.waitstatus_to_exitcode(exits[71]["status"]) == 0
    log = (tmp_path / "p71.log").read_text()
    assert "run 71 out| held" in log
    took = float(log.split("after ")[1].split("s")[0])
    assert took < 1.0       # the log's duration is the command's too


def test_a_stop_or_a_timeout_ends_a_hold_early(tmp_path, launched):
    launcher, report_r = launched
    hold_until = time.time() + 30
    launcher.submit(_prepared(tmp_path, 81, ("true",), hold_until=hold_until))
    launcher.submit(_prepared(tmp_path, 82, ("sleep", "20"), hold_until=hold_until,
                              timeout=1, kill_grace=1))
    seen = answers_until(launcher, lambda s: len([a for a in s if "forked" in a]) == 2)
    wait_for(lambda: len(_gates(tmp_path)) == 2, 10, "two gates")
    launcher.go([81, 82])
    time.sleep(0.5)
    os.kill(next(a["pid"] for a in seen if a.get("forked") == 81), signal.SIGTERM)
    exits = _exits(launcher, [81, 82])
    assert time.time() < hold_until - 20
    ends = {r["run"]: r for r in _reports(report_r) if r["e"] == "end"}
    assert ends[81]["exit_code"] == 0 and not ends[81]["timed_out"]
    assert ends[82]["timed_out"] and ends[82]["signal"] == signal.SIGTERM
    assert all(os.waitstatus_to_exitcode(a["status"]) == 0 for a in exits.values())
