"""The supervisor on a fake clock, its children make-believe: shared by the supervisor-level tests.

The supervisor makes its calls into the system (fork, kill, waitpid, launchers, telling a live
executor) through one object, as supervisor's DummyOptions; ``FakeSystem`` is that object with
fake pids, recorded signals and fake launchers.  ``make`` (tests/conftest.py) builds a Harness
from a task file body and starts it; ``second()`` ticks the fake clock one second on, ``end()``
ends a run the way a real one ends: its report on the report pipe, its exit seen by waitpid.
"""

import os
import socket

from torchcore import config, wire
from torchcore.clock import FakeClock
from torchcore.node import Node
from torchcore.supervisor import Supervisor
from torchcore.system import System

T0 = 1_767_225_600          # 2026-01-01T00:00:00Z, a multiple of 60


class FakeSystem(System):
    """Children make-believe: forks return fake pids, signals are recorded, launchers are fakes."""

    loads_in_child = False      # a reload loads the file here, at once (the tests look right after)

    def __init__(self, wall, launchers=0, cores=1):
        self.clock = FakeClock(wall=wall)
        self.cores = cores
        self.launcher_count = launchers
        self.forked = []            # (name, scheduled, manual) of each executor forked here
        self.killed = []            # (pid, signum) of each signal sent
        self.fork_error = None      # raised by the next forks, while set
        self.exited = []            # (pid, status) for waitpid to return
        self.launched = []          # the FakeLaunchers started
        self.submitted = []         # (job, wall time) of each job handed to a launcher
        self.alive = True           # what is_executor says of every pid
        self.group = None           # what command_group says of every pid
        self.found = {}             # run id -> pid: executors found by their title and mark
        self.strays = {}            # run id -> procscan.Proc: this daemon's executors of other runs
        self.title = None           # the process title the supervisor set
        self._next_pid = 100000

    def fork_executor(self, job, report_w):
        if self.fork_error:
            raise self.fork_error
        self._next_pid += 1
        self.forked.append((job.name, job.scheduled, job.manual))
        return self._next_pid

    def kill(self, pid, signum):
        self.killed.append((pid, signum))

    def waitpid(self):
        return self.exited.pop(0) if self.exited else (0, 0)

    def start_launcher(self, report_w, stderr):
        launcher = FakeLauncher(self)
        self.launched.append(launcher)
        return launcher

    def set_title(self, title):
        self.title = title

    def is_executor(self, pid, task, run_id):
        return self.alive

    def command_group(self, executor_pid):
        return self.group

    def executors_of(self, records, strays=False):
        alive = {r.run_id: r.pid for r in records if r.pid and self.alive}
        return {**alive, **{run_id: pid for run_id, pid in self.found.items()
                            if run_id in {r.run_id for r in records}}}, \
            (dict(self.strays) if strays else {})


class FakeLauncher:
    """A launcher that takes jobs and is told go and cancel, and never answers."""

    pending, dead = b"", False

    def __init__(self, system=None):
        self.system = system
        self.sock, self._peer = socket.socketpair()
        self.pid = 0
        self.proc = self
        self.runs = 0
        self.told = []

    def submit(self, job):
        self.runs += 1
        self.system.submitted.append((job, self.system.clock.time()))

    def go(self, run_ids):
        self.told.append(("go", list(run_ids)))

    def cancel(self, run_ids):
        self.told.append(("cancel", list(run_ids)))

    def answers(self):
        return []

    def flush(self):
        return True

    def close(self):
        self.sock.close()
        self._peer.close()

    def wait(self, timeout=None):
        return 0


class Harness(Supervisor):
    """A supervisor on a FakeSystem, with helpers that move the fake clock and end runs."""

    def __init__(self, taskfile, wall=T0 - 1 + 0.5, launchers=0, cores=1, **kw):
        super().__init__(taskfile, Node.detect(["10.0.0.5"], hostname="test-node"),
                         system=FakeSystem(wall, launchers, cores), **kw)

    def second(self, n=1):
        for _ in range(n):
            self.clock.advance(1)
            self.tick(int(self.clock.time()))

    def end(self, name, lived=5.0, exit_code=0):
        """Pretend the oldest run of ``name`` ended after ``lived`` seconds."""
        run = self.table.oldest(name)
        self.report(wire.End(run=run.run_id, exit_code=exit_code, started=run.started,
                             ended=run.started + lived))
        self.system.exited.append((run.executor_pid, 0))
        self.reap()

    def report(self, message):
        """An executor's report (a wire message), as it arrives on the report pipe."""
        os.write(self.report_w, wire.encode(message))
        self.read_reports()


def taskfile(directory, body):
    """The task file ``body`` under the common settings, written in ``directory`` and loaded."""
    path = directory / "tasks.yaml"
    path.write_text("settings:\n  timezone: UTC\n  state_dir: state\n" + body)
    return config.load(str(path))


def build(directory, body, **kw):
    """A Harness on the task file ``body``, started (its planner at T0 - 1); close it after."""
    sup = Harness(taskfile(directory, body), **kw)
    sup.start()
    return sup


def rewrite(sup, body):
    with open(sup.settings.path, "w") as handle:
        handle.write("settings:\n  timezone: UTC\n  state_dir: state\n" + body)
