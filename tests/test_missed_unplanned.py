"""Seconds no tick planned are recorded as missed: those due while the supervisor was stopping
(after begin_shutdown the loop no longer ticks) and those due while it was not running (the
last planned second is kept in the records database's meta table).  On the fake clock."""

import time

from supervisor_harness import T0, build

from torchcore import ledger, records
from torchcore.ledger import PLANNED

BODY = """  shutdown_grace: 30s
tasks:
  - {name: every, schedule: "* * * * * *", command: "sleep 100"}
  - {name: boot, schedule: "@reboot", command: "true"}
  - {name: serve, type: daemon, command: "sleep 100"}
"""


def misses(tmp_path):
    with records.Records(records.db_path(str(tmp_path / "state"))) as db:
        return [r for r in db.query(limit=None) if r.missed]


def stop(sup, after):
    """A shutdown whose last run ends ``after`` seconds on; the supervisor is then closed."""
    sup.begin_shutdown("test")
    sup.clock.advance(after)
    for run in list(sup.table):
        sup.system.exited.append((run.executor_pid, 0))
    sup.reap()
    sup.drive_shutdown()
    sup.close()


def test_seconds_due_while_stopping_are_missed_once_stopped(tmp_path):
    sup = build(tmp_path, "tasks:\n  - {name: every, schedule: '* * * * * *', command: 'x'}\n")
    sup.second()                    # T0: started, then a shutdown waits 5 s for it
    sup.begin_shutdown("test")
    sup.clock.advance(5)
    sup.drive_shutdown()            # still running: nothing recorded yet
    sup.records.flush()
    assert misses(tmp_path) == []
    sup.system.exited.append((next(iter(sup.table)).executor_pid, 0))
    sup.reap()
    sup.drive_shutdown()
    sup.drive_shutdown()            # once
    sup.close()
    [miss] = misses(tmp_path)
    assert (miss.task, miss.scheduled) == ("every", T0 + 1)
    assert miss.skipped == "missed 5 run(s) while torchcore was stopping, from this second on"
    assert miss.describe().startswith("skipped: missed 5 run(s)")
    assert sup.stats.missed == 5


def test_seconds_while_down_are_missed_at_the_next_start_one_record_per_task(tmp_path):
    sup = build(tmp_path, BODY)
    assert misses(tmp_path) == []   # a first start records nothing
    sup.second(3)
    stop(sup, 0)
    assert misses(tmp_path) == []
    sup = build(tmp_path, BODY, wall=T0 + 2 + 60.5)     # down for 60 s
    sup.close()
    [miss] = misses(tmp_path)       # not the @reboot task nor the daemon
    assert (miss.task, miss.scheduled) == ("every", T0 + 3)
    assert miss.skipped == "missed 60 run(s) while torchcore was not running, from this second on"
    again = build(tmp_path, BODY, wall=T0 + 2 + 60.5)   # started again at once: nothing more
    again.close()
    assert len(misses(tmp_path)) == 1


def test_the_last_planned_second_is_written_with_the_records_not_on_its_own(tmp_path):
    sup = build(tmp_path, "tasks:\n  - {name: h, schedule: '0 30 * * * *', command: 'x'}\n")
    sup.housekeeping()
    sup.clock.advance(10)
    sup.tick(int(sup.clock.time()))
    sup.housekeeping()              # nothing to write: no commit for the second alone
    assert sup.records.recall(PLANNED) is None
    sup.clock.advance(1791)
    sup.tick(int(sup.clock.time()))     # a run starts: written, the second with it
    sup.housekeeping()
    assert sup.records.recall(PLANNED) == str(T0 + 1800)
    sup.records.flush()
    sup.records._conn.close()           # as if killed: no close, no stop recorded
    sup.records._conn = None
    sup.close()
    sup = build(tmp_path, "tasks:\n  - {name: h, schedule: '0 30 * * * *', command: 'x'}\n",
                wall=T0 + 5 * 3600 + 0.5)
    sup.close()
    [miss] = misses(tmp_path)
    assert (miss.scheduled, miss.skipped) == (
        T0 + 5400, "missed 4 run(s) while torchcore was not running, from this second on")


def test_a_year_down_finishes_fast_and_says_when_the_count_is_a_lower_bound(tmp_path):
    body = """tasks:
  - {name: daily, schedule: "0 30 3 * * *", command: "x"}
  - {name: hourly, schedule: "0 0 * * * *", command: "x"}
"""
    stop(build(tmp_path, body), 0)
    began = time.monotonic()
    build(tmp_path, body, wall=T0 - 1 + 365 * 86400 + 0.5).close()
    assert time.monotonic() - began < 5
    found = {m.task: m for m in misses(tmp_path)}
    assert found["daily"].skipped.startswith("missed 365 run(s) ")
    assert found["daily"].scheduled == T0 + 3 * 3600 + 1800
    assert found["hourly"].skipped.startswith(f"missed {365 * 24} run(s) ")
    every = tmp_path / "every"
    every.mkdir()
    body = "tasks:\n  - {name: every, schedule: '* * * * * *', command: 'x'}\n"
    stop(build(every, body), 0)
    began = time.monotonic()
    build(every, body, wall=T0 - 1 + 365 * 86400 + 0.5).close()
    assert time.monotonic() - began < 5
    [miss] = misses(every)
    assert miss.scheduled == T0
    assert miss.skipped == (f"missed at least {ledger.UNPLANNED_BUSY} run(s) while torchcore "
                            "was not running, from this second on")


def test_a_run_once_task_is_not_missed_by_a_node_that_was_down():
    """The other nodes claimed and ran its seconds: a node's restart records no miss of a
    `run: once` task (nor a missed event), only of the tasks that run on every node."""

    class Planner:
        def due_between(self, after, upto, max_busy):
            return {"report": [after + 1, 5], "every": [after + 1, 5]}, True

    class Records:
        def __init__(self):
            self.added, self.next_id = [], 0

        def allocate_run_id(self):
            self.next_id += 1
            return self.next_id

        def add(self, record):
            self.added.append(record)

    class Clock:
        def monotonic(self):
            return 0.0

    book = ledger.Ledger("web-3", Clock())
    book.records = Records()
    book.unplanned(Planner(), T0, T0 + 5, "while torchcore was not running", once={"report"})
    assert [r.task for r in book.records.added] == ["every"]
    assert book.stats.missed == 5
