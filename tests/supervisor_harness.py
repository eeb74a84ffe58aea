"""The supervisor on a fake clock, its children make-believe: shared by the supervisor-level tests.

``make`` (tests/conftest.py) builds a Harness from a task file body: fork returns fake pids, kill
is recorded, and ``second()`` ticks the fake clock one second on.
"""

from torchcore import config
from torchcore.clock import FakeClock
from torchcore.node import Node
from torchcore.supervisor import Supervisor

T0 = 1_767_225_600          # 2026-01-01T00:00:00Z, a multiple of 60


class Harness(Supervisor):
    """A supervisor whose children are make-believe: fork returns fake pids, kill is recorded."""

    def __init__(self, taskfile, **kw):
        super().__init__(taskfile, Node.detect(["10.0.0.5"], hostname="test-node"),
                         clock=FakeClock(wall=T0 - 1 + 0.5), **kw)
        self.forked = []
        self.killed = []
        self.fork_error = None
        self._next_pid = 100000

    def fork(self, job):
        if self.fork_error:
            raise self.fork_error
        self._next_pid += 1
        self.forked.append((job.name, job.scheduled, job.manual))
        return self._next_pid

    def kill(self, pid, signum):
        self.killed.append((pid, signum))

    def reap(self):
        pass

    def second(self, n=1):
        for _ in range(n):
            self.clock.advance(1)
            self.tick(int(self.clock.time()))

    def end(self, name, lived=5.0, exit_code=0):
        """Pretend the oldest run of ``name`` ended after ``lived`` seconds."""
        run = self.runs[min(self.by_task[name])]
        run.result = {"exit_code": exit_code, "signal": None, "timed_out": False,
                      "peak_rss": None, "started": run.started, "ended": run.started + lived}
        self._executor_exited(run.run_id, 0)


def rewrite(sup, body):
    with open(sup.settings.path, "w") as handle:
        handle.write("settings:\n  timezone: UTC\n  state_dir: state\n" + body)


class FakeLauncher:
    runs, pending = 0, b""

    def __init__(self):
        self.told = []

    def go(self, run_ids):
        self.told.append(("go", list(run_ids)))

    def cancel(self, run_ids):
        self.told.append(("cancel", list(run_ids)))


def build(directory, body, **kw):
    """A Harness on a task file with ``body`` under the common settings, opened, its tasks applied
    and its planner at T0 - 1 (close it with ``_close``)."""
    path = directory / "tasks.yaml"
    path.write_text("settings:\n  timezone: UTC\n  state_dir: state\n" + body)
    sup = Harness(config.load(str(path)), **kw)
    sup._open()
    sup._apply(sup.taskfile, first=True)
    sup.planner.start(T0 - 1)
    return sup
