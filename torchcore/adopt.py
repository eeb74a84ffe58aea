"""Taking over the runs a killed supervisor left behind, so none runs twice at once.

A new supervisor finds them among the records without an end: a run whose executor still
lives (told by its process title) is adopted, a run like any other followed by its executor's
pid (see Supervisor.adopt_previous_executors); one whose executor is gone is closed as lost.
"""

import dataclasses
import logging

from torchcore import records
from torchcore.runs import Run
from torchcore.states import RunState

log = logging.getLogger("torchcore")


@dataclasses.dataclass(frozen=True)
class Retired:
    """The task of an adopted run that the task file no longer has (name and kind only)."""

    name: str
    type: str


def survivors(db, system, tasks, clock):
    """The unfinished runs whose executor still lives, as adopted Runs (RUNNING); the records
    of those whose executor is gone are closed as lost."""
    found = []
    for record in db.unfinished():
        pid = system.executor_of(record.pid, record.task, record.run_id)
        if pid:
            found.append(_adopted(record, pid, system, tasks, clock))
        else:
            db.add(record.lost(clock.time(), "its supervisor and executor stopped before "
                                             "recording an end"))
    return found


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
    """An adopted run ended: its executor wrote its record, or it is closed as lost here."""
    db.flush()
    try:
        record = next((r for r in db.unfinished() if r.run_id == run.run_id), None)
    except records.RecordsError:
        record = None
    if record is not None:
        db.add(record.lost(now, "its executor ended without recording an end"))
    log.info("%s run %d (adopted) ended%s", run.task.name, run.run_id,
             ": lost" if record is not None else "")
