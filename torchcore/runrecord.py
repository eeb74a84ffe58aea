"""A run record: one run of a task, or one skipped or missed due time, as records.py stores it.

Its constructors (``RunRecord.of_start``, ``of_end``, ``of_skip`` ...) are the one way each kind
of record is made (by the ledger, adopt.py, and ``python -m torchcore.records`` for an executor
whose supervisor is gone); how an ended run ended is its outcome.RunResult.
"""

import dataclasses

from torchcore.outcome import RunResult

LOST = "lost: "     # the start of a lost verdict's error (recordsql.py ranks it below a real end)


@dataclasses.dataclass
class RunRecord:
    """One run of a task (or one skipped or missed due time), as stored."""

    run_id: int
    task: str
    node: str
    scheduled: int | None          # epoch second it was due for (None: manual or daemon start)
    started: float | None = None   # epoch seconds
    ended: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    skipped: str | None = None     # reason, when the run was not started
    missed: bool = False           # due but beyond misfire_grace (or lost in a stall)
    manual: bool = False
    pid: int | None = None
    peak_rss: int | None = None
    error: str | None = None       # why it failed without an exit code (or beside it)
    stopped: str | None = None     # why a planned stop ended it (then it did not fail)

    @property
    def duration(self):
        """Seconds from start to end, or None while running or when it never ran."""
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started

    @property
    def finished(self):
        """An ended run (not one still running, nor a skipped or missed due time)."""
        return self.ended is not None and self.skipped is None and not self.missed

    # ---- the records of a run, a skip, a miss (named of_*: the fields take the plain words) ----

    @classmethod
    def of_start(cls, run_id, task, node, scheduled, started, manual, pid):
        """A run started (no end yet): ``pid`` is its command's once known, else its executor's."""
        return cls(run_id, task, node, scheduled, started, manual=manual, pid=pid)

    @classmethod
    def of_end(cls, run_id, task, node, scheduled, manual, pid, result):
        """A run ended, with its outcome.RunResult (which says when it started and ended)."""
        return cls(run_id, task, node, scheduled, result.started, result.ended, result.exit_code,
                   result.signal, bool(result.timed_out), manual=manual, pid=pid,
                   peak_rss=result.peak_rss, error=result.error, stopped=result.stopped)

    @classmethod
    def of_refusal(cls, run_id, task, node, scheduled, manual, now):
        """A run that could not be handed over: failed at once with exit 126, as a command that
        cannot start (the reason is in the daemon's log)."""
        return cls(run_id, task, node, scheduled, now, now, 126, manual=manual)

    @classmethod
    def of_failed_fork(cls, run_id, task, node, scheduled, manual, error):
        """A run whose executor could not be forked: not a start after all (it is retried)."""
        return cls(run_id, task, node, scheduled, manual=manual, skipped=f"fork failed: {error}")

    @classmethod
    def of_skip(cls, run_id, task, node, scheduled, reason, manual):
        """A due run not started: a limit said no (``reason``)."""
        return cls(run_id, task, node, scheduled, skipped=reason, manual=manual)

    @classmethod
    def of_miss(cls, run_id, task, node, scheduled, count, why="", at_least=False):
        """``count`` due runs missed, the latest due at ``scheduled`` (one record for them); or,
        with ``why`` (seconds no tick planned: "while torchcore was down"), the first."""
        words = f"missed {'at least ' if at_least else ''}{count} run(s)"
        if why:
            words += f" {why}, from this second on"
        return cls(run_id, task, node, scheduled, missed=True, skipped=words)

    def lost(self, now, why):
        """This unfinished run closed as lost at ``now`` (a copy)."""
        return dataclasses.replace(self, ended=now, error=LOST + why)

    # ---- reading one --------------------------------------------------------------------------

    @property
    def result(self):
        """How it ended, as an outcome.RunResult (of an ended run)."""
        return RunResult(exit_code=self.exit_code, signal=self.signal, timed_out=self.timed_out,
                         error=self.error, stopped=self.stopped, started=self.started,
                         ended=self.ended, peak_rss=self.peak_rss)

    @property
    def failed(self):
        """RunResult.failed of an ended run; skips, misses and running runs are not failures."""
        return self.finished and self.result.failed

    def describe(self):
        """RunResult.describe() of an ended run, or what it is: skipped, missed, running."""
        if self.skipped is not None:
            return f"skipped: {self.skipped}"
        if self.missed:
            return "missed"
        if self.ended is None:
            return "running" if self.pid is None else f"running (pid {self.pid})"
        return self.result.describe()

    def as_json(self, iso):
        """The JSON object of ``history --json`` (local and fleet alike); ``iso(epoch, timespec)``
        writes a time (None for None): the fleet's also clamps years beyond 1-9999."""
        return {
            "task": self.task, "run_id": self.run_id, "node": self.node,
            "scheduled": iso(self.scheduled, "seconds"),
            "started": iso(self.started, "milliseconds"), "ended": iso(self.ended, "milliseconds"),
            "exit_code": self.exit_code, "signal": self.signal, "timed_out": self.timed_out,
            "skipped": self.skipped is not None, "skip_reason": self.skipped, "missed": self.missed,
            "duration": None if self.duration is None else round(self.duration, 3),
            "manual": self.manual, "pid": self.pid, "peak_rss": self.peak_rss,
            "error": self.error, "stopped": self.stopped, "failed": self.failed,
        }
