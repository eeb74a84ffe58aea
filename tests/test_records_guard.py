"""A run's row never goes back: a start never replaces an end, a lost verdict never a real end
(recordsql.rank, kept by records.write_rows), whichever writer writes and in whatever order the
writes land.

The writers: the supervisor's buffered start, end and failed-fork rows; an executor's own end
record, written at once on a connection of its own when its supervisor is gone
(``write_record_now``, what ``python -m torchcore.records`` calls); the next supervisor's
adoption (adopt.py): the start row of a stray executor's run found without a record, the lost
verdict of an unfinished run whose executor is gone, and ``close``'s lost verdict.
"""

import dataclasses
import sqlite3
import tempfile
import types

from hypothesis import given, settings
from hypothesis import strategies as st

from torchcore import adopt, procscan, recordsql
from torchcore.records import Records, RunRecord, db_path, write_record_now
from torchcore.runrecord import LOST


def twin_rank(record):
    """The rule's rank, written again here: 0 a start, 1 a lost verdict, 2 a real end."""
    if record.ended is None and record.skipped is None and not record.missed:
        return 0
    return 1 if record.error is not None and record.error.startswith("lost: ") else 2


def start(run_id, at):
    return RunRecord.of_start(run_id, "t", "n1", 1000, at, False, 4000 + run_id)


def end(run_id, at, code):
    return dataclasses.replace(start(run_id, at - 1.0), ended=at, exit_code=code, peak_rss=4096)


def lost(run_id, at):
    return start(run_id, at - 1.0).lost(at, "its supervisor and executor stopped")


def failed_fork(run_id, at):
    return RunRecord.of_failed_fork(run_id, "t", "n1", 1000, False, f"no memory at {at}")


KINDS = {"start": start, "end": end, "lost": lost, "fork": failed_fork}
# what each writer writes: the supervisor (buffered), the adopting supervisor (buffered), an
# executor's own end record (at once)
WRITES = {"supervisor": ("start", "end", "fork"), "adopter": ("start", "lost"), "own": ("end",)}


def fields(record):
    return dataclasses.astuple(record)


def stored(path):
    conn = sqlite3.connect(path)
    try:
        rows = {row[0]: RunRecord(*row) for row in conn.execute(recordsql.SELECT)}
        journal = {}
        for run_id, count in conn.execute("SELECT run_id, count(*) FROM changes GROUP BY run_id"):
            journal[run_id] = count
    finally:
        conn.close()
    for record in rows.values():
        record.timed_out, record.missed, record.manual = (
            bool(record.timed_out), bool(record.missed), bool(record.manual))
    return rows, journal


@st.composite
def steps(draw):
    """A sequence of writes and flushes of the three writers over three runs, in any order."""
    out = []
    for _ in range(draw(st.integers(1, 25))):
        writer = draw(st.sampled_from(("supervisor", "adopter", "own", "flush supervisor",
                                       "flush adopter")))
        if writer.startswith("flush"):
            out.append((writer, None, None, None))
            continue
        kind = draw(st.sampled_from(WRITES[writer]))
        out.append((writer, draw(st.integers(1, 3)), kind, draw(st.integers(0, 3))))
    return out


@settings(derandomize=True, max_examples=100, deadline=None)
@given(steps())
def test_any_interleaving_of_the_writers_ends_as_the_rule_says(sequence):
    with tempfile.TemporaryDirectory() as tmp:
        path = db_path(tmp)
        buffered = {"supervisor": Records(path), "adopter": Records(path)}
        pending = {"supervisor": {}, "adopter": {}}     # the twin's buffers: run_id -> record
        model, journal, real_end = {}, {}, set()

        def land(record):
            old = model.get(record.run_id)
            if old is None or twin_rank(record) >= twin_rank(old):
                model[record.run_id] = record
                journal[record.run_id] = journal.get(record.run_id, 0) + 1

        def flush(writer):
            buffered[writer].flush()
            for record in pending[writer].values():
                land(record)
            pending[writer].clear()

        try:
            for n, (writer, run_id, kind, code) in enumerate(sequence):
                if writer.startswith("flush"):
                    flush(writer.split()[1])
                    continue
                make = KINDS[kind]
                record = make(run_id, 2000.0 + n, code) if kind == "end" else make(run_id, 2000.0 + n)
                if twin_rank(record) == 2:
                    real_end.add(run_id)
                if writer == "own":
                    assert write_record_now(path, record)
                    land(record)
                else:
                    buffered[writer].add(record)
                    pending[writer][run_id] = record
            flush("supervisor")
            flush("adopter")
        finally:
            for records in buffered.values():
                records.close()
        rows, journalled = stored(path)
        assert {k: fields(v) for k, v in rows.items()} == {k: fields(v) for k, v in model.items()}
        assert journalled == journal            # a refused write is not journalled
        for run_id in real_end:                 # a real end, once written, is never lost again
            assert twin_rank(rows[run_id]) == 2 and not (rows[run_id].error or "").startswith(LOST)
        for record in rows.values():
            assert recordsql.rank(record.ended, record.skipped, record.missed, record.error) == \
                twin_rank(record)


# ---- adopt.py's check-then-write, with the executor's own end record landing in between ----

class Clock:
    def time(self):
        return 5000.0


class System:
    """The processes as adopt.survivors sees them; ``looked`` runs while it looks."""

    def __init__(self, alive=None, others=None, looked=lambda: None):
        self.alive, self.others, self.looked = alive or {}, others or {}, looked

    def executors_of(self, unfinished, strays):
        self.looked()
        return dict(self.alive), dict(self.others)

    def command_group(self, pid):
        return pid


def journal_of(path, run_id):
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute(
            "SELECT ended FROM changes WHERE run_id = ? ORDER BY seq", (run_id,))]
    finally:
        conn.close()


def killed_supervisor(path, *records):
    """A supervisor killed with -9 after writing ``records`` (its run ids not given back)."""
    first = Records(path)
    first.allocate_run_id()
    for record in records:
        first.add(record)
    first.flush()
    first._conn.close()         # no close(): it was killed
    first._conn = None


def test_an_executor_ending_while_the_next_supervisor_looks_for_it_keeps_its_end(tmp_path):
    path = db_path(str(tmp_path))
    killed_supervisor(path, start(5, 1000.0))
    own = end(5, 1010.0, 3)
    db = Records(path)
    system = System(looked=lambda: write_record_now(path, own))     # ended: gone when looked at
    try:
        assert adopt.survivors(db, system, {}, Clock(), "n1") == []
        db.flush()
        (got,) = db.query()
    finally:
        db.close()
    assert fields(got) == fields(own)           # not lost: it ended with exit 3
    assert journal_of(path, 5) == [0, 1]        # its start, its end: no lost verdict told


class RacingRecords(Records):
    """Records whose ``after`` (the method adopt.py checks with) lets the executor's own end
    record land right after the check."""

    own = after = None

    def _land(self):
        if self.own is not None:
            write_record_now(self.path, self.own)
            self.own = None

    def recorded(self, run_ids):
        found = super().recorded(run_ids)
        if self.after == "recorded":
            self._land()
        return found

    def unfinished(self):
        found = super().unfinished()
        if self.after == "unfinished":
            self._land()
        return found


def test_a_stray_executor_ending_after_the_check_keeps_its_end_not_a_start(tmp_path):
    path = db_path(str(tmp_path))
    killed_supervisor(path)                     # run 7's start was still buffered
    db = RacingRecords(path)
    db.own, db.after = end(7, 1010.0, 0), "recorded"
    proc = types.SimpleNamespace(pid=4321, title=procscan.executor_title("t", 7), created=1000.0)
    try:
        found = adopt.survivors(db, System(others={7: proc}), {}, Clock(), "n1")
        assert [run.run_id for run in found] == [7]     # adopted: its pid is followed till gone
        (got,) = db.query()
    finally:
        db.close()
    assert fields(got) == fields(end(7, 1010.0, 0))     # the end, not the adoption's start row
    assert journal_of(path, 7) == [1]                   # no start told after the end


def test_an_adopted_run_ending_as_close_looks_keeps_its_end_not_lost(tmp_path):
    path = db_path(str(tmp_path))
    killed_supervisor(path, start(9, 1000.0))
    db = RacingRecords(path)
    db.own, db.after = end(9, 1010.0, 2), "unfinished"
    run = types.SimpleNamespace(run_id=9, task=types.SimpleNamespace(name="t"), started=999.0)
    try:
        adopt.close(db, run, 5000.0)
        db.flush()
        (got,) = db.query()
    finally:
        db.close()
    assert fields(got) == fields(end(9, 1010.0, 2))
    assert journal_of(path, 9) == [0, 1]


def test_a_lost_verdict_still_closes_a_run_nobody_ended_and_a_late_real_end_replaces_it(tmp_path):
    path = db_path(str(tmp_path))
    killed_supervisor(path, start(4, 1000.0))
    db = Records(path)
    try:
        assert adopt.survivors(db, System(), {}, Clock(), "n1") == []
        db.flush()
        (got,) = db.query()
        assert got.error.startswith(LOST) and got.ended == 5000.0
        assert write_record_now(path, end(4, 5001.0, 0))        # its executor after all
        (got,) = db.query()
    finally:
        db.close()
    assert fields(got) == fields(end(4, 5001.0, 0))
    assert journal_of(path, 4) == [0, 1, 1]


def test_a_flush_of_more_runs_than_one_look_takes_keeps_every_end(tmp_path):
    """Over recordsql.CHUNK runs in one flush: each is looked up, the last ones too."""
    path = db_path(str(tmp_path))
    count = recordsql.CHUNK * 2 + 7
    killed_supervisor(path, *(end(run_id, 1500.0, 1) for run_id in range(1, count + 1, 2)))
    db = Records(path)
    try:
        for run_id in range(1, count + 1):
            db.add(start(run_id, 2000.0) if run_id % 4 else lost(run_id, 2000.0))
        assert db.flush()
        rows = {record.run_id: record for record in db.query(limit=None)}
    finally:
        db.close()
    for run_id in range(1, count + 1):
        expected = end(run_id, 1500.0, 1) if run_id % 2 else (
            start(run_id, 2000.0) if run_id % 4 else lost(run_id, 2000.0))
        assert fields(rows[run_id]) == fields(expected)
