"""Services: the supervisor's long-lived helper children (torchcore/services.py).

Real child processes running a small service module written by each test: started when the
task file asks for them, given the common arguments, restarted with a backoff when they exit,
told of reloads by SIGHUP, stopped (killed when they ignore SIGTERM), and gone when the
supervisor is gone.
"""

import os
import signal
import sys
import textwrap
import time
import types

import pytest

from torchcore import services


SERVICE = '''
import os, select, signal, sys, time
from torchcore import services

def wanted(taskfile, node, options):
    return os.path.exists(os.path.join(os.path.dirname(taskfile.path), "want-" + NAME))

def main():
    args = services.child_args(extra=lambda p: p.add_argument("--listen"))
    services.set_title(NAME)
    out = os.path.join(args.state_dir, NAME + ".log")
    def note(text):
        with open(out, "a") as f:
            f.write(text + "\\n")
    note("started %d %s %s %s" % (os.getpid(), args.node, args.taskfile, args.listen))
    signal.signal(signal.SIGHUP, lambda *a: note("hup"))
    if IGNORE_TERM:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            ready, _, _ = select.select([args.parent_fd], [], [], 1.0)
        except InterruptedError:
            continue
        if ready and services.parent_gone(args.parent_fd):
            note("parent gone")
            return

NAME = @NAME@
IGNORE_TERM = @IGNORE@
if __name__ == "__main__":
    main()
'''


NODE = types.SimpleNamespace(hostname="n")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def time(self):
        return self.now


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A directory on sys.path holding service modules, a task file's stand-in, a state dir."""
    modules = tmp_path / "mods"
    modules.mkdir()
    monkeypatch.syspath_prepend(str(modules))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(modules)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    state = tmp_path / "state"
    state.mkdir()
    path = str(tmp_path / "tasks.yaml")
    taskfile = types.SimpleNamespace(path=path, settings=types.SimpleNamespace(path=path))
    made = []

    def make(name, ignore_term=False, want=True, options=None):
        (modules / f"svc_{name}.py").write_text(
            SERVICE.replace("@NAME@", repr(name)).replace("@IGNORE@", repr(ignore_term)))
        if want:
            (tmp_path / f"want-{name}").write_text("")
        clock = Clock()
        registry = {name: services.Spec(name, f"svc_{name}")}
        svc = services.Services(clock, str(state), registry=registry, options=options)
        made.append(svc)
        return svc, clock

    yield types.SimpleNamespace(make=make, state=state, taskfile=taskfile, dir=tmp_path)
    for svc in made:
        svc.stop(grace=1.0)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def log_of(setup, name):
    path = setup.state / f"{name}.log"
    return path.read_text().splitlines() if path.exists() else []


def reap_all(svc):
    """What the supervisor's reap does: hand every exited child to Services."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        svc.exited(pid, status)


@pytest.mark.process
def test_wanted_service_starts_with_the_common_arguments_and_its_title(setup):
    svc, _ = setup.make("alpha", options={"alpha": ["--listen", "127.0.0.1:1"]})
    svc.apply(setup.taskfile, types.SimpleNamespace(hostname="node-1"))
    lines = wait_for(lambda: log_of(setup, "alpha"))
    pid = next(iter(svc)).pid
    assert lines[0] == f"started {pid} node-1 {setup.taskfile.path} 127.0.0.1:1"
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[0].startswith(b"torchcore: alpha")
    assert svc.describe()[0]["state"] == "running"


@pytest.mark.process
def test_a_service_is_given_the_task_files_absolute_path(setup, monkeypatch):
    """`torchcore start -c tasks.yaml` detaches into /: a relative path would name /tasks.yaml,
    and the notifier would wait forever for a task file that is not there."""
    monkeypatch.chdir(setup.dir)
    svc, _ = setup.make("gamma")
    taskfile = types.SimpleNamespace(path="tasks.yaml", settings=types.SimpleNamespace(
        path=setup.taskfile.path))
    svc.apply(taskfile, NODE)
    lines = wait_for(lambda: log_of(setup, "gamma"))
    assert lines[0].split()[3] == setup.taskfile.path


@pytest.mark.process
def test_unwanted_service_is_not_started_and_stops_when_no_longer_wanted(setup):
    svc, _ = setup.make("beta", want=False)
    svc.apply(setup.taskfile, NODE)
    assert list(svc) == []
    (setup.dir / "want-beta").write_text("")
    svc.apply(setup.taskfile, NODE, reloaded=True)
    proc = next(iter(svc)).proc
    wait_for(lambda: log_of(setup, "beta"))
    os.unlink(setup.dir / "want-beta")
    svc.apply(setup.taskfile, NODE, reloaded=True)
    assert list(svc) == []
    wait_for(lambda: (reap_all(svc), proc.returncode is not None or _gone(proc.pid))[1])   # reaped by
    assert proc.returncode is not None or _gone(proc.pid)          # the supervisor's loop, not waited on
    assert svc.retiring == []


@pytest.mark.process
def test_a_service_no_longer_wanted_never_holds_the_loop(setup):
    """A reload that turns off a service that is hung (stopped, ignoring SIGTERM) returns at
    once; the loop wakes at the grace's end, and ``tend`` kills it then; the reap collects it."""
    svc, clock = setup.make("eta", ignore_term=True)
    svc.apply(setup.taskfile, NODE)
    wait_for(lambda: log_of(setup, "eta"))
    service = next(iter(svc))
    os.kill(service.pid, signal.SIGSTOP)
    os.unlink(setup.dir / "want-eta")
    started = time.monotonic()
    svc.apply(setup.taskfile, NODE, reloaded=True)
    assert time.monotonic() - started < 0.5
    assert list(svc) == [] and svc.retiring == [service]
    assert svc.next_wake() == pytest.approx(clock.now + services.STOP_GRACE)
    svc.tend()
    reap_all(svc)
    assert svc.retiring == [service]            # not killed before the grace is over
    clock.now += services.STOP_GRACE
    svc.tend()
    wait_for(lambda: (reap_all(svc), service.proc.returncode is not None)[1])
    assert service.proc.returncode == -signal.SIGKILL and svc.retiring == []
    assert svc.next_wake() is None


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.process
def test_reload_is_told_by_sighup(setup):
    svc, _ = setup.make("gamma")
    svc.apply(setup.taskfile, NODE)
    wait_for(lambda: log_of(setup, "gamma"))
    svc.apply(setup.taskfile, NODE, reloaded=True)
    wait_for(lambda: "hup" in log_of(setup, "gamma"))


@pytest.mark.process
def test_exited_service_restarts_after_a_doubling_backoff(setup):
    svc, clock = setup.make("delta")
    svc.apply(setup.taskfile, NODE)
    for expected_backoff in (1.0, 2.0, 4.0):
        service = next(iter(svc))
        wait_for(lambda: log_of(setup, "delta"))
        os.kill(service.pid, signal.SIGKILL)
        wait_for(lambda: (reap_all(svc), service.proc is None)[1])
        assert service.last_exit == "killed by signal 9"
        assert svc.next_wake() == pytest.approx(clock.now + expected_backoff)
        svc.tend()
        assert service.proc is None             # not before its time
        clock.now += expected_backoff
        svc.tend()
        assert service.proc is not None
    assert service.restarts == 3


@pytest.mark.process
def test_backoff_resets_after_a_stable_run(setup):
    svc, clock = setup.make("eps")
    svc.apply(setup.taskfile, NODE)
    service = next(iter(svc))
    service.backoff = services.RESTART_MAX
    clock.now += services.STABLE_AFTER
    os.kill(service.pid, signal.SIGKILL)
    wait_for(lambda: (reap_all(svc), service.proc is None)[1])
    assert svc.next_wake() == pytest.approx(clock.now + services.RESTART_FIRST)


@pytest.mark.process
def test_stop_kills_a_service_that_ignores_sigterm(setup):
    svc, _ = setup.make("zeta", ignore_term=True)
    svc.apply(setup.taskfile, NODE)
    wait_for(lambda: log_of(setup, "zeta"))
    pid = next(iter(svc)).pid
    started = time.monotonic()
    svc.stop(grace=0.5)
    assert time.monotonic() - started < 5
    assert _gone(pid)
    assert svc.next_wake() is None


@pytest.mark.process
def test_service_exits_when_the_supervisor_is_gone(setup):
    """The parent pipe's EOF, as when the supervisor is killed with SIGKILL."""
    svc, _ = setup.make("eta")
    svc.apply(setup.taskfile, NODE)
    wait_for(lambda: log_of(setup, "eta"))
    service = next(iter(svc))
    os.close(service.parent_w)
    service.parent_w = None
    wait_for(lambda: "parent gone" in log_of(setup, "eta"))
    wait_for(lambda: _reaped_pid(service.pid))
    service.proc = None


def _reaped_pid(pid):
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


@pytest.mark.process
def test_a_service_that_cannot_start_is_retried_not_raised(setup, monkeypatch):
    svc, clock = setup.make("theta")
    monkeypatch.setattr(sys, "executable", str(setup.dir / "no-such-python"))
    svc.apply(setup.taskfile, NODE)
    service = next(iter(svc))
    assert service.proc is None and service.last_exit.startswith("cannot start")
    assert svc.next_wake() == pytest.approx(clock.now + 1.0)


@pytest.mark.process
def test_a_module_that_cannot_decide_is_not_started(setup, caplog):
    svc, _ = setup.make("iota")
    svc.registry["broken"] = services.Spec("broken", "svc_no_such_module")
    svc.apply(setup.taskfile, NODE)
    assert [s.spec.name for s in svc] == ["iota"]
    assert "service broken: cannot tell whether it is wanted" in caplog.text


class Recorder:
    """Stands in for Services: what the supervisor asked of it."""

    def __init__(self):
        self.calls = []

    def apply(self, taskfile, node, reloaded=False):
        self.calls.append(("apply", taskfile.digest, node.hostname, reloaded))

    def exited(self, pid, status):
        self.calls.append(("exited", pid))
        return pid == 4242

    def tend(self):
        pass

    def next_wake(self):
        return None

    def stop(self):
        self.calls.append(("stop",))

    def describe(self):
        return [{"name": "fake", "pid": 4242, "state": "running", "restarts": 0,
                 "last_exit": None}]


@pytest.mark.unit
def test_the_supervisor_starts_tells_reaps_and_stops_its_services(tmp_path):
    from supervisor_harness import Harness, rewrite, taskfile

    body = 'tasks:\n  - {name: a, schedule: "0 0 3 1 1 *", command: "true"}\n'
    sup = Harness(taskfile(tmp_path, body))
    sup.services = recorder = Recorder()
    sup.start()
    try:
        assert recorder.calls == [("apply", sup.taskfile.digest, "test-node", False)]
        rewrite(sup, body.replace("true", "false"))
        assert sup.reload("test")[0]
        assert recorder.calls[-1] == ("apply", sup.taskfile.digest, "test-node", True)
        rewrite(sup, "tasks: [")
        assert not sup.reload("test")[0]
        assert len([c for c in recorder.calls if c[0] == "apply"]) == 2   # a rejected one: none
        sup.system.exited.append((4242, 0))
        sup.reap()
        assert ("exited", 4242) in recorder.calls
        assert sup.replies.control_status({})["services"][0]["name"] == "fake"
    finally:
        sup.close()
    assert recorder.calls[-1] == ("stop",)
