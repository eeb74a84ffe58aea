"""A supervisor killed with -9 before it learned a run's pid: the next one still adopts its executor.

The window: a run's start is on record, its job handed to a launcher, and the supervisor is
killed before the launcher's answer (the pid) reaches it.  The tests open it at will: the
launchers are stopped (SIGSTOP) before a daemon task's instance is started, so its start is
written without a pid and its executor is forked only once the supervisor is dead.  And
processes that only look like executors (the right title, another daemon's mark or none,
another user's) are never taken for one.  Task names carry this process's pid: another
session's tests on the machine never share a title with ours.
"""

import os
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest
from daemon_harness import titled, wait_for
from test_faults_daemon import started

from torchcore import paths, procscan, records

pytestmark = pytest.mark.process
NAME = f"keeper{os.getpid()}"


def _launchers(pid):
    return titled(psutil.Process(pid).children(), "launcher")


def _executors(state_dir, task, run_id):
    """The live processes titled as that run's executor that hold ``state_dir`` open."""
    mark = _mark(state_dir)
    found = procscan.scan({run_id: (task, None)})
    return [p.pid for p in found if procscan.parse_title(p.title) == (task, run_id) and mark in p.marks]


def _mark(state_dir):
    fd = procscan.open_mark(state_dir)
    try:
        return procscan.mark_of(fd)
    finally:
        os.close(fd)


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_holders(state_dir):
    """Kill what holds ``state_dir`` open (this test's daemon, launchers, executors: no other
    process holds a test's temporary directory) and their commands."""
    mark = _mark(state_dir)
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and mark in procscan._marks(int(name)):
                proc = psutil.Process(int(name))
                for each in [*proc.children(recursive=True), proc]:
                    try:
                        each.kill()
                    except psutil.Error:    # ended meanwhile: kill the others still
                        pass
        except (OSError, psutil.Error):
            pass


@pytest.mark.parametrize("start_written", [True, False], ids=["start-written", "start-unwritten"])
def test_a_supervisor_killed_before_it_learned_the_pid_leaves_an_executor_the_next_adopts(
        daemons, figures, start_written):
    """start-written: its start on record without a pid.  start-unwritten: killed before its
    buffered start record was written either (the record is taken out after the kill): the run
    has no record at all, only run ids the killed supervisor did not give back."""
    d = daemons('tasks:\n  - {name: idle, schedule: "@daily", command: "true"}\n').start()
    state = os.path.join(d.dir, "state")
    flag = os.path.join(d.dir, "finish")
    launchers = _launchers(d.proc.pid)
    assert launchers
    for launcher in launchers:
        launcher.suspend()                      # jobs handed over now wait: no pid comes back
    try:
        d.write(f'tasks:\n  - {{name: idle, schedule: "@daily", command: "true"}}\n'
                f'  - {{name: {NAME}, type: daemon, command: "while [ ! -e {flag} ]; do sleep 0.1; '
                f'done"}}\n')
        row = wait_for(lambda: started(d.runs(NAME)), 20, "its start on record")[0]
        assert row["pid"] is None               # the window: on record, its pid unknown
        d.proc.kill()                           # kill -9, in the window
        d.proc.wait()
        if not start_written:
            with sqlite3.connect(os.path.join(state, "torchcore.db")) as conn:
                conn.execute("DELETE FROM runs WHERE run_id = ?", (row["run_id"],))
    finally:
        for launcher in launchers:
            launcher.resume()                   # it forks the job it holds, then sees the hang-up
    try:
        executor = wait_for(lambda: _executors(state, NAME, row["run_id"]), 10, "its executor")[0]
        d.start()
        d.wait_log("adopted")
        time.sleep(3)                           # a second instance would start within a second
        rows = started(d.runs(NAME))
        assert [r["run_id"] for r in rows] == [row["run_id"]]
        assert rows[0]["ended"] is None and _alive(executor)
        assert "closed as lost" not in d.log and "lost" not in (rows[0]["error"] or "")
        open(flag, "w").close()                 # its command ends: the executor records its end
        wait_for(lambda: not _alive(executor), 10, "the adopted executor to end")
        ended = wait_for(lambda: [r for r in d.runs(NAME) if r["run_id"] == row["run_id"]
                                  and r["ended"] is not None], 10, "its end on record")[0]
        assert ended["exit_code"] == 0 and not (ended["error"] or "").startswith("lost")
        os.remove(flag)
        nxt = wait_for(lambda: [r for r in started(d.runs(NAME)) if r["run_id"] != row["run_id"]],
                       10, "the next instance, once the adopted one ended")
        assert len(nxt) == 1 and nxt[0]["started"] >= ended["ended"] - 0.05
        open(flag, "w").close()
        assert d.stop() == 0
    finally:
        _kill_holders(state)
    figures.add(faults=1, runs=2, doubled=0)


def _impostor(title, hold=None, uid=None):
    """A process titled ``title`` holding the directory ``hold`` open (None: none), as user
    ``uid`` once it holds it (None: ours)."""
    code = ("import os, sys, time, setproctitle\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY) if sys.argv[1] != '-' else None\n"
            "if sys.argv[3] != '-':\n"
            "    os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[3]))\n"
            "setproctitle.setproctitle(sys.argv[2])\n"
            "print('ready', flush=True)\n"
            "time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, hold or "-", title,
                             "-" if uid is None else str(uid)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_processes_titled_as_an_executor_without_this_daemon_s_mark_are_never_adopted(
        daemons, tmp_path, figures):
    """An open run without a pid, and one whose pid is now another daemon's executor titled as
    it: each is closed as lost, the daemon task gets its own instance, no impostor is touched."""
    d = daemons(f'tasks:\n  - {{name: {NAME}, type: daemon, command: "sleep 300"}}\n')
    state = os.path.join(d.dir, "state")
    os.makedirs(state, mode=0o700)
    other = tmp_path / "another-daemon-state"
    other.mkdir()
    with records.Records(paths.records_db(state)) as db:
        no_pid, stale = db.allocate_run_id(), db.allocate_run_id()
    impostors = []
    try:
        impostors.append(_impostor(procscan.executor_title(NAME, no_pid), str(other)))  # another daemon's
        impostors.append(_impostor(procscan.executor_title(NAME, no_pid)))              # no mark at all
        if os.geteuid() == 0:                   # another user's, holding our very state directory
            impostors.append(_impostor(procscan.executor_title(NAME, no_pid), state, uid=65534))
        impostors.append(_impostor(procscan.executor_title(NAME, stale), str(other)))
        with records.Records(paths.records_db(state)) as db:
            for run_id, pid in ((no_pid, None), (stale, impostors[-1].pid)):
                db.add(records.RunRecord(run_id=run_id, task=NAME, node="n", scheduled=None,
                                         started=time.time() - 5, ended=None, exit_code=None,
                                         signal=None, pid=pid))
        d.start()
        time.sleep(2)
        rows = {r["run_id"]: r for r in d.runs(NAME)}
        assert rows[no_pid]["error"].startswith("lost") and rows[stale]["error"].startswith("lost")
        mine = [r for r in started(rows.values()) if r["run_id"] not in (no_pid, stale)]
        assert len(mine) == 1 and mine[0]["ended"] is None          # its own instance, one
        assert "adopted" not in d.log
        assert d.stop() == 0
        assert all(p.poll() is None for p in impostors)             # none was signalled
    finally:
        for proc in impostors:
            proc.kill()
            proc.wait()
        _kill_holders(state)
    figures.add(faults=len(impostors), runs=1)


def test_the_scan_reads_the_processes_of_this_user_only_and_survives_their_ends(tmp_path):
    """find() with a run without a pid: its marked executor found; once it has ended, nothing."""
    state = tmp_path / "state"
    state.mkdir()
    proc = _impostor(procscan.executor_title("t", 41), str(state))
    record = records.RunRecord(run_id=41, task="t", node="n", scheduled=None, started=time.time(),
                               ended=None, exit_code=None, signal=None, pid=None)
    try:
        mark = _mark(str(state))
        assert procscan.find([record], mark)[0] == {41: proc.pid}
        assert procscan.find([record], mark, uid=os.geteuid() + 1)[0] == {}
    finally:
        proc.kill()
        proc.wait()
    assert procscan.find([record], mark) == ({}, {})


class _BareDaemon(__import__("daemon_harness").Daemon):
    """A daemon started with an empty environment (``env -i torchcore start``)."""

    def start(self, *extra, wait=True):
        with open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torchcore", "start", "--foreground", "-c", self.path, *extra],
                stdout=subprocess.DEVNULL, stderr=err, cwd=self.dir, env={})
        if wait:
            self.wait_log("torchcore started")
        return self


def test_an_executor_carries_its_whole_title_whatever_the_daemon_s_environment(daemons):
    """The title is what finds an executor without a pid (and what tells a followed one is still
    alive): a daemon started with an empty environment, a task name of 64 characters and a run id
    of 18 digits still gives its executor the whole title, which the scan finds."""
    name = ("t" + NAME + "x" * 64)[:64]
    d = daemons(f'tasks:\n  - {{name: {name}, type: daemon, command: "sleep 300"}}\n', cls=_BareDaemon)
    state = os.path.join(d.dir, "state")
    os.makedirs(state, mode=0o700)
    with records.Records(paths.records_db(state)):
        pass
    with sqlite3.connect(paths.records_db(state)) as conn:
        conn.execute("UPDATE meta SET value = '100000000000000000' WHERE key = 'next_run_id'")
    try:
        d.start()
        row = wait_for(lambda: [r for r in started(d.runs(name)) if r["pid"]], 20, "its start")[0]
        assert row["run_id"] >= 10 ** 17
        wait_for(lambda: _executors(state, name, row["run_id"]), 10, "its executor by its title")
        assert d.stop() == 0
    finally:
        _kill_holders(state)


_FAKETIME = [path for pattern in ("/usr/lib/*/faketime/libfaketime.so.1",
                                  "/usr/lib/faketime/libfaketime.so.1")
             for path in __import__("glob").glob(pattern)]


@pytest.mark.skipif(not _FAKETIME, reason="libfaketime is not installed (Debian package "
                    "`faketime`; tests/setup-system.sh installs it)")
def test_an_executor_at_its_recorded_pid_is_adopted_after_the_clock_stepped_back(daemons,
                                                                                 monkeypatch):
    """The wall clock 5 minutes ahead while a daemon task's instance starts (its start on record
    in that time), then set right, then the supervisor killed: the next one adopts the instance
    at its recorded pid (the process's start time, read in the corrected clock, is 5 minutes
    "before" its record's) and starts no second one."""
    name = "s" + NAME
    d = daemons(f'tasks:\n  - {{name: {name}, type: daemon, command: "sleep 300"}}\n')
    state = os.path.join(d.dir, "state")
    monkeypatch.setenv("LD_PRELOAD", _FAKETIME[0])
    monkeypatch.setenv("FAKETIME", "+300")
    d.start()
    try:
        row = wait_for(lambda: [r for r in started(d.runs(name)) if r["pid"]], 20, "its start")[0]
        assert row["started"] > time.time() + 200
        d.proc.kill()                           # kill -9
        d.proc.wait()
        monkeypatch.delenv("LD_PRELOAD")
        monkeypatch.delenv("FAKETIME")
        d.start()                               # the clock set right
        d.wait_log("adopted")
        time.sleep(2)                           # a second instance would start within a second
        rows = started(d.runs(name))
        assert [r["run_id"] for r in rows] == [row["run_id"]] and rows[0]["ended"] is None
        assert d.stop() == 0
    finally:
        _kill_holders(state)


def test_a_killed_supervisor_s_late_launcher_forks_an_executor_the_next_one_still_adopts(daemons):
    """The killed supervisor's launcher is held up (stopped here; a machine short of memory when
    the OOM killer strikes does it too) with a daemon task's job it read: the next supervisor
    starts meanwhile, the launcher forks the executor after that, and the task has one instance."""
    name = "l" + NAME
    d = daemons('tasks:\n  - {name: idle, schedule: "@daily", command: "true"}\n').start()
    state = os.path.join(d.dir, "state")
    flag = os.path.join(d.dir, "finish")
    launchers = _launchers(d.proc.pid)
    for launcher in launchers:
        launcher.suspend()
    try:
        d.write(f'tasks:\n  - {{name: {name}, type: daemon, command: "while [ ! -e {flag} ]; do '
                f'sleep 0.1; done"}}\n')
        row = wait_for(lambda: started(d.runs(name)), 20, "its start on record")[0]
        d.proc.kill()                           # kill -9 while its launcher holds the job
        d.proc.wait()
        d.start(wait=False)
        time.sleep(1.5)                         # the next supervisor is starting, or started
    finally:
        for launcher in launchers:
            launcher.resume()                   # it forks the job it holds, then sees the hang-up
    try:
        d.wait_log("torchcore started")
        wait_for(lambda: _executors(state, name, row["run_id"]), 10, "the late executor")
        time.sleep(3)                           # a second instance would start within a second
        rows = started(d.runs(name))
        assert [r["run_id"] for r in rows] == [row["run_id"]]
        assert "adopted" in d.log
        open(flag, "w").close()
        assert d.stop() == 0
    finally:
        _kill_holders(state)
