"""Faults on the supervisor's fake clock: daylight saving, fork failures, a locked database.

The Harness (tests/supervisor_harness.py) runs the real supervisor's tick, limits and records with
make-believe children, so hours of wall time take a fraction of a second.
"""

import errno
import sqlite3
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from supervisor_harness import T0

BERLIN = ZoneInfo("Europe/Berlin")
DST = """tasks:
  - {name: nightly, schedule: "0 30 2 * * *", command: "true", timezone: Europe/Berlin}
  - {name: quarter, schedule: "0 */15 * * * *", command: "true", timezone: Europe/Berlin}
"""


def walk(sup, start, end):
    """Tick every second of [start, end) on the fake clock, ending each run at once."""
    sup.clock.wall = start - 1 + 0.5
    sup.planner.start(start - 1)
    for _ in range(start, end):
        sup.second()
        for name in list(dict.fromkeys(run.task.name for run in sup.table)):
            sup.end(name, lived=0.1)


@pytest.mark.parametrize("day, hours", [("2026-03-29", 3), ("2026-10-25", 5)])
def test_dst_fixed_time_runs_once_and_frequent_tasks_follow_elapsed_time(make, day, hours, figures):
    """Berlin `0 30 2 * * *`: 02:30 does not exist in March (runs at 03:00:00, the first second
    after the gap) and exists twice in October (runs once).  A quarter-hourly task fires every
    15 real minutes: 4 times an hour however long the night is."""
    sup = make(DST)
    start = int(datetime.fromisoformat(f"{day}T00:00:00").replace(tzinfo=BERLIN).timestamp())
    end = start + hours * 3600           # local 00:00 to 04:00 of the change day
    walk(sup, start, end)
    nightly = [second for name, second, _ in sup.system.forked if name == "nightly"]
    quarter = [second for name, second, _ in sup.system.forked if name == "quarter"]
    assert len(nightly) == 1
    wall = datetime.fromtimestamp(nightly[0], BERLIN)
    assert (wall.hour, wall.minute) == ((3, 0) if day.endswith("03-29") else (2, 30))
    assert quarter == list(range(start, end, 900))
    figures.add(faults=1, runs=len(nightly) + len(quarter))


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.ENOMEM])
def test_fork_failures_for_seconds_are_counted_retried_and_scheduling_goes_on(make, code, figures):
    sup = make("""tasks:
  - {name: every, schedule: "* * * * * *", command: "true"}
  - {name: fixed, schedule: "5 * * * * *", command: "true"}
""")
    sup.system.fork_error = OSError(code, "fork failed")
    sup.second(10)                               # T0 .. T0+9: nothing can start
    assert sup.stats.fork_failures >= 10 and not sup.system.forked
    sup.system.fork_error = None
    sup.second()
    started = {(name, second) for name, second, _ in sup.system.forked}
    assert ("fixed", T0 + 5) in started          # retried while within misfire_grace
    assert ("every", T0 + 10) in started
    assert len(sup.system.forked) == len(started)       # nothing twice, no burst of old seconds
    sup.records.flush()
    rows = sup.records.query(task="every", limit=100)
    assert not [r for r in rows if r.skipped and "max" in r.skipped]
    accounted = {r.scheduled for r in rows if r.missed} | {s for n, s in started if n == "every"}
    lost = set(range(T0, T0 + 11)) - accounted   # every second ran or is recorded as missed
    assert not lost
    figures.add(faults=10, runs=len(started) + 11, lost=len(lost))


@pytest.mark.slow
def test_a_locked_database_keeps_records_buffered_and_writes_them_later(make, figures):
    sup = make("""tasks:
  - {name: every, schedule: "* * * * * *", command: "true", max: 10}
""")
    sup.second()
    sup.records.flush()
    blocker = sqlite3.connect(sup.db_path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(5):
            sup.second()
            sup.records.flush()                         # fails: locked; must not raise
        assert sup.records.pending >= 5 and sup.records.failed_flushes >= 5
    finally:
        blocker.rollback()
        blocker.close()
    sup.second()
    sup.records.flush()
    assert sup.records.pending == 0
    seconds = [r.scheduled for r in sup.records.query(task="every", limit=100)]
    assert sorted(seconds) == list(range(T0, T0 + 7))
    figures.add(faults=5, runs=len(seconds), lost=7 - len(set(seconds)),
                doubled=len(seconds) - len(set(seconds)))
