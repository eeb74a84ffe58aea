"""The gate (csrc/tc_gate.c): a prepared run's command waiting for its go byte."""

import os
import subprocess
import time

import pytest

from torchcore.spawn import GATE

pytestmark = pytest.mark.process


def start_gate(argv, wait_ms=5000, args=None):
    """Spawn the gate as the executor does; returns (process, go write end, status read end)."""
    go_r, go_w = os.pipe()
    status_r, status_w = os.pipe()
    argv_r, argv_w = os.pipe()
    proc = subprocess.Popen(   # the test process has no threads: preexec_fn is safe here
        args or [GATE, str(wait_ms)], executable=GATE, stdout=subprocess.PIPE, pass_fds=(3, 4, 5),
        preexec_fn=lambda: _place(go_r, status_w, argv_r))  # noqa: PLW1509
    for fd in (go_r, status_w, argv_r):
        os.close(fd)
    try:
        with open(argv_w, "wb") as words:
            words.write(b"".join(w.encode() + b"\0" for w in argv))
    except BrokenPipeError:
        pass            # a gate that refused its arguments left at once
    return proc, go_w, status_r


def _place(go_r, status_w, argv_r):
    for fd, target in ((go_r, 3), (status_w, 4), (argv_r, 5)):
        os.dup2(fd, target)


def status_of(status_r):
    data = b""
    while chunk := os.read(status_r, 256):
        data += chunk
    os.close(status_r)
    return data


def test_go_execs_the_command_and_reports_its_start():
    proc, go_w, status_r = start_gate(["sh", "-c", "echo started"])
    time.sleep(0.1)
    assert proc.poll() is None
    before = time.time()
    os.write(go_w, b"g")
    status = status_of(status_r)
    assert status.startswith(b"S") and status.endswith(b"\n") and status.count(b"\n") == 1
    assert before - 0.01 <= float(status[1:]) <= time.time()
    assert proc.communicate(timeout=10)[0] == b"started\n" and proc.returncode == 0
    os.close(go_w)


def test_end_of_file_on_the_go_pipe_cancels():
    proc, go_w, status_r = start_gate(["sh", "-c", "echo never"])
    os.close(go_w)
    assert status_of(status_r) == b"C\n"
    assert proc.communicate(timeout=10)[0] == b"" and proc.returncode == 0


def test_no_go_within_the_wait_cancels():
    started = time.monotonic()
    proc, go_w, status_r = start_gate(["sh", "-c", "echo never"], wait_ms=200)
    assert status_of(status_r) == b"C\n"
    assert proc.wait(10) == 0 and 0.15 <= time.monotonic() - started < 5
    os.close(go_w)


def test_a_gone_executor_cancels():
    proc, go_w, status_r = start_gate(["sh", "-c", "echo never"])
    os.close(status_r)          # the executor's end of the status pipe
    assert proc.wait(10) == 0 and proc.stdout.read() == b""
    os.close(go_w)


def test_an_exec_failure_is_reported_with_its_errno():
    proc, go_w, status_r = start_gate(["/nonexistent/tc-command"])
    os.write(go_w, b"g")
    status = status_of(status_r)
    assert status.startswith(b"S") and status.split(b"\n")[1] == b"E2"
    assert proc.wait(10) == 127
    os.close(go_w)


@pytest.mark.parametrize("args", [[GATE], [GATE, "x"], [GATE, "-5"], [GATE, "1", "2"]])
def test_bad_arguments_are_a_usage_error(args):
    proc, go_w, status_r = start_gate(["true"], args=args)
    assert proc.wait(10) == 2
    os.close(go_w)
    os.close(status_r)
