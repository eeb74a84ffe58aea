import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from torchcore.records import Records, RecordsError, RunRecord, db_path, write_record_now


def run(run_id, task="t", started=1000.0, ended=1001.5, exit_code=0, **kw):
    return RunRecord(run_id=run_id, task=task, node="n1", scheduled=kw.pop("scheduled", None),
                     started=started, ended=ended, exit_code=exit_code,
                     signal=kw.pop("signal", None), **kw)


@pytest.fixture
def path(tmp_path):
    return db_path(str(tmp_path / "state" / "sub"))


@pytest.fixture
def records(path):
    r = Records(path, busy_timeout=0.05)
    yield r
    r.close()


def count_statements(records, word):
    seen = []
    records._conn.set_trace_callback(seen.append)
    return lambda: sum(1 for s in seen if s.strip().upper().startswith(word))


def test_creates_directory_wal_and_schema(path, records):
    assert os.path.exists(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"runs_task_at", "runs_failed"} <= indexes


def test_start_row_then_end_row_is_one_record(records):
    start = run(7, ended=None, exit_code=None, pid=123)
    records.add(start)
    assert records.flush()
    assert records.query()[0].ended is None
    start.ended, start.exit_code, start.peak_rss = 1003.0, 0, 4096
    records.add(start)
    records.flush()
    (got,) = records.query()
    assert (got.run_id, got.ended, got.exit_code) == (7, 1003.0, 0)
    assert (got.pid, got.peak_rss) == (123, 4096)
    assert got.duration == 3.0


def test_add_takes_a_snapshot(records):
    rec = run(1, ended=None, exit_code=None)
    records.add(rec)
    rec.ended = 5000.0
    records.flush()
    assert records.query()[0].ended is None


def test_flush_writes_a_burst_in_one_commit(records):
    commits = count_statements(records, "COMMIT")
    for i in range(500):
        records.add(run(i + 1, ended=None, exit_code=None))
    for i in range(500):
        records.add(run(i + 1))
    assert records.pending == 500
    assert records.flush()
    assert commits() == 1
    assert len(records.query(limit=None)) == 500
    assert records.flush() and commits() == 1     # nothing buffered: no transaction at all


def test_locked_database_keeps_buffer_and_retries(path, records, caplog):
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")          # holds the write lock
    records.add(run(1))
    records.add(run(2))
    with caplog.at_level(logging.WARNING, logger="torchcore.records"):
        assert records.flush() is False
        assert records.flush() is False
    assert records.pending == 2 and records.failed_flushes == 2
    warnings = [r for r in caplog.records if "will retry" in r.getMessage()]
    assert len(warnings) == 1                 # not one per failed flush
    other.execute("ROLLBACK")
    records.add(run(3))
    assert records.flush() is True
    assert records.pending == 0
    assert [r.run_id for r in records.query()] == [3, 2, 1]


def test_full_disk_keeps_buffer(path, records):
    records.add(run(1))
    records.flush()
    pages = records._conn.execute("PRAGMA page_count").fetchone()[0]
    records._conn.execute(f"PRAGMA max_page_count = {pages}")
    for i in range(2, 2000):
        records.add(run(i, task="x" * 200))
    assert records.flush() is False          # SQLITE_FULL
    assert records.pending == 1998
    records._conn.execute("PRAGMA max_page_count = 1000000")
    assert records.flush() is True
    assert len(records.query(limit=None)) == 1999


def test_buffer_is_bounded_dropping_the_oldest(path, caplog):
    r = Records(path, max_buffer=10)
    with caplog.at_level(logging.WARNING, logger="torchcore.records"):
        for i in range(1, 16):
            r.add(run(i))
    assert r.pending == 10 and r.dropped == 5
    assert any("dropped" in rec.getMessage() for rec in caplog.records)
    r.flush()
    assert sorted(x.run_id for x in r.query(limit=None)) == list(range(6, 16))
    r.close()


def test_run_ids_hi_lo_unique_across_reopen_and_concurrent_owners(path):
    first = Records(path, id_block=100)
    commits = count_statements(first, "COMMIT")
    ids_a = [first.allocate_run_id() for _ in range(250)]
    assert commits() <= 4                     # one small commit per block, not per id
    # A second owner while the first still lives (a supervisor killed with -9 leaves executors).
    second = Records(path, id_block=100)
    ids_b = [second.allocate_run_id() for _ in range(250)]
    ids_a += [first.allocate_run_id() for _ in range(250)]
    first.close()
    second.close()
    third = Records(path, id_block=100)
    ids_c = [third.allocate_run_id() for _ in range(10)]
    third.close()
    every = ids_a + ids_b + ids_c
    assert len(set(every)) == len(every)
    assert min(ids_c) > max(ids_a + ids_b)       # a fresh block after every reserved one
    assert all(i > 0 for i in every)


def test_query_filters_and_order(records):
    records.add(run(1, task="a", started=100.0, ended=101.0))
    records.add(run(2, task="b", started=200.0, ended=201.0, exit_code=3))
    records.add(run(3, task="a", started=300.0, ended=301.0, exit_code=None, signal=9))
    records.add(run(4, task="a", started=400.0, ended=460.0, exit_code=None, signal=15,
                    timed_out=True))
    records.add(run(5, task="a", started=None, ended=None, exit_code=None, scheduled=500,
                    skipped="max 1 reached"))
    records.add(run(6, task="b", started=None, ended=None, exit_code=None, scheduled=600,
                    missed=True))
    records.add(run(7, task="a", started=700.0, ended=None, exit_code=None, manual=True))
    records.flush()
    assert [r.run_id for r in records.query()] == [7, 6, 5, 4, 3, 2, 1]
    assert [r.run_id for r in records.query(task="a", limit=2)] == [7, 5]
    assert [r.run_id for r in records.query(since=300)] == [7, 6, 5, 4, 3]
    assert [r.run_id for r in records.query(failed=True)] == [4, 3, 2]
    assert [r.run_id for r in records.query(task="b", failed=True)] == [2]
    skip, timed = records.query(task="a", limit=3)[1:3]
    assert skip.skipped == "max 1 reached" and skip.started is None and skip.duration is None
    assert timed.timed_out is True and timed.duration == 60.0 and timed.failed
    assert records.query(task="a")[0].manual is True


def test_last_results_latest_finished_per_task(records):
    records.add(run(1, task="a", started=100.0, ended=101.0, exit_code=1))
    records.add(run(2, task="a", started=200.0, ended=201.0, exit_code=0))
    records.add(run(3, task="a", started=300.0, ended=None, exit_code=None))   # still running
    records.add(run(4, task="b", started=150.0, ended=151.0, exit_code=2))
    records.add(run(5, task="c", started=None, ended=None, exit_code=None, scheduled=10,
                    skipped="max 1 reached"))
    records.flush()
    last = records.last_results()
    assert sorted(last) == ["a", "b"]
    assert last["a"].run_id == 2 and last["b"].exit_code == 2


def test_prune_keeps_recent_and_unfinished(records):
    records.add(run(1, started=100.0, ended=101.0))
    records.add(run(2, started=150.0, ended=None, exit_code=None))             # a long daemon task
    records.add(run(3, started=None, ended=None, exit_code=None, scheduled=120, missed=True))
    records.add(run(4, started=900.0, ended=901.0))
    assert records.prune(500) == 2                # prune flushes the buffer first
    assert sorted(r.run_id for r in records.query()) == [2, 4]


def test_every_write_is_journalled_for_the_notifier(path, records):
    records.add(run(1, ended=None, exit_code=None))
    records.flush()
    records.add(run(1))
    records.add(run(2, started=None, ended=None, exit_code=None, scheduled=5, skipped="max"))
    records.flush()
    conn = sqlite3.connect(path)

    def journal():
        return conn.execute("SELECT seq, run_id, ended FROM changes ORDER BY seq").fetchall()

    assert journal() == [(1, 1, 0), (2, 1, 1), (3, 2, 1)]
    assert abs(conn.execute("SELECT max(written) FROM changes").fetchone()[0] - time.time()) < 60
    conn.execute("DELETE FROM changes")
    conn.commit()
    records.add(run(3))
    records.flush()
    assert journal() == [(4, 3, 1)]             # a number never comes back
    records.add(run(5))
    records.flush()
    conn.execute("UPDATE changes SET written = 100 WHERE run_id = 3")
    conn.commit()
    records.prune(5000)                         # by when an entry was written, from the oldest
    assert journal() == [(5, 5, 1)]
    conn.execute("UPDATE changes SET written = 100")
    conn.commit()
    records.prune(5000)
    assert journal() == []
    conn.close()


def test_a_version_2_database_gets_the_journal(path):
    Records(path).close()
    conn = sqlite3.connect(path)
    conn.executescript("DROP TRIGGER runs_changed; DROP TABLE changes;"
                       " UPDATE meta SET value='2' WHERE key='schema_version';")
    conn.close()
    with Records(path) as store:
        store.add(run(1))
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"
    assert conn.execute("SELECT run_id, ended FROM changes").fetchall() == [(1, 1)]
    conn.close()


def test_newer_schema_is_refused(path):
    Records(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RecordsError, match="schema version 99"):
        Records(path)


def test_unopenable_path_is_a_records_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RecordsError, match="cannot open"):
        Records(str(tmp_path / "file" / "torchcore.db"))


def test_forked_child_cannot_use_the_parents_connection(records, path):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                records.allocate_run_id()
                code = b"used"
            except RecordsError:
                code = b"refused"
            records.add(run(9))
            records.flush()                       # silently a no-op in the child
            ok = write_record_now(path, run(8, task="orphan"))
            os.write(write, code + (b" written" if ok else b" failed"))
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 100) == b"refused written"
    os.close(read)
    assert [r.task for r in records.query()] == ["orphan"]


WRITER = textwrap.dedent("""
    import sys
    from torchcore.records import Records, RunRecord
    r = Records(sys.argv[1], busy_timeout=2.0)
    for batch in range(40):
        for i in range(50):
            rid = r.allocate_run_id()
            r.add(RunRecord(rid, "w", "n", None, 1000.0 + rid, 1001.0 + rid, 0, None))
        while not r.flush():
            pass
    r.close()
""")


def test_daemon_writes_while_cli_reads(path):
    Records(path).close()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path])
    reader = Records(path)
    counts = []
    deadline = time.monotonic() + 60
    while writer.poll() is None and time.monotonic() < deadline:
        counts.append(len(reader.query(limit=None)))
        reader.last_results()
    assert writer.wait(timeout=60) == 0
    counts.append(len(reader.query(limit=None)))
    reader.close()
    assert counts == sorted(counts)               # each read sees a consistent, growing set
    assert counts[-1] == 2000
    assert len(counts) > 1


def test_closed_records_refuse_reads_and_flush_quietly(path):
    with Records(path) as r:
        r.add(run(1))
    assert r.flush() is True                      # written on close: nothing left
    r.add(run(2))
    assert r.flush() is False and r.pending == 1
    with pytest.raises(RecordsError, match="closed"):
        r.query()
    with Records(path) as again:
        assert [x.run_id for x in again.query()] == [1]
