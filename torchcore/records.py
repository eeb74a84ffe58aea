"""Run records: every run, skip and miss of every task, kept in SQLite under state_dir.

The supervisor owns one :class:`Records`: ``add()`` only buffers, and ``flush()``
(called once per tick or so) writes the whole buffer in one transaction, so a
burst of 500 runs costs one commit, not 500.  A run is written twice under the
same ``run_id``: a start row, then the end row replacing it.  Every write of a run row, by
whichever writer, goes through ``write_rows``: a row never takes its run back (a start never
replaces an end, a lost verdict never a real end: recordsql.py has the rule).

The database is in WAL mode, so the ``history`` and ``status`` commands read it
while the daemon writes.  If it is locked or the disk is full, ``flush()`` logs a
warning, keeps the buffer and tries again next time; it never raises into the
supervisor.  If the database file is removed (or replaced) while the daemon
runs, the next flush notices (one stat of the file, only when there is something
to write), warns once, creates it again and writes there, with run ids that go on
from where the lost file was.

Run ids come from hi/lo blocks reserved in the ``meta`` table (one small commit
per block), so they stay unique across restarts, and also when a supervisor was
killed with -9 while its executors still run and write their own end rows with
:func:`write_record_now`.  ``close()`` gives the unused rest of the last block
back, so after a clean stop the ids go on densely; only a killed supervisor
leaves a gap (its ids may still be in use by executors it left running).
"""

import logging
import operator
import os
import sqlite3
import time
from collections import OrderedDict

from torchcore import paths, safepaths
from torchcore.errors import TorchcoreError
from torchcore.outcome import RunResult
from torchcore.recordsql import (CHUNK, COLUMNS, FAILED, JOURNAL, JOURNAL_CURSORS, PRUNE_JOURNAL,
                                 SCHEMA, SELECT, TRIM_JOURNAL, UPGRADE_FROM_1, UPSERT, final_among,
                                 rank, row_rank)
from torchcore.runrecord import RunRecord

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3       # 2: the error and stopped columns; 3: the changes journal (older ones are upgraded)
ID_BLOCK = 1000          # run ids reserved per commit of the hi/lo counter
MAX_BUFFER = 100_000     # records kept in memory while the database cannot be written
BUSY_TIMEOUT = 0.5       # seconds a supervisor's statement waits for a lock (it must keep ticking)
WARN_INTERVAL = 60.0     # seconds between repeated warnings about an unwritable database
_FAILED, _SELECT = FAILED, SELECT      # the names the web store reads here (web/store.py)


class RecordsError(TorchcoreError):
    """The records database cannot be opened or is of an unknown version."""


def db_path(state_dir):
    """The database file inside a state directory."""
    return paths.records_db(state_dir)


_VALUES = operator.attrgetter(*COLUMNS)
_FLAGS = tuple(COLUMNS.index(name) for name in ("timed_out", "missed", "manual"))


def _row(record):
    """The record as the tuple of the upsert statement (a snapshot: later edits do not leak in)."""
    values = list(_VALUES(record))
    for i in _FLAGS:
        values[i] = int(bool(values[i]))
    at = record.started
    if at is None:
        at = record.scheduled if record.scheduled is not None else record.ended
    values.append(time.time() if at is None else at)
    return tuple(values)


def write_rows(conn, rows):
    """Write rows (of ``_row``) of distinct runs in the open write transaction, each replacing its
    run's row unless that would take the run back: never a start over an end, nor a lost verdict
    over a real end (recordsql.rank; every writer of a run row comes here).  A refused row is not
    written, nor journalled.  Real ends, which nothing outranks, are written without a look."""
    written, others = [], []
    for row in rows:
        (written if row_rank(row) == 2 else others).append(row)
    if others:
        ids = [row[0] for row in others]
        stored = {}
        for i in range(0, len(ids), CHUNK):
            part = ids[i:i + CHUNK]
            for run_id, *values in conn.execute(*final_among(part)):
                stored[run_id] = rank(*values)
        written += [row for row in others if stored.get(row[0], 0) <= row_rank(row)]
    conn.executemany(UPSERT, written)


def record_of(row):
    """A RunRecord from a row of the runs table's columns in RunRecord's order (_SELECT's;
    the notifier and the fleet agent select them so too)."""
    record = RunRecord(*row)
    record.timed_out, record.missed, record.manual = (
        bool(record.timed_out), bool(record.missed), bool(record.manual))
    return record


def connect(path, busy_timeout):
    """Open the database (creating its directory), in WAL mode with the schema in place
    (autocommit: BEGIN where a transaction is wanted); RecordsError if it cannot be."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _create_private(path)
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    except safepaths.UnsafePath as exc:
        raise RecordsError(f"cannot open the records database: {exc}") from None
    except (OSError, sqlite3.Error) as exc:
        raise RecordsError(f"cannot open the records database {path}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        _ensure_schema(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise RecordsError(f"cannot open the records database {path}: {exc}") from exc
    except RecordsError:
        conn.close()
        raise
    return conn


def trim_journal(conn):
    """Drop the journal entries every reader has passed (up to the lowest cursor in ``meta`` of
    the readers this database has; none without a reader).  Called by a reader in the
    transaction that moves its cursor: with two readers, neither drops what the other has not
    read yet."""
    return conn.execute(TRIM_JOURNAL, JOURNAL_CURSORS).rowcount


def _create_private(path):
    """Create the database 0600 without following a link, before SQLite opens it by name.

    SQLite gives its -wal and -shm the database's mode; a database, -wal or -shm
    that is a link, another user's file or hard-linked is refused, a looser mode
    tightened (see safepaths).
    """
    os.close(safepaths.open_file(path, os.O_RDWR | os.O_CREAT, safepaths.PRIVATE_MODE,
                                 what="records database"))
    for suffix in ("-wal", "-shm", "-journal"):
        safepaths.check_existing_file(path + suffix, safepaths.PRIVATE_MODE,
                                      what="records database file")


def _schema_version(conn):
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return int(row[0]) if row else None


def _ensure_schema(conn, path):
    """Create the tables once; a reader of an existing database never writes to it."""
    version = _schema_version(conn)
    if version is None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.format(failed=_FAILED).split(";"):
                if statement.strip():
                    conn.execute(statement)
            for statement in JOURNAL:
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('next_run_id', '1')")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        version = _schema_version(conn)
    if version in (1, 2):
        version = _upgrade(conn)
    if version != SCHEMA_VERSION:
        raise RecordsError(
            f"{path} has records schema version {version}, this torchcore knows version "
            f"{SCHEMA_VERSION}: upgrade torchcore, or move the file away to start afresh")


def _upgrade(conn):
    """From version 1: add the error and stopped columns and the new failed index; from 2: the
    changes journal (once, by whoever opens first)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _schema_version(conn)
        if version in (1, 2):
            for statement in (UPGRADE_FROM_1 if version == 1 else ()) + JOURNAL:
                conn.execute(statement)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                         (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return _schema_version(conn)


def _rollback(conn):
    """Roll back if a transaction is still open (SQLite may have rolled back on its own)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _reserve_block(conn, size):
    """Persist next_run_id += size and return the first id of the reserved block."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        start = int(conn.execute(
            "SELECT value FROM meta WHERE key = 'next_run_id'").fetchone()[0])
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_run_id'", (str(start + size),))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return start


class Records:
    """The run records of one node: buffered writes, queries, pruning.

    Use one instance per process, and never across ``fork()``: an executor child
    that must write on its own uses :func:`write_record_now`.
    """

    def __init__(self, path, *, busy_timeout=BUSY_TIMEOUT, id_block=ID_BLOCK,
                 max_buffer=MAX_BUFFER, clock=time.monotonic):
        self.path = path
        self._busy_timeout = busy_timeout
        self._conn = connect(path, busy_timeout)
        self._identity = file_identity(path)
        self.recreated = 0                  # times the file was found gone and made again
        self._pid = os.getpid()
        self._buffer = OrderedDict()        # run_id -> row tuple; a later add replaces the row
        self._max_buffer = max_buffer
        self._id_block = id_block
        self._next_id = self._id_limit = 0  # the current hi/lo block: [next, limit)
        self._spare_block = None            # the following block, reserved ahead of need
        self._clock = clock
        self.dropped = 0                    # records dropped because the buffer was full
        self.failed_flushes = 0             # consecutive flushes that could not write
        self._last_warning = None
        self._meta = {}                     # meta key -> value, written with the next flush

    # -- writing ------------------------------------------------------------------------------

    def allocate_run_id(self):
        """A run id never handed out before by any process on this database.

        Ids come from a block reserved with one commit; the next block is reserved
        when a quarter of the current one is left, so a briefly locked database does
        not stop a launch.  Raises RecordsError only when no id is left and no
        block can be reserved.
        """
        self._check_process()
        if self._next_id >= self._id_limit:
            start = self._spare_block
            self._spare_block = None
            if start is None:
                try:
                    start = _reserve_block(self._conn, self._id_block)
                except sqlite3.Error as exc:
                    raise RecordsError(f"cannot reserve run ids in {self.path}: {exc}") from exc
            self._next_id, self._id_limit = start, start + self._id_block
        run_id = self._next_id
        self._next_id += 1
        if self._spare_block is None and self._id_limit - self._next_id <= self._id_block // 4:
            try:
                self._spare_block = _reserve_block(self._conn, self._id_block)
            except sqlite3.Error as exc:
                log.warning("records: cannot reserve run ids ahead (will retry): %s", exc)
        return run_id

    def add(self, record):
        """Buffer a record (a snapshot of it) for the next flush(); replaces one with its run_id."""
        self._buffer.pop(record.run_id, None)
        self._buffer[record.run_id] = _row(record)
        if len(self._buffer) > self._max_buffer:
            self._buffer.popitem(last=False)
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("records: buffer full (%d), %d oldest records dropped so far",
                            self._max_buffer, self.dropped)

    def remember(self, key, value):
        """Keep ``value`` under ``key`` in the meta table: written with the next flush that writes
        records, and by ``close`` (never a commit of its own)."""
        self._meta[key] = str(value)

    def recall(self, key):
        """The value kept under ``key`` (a string), or None (never kept, or unreadable)."""
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            log.warning("records: cannot read %s from %s: %s", key, self.path, exc)
            return None
        return None if row is None else row[0]

    @property
    def pending(self):
        """How many records wait for a flush."""
        return len(self._buffer)

    def flush(self, meta=False):
        """Write every buffered record in one transaction, with what ``remember`` kept (also
        without records if ``meta``); True if the buffer is now empty.

        On any database error (locked, disk full, ...) the buffer is kept for the
        next flush and a warning is logged (at most once a minute); never raises.
        """
        if not (self._buffer or meta and self._meta) or os.getpid() != self._pid \
                or self._conn is None:
            return not self._buffer
        self._recreate_if_gone()
        rows, kept = list(self._buffer.values()), list(self._meta.items())
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                write_rows(self._conn, rows)
                self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", kept)
                self._conn.execute("COMMIT")
            except BaseException:
                _rollback(self._conn)
                raise
        except sqlite3.Error as exc:
            self._flush_failed(exc)
            return False
        if self.failed_flushes:
            log.warning("records: wrote %d buffered records after %d failed attempts",
                        len(rows), self.failed_flushes)
        self.failed_flushes = 0
        self._last_warning = None
        self._buffer.clear()
        self._meta.clear()
        return True

    def _recreate_if_gone(self):
        """The file at ``path`` is not the one we opened (removed, with its -wal and -shm, or
        replaced): open (create) it again.  Run ids go on after every id handed out so far."""
        identity = file_identity(self.path)
        if identity == self._identity or identity is False:
            return
        log.warning("records: %s was removed or replaced while in use; creating it again "
                    "(the records it held are gone, the ones not yet written go to the new one)",
                    self.path)
        self._conn.close()      # first: closing the old may remove its -wal file by name
        try:
            self._conn = connect(self.path, self._busy_timeout)
        except RecordsError as exc:
            self._conn = sqlite3.connect(":memory:", isolation_level=None)  # retried next flush
            self._identity = ()     # matches no file: tried again at the next flush
            log.warning("records: %s", exc)
            return
        self._identity = file_identity(self.path)
        self.recreated += 1
        floor = max(self._id_limit, (self._spare_block or 0) + self._id_block)
        try:
            self._conn.execute("UPDATE meta SET value = ? WHERE key = 'next_run_id' "
                               "AND CAST(value AS INTEGER) < ?", (str(floor), floor))
        except sqlite3.Error as exc:
            log.warning("records: cannot carry the run ids over to %s: %s", self.path, exc)

    def _flush_failed(self, exc):
        self.failed_flushes += 1
        now = self._clock()
        if self._last_warning is None or now - self._last_warning >= WARN_INTERVAL:
            self._last_warning = now
            log.warning("records: cannot write %d records to %s (kept, will retry): %s",
                        len(self._buffer), self.path, exc)

    def prune(self, before_epoch):
        """Delete records older than ``before_epoch`` but not unfinished runs; returns the count."""
        self._check_process()
        self.flush()
        try:
            cursor = self._conn.execute(
                "DELETE FROM runs WHERE at < ? AND (ended IS NOT NULL OR skipped IS NOT NULL"
                " OR missed != 0 OR started IS NULL)", (before_epoch,))
            self._conn.execute(PRUNE_JOURNAL, (before_epoch,))
        except sqlite3.Error as exc:
            log.warning("records: cannot prune %s (will retry): %s", self.path, exc)
            return 0
        return cursor.rowcount

    # -- reading ------------------------------------------------------------------------------

    def query(self, task=None, limit=50, since=None, failed=False):
        """Records newest first, optionally of one task, since an epoch, failed runs only."""
        where, params = [], []
        if task is not None:
            where.append("task = ?")
            params.append(task)
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        if failed:
            where.append(_FAILED)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY at DESC, run_id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [record_of(row) for row in self._read(sql, params)]

    def unfinished(self):
        """Runs that started and have no end yet (their executor may outlive a supervisor)."""
        sql = _SELECT + " WHERE ended IS NULL AND started IS NOT NULL AND skipped IS NULL"
        return [record_of(row) for row in self._read(sql + " ORDER BY run_id", [])]

    def ids_not_given_back(self):
        """Run ids were handed out past the last record and not given back (a supervisor was
        killed since, most likely): some may belong to runs whose start never reached here."""
        given, used = self._read("SELECT (SELECT CAST(value AS INTEGER) FROM meta WHERE key = "
                                 "'next_run_id'), (SELECT max(run_id) FROM runs)", ())[0]
        return given is not None and given > (used or 0) + 1

    def recorded(self, run_ids):
        """Those of ``run_ids`` that have a record."""
        ids = list(run_ids)
        sql = f"SELECT run_id FROM runs WHERE run_id IN ({', '.join('?' * len(ids))})"
        return {row[0] for row in self._read(sql, ids)} if ids else set()

    def last_results(self):
        """The latest finished run of every task: {task: RunRecord}.

        A recursive walk over the (task, at) index visits each task once instead of
        scanning every row.
        """
        sql = f"""
            WITH RECURSIVE tasks(name) AS (
                SELECT min(task) FROM runs
                UNION ALL
                SELECT (SELECT min(task) FROM runs WHERE task > name) FROM tasks
                WHERE name IS NOT NULL)
            SELECT {", ".join("r." + c for c in COLUMNS)} FROM tasks JOIN runs r
            ON r.run_id = (SELECT run_id FROM runs WHERE task = tasks.name AND ended IS NOT NULL
                           ORDER BY at DESC, run_id DESC LIMIT 1)"""
        return {record.task: record for record in map(record_of, self._read(sql, ()))}

    def _read(self, sql, params):
        self._check_process()
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise RecordsError(f"cannot read the records database {self.path}: {exc}") from exc

    def close(self):
        """Flush what can be written, then close (in the process that opened it only)."""
        if os.getpid() != self._pid or self._conn is None:
            return
        self.flush(meta=True)
        self._release_ids()
        self._conn.close()
        self._conn = None

    def _release_ids(self):
        """Give back the unused rest of our blocks, if no one reserved after us: a daemon
        stopped cleanly and started again goes on with the next id (108 -> 109, not 1001)."""
        if self._id_limit == 0:
            return
        reserved_to = self._id_limit if self._spare_block is None else \
            self._spare_block + self._id_block
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            value = int(self._conn.execute(
                "SELECT value FROM meta WHERE key = 'next_run_id'").fetchone()[0])
            used = self._conn.execute("SELECT max(run_id) FROM runs").fetchone()[0]
            if value == reserved_to:
                next_id = max(self._next_id, (used or 0) + 1)
                self._conn.execute("UPDATE meta SET value = ? WHERE key = 'next_run_id'",
                                   (str(next_id),))
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(self._conn)
            log.warning("records: cannot give back unused run ids: %s", exc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_process(self):
        if os.getpid() != self._pid:
            raise RecordsError("a Records object cannot be used across fork(); "
                               "use write_record_now() in a child")
        if self._conn is None:
            raise RecordsError(f"the records database {self.path} is closed")


def file_identity(path):
    """(device, inode) of the file at ``path``; None when there is none; False when unknown."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    return (st.st_dev, st.st_ino)


def write_record_now(path, record, busy_timeout=5.0):
    """Write one record at once on a connection of its own; True if it was written.

    For an executor child whose supervisor has died: it opens, writes, commits
    and closes, and logs (does not raise) when the database cannot be written.
    """
    try:
        conn = connect(path, busy_timeout)
    except RecordsError as exc:
        log.warning("records: %s", exc)
        return False
    try:
        conn.execute("BEGIN IMMEDIATE")     # its look and its write: no writer in between
        try:
            write_rows(conn, [_row(record)])
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return True
    except sqlite3.Error as exc:
        log.warning("records: cannot write run %s to %s: %s", record.run_id, path, exc)
        return False
    finally:
        conn.close()


def _main(argv):
    """``python -m torchcore.records DB JSON``: write one record from a clean process.

    An executor whose supervisor died uses this: a forked child must not open
    SQLite with the state it inherited from its parent.
    """
    import signal

    from torchcore import wire

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):   # sent to a whole group:
        signal.signal(signum, signal.SIG_IGN)       # this short write finishes regardless
    logging.basicConfig(format="torchcore: %(message)s")
    path, text = argv
    own = wire.decode_own_record(text)
    result = RunResult(**{name: getattr(own, name) for name in RunResult.FIELDS})
    record = RunRecord.of_end(own.run_id, own.task, own.node, own.scheduled, own.manual, own.pid,
                              result)
    return 0 if write_record_now(path, record) else 1


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
