"""Daemonizer: a real launcher process, a real daemon, the verdict between them."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from torchcore.daemonize import parse_messages
from torchcore.pidfile import pid_alive_and_locked

pytestmark = pytest.mark.process

# The program under test: `python -c DAEMON MODE WORKDIR TIMEOUT`.
DAEMON = textwrap.dedent("""
    import json, os, signal, sys, time
    # ^C raises KeyboardInterrupt even when the test runs where SIGINT is ignored (a shell's
    # background job): a process started with SIGINT ignored would never see the test's signal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from torchcore.daemonize import Daemonizer
    from torchcore.errors import DaemonError
    from torchcore.pidfile import Pidfile

    mode, work, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    launcher = Daemonizer(ready_timeout=timeout, started_message="started pid {pid}")
    if not launcher.detach():
        raise SystemExit("detach returned False")

    def facts():
        return {"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
                "cwd": os.getcwd(), "umask": os.umask(0o022),
                "fds": [os.readlink(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)]}

    def wait_for_stop():
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(work, "stop")) and time.monotonic() < deadline:
            time.sleep(0.02)

    if mode in ("ok", "busy"):
        try:
            pidfile = Pidfile(os.path.join(work, "tc.pid")).acquire()
        except DaemonError as exc:
            launcher.failed(str(exc))
            sys.exit(1)
        before = facts()
        launcher.ready()
        after = facts()
        with open(os.path.join(work, "facts.tmp"), "w") as out:
            json.dump({"before": before, "after": after}, out)
        os.rename(os.path.join(work, "facts.tmp"), os.path.join(work, "facts.json"))
        wait_for_stop()
        pidfile.release()
    elif mode == "fail":
        print("warning: tasks.yaml is group-writable", file=sys.stderr, flush=True)
        launcher.failed("cannot read tasks.yaml: permission denied")
        sys.exit(1)
    elif mode == "die":
        raise RuntimeError("crashed while starting")
    elif mode == "exit":
        os._exit(7)
    elif mode == "hang":
        open(os.path.join(work, "hanging"), "w").close()
        wait_for_stop()     # until the test ends: never before the launcher's own verdict
""")


def launch(work, mode, timeout=10.0):
    return subprocess.run([sys.executable, "-c", DAEMON, mode, str(work), str(timeout)],
                          capture_output=True, text=True, timeout=30)


def wait_for(path, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture
def work(tmp_path):
    yield tmp_path
    (tmp_path / "stop").touch()  # every daemon left waiting exits


def test_ready_exits_zero_with_the_daemon_holding_the_pidfile(work):
    result = launch(work, "ok")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    daemon_pid = int(result.stdout.split()[-1])
    assert result.stdout == f"started pid {daemon_pid}\n"
    assert pid_alive_and_locked(work / "tc.pid") == daemon_pid
    (work / "stop").touch()
    deadline = time.monotonic() + 10
    while (work / "tc.pid").exists():
        assert time.monotonic() < deadline, "daemon did not release its pidfile"
        time.sleep(0.02)


def test_daemon_is_detached(work):
    assert launch(work, "ok").returncode == 0
    wait_for(work / "facts.json")
    facts = json.loads((work / "facts.json").read_text())
    before, after = facts["before"], facts["after"]
    assert before["sid"] != os.getsid(0)  # a new session...
    assert before["pid"] != before["sid"]  # ...whose leader is gone: no terminal can attach
    assert before["cwd"] == "/"
    assert before["umask"] == 0o022
    assert before["fds"][:2] == ["/dev/null", "/dev/null"]
    assert before["fds"][2].startswith("pipe:")  # stderr reaches the launcher until ready
    assert after["fds"] == ["/dev/null"] * 3


def test_failure_text_propagates_with_nonzero_status(work):
    result = launch(work, "fail")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "warning: tasks.yaml is group-writable",
        "torchcore: cannot read tasks.yaml: permission denied"]


def test_pidfile_held_elsewhere_fails_start_with_its_pid(work):
    first = launch(work, "ok")
    assert first.returncode == 0
    running = int(first.stdout.split()[-1])
    second = launch(work, "busy")
    assert second.returncode == 1
    assert f"torchcore is already running (pid {running}, pidfile {work / 'tc.pid'})" \
        in second.stderr
    assert pid_alive_and_locked(work / "tc.pid") == running


def test_crash_before_verdict_reports_its_output(work):
    result = launch(work, "die")
    assert result.returncode == 1
    assert "RuntimeError: crashed while starting" in result.stderr
    assert "exited before it was ready" in result.stderr.splitlines()[-1]


def test_silent_exit_before_verdict_is_an_error(work):
    result = launch(work, "exit")
    assert result.returncode == 1
    assert result.stderr.startswith("torchcore: the daemon (pid ")
    assert "exited before it was ready" in result.stderr


def test_no_verdict_within_timeout_is_an_error(work):
    started = time.monotonic()
    result = launch(work, "hang", timeout=0.5)
    assert time.monotonic() - started < 3.5  # did not wait for the hanging daemon
    assert result.returncode == 1
    assert "did not report ready within the timeout" in result.stderr


def test_parse_messages_frames_and_text():
    verdict = parse_messages(b"warn\n\0PID 42\0more\0FAIL no way\0")
    assert (verdict.kind, verdict.pid, verdict.message) == ("FAIL", 42, "no way")
    assert verdict.output == "warn\nmore"
    assert parse_messages(b"\0PID 42\0\0OK").kind == "PENDING"  # unterminated frame
    assert parse_messages(b"\0PID 42\0\0OK\0").kind == "OK"


def test_signal_to_launcher_does_not_leave_it_in_caller_code(work):
    proc = subprocess.Popen([sys.executable, "-c", DAEMON, "hang", str(work), "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(work / "hanging")  # the launcher is waiting for a verdict
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)           # the launcher answers the signal; the daemon still hangs,
    (work / "stop").touch()         # holding the start-up pipe until it is let go
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "detach returned False" not in err
    assert "interrupted" in err
