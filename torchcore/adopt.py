"""Taking over the runs a killed supervisor left behind, so none runs twice at once.

A new supervisor finds them among the records without an end: a run whose executor still
lives is adopted, a run like any other followed by its executor's pid (see take_over); one
whose executor is gone is closed as lost.  The executor is looked for at the pid on record,
and, when there is none (the supervisor was killed before its launcher answered with the pid)
or it is another process's now, by its title and its daemon's mark (procscan.py); so is one
whose run has no record at all (its start was still buffered), after a supervisor was killed.
"""

import dataclasses
import logging
import signal

from torchcore import procscan, records
from torchcore.outcome import RunResult
from torchcore.runrecord import RunRecord
from torchcore.runs import Run
from torchcore.states import RunState

log = logging.getLogger("torchcore")


@dataclasses.dataclass(frozen=True)
class Retired:
    """The task of an adopted run that the task file no longer has (name and kind only)."""

    name: str
    type: str


def take_over(db, system, tasks, clock, table, signal_run, node=""):
    """Take over the runs a killed supervisor left behind, so none runs twice at once.

    An adopted run is a run like any other, followed by its executor's pid: it counts
    against `max` and `max_running`, is stopped at shutdown and when a reload retires
    its daemon task, and its executor still enforces its timeout.  Its executor records
    its own end; runs whose executor is gone without a record are closed as lost.
    ``signal_run(run, signum)`` stops an instance whose daemon task is gone; ``node`` names
    this node in the start record of a run found without one (see survivors).
    """
    for run in survivors(db, system, tasks, clock, node):
        table.adopt(run)
        log.warning("run %d of %s (pid %d) was started by a previous supervisor and still "
                    "runs: it counts against max (adopted, stopped like any other run)",
                    run.run_id, run.task.name, run.executor_pid)
        current = tasks.get(run.task.name)
        if is_daemon_instance(run) and (current is None or current.type != "daemon"):
            signal_run(run, signal.SIGTERM)       # its daemon task is gone


def survivors(db, system, tasks, clock, node=""):
    """The unfinished runs whose executor still lives, as adopted Runs (RUNNING); the records
    of those whose executor is gone are closed as lost.

    When run ids were handed out and not given back (a supervisor killed), this daemon's
    executors of runs with no record at all are adopted too: killed before its buffered start
    record was written, a supervisor leaves such runs.  Each gets its start record now (its
    executor's start time; a daemon task's instance, or for another task the second nearest
    its executor's start as its scheduled one), which its executor's own end record corrects."""
    found = []
    unfinished = db.unfinished()
    strays = db.ids_not_given_back()
    alive, others = system.executors_of(unfinished, strays) if unfinished or strays else ({}, {})
    recorded = db.recorded(others)
    for run_id, proc in sorted(others.items()):
        if run_id not in recorded:          # else its end is on record: it is on its way out
            record = _unrecorded(run_id, proc, tasks, node)
            db.add(record)
            unfinished.append(record)
            alive[run_id] = proc.pid
    if others:
        db.flush()
    for record in unfinished:
        pid = alive.get(record.run_id)
        if pid:
            found.append(_adopted(record, pid, system, tasks, clock))
        else:
            db.add(record.lost(clock.time(), "its supervisor and executor stopped before "
                                             "recording an end"))
    return found


def _unrecorded(run_id, proc, tasks, node):
    """The start record of a run whose executor was found without any record of it."""
    name = procscan.parse_title(proc.title)[0]
    task = tasks.get(name)
    daemon = task is not None and task.type == "daemon"
    return RunRecord.of_start(run_id, name, node, None if daemon else round(proc.created),
                              proc.created, False, proc.pid)


def is_daemon_instance(run):
    """A run (or its record) with no scheduled second, not started by hand: a daemon instance."""
    return run.scheduled is None and not run.manual


def _adopted(record, executor_pid, system, tasks, clock):
    kind = "daemon" if is_daemon_instance(record) else "common"
    task = tasks.get(record.task) or Retired(record.task, kind)
    return Run(record.run_id, task, record.scheduled, record.manual, executor_pid,
               record.started or clock.time(), state=RunState.RUNNING,
               pgid=system.command_group(executor_pid), adopted=True)


def close(db, run, now):
    """An adopted run ended: its executor wrote its record, or it is closed as lost here.
    Returns the result a daemon task's slot is told (its exit unknown)."""
    db.flush()
    try:
        record = next((r for r in db.unfinished() if r.run_id == run.run_id), None)
    except records.RecordsError:
        record = None
    if record is not None:
        db.add(record.lost(now, "its executor ended without recording an end"))
    log.info("%s run %d (adopted) ended%s", run.task.name, run.run_id,
             ": lost" if record is not None else "")
    return RunResult(started=run.started, ended=now)
