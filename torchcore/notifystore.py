"""The notifier's durable state, in its own tables of the node's records database.

- ``notify_outbox``: every message to send, queued before the first try and kept with its
  delivery state (queued, sent, rejected, expired, dropped; held: the latest event held back
  by the rate limit, its details kept for the digest), attempts and last error (a finished
  message without its output: nothing reads it again, and it is listed for a week); unique
  per (message id, target), so deriving an event twice queues it once.
- ``notify_windows``: the rate limit of each (task, target, event) (notifyrules.Window).
- ``notify_tasks``: whether each task's last ended run failed (for ``recovered``).
- ``meta``'s ``notify_cursor``: the last entry of the records' ``changes`` journal whose events
  are queued.  A first start puts it FIRST_LOOKBACK before its own start: a node that gets a
  notify target does not announce its whole history, only what the daemon did as it started.
  Queuing a batch, moving the cursor and dropping the journal entries every reader has
  passed (records.trim_journal: the fleet agent reads it too) happen in one transaction, so
  a notifier killed at any point derives each event exactly once and sends it at least once.

Targets are stored by key (a hash of the kind and URL), never by URL: the URL is looked up in
the task file when a message is sent, so secrets stay out of the database.  Transactions are
short (the supervisor writes the same file, and waits at most half a second for it).
"""

import dataclasses
import json
import logging
import sqlite3
import time

from torchcore import paths, records
from torchcore.notifyrules import Window
from torchcore.runrecord import RunRecord

log = logging.getLogger("torchcore")

SCHEMA_VERSION = 1
KEEP_DONE = 7 * 24 * 3600       # seconds a delivered (or given up) message stays listed
FIRST_LOOKBACK = 300            # a first start announces what was written this long before it on
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS notify_outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        target TEXT NOT NULL,           -- notifyspec.Target.key
        shown TEXT NOT NULL,            -- the target without secrets, for alerts and logs
        task TEXT NOT NULL,
        event TEXT NOT NULL,            -- an event, or a ping (start, success, fail)
        body TEXT NOT NULL,             -- the webhook's JSON body
        created REAL NOT NULL,
        next_try REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'queued',
        error TEXT,
        done REAL,
        UNIQUE (id, target))""",
    "CREATE INDEX IF NOT EXISTS notify_queued ON notify_outbox (target, seq) WHERE state = 'queued'",
    """CREATE TABLE IF NOT EXISTS notify_windows (
        task TEXT NOT NULL, target TEXT NOT NULL, event TEXT NOT NULL,
        sent_at REAL, held INTEGER NOT NULL, since REAL, last TEXT,
        PRIMARY KEY (task, target, event))""",
    "CREATE TABLE IF NOT EXISTS notify_tasks (task TEXT PRIMARY KEY, failing INTEGER NOT NULL)",
)
QUEUED, SENT, REJECTED, EXPIRED, DROPPED = "queued", "sent", "rejected", "expired", "dropped"
HELD = "held"       # held back by the rate limit: counted in a digest, not sent on its own
_RUN_FIELDS = [f.name for f in dataclasses.fields(RunRecord)]   # each a column of runs
_CHANGES = ("SELECT c.seq, c.ended, c.written, {} FROM changes c LEFT JOIN runs r ON r.run_id = c.run_id"
            " WHERE c.seq > ? ORDER BY c.seq LIMIT ?").format(", ".join("r." + f for f in _RUN_FIELDS))
_OUTBOX = "seq, id, target, shown, task, event, body, created, next_try, attempts, state, error, done"


def _without_output(body):
    """A finished message's body as kept (listed for KEEP_DONE): its output left out, which
    may be large and hold whatever a job printed; nothing reads it again."""
    try:
        payload = json.loads(body)
        payload["output_tail"] = ""
        return json.dumps(payload)
    except (ValueError, TypeError):
        return "{}"


class Message:
    """One row of the outbox."""

    __slots__ = tuple(_OUTBOX.split(", "))

    def __init__(self, *row):
        for name, value in zip(self.__slots__, row):
            setattr(self, name, value)

    @property
    def payload(self):
        return json.loads(self.body)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__ if name != "body"}



class Store:
    """The notifier's tables on a connection of its own (see the module's docstring)."""

    def __init__(self, path, busy_timeout=5.0, clock=time.time):
        self.path = path
        self.clock = clock
        self.conn = records.connect(path, busy_timeout)
        self.conn.execute("PRAGMA secure_delete = ON")     # a finished message's output is gone
        self.identity = records.file_identity(path)
        self._transaction(self._create)

    def close(self):
        self.conn.close()

    def _transaction(self, work, *args):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(*args)
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        return result

    def _create(self):
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'notify_schema'").fetchone()
        if row is not None and int(row[0]) != SCHEMA_VERSION:
            raise records.RecordsError(
                f"{self.path} has notifier schema version {row[0]}, this torchcore knows version "
                f"{SCHEMA_VERSION}: upgrade torchcore")
        for statement in _SCHEMA:
            self.conn.execute(statement)
        self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('notify_schema', ?)", (str(SCHEMA_VERSION),))
        if self.conn.execute("SELECT 1 FROM meta WHERE key = 'notify_cursor'").fetchone() is None:
            self.conn.execute("INSERT INTO meta VALUES ('notify_cursor', ?)",
                              (str(self._first_cursor(self.clock() - FIRST_LOOKBACK)),))

    def _first_cursor(self, since):
        """Just before the first journal entry written at ``since`` or later (the entries are
        read oldest first up to it, once: no index is kept for this)."""
        row = self.conn.execute("SELECT seq FROM changes WHERE written >= ? ORDER BY seq LIMIT 1",
                                (since,)).fetchone()
        if row is not None:
            return row[0] - 1
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return row[0] if row else 0

    # -- deriving -------------------------------------------------------------------------------

    def cursor(self):
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'notify_cursor'").fetchone()[0])

    def changes(self, limit=500):
        """The records' journal after the cursor: ``[(seq, ended, written, RunRecord or None)]``
        in order, each with the run's row as it is now (None: pruned away).  ``ended``: the
        write was an end, a skip or a miss (else a start); ``written``: when (epoch)."""
        rows = self.conn.execute(_CHANGES, (self.cursor(), limit)).fetchall()
        return [(row[0], bool(row[1]), row[2],
                 records.record_of(row[3:]) if row[3] is not None else None)
                for row in rows]

    def replaced(self):
        """True if the database file is not the one opened (removed, or put back from a
        backup): then the notifier opens it again."""
        return records.file_identity(self.path) not in (self.identity, None, False)

    def window(self, task, target, event):
        row = self.conn.execute("SELECT sent_at, held, since, last FROM notify_windows WHERE task = ?"
                                " AND target = ? AND event = ?", (task, target, event)).fetchone()
        return Window(*row) if row else Window()

    def windows_holding(self):
        """``[(task, target, event, Window)]`` with events held back for a digest."""
        rows = self.conn.execute("SELECT task, target, event, sent_at, held, since, last"
                                 " FROM notify_windows WHERE held > 0").fetchall()
        return [(*row[:3], Window(*row[3:])) for row in rows]

    def failing(self, task):
        row = self.conn.execute("SELECT failing FROM notify_tasks WHERE task = ?", (task,)).fetchone()
        return bool(row and row[0])

    def was_queued(self, message_id, target):
        return self.conn.execute("SELECT 1 FROM notify_outbox WHERE id = ? AND target = ?",
                                 (message_id, target)).fetchone() is not None

    def find(self, message_id, target):
        row = self.conn.execute(f"SELECT {_OUTBOX} FROM notify_outbox WHERE id = ? AND target = ?",
                                (message_id, target)).fetchone()
        return Message(*row) if row else None

    def commit(self, batch, cursor=None):
        """Write what handling some journal entries (or digests) decided, in one transaction:
        ``batch.messages`` queued, ``batch.windows`` and ``batch.failing`` stored, the cursor
        moved to ``cursor`` and the journal up to it dropped."""
        self._transaction(self._commit, batch, cursor)

    def _commit(self, batch, cursor):
        self.conn.executemany(
            "INSERT OR IGNORE INTO notify_outbox (id, target, shown, task, event, body, created,"
            " next_try, state, done) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(m["id"], m["target"], m["shown"], m["task"], m["event"], json.dumps(m["body"]),
              m["created"], m["created"], HELD if m["held"] else QUEUED,
              m["created"] if m["held"] else None) for m in batch.messages])
        self.conn.executemany("DELETE FROM notify_outbox WHERE id = ? AND target = ? AND state = 'held'",
                              batch.unheld)
        self.conn.executemany(
            "INSERT OR REPLACE INTO notify_windows VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(*key, w.sent_at, w.held, w.since, w.last) for key, w in batch.windows.items()])
        self.conn.executemany("INSERT OR REPLACE INTO notify_tasks VALUES (?, ?)",
                              [(task, int(failing)) for task, failing in batch.failing.items()])
        if cursor is not None:
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'notify_cursor'", (str(cursor),))
            records.trim_journal(self.conn)    # up to the lowest reader's cursor

    # -- delivering -----------------------------------------------------------------------------

    def heads(self):
        """The oldest queued message of each target: a target gets its messages in order."""
        rows = self.conn.execute(
            f"SELECT {_OUTBOX} FROM notify_outbox WHERE seq IN (SELECT min(seq) FROM notify_outbox"
            " WHERE state = 'queued' GROUP BY target) ORDER BY next_try").fetchall()
        return [Message(*row) for row in rows]

    def retry(self, message, next_try, error):
        self._update(message.seq, "UPDATE notify_outbox SET attempts = attempts + 1, next_try = ?,"
                     " error = ? WHERE seq = ?", (next_try, error, message.seq))

    def finish(self, message, state, now, error=None):
        """``state``: SENT, REJECTED (the target said never), EXPIRED (24 h of trying) or
        DROPPED (the target is no longer in the task file)."""
        tried = 1 if state in (SENT, REJECTED) else 0
        self._update(message.seq, "UPDATE notify_outbox SET state = ?, done = ?, error = ?,"
                     " attempts = attempts + ?, body = ? WHERE seq = ?",
                     (state, now, error, tried, _without_output(message.body), message.seq))

    def _update(self, seq, sql, params):
        try:
            self.conn.execute(sql, params)
        except sqlite3.Error as exc:    # the try is repeated: at least once, as promised
            log.warning("notifier: cannot record the delivery of message %d (will retry): %s", seq, exc)

    def prune(self, before):
        """Forget messages finished before ``before``; returns how many.  A held message its
        window still points at is kept: its details make the digest (``every`` may be longer
        than KEEP_DONE)."""
        return self.conn.execute(
            "DELETE FROM notify_outbox WHERE state != 'queued' AND done < ? AND NOT (state = 'held'"
            " AND EXISTS (SELECT 1 FROM notify_windows w WHERE w.held > 0 AND w.last = notify_outbox.id"
            " AND w.target = notify_outbox.target))", (before,)).rowcount

    def recent(self, limit=50, task=None):
        return read_recent(self.conn, limit, task)


# -- reading (alerts, status), on any connection; nothing before a notifier made the tables ------


def read_recent(conn, limit=50, task=None):
    """Messages newest first."""
    where, params = ("WHERE task = ?", [task]) if task else ("", [])
    return [Message(*row) for row in _read(
        conn, f"SELECT {_OUTBOX} FROM notify_outbox {where} ORDER BY seq DESC LIMIT ?",
        (*params, limit))]


def read_overview(conn):
    """What ``status`` says of the notifications: ``{"states": {state: count}, "rejected_by":
    [{"target", "error", "at"}]}``, the targets whose latest rejection is newest first (at most 5)."""
    states = dict(_read(conn, "SELECT state, count(*) FROM notify_outbox GROUP BY state", ()))
    rows = _read(conn, "SELECT shown, error, max(done) AS at FROM notify_outbox WHERE state = 'rejected'"
                       " GROUP BY target ORDER BY at DESC LIMIT 5", ())
    return {"states": states,
            "rejected_by": [{"target": shown, "error": error, "at": at} for shown, error, at in rows]}


def recent_in(state_dir, limit=50, task=None):
    """read_recent on the database of a state directory ([] when there is none)."""
    return _at(state_dir, lambda conn: read_recent(conn, limit, task), [])


def overview_in(state_dir):
    """read_overview on the database of a state directory (nothing when there is none)."""
    return _at(state_dir, read_overview, {"states": {}, "rejected_by": []})


def summary(overview):
    """Lines for ``status``: ``notifications: 2 queued, 1 rejected (torchcore alerts lists them)``
    and one per target that rejected messages; none when nothing waits and nothing was rejected
    or given up."""
    states = overview["states"]
    parts = [f"{states[state]} {state}" for state in (QUEUED, REJECTED, EXPIRED) if states.get(state)]
    if not parts:
        return []
    return [f"notifications: {', '.join(parts)} (torchcore alerts lists them)"] + [
        f"  {rejection['target']} rejected them: {rejection['error']}"
        for rejection in overview["rejected_by"]]


def _at(state_dir, read, empty):
    path = paths.records_db(state_dir)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return empty
    except OSError as exc:
        raise records.RecordsError(f"cannot read the records database {path}: {exc.strerror}") from None
    conn = records.connect(path, 5.0)
    try:
        return read(conn)
    finally:
        conn.close()


def _read(conn, sql, params):
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise records.RecordsError(f"cannot read the notifications: {exc}") from exc
