"""The run table: every run the supervisor follows, its lookups, its limits and its states.

A run is indexed several ways (by id, by its executor's pid, by task, prepared ones by task and
second, those followed by pid); keeping those in step by hand in many places is what this module
is for: every index changes here, and every labelled state change (``STARTING -> RUNNING`` ...)
is a method that asserts the state it starts from.  Runs move PREPARED -> STARTING -> RUNNING ->
STOPPING -> EXITED (states.py); a PREPARED run is not counted as running until it fires.
"""

import dataclasses

from torchcore.states import RunState


@dataclasses.dataclass
class Run:
    """One running executor, as the supervisor sees it."""

    run_id: int
    task: object                # the Task spec it was started with
    scheduled: int | None
    manual: bool
    executor_pid: int | None    # known once a launcher has forked it
    started: float
    state: str = RunState.STARTING
    pgid: int | None = None     # the command's process group, once the executor reports it
    report: object = None       # the executor's end report (wire.End), once read
    launcher: object = None     # the Launcher that forks it
    pending_signal: int | None = None   # a stop asked for before the executor existed
    orphaned: bool = False      # its launcher died: followed by pid until it ends
    adopted: bool = False       # started by a previous supervisor (killed): followed by pid too
    stop_reason: str | None = None  # why the supervisor stopped it: recorded as stopped, not failed
    killed: bool = False        # the supervisor sent SIGKILL to its command's group itself


_STARTED = (RunState.STARTING, RunState.RUNNING, RunState.STOPPING)


class RunTable:
    """The runs of this supervisor, started (counted against the limits) and prepared."""

    def __init__(self):
        self._runs = {}             # run id -> Run, started (STARTING, RUNNING, STOPPING)
        self._by_pid = {}           # executor pid -> run id
        self._by_task = {}          # name -> set of run ids
        self.followed = set()       # ids of runs followed by pid (orphaned or adopted)
        self.prepared = {}          # (name, second) -> Run forked ahead, waiting for go
        self.prepared_ids = {}      # run id -> Run, for prepared runs not (yet) fired

    # ---- lookups ----------------------------------------------------------------------------

    def __len__(self):
        """How many runs are started (what max_running counts)."""
        return len(self._runs)

    def __iter__(self):
        return iter(list(self._runs.values()))

    def get(self, run_id):
        return self._runs.get(run_id)

    def run_of_pid(self, pid):
        """The id of the run whose executor is ``pid``, or None."""
        return self._by_pid.get(pid)

    def count(self, name):
        return len(self._by_task.get(name, ()))

    def of_task(self, name):
        """The started runs of task ``name``."""
        return [self._runs[run_id] for run_id in self._by_task.get(name, ())]

    def oldest(self, name):
        return self._runs[min(self._by_task[name])]

    def started_by(self, launcher):
        return [run for run in self._runs.values() if run.launcher is launcher]

    def prepared_by(self, launcher):
        return [run for run in self.prepared_ids.values() if run.launcher is launcher]

    def limit_reason(self, task, max_running, own_max=True):
        """Why one more run of ``task`` may not start now, or None (``own_max`` False: the
        task's ``max`` is counted elsewhere, across the fleet for a `run: once` task)."""
        running = len(self._by_task.get(task.name, ()))
        if own_max and running >= task.max:
            return f"max {task.max} reached"
        if max_running is not None and len(self._runs) >= max_running:
            return f"max_running {max_running} reached"
        return None

    # ---- entering and leaving -------------------------------------------------------------

    def add(self, run):
        """A run started the ordinary way (STARTING; its executor not forked yet, or forked
        here: see ``forked``)."""
        assert run.state == RunState.STARTING, run.state
        self._runs[run.run_id] = run
        self._by_task.setdefault(run.task.name, set()).add(run.run_id)

    def adopt(self, run):
        """A run a previous supervisor started (RUNNING), followed by its executor's pid."""
        assert run.state == RunState.RUNNING and run.adopted, run.state
        self._runs[run.run_id] = run
        self._by_pid[run.executor_pid] = run.run_id
        self._by_task.setdefault(run.task.name, set()).add(run.run_id)
        self.followed.add(run.run_id)

    def follow(self, run):
        """Its launcher died: the run is followed by its executor's pid until it ends."""
        run.orphaned = True
        self.followed.add(run.run_id)

    def forget(self, run_id):
        """The run ended (or never was forked): out of every index; returns it, or None."""
        run = self._runs.pop(run_id, None)
        self.followed.discard(run_id)
        if run is not None:
            self._by_pid.pop(run.executor_pid, None)
            self._by_task.get(run.task.name, set()).discard(run_id)
        return run

    def forked(self, run, pid):
        """The executor of ``run`` exists now (STARTING or PREPARED, pid known); False for a
        prepared run (it is found by pid once it fires)."""
        run.executor_pid = pid
        if run.state == RunState.PREPARED:
            return False
        self._by_pid[pid] = run.run_id
        return True

    # ---- prepared runs ----------------------------------------------------------------------

    def add_prepared(self, run):
        assert run.state == RunState.PREPARED, run.state
        self.prepared[(run.task.name, run.scheduled)] = run
        self.prepared_ids[run.run_id] = run

    def take_prepared(self, name, second):
        """The run prepared for ``name`` at ``second``, off the look-ahead (still waiting for
        go or cancel), or None."""
        return self.prepared.pop((name, second), None)

    def leave_prepared(self, run_id):
        del self.prepared_ids[run_id]

    def cancelled(self, run):
        """A prepared run told to cancel: known by id until its executor's exit is seen."""
        assert run.state == RunState.PREPARED, run.state
        self.prepared_ids[run.run_id] = run

    def prepared_gone(self, run_id):
        """A prepared run's executor ended (never fired, or its launcher died): forgotten."""
        run = self.prepared_ids.pop(run_id)
        self.prepared.pop((run.task.name, run.scheduled), None)
        return run

    # ---- state changes ------------------------------------------------------------------------

    def fire(self, run, now):
        """A prepared run is due and allowed: PREPARED -> RUNNING when its command already
        waits at the gate (its group known), PREPARED -> STARTING otherwise."""
        assert run.state == RunState.PREPARED, run.state
        run.state = RunState.RUNNING if run.pgid else RunState.STARTING
        run.started = now
        self._runs[run.run_id] = run
        self._by_task.setdefault(run.task.name, set()).add(run.run_id)
        if run.executor_pid is not None:
            self._by_pid[run.executor_pid] = run.run_id

    @staticmethod
    def running(run):
        """Its executor reported the command's start (STARTING -> RUNNING); a report read late
        finds it RUNNING or STOPPING already."""
        assert run.state in _STARTED, run.state
        run.state = RunState.RUNNING

    @staticmethod
    def stopping(run):
        """A stop signal went to its executor: RUNNING -> STOPPING (other states stay)."""
        if run.state == RunState.RUNNING:
            run.state = RunState.STOPPING

    @staticmethod
    def exited(run):
        """Its executor has exited: STARTING, RUNNING or STOPPING -> EXITED."""
        assert run.state in _STARTED, run.state
        run.state = RunState.EXITED
