"""One run from spawn to its record, on real processes: limits that hold whatever the command
does with its pipes, a log that cannot stop a run, signals and credentials at their start."""

import grp
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from executor_harness import ExecutorRun
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.process

SH = "/bin/sh"


def group_members(pgid):
    """Live (non-zombie) processes of a process group: this test's own, never anyone else's."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            pass
    return found


def started_pgid(run):
    return next(r["pid"] for r in run.reports if r.get("e") in ("start", "gate"))


def cleanup(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- the run is over when its process group is empty, not when its pipes close ---------------

def test_a_command_that_redirects_its_output_is_stopped_at_its_timeout(tmp_path):
    run = ExecutorRun(tmp_path, [SH, "-c", f"exec >>{tmp_path}/out 2>&1; sleep 20"], timeout=3)
    end = run.wait(30)
    assert end["timed_out"] and end["signal"] == signal.SIGTERM
    assert 2.9 <= end["ended"] - end["started"] < 8, end
    assert not group_members(started_pgid(run))


@pytest.mark.parametrize("output", ["", " >/dev/null 2>&1"])
def test_background_processes_a_command_leaves_stay_under_its_timeout(tmp_path, output):
    run = ExecutorRun(tmp_path, [SH, "-c", f"for i in 1 2 3; do sleep 30{output} & done; exit 0"],
                      timeout=2, kill_grace=1)
    end = run.wait(30)
    pgid = started_pgid(run)
    try:
        assert end["exit_code"] == 0 and end["timed_out"], end
        assert 1.9 <= end["ended"] - end["started"] < 7, end
        assert not group_members(pgid)
    finally:
        cleanup(pgid)


def test_background_processes_a_command_leaves_stay_under_its_memory_limit(tmp_path):
    hog = f"{sys.executable} -c 'import time; b = bytearray(200 << 20); time.sleep(30)'"
    run = ExecutorRun(tmp_path, [SH, "-c", f"{hog} >/dev/null 2>&1 & exit 0"],
                      memory=80 << 20, kill_grace=1)
    end = run.wait(30)
    pgid = started_pgid(run)
    try:
        assert end["exit_code"] == 0 and "memory limit" in end["error"], end
        assert end["ended"] - end["started"] < 10, end
        assert not group_members(pgid)
    finally:
        cleanup(pgid)


def test_a_stop_request_ends_what_a_finished_command_left_in_its_group(tmp_path):
    """A shutdown does not wait for the timeout of a command's leftovers: they are stopped too,
    and the command's own result (exit 0) stands."""
    run = ExecutorRun(tmp_path, [SH, "-c", "sleep 30 >/dev/null 2>&1 & exit 0"], timeout=60,
                      kill_grace=1)
    time.sleep(1.5)
    run.proc.send_signal(signal.SIGTERM)
    end = run.wait(20)
    pgid = started_pgid(run)
    try:
        assert end is not None and end["exit_code"] == 0 and not end["stopped"], end
        assert not group_members(pgid)
    finally:
        cleanup(pgid)


def test_without_a_limit_what_a_command_leaves_running_keeps_running_as_under_cron(tmp_path):
    run = ExecutorRun(tmp_path, [SH, "-c", "sleep 30 >/dev/null 2>&1 & exit 0"])
    end = run.wait(30)
    pgid = started_pgid(run)
    try:
        assert end["exit_code"] == 0 and not end["timed_out"]
        assert end["ended"] - end["started"] < 3
        assert [p.name() for p in group_members(pgid)] == ["sleep"]
    finally:
        cleanup(pgid)


# -- the log never holds up a run -------------------------------------------------------------

def test_the_timeout_fires_and_the_run_ends_while_its_log_write_is_stuck(tmp_path):
    """The log is a FIFO nobody reads: a blocking write would hang the executor for ever."""
    logs = tmp_path / "logs"
    logs.mkdir()
    os.mkfifo(logs / "t.log")
    reader = os.open(logs / "t.log", os.O_RDONLY | os.O_NONBLOCK)   # present, never reading
    try:
        run = ExecutorRun(tmp_path, [SH, "-c", "yes | head -c 2000000; sleep 30"], timeout=2)
        end = run.wait(30)
    finally:
        os.close(reader)
    assert end is not None, "no end: the executor hung on its log"
    assert end["timed_out"] and end["ended"] - end["started"] < 8, end
    assert "its log lost" in end["log_problem"]


def test_a_run_whose_log_cannot_be_written_keeps_running_and_records_its_result(tmp_path):
    """A full disk (the log is /dev/full) and an executor stderr nobody reads: the run goes
    on, its output is drained, its own exit code is recorded, the loss is reported."""
    logs = tmp_path / "logs"
    logs.mkdir()
    os.symlink("/dev/full", logs / "t.log")
    run = ExecutorRun(tmp_path, [SH, "-c", "yes | head -c 1000000; echo done >&2; exit 3"],
                      stderr=subprocess.PIPE)
    run.proc.stderr.close()                 # the executor's warnings meet a broken pipe
    end = run.wait(30)
    assert end is not None and end["exit_code"] == 3 and end["error"] is None, end
    assert "its log lost" in end["log_problem"]


def test_a_nul_in_the_environment_is_a_failed_start_with_its_reason(tmp_path):
    run = ExecutorRun(tmp_path, ["/bin/true"], env=(("BAD", "a\0b"),))
    end = run.wait(30)
    assert end["exit_code"] == 126 and "null" in end["error"], end


# -- every signal at its default, none blocked, on every spawn path ---------------------------

_CANDIDATES = [signal.SIGALRM, signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP, signal.SIGPIPE,
               signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
               signal.SIGTERM, signal.SIGCHLD, signal.SIGWINCH, signal.SIGXFSZ, signal.SIGURG]
_GLIBC_INTERNAL = (1 << 31) | (1 << 32)      # signals 32 and 33, bits 31 and 32 of the masks
_PATHS = {"spawn": {}, "popen": {"cwd": "/"}, "gate": {"go": True}}


def _status_masks(text):
    return {name: int(mask, 16) for name, mask in re.findall(r"\| (SigIgn|SigBlk):\s*([0-9a-f]+)", text)}


@pytest.mark.slow
@settings(derandomize=True, max_examples=6, deadline=None)
@given(ignored=st.sets(st.sampled_from(_CANDIDATES), min_size=1),
       blocked=st.sets(st.sampled_from(_CANDIDATES)))
def test_every_spawn_path_starts_the_command_with_default_signals(tmp_path_factory, ignored,
                                                                 blocked):
    """The daemon started with signals ignored and blocked (nohup, a service manager)."""
    def started_like_that():
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)

    for path, fields in _PATHS.items():
        directory = tmp_path_factory.mktemp(path)
        run = ExecutorRun(directory, ["/bin/cat", "/proc/self/status"], preexec_fn=started_like_that,
                          **fields)
        end = run.wait(30)
        assert end is not None and end["exit_code"] == 0, (path, end)
        masks = _status_masks(run.log())
        if path == "spawn":     # glibc's posix_spawn leaves its own two (32, 33) ignored
            masks["SigIgn"] &= ~_GLIBC_INTERNAL
        assert masks == {"SigIgn": 0, "SigBlk": 0}, (path, masks)


# -- who the command runs as, and its environment ---------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users and groups needs root")


@needs_root
def test_group_without_user_runs_with_that_group_only(tmp_path):
    gid = grp.getgrnam("nogroup").gr_gid
    run = ExecutorRun(tmp_path, [SH, "-c", "echo ids $(id -u) $(id -g) $(id -G)"], group="nogroup")
    assert run.wait(30)["exit_code"] == 0
    assert f"out| ids 0 {gid} {gid}\n" in run.log()


@needs_root
@pytest.mark.parametrize("inherit", [False, True])
def test_user_tasks_get_cron_s_minimal_environment_unless_inherit_env(tmp_path, monkeypatch,
                                                                      inherit):
    monkeypatch.setenv("TC_TEST_SECRET", "hunter2")
    run = ExecutorRun(tmp_path, ["/usr/bin/env"], user="nobody", env=(("EXTRA", "1"),),
                      inherit_env=inherit)
    assert run.wait(30)["exit_code"] == 0
    env = dict(line.split("| ", 1)[1].split("=", 1) for line in run.log().splitlines()
               if " out| " in line)
    assert env["USER"] == env["LOGNAME"] == "nobody" and env["EXTRA"] == "1"
    assert env["SHELL"] == "/bin/sh"                     # as cron, not nobody's nologin
    if inherit:
        assert env["TC_TEST_SECRET"] == "hunter2"
    else:
        assert set(env) == {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "EXTRA"}
        assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"


def test_tasks_without_user_keep_the_daemon_s_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TC_TEST_KEPT", "yes")
    run = ExecutorRun(tmp_path, ["/usr/bin/env"])
    assert run.wait(30)["exit_code"] == 0
    assert "out| TC_TEST_KEPT=yes\n" in run.log()


@pytest.mark.parametrize("go", [False, True])
def test_a_last_line_without_a_newline_comes_before_run_ended(tmp_path, go):
    run = ExecutorRun(tmp_path, [SH, "-c", "printf 'line1\\npartial'; printf 'err-partial' >&2"],
                      go=go)
    assert run.wait(30)["exit_code"] == 0
    text = (tmp_path / "logs" / "t.log").read_text()
    streams = [line.split(" ", 3)[3] for line in text.splitlines()]
    assert streams[-1].startswith("sys| run ended"), streams
    assert {"out| line1", "out| partial", "err| err-partial"} <= set(streams[:-1]), streams
