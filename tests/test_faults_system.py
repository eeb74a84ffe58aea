"""System events against the real daemon: launchers killed and stopped, an oversized job, the log
directory renamed and removed, the records database removed, a full disk in daemon mode, TERM to
the whole process group, a refused second start, kill -9 and restart with an adopted run, a burst.

Each test checks that the daemon lives (or stops cleanly where stopping is the event), that no due
run is lost or doubled (the records, and the runs' own output where they leave some), and that
nothing of the test's daemon is left running; it adds what it tried to the figure table.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from daemon_harness import Daemon, wait_for
from test_faults_daemon import lost_seconds, started

pytestmark = pytest.mark.process
ENV = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9")
EVERY = '  - {name: tick, schedule: "* * * * * *", command: "echo tick", max: 5}\n'


class Detached(Daemon):
    """``torchcore start`` without --foreground: daemonized, logging to log_dir/torchcore.log."""

    pid = None

    def start(self, *extra, wait=True):
        done = subprocess.run([sys.executable, "-m", "torchcore", "start", "-c", self.path, *extra],
                              cwd=self.dir, env=ENV, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        with open(os.path.join(self.dir, "state", "torchcore.pid")) as handle:
            self.pid = int(handle.read().split()[0])
        if wait:
            self.wait_log("torchcore started")
        return self

    @property
    def log_path(self):
        return os.path.join(self.dir, "state", "logs", "torchcore.log")

    @property
    def log(self):
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def alive(self):
        return _alive(self.pid)

    def stop(self, timeout=30):
        done = subprocess.run([sys.executable, "-m", "torchcore", "stop", "-c", self.path],
                              cwd=self.dir, env=ENV, capture_output=True, text=True, timeout=timeout)
        return done.returncode

    def kill(self):
        if self.pid and _alive(self.pid):
            _kill_tree(self.pid)


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tree(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_tree(pid):
    for proc in [*_tree(pid), psutil.Process(pid)]:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _left_running(procs):
    return [p for p in procs if _alive(p.pid)]


def _launchers(pid):
    return [p for p in _tree(pid) if "launcher" in " ".join(_cmdline(p))]


def _cmdline(proc):
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _check_ticks(d, figures, faults, after=None):
    """Every second of `tick` from its first run (or ``after``) ran once or is accounted for."""
    rows = d.runs("tick")
    ran = [r["scheduled"] for r in started(rows)]
    assert ran, "no run of tick"
    first = max(min(ran), after or 0)
    lost = lost_seconds([r for r in rows if (r["scheduled"] or 0) >= first], first, max(ran))
    doubled = len(ran) - len(set(ran))
    assert lost == [] and doubled == 0, (lost, doubled)
    assert all(r["ended"] is not None for r in started(rows))      # every start has its end
    figures.add(faults=faults, runs=len(ran), lost=len(lost), doubled=doubled)
    return ran


# ---- a reload that cannot be applied -----------------------------------------------------------

def test_a_file_the_c_core_cannot_hold_is_a_rejected_reload_and_the_old_tasks_go_on(daemons, figures):
    """`@every 9223372036854775808s` (refused at validation, or else by the table while the
    reload is applied): either way the reload is rejected whole and the old tasks keep running."""
    d = daemons("tasks:\n" + EVERY + '  - {name: d, type: daemon, command: "sleep 300"}\n').start()
    wait_for(lambda: started(d.runs("d")) and len(started(d.runs("tick"))) >= 2, 15, "runs")
    procs = _tree(d.proc.pid)
    edited_at = time.time()
    d.write("tasks:\n" + EVERY.replace("echo tick", "echo changed") +
            '  - {name: huge, schedule: "@every 9223372036854775808s", command: "true"}\n')
    d.wait_log("rejected")
    time.sleep(3)
    assert d.proc.poll() is None
    assert d.log.count("rejected") == 1 and "Traceback" not in d.log
    assert [r["ended"] for r in started(d.runs("d"))] == [None]     # the daemon task untouched
    assert not d.runs("huge")
    assert d.stop() == 0
    ran = _check_ticks(d, figures, faults=1)
    assert max(ran) >= edited_at + 2                                 # tick went on after it
    assert _left_running(procs) == []


# ---- launchers ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_launcher_killed_with_unread_input_is_replaced_and_no_run_is_lost(daemons, figures):
    d = daemons("tasks:\n" + EVERY + "".join(
        f'  - {{name: w{i}, schedule: "* * * * * *", command: "true", max: 3}}\n'
        for i in range(20))).start()
    wait_for(lambda: len(started(d.runs("tick"))) >= 2, 15, "runs")
    procs = _tree(d.proc.pid)
    for _ in range(2):
        victim = _launchers(d.proc.pid)[0]
        victim.suspend()                        # jobs pile up unread in its socket...
        time.sleep(2.5)
        victim.kill()                           # ...and it dies with them
        d.wait_log(f"launcher (pid {victim.pid}) died")
        time.sleep(2)
    assert d.proc.poll() is None
    count = max(1, min(4, os.cpu_count()))
    wait_for(lambda: len(_launchers(d.proc.pid)) == count, 10, "replacement launchers")
    procs += _tree(d.proc.pid)
    assert d.stop() == 0
    assert "Traceback" not in d.log and "ConnectionResetError" not in d.log
    _check_ticks(d, figures, faults=2)
    for i in range(20):
        rows = d.runs(f"w{i}")
        seconds = [r["scheduled"] for r in started(rows)]
        assert len(seconds) == len(set(seconds))
    assert _left_running(procs) == []


@pytest.mark.slow
def test_a_stopped_launcher_delays_its_runs_but_loses_and_doubles_none(daemons, figures):
    d = daemons("tasks:\n" + EVERY).start()
    wait_for(lambda: len(started(d.runs("tick"))) >= 2, 15, "runs")
    procs = _tree(d.proc.pid)
    for victim in _launchers(d.proc.pid):
        victim.suspend()
        time.sleep(3)
        victim.resume()
    time.sleep(3)
    assert d.proc.poll() is None
    assert d.stop() == 0
    assert "Traceback" not in d.log
    _check_ticks(d, figures, faults=len(_launchers(d.proc.pid)) or 1)
    assert _left_running(procs) == []


def test_a_job_too_large_for_the_launcher_frame_is_refused_and_the_daemon_lives(daemons, figures):
    d = daemons("tasks:\n" + EVERY).start()
    wait_for(lambda: len(started(d.runs("tick"))) >= 1, 15, "runs")
    big = "echo " + "x" * 1_500_000
    d.write("tasks:\n" + EVERY + f'  - {{name: big, schedule: "* * * * * *", command: "{big}"}}\n')
    time.sleep(4)
    assert d.proc.poll() is None
    launchers = _launchers(d.proc.pid)
    assert "died" not in d.log and "Traceback" not in d.log
    rows = d.runs("big")
    if "rejected" in d.log:                     # refused at validation: equally fine
        assert rows == []
    else:                                       # refused by the supervisor: failed, not sent
        assert rows and all(r["exit_code"] == 126 and r["ended"] for r in rows)
        assert "refused" in d.log and d.log.count("run") > 0
    procs = _tree(d.proc.pid)
    assert len(launchers) == max(1, min(4, os.cpu_count()))
    assert d.stop() == 0
    _check_ticks(d, figures, faults=max(1, len(rows)))
    assert _left_running(procs) == []


# ---- the daemon's own log, the records database ------------------------------------------------

@pytest.mark.parametrize("how", ["rename", "remove"])
def test_the_log_dir_renamed_or_removed_under_a_running_daemon(daemons, figures, how):
    """The supervisor's next log line (here a reload's) finds no directory: it makes it again.
    (A task's executor would make it too, so the test has none that runs meanwhile.)"""
    d = daemons('tasks:\n  - {name: quiet, schedule: "@yearly", command: "true"}\n',
                cls=Detached).start()
    procs = _tree(d.pid)
    logs = os.path.dirname(d.log_path)
    for round_ in range(2):
        if how == "rename":
            os.rename(logs, f"{logs}.{round_}")
        else:
            shutil.rmtree(logs)
        os.kill(d.pid, signal.SIGHUP)               # a reload: a log line
        wait_for(lambda: "reloaded (SIGHUP)" in d.log, 10, "the daemon log written again")
        assert "was removed or renamed while in use; made it again" in d.log   # and says so
        assert d.alive()
    assert d.stop() == 0
    assert "torchcore stopped" in d.log and "Traceback" not in d.log
    assert _left_running(procs) == []
    figures.add(faults=2)


def test_the_services_follow_the_daemon_log_when_logrotate_moves_it(daemons, figures):
    """A service (here the notifier) logs into the daemon's file through its own watched handler:
    after logrotate moves torchcore.log away, its lines go to the new file with the supervisor's,
    not to the moved one."""
    d = daemons('tasks:\n  - {name: quiet, schedule: "@yearly", command: "true",\n'
                '     notify: [{webhook: "http://127.0.0.1:9/hook"}]}\n', cls=Detached).start()
    d.wait_log("notifier: started")
    for round_ in range(2):
        before = d.log.count("task file re-read")
        os.rename(d.log_path, f"{d.log_path}.{round_ + 1}")      # logrotate's default: move
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: "notifier: task file re-read" in d.log, 15,
                 "the notifier's line in the new daemon log", lambda: d.log)
        assert "reloaded (SIGHUP)" in d.log
        time.sleep(0.5)     # a line wrongly sent to the moved file would be there by now
        with open(f"{d.log_path}.{round_ + 1}") as moved:
            assert moved.read().count("task file re-read") == before
    assert d.stop() == 0
    figures.add(faults=2)


@pytest.mark.slow
def test_the_fleet_claims_process_follows_the_daemon_log_when_logrotate_moves_it(
        daemons, pg, figures):
    """The claims process of `run: once` tasks logs into the daemon's file by its path, as the
    services do: after logrotate moves torchcore.log away, its lines about the fleet database
    going and coming back are in the new file, none in the moved one."""
    from torchcore import fleetdb

    with fleetdb.connect(pg.url) as conn:
        fleetdb.migrate(conn, pg.url)
    d = daemons('tasks:\n  - {name: one, schedule: "* * * * * *", command: "true", run: once}\n',
                settings=f"  fleet:\n    database: {pg.url}\n", cls=Detached)
    d.start("--node-name", "n1")
    wait_for(lambda: any(r["ended"] for r in d.runs("one")), 20, "a run: once run", lambda: d.log)
    os.rename(d.log_path, f"{d.log_path}.1")
    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: "reloaded (SIGHUP)" in d.log, 15, "the supervisor's line in the new log")
    pg.server.stop()
    try:
        wait_for(lambda: "are skipped until it is back" in d.log, 20,
                 "the claims process's outage line in the new log", lambda: d.log)
    finally:
        pg.server.start_again()
    wait_for(lambda: "the fleet database is reachable again" in d.log, 30,
             "the claims process's line in the new log", lambda: d.log)
    with open(f"{d.log_path}.1") as moved:
        text = moved.read()
    assert "skipped until it is back" not in text and "reachable again" not in text
    assert d.stop() == 0
    figures.add(faults=2)


@pytest.mark.slow
def test_the_records_database_removed_under_a_running_daemon_is_recreated(daemons, figures):
    d = daemons("tasks:\n" + EVERY).start()
    wait_for(lambda: len(started(d.runs("tick"))) >= 2, 15, "runs")
    procs = _tree(d.proc.pid)
    db = os.path.join(d.dir, "state", "torchcore.db")
    removed_at = int(time.time())
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(db + suffix)
        except FileNotFoundError:
            pass
    wait_for(lambda: len(started(d.runs("tick"))) >= 4, 15, "runs in the new database")
    assert d.proc.poll() is None
    assert d.stop() == 0
    assert d.log.count("was removed or replaced while in use") == 1
    ran = _check_ticks(d, figures, faults=1, after=removed_at + 2)
    assert min(ran) <= removed_at + 2            # the seconds right after the removal are there
    ids = [r["run_id"] for r in d.runs()]
    assert len(ids) == len(set(ids))
    assert _left_running(procs) == []


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs for a full disk needs root")
def test_a_full_log_dir_in_daemon_mode_kills_no_run(daemons, figures, tmp_path):
    d = daemons("tasks:\n" + EVERY.replace("echo tick", "echo tick; echo oops >&2; sleep 0.3"),
                settings="  log_dir: full\n", cls=Detached)
    full = os.path.join(d.dir, "full")
    os.makedirs(full, mode=0o750)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0750", "tmpfs", full],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        fd = os.open(os.path.join(full, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass                                # ENOSPC: the disk is full
        finally:
            os.close(fd)
        d.start(wait=False)
        wait_for(lambda: len([r for r in d.runs("tick") if r["ended"]]) >= 4, 20, "runs")
        procs = _tree(d.pid)
        assert d.alive()
        assert d.stop() == 0
        ran = started(d.runs("tick"))
        # each run ended well, but one the stop itself ended (stopped: shutdown, not a failure)
        assert all(r["exit_code"] == 0 and r["signal"] is None for r in ran if not r["stopped"]), \
            [(r["exit_code"], r["signal"], r["stopped"]) for r in ran if r["exit_code"] != 0]
        _check_ticks(d, figures, faults=len(ran))
        assert _left_running(procs) == []
    finally:
        d.kill()
        subprocess.run(["umount", "-l", full], capture_output=True)


# ---- signals and a second start ----------------------------------------------------------------

def test_term_to_the_whole_process_group_is_an_ordinary_clean_stop(daemons, figures):
    d = daemons("tasks:\n" + EVERY + '  - {name: long, type: daemon, command: "sleep 300"}\n')
    env = dict(ENV)
    with open(d.err_path, "ab") as err:
        d.proc = subprocess.Popen(
            [sys.executable, "-m", "torchcore", "start", "--foreground", "-c", d.path],
            stdout=subprocess.DEVNULL, stderr=err, cwd=d.dir, env=env, start_new_session=True)
    d.wait_log("torchcore started")
    wait_for(lambda: started(d.runs("long")) and len(started(d.runs("tick"))) >= 2, 15, "runs")
    procs = _tree(d.proc.pid)
    os.killpg(d.proc.pid, signal.SIGTERM)       # what `timeout`, a terminal or systemd send
    assert d.proc.wait(30) == 0
    log = d.log
    assert "torchcore stopped" in log
    assert "died" not in log and "Traceback" not in log and "Error" not in log, log
    assert all(r["ended"] is not None for r in started(d.runs()))
    assert _left_running(procs) == []
    figures.add(faults=1, runs=len(started(d.runs())))


@pytest.mark.parametrize("foreground", [False, True])
def test_a_refused_second_start_writes_nothing_into_the_running_daemon_s_log(daemons, figures,
                                                                            foreground):
    d = daemons("tasks:\n" + EVERY, cls=Detached).start()
    procs = _tree(d.pid)
    other = os.path.join(d.dir, "other.pid")    # another pidfile: only the control socket is shared
    args = ["--foreground"] if foreground else []
    before = d.log
    done = subprocess.run([sys.executable, "-m", "torchcore", "start", "-c", d.path,
                           "--pidfile", other, *args], cwd=d.dir, env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "control socket" in lines[0], done.stderr
    time.sleep(1.5)
    added = d.log[len(before):]
    assert "control socket" not in added and "Traceback" not in added and "failed" not in added
    assert d.alive() and not os.path.exists(other)
    assert d.stop() == 0
    _check_ticks(d, figures, faults=1)
    assert _left_running(procs) == []


@pytest.mark.slow
def test_kill9_then_restart_adopts_a_daemon_task_run_and_stop_stops_it(daemons, figures):
    d = daemons("tasks:\n" + EVERY + '  - {name: long, type: daemon, command: "sleep 301"}\n')
    d.start()
    first = wait_for(lambda: started(d.runs("long")), 15, "the daemon task's run")[0]
    procs = _tree(d.proc.pid)
    command = wait_for(lambda: [p for p in procs if "sleep 301" in " ".join(_cmdline(p))] or
                       [p for p in _tree(d.proc.pid) if "sleep 301" in " ".join(_cmdline(p))],
                       10, "its command")
    procs += command
    d.proc.kill()
    d.proc.wait()
    d.start()
    d.wait_log("adopted")
    time.sleep(4)                               # its instance: no second one, no skip each second
    assert [r["run_id"] for r in started(d.runs("long"))] == [first["run_id"]]
    status = subprocess.run([sys.executable, "-m", "torchcore", "status", "-c", d.path, "--json"],
                            cwd=d.dir, env=ENV, capture_output=True, text=True, timeout=30)
    if status.returncode == 0 and '"skipped"' in status.stdout:
        import json
        assert json.loads(status.stdout).get("stats", {}).get("skipped", 0) <= 1
    procs += _tree(d.proc.pid)
    assert d.stop() == 0
    assert _left_running(procs) == [], _left_running(procs)      # the adopted command too
    row = next(r for r in d.runs("long") if r["run_id"] == first["run_id"])
    assert row["ended"] is not None
    _check_ticks(d, figures, faults=1)


# ---- a burst -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_burst_s_prepared_runs_start_on_time(daemons, figures):
    """2,200 runs due in one second (2,000 can be prepared): the prepared ones get their go
    first, so they start at their second, not after the rest were forked."""
    count = 2200
    burst_at = (int(time.time()) // 10 + 2) * 10 + 10           # 20-30 s ahead, on a :x0 second
    when = time.gmtime(burst_at)
    schedule = f"{when.tm_sec} {when.tm_min} {when.tm_hour} * * *"
    d = daemons("tasks:\n" + "".join(
        f'  - {{name: b{i}, schedule: "{schedule}", command: "true"}}\n' for i in range(count)))
    d.start()
    procs = _tree(d.proc.pid)
    wait_for(lambda: time.time() > burst_at + 3 and
             len([r for r in d.runs() if r["ended"]]) >= count, 90, "the burst to end")
    assert d.proc.poll() is None
    assert d.stop() == 0
    rows = d.runs()
    ran = started(rows)
    keys = [(r["task"], r["scheduled"]) for r in ran]
    assert len(ran) == count and len(set(keys)) == count        # each once
    delays = sorted(r["started"] - burst_at for r in ran)
    # The prepared ones start at once, as fast as 2 busy cores exec them (measured: the first at
    # 0.12 s, 1,000 within 1 s; with go after the rest were forked: none within 1.2 s).  How many
    # are prepared in time depends on the machine's load, so only the first 500 are held to it.
    assert delays[99] < 0.6 and delays[499] < 2.0, [round(x, 2) for x in delays[::200]]
    assert _left_running(procs) == []
    figures.add(faults=1, runs=count, doubled=len(keys) - len(set(keys)))
