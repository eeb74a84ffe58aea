"""The fleet agent's side of the node's records database: what waits to be shipped to the fleet
database, each run's output tail from its task log, and the agent's state for ``status``.

Everything is in the records database (SQLite stays the source of truth and the outbox):

- ``meta``'s ``fleet_cursor``: the last entry of the records' ``changes`` journal whose run is in
  the fleet database.  It moves only after the PostgreSQL transaction that wrote the batch
  committed, in the SQLite transaction that also drops the journal entries every reader has
  passed (records.trim_journal: the notifier reads the journal too).  An agent killed between the
  two commits ships that batch again, which the (node, run_id) key writes once.
- ``meta``'s ``fleet_backfill``: on the agent's first start on a node, the run ids already shipped
  of the history the node had before (the runs table read in run id order); the cursor is set to
  the journal's end at that moment, so whatever is written later comes through the journal.
  Gone once the history is shipped.
- ``meta``'s ``fleet_state``: JSON with the agent's state (``up``, ``unreachable``, ``refused``,
  ``schema``, ``starting``, ``stopped``), since when, how many records wait, the last error
  (already without secrets), the database's redacted URL and the clock offset at the last
  heartbeat (this node's clock minus the database's, to 0.1 s): what ``status`` shows.

A batch holds each run once, as its row is now (a start and an end of one run in the same batch
ship one row, the end); shipping the current row of every journal entry, in journal order, makes
the fleet's row the node's row however often it is shipped.  This module imports nothing of
psycopg: ``status`` reads the state through it.
"""

import dataclasses
import datetime
import json
import os
import sqlite3
import time

from torchcore import paths, records, tasklog
from torchcore.fleetspec import CLOCK_TOLERANCE
from torchcore.runrecord import RunRecord
from torchcore.textfmt import printable

CURSOR, BACKFILL, STATE = "fleet_cursor", "fleet_backfill", "fleet_state"
BATCH = 500                 # runs per PostgreSQL transaction
SCAN_LIMIT = 8 << 20        # bytes of a task's logs read back, at most, for one batch's output
STAMP_SLACK = 5.0           # seconds a log line's stamp may precede its run's start
_FIELDS = [f.name for f in dataclasses.fields(RunRecord)]
_JOURNAL = ("SELECT c.seq, {} FROM changes c LEFT JOIN runs r ON r.run_id = c.run_id"
            " WHERE c.seq > ? ORDER BY c.seq LIMIT ?").format(", ".join("r." + f for f in _FIELDS))
_HISTORY = "SELECT {} FROM runs WHERE run_id > ? ORDER BY run_id LIMIT ?".format(", ".join(_FIELDS))


@dataclasses.dataclass
class Batch:
    """The next runs to ship, each once, and where the cursor (or the backfill) goes after them."""

    records: list
    cursor: int | None = None       # the journal entry to move fleet_cursor to
    backfill: int | None = None     # the run id to move fleet_backfill to

    def __bool__(self):
        return self.cursor is not None or self.backfill is not None



CACHE_KIB = 256     # the agent's page cache (SQLite's default is 2 MiB: a resident cost when idle)


class Store:
    """The agent's cursor, backfill and state on a connection of its own; transactions are short
    (the supervisor writes the same file and waits at most half a second for it)."""

    def __init__(self, path, busy_timeout=5.0):
        self.path = path
        self.conn = records.connect(path, busy_timeout)
        self.conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")     # it reads each page once
        self.identity = records.file_identity(path)
        self._transaction(self._first_start)

    def close(self):
        self.conn.close()

    def replaced(self):
        """True if the database file is not the one opened (removed, or put back from a backup)."""
        return records.file_identity(self.path) not in (self.identity, None, False)

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

    def _first_start(self):
        """No cursor yet: the journal's end becomes it, and the history before it is shipped from
        the runs table first (a run written since is in both: shipped twice, stored once)."""
        if self._meta(CURSOR) is not None:
            return
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        self.conn.execute("INSERT INTO meta VALUES (?, ?)", (CURSOR, str(row[0] if row else 0)))
        if self.conn.execute("SELECT 1 FROM runs LIMIT 1").fetchone() is not None:
            self.conn.execute("INSERT INTO meta VALUES (?, '0')", (BACKFILL,))

    def _meta(self, key):
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def cursor(self):
        return int(self._meta(CURSOR) or 0)

    def backfill(self):
        value = self._meta(BACKFILL)
        return None if value is None else int(value)

    def next_batch(self, limit=BATCH):
        """The next runs to ship (an empty Batch: nothing waits): the history first, then the
        journal after the cursor."""
        done = self.backfill()
        if done is not None:
            rows = self.conn.execute(_HISTORY, (done, limit)).fetchall()
            if rows:
                return Batch([records.record_of(row) for row in rows], backfill=rows[-1][0])
            self._transaction(lambda: self.conn.execute("DELETE FROM meta WHERE key = ?", (BACKFILL,)))
        rows = self.conn.execute(_JOURNAL, (self.cursor(), limit)).fetchall()
        if not rows:
            return Batch([])
        latest = {}
        for row in rows:
            if row[1] is not None:          # None: the run was pruned meanwhile
                latest.pop(row[1], None)
                latest[row[1]] = row[1:]    # in the order of each run's last entry
        return Batch([records.record_of(row) for row in latest.values()], cursor=rows[-1][0])

    def commit(self, batch):
        """After the batch's PostgreSQL transaction committed: move the cursor (or the backfill)
        past it and drop the journal entries every reader has passed, in one transaction."""
        self._transaction(self._commit, batch)

    def _commit(self, batch):
        if batch.backfill is not None:
            self.conn.execute("UPDATE meta SET value = ? WHERE key = ?", (str(batch.backfill), BACKFILL))
        if batch.cursor is not None:
            self.conn.execute("UPDATE meta SET value = ? WHERE key = ?", (str(batch.cursor), CURSOR))
            records.trim_journal(self.conn)

    def waiting(self):
        """How many runs wait to be shipped (each once, however many writes it had)."""
        done = self.backfill()
        if done is None:
            return self.conn.execute("SELECT count(DISTINCT run_id) FROM changes WHERE seq > ?",
                                     (self.cursor(),)).fetchone()[0]
        return self.conn.execute(     # the history left, and the journal's other runs
            "SELECT (SELECT count(*) FROM runs WHERE run_id > ?) + (SELECT count(DISTINCT run_id)"
            " FROM changes WHERE seq > ? AND run_id <= ?)", (done, self.cursor(), done)).fetchone()[0]

    def save_state(self, state):
        """Keep the agent's state (a dict, see the module's docstring) for ``status``."""
        self._transaction(lambda: self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                                    (STATE, json.dumps(state))))


# -- a run's output, from its task's log -------------------------------------------------------


def outputs(log_dir, task, runs, tail, scan_limit=SCAN_LIMIT):
    """``{run_id: text}``: the last ``tail`` bytes of the output of each run of ``task`` in
    ``runs`` (``{run_id: (epoch it started, epoch it ended)}``), from its log files (the current
    one, then the rotated ones).  Lines are stamped in time order, so only the runs' time window
    is read: its end found by a binary search on the stamps, then read back to its start (at most
    ``scan_limit`` bytes): a backlog shipped long after costs what its own runs printed.  A run
    whose lines are not found (it printed nothing, or they rotated away) has ''.  torchcore's own
    lines (a timeout, a limit, the run's end) are marked ``[torchcore]`` as in notifications."""
    if not runs or tail <= 0:
        return {run_id: "" for run_id in runs}
    wanted = {str(run_id).encode(): run_id for run_id in runs}
    oldest = min(start for start, _ in runs.values()) - STAMP_SLACK
    newest = max(end for _, end in runs.values()) + STAMP_SLACK
    found = {run_id: [] for run_id in runs}
    size = {run_id: 0 for run_id in runs}
    budget = scan_limit
    for path in reversed(tasklog.log_files(log_dir, task)):
        try:
            with open(path, "rb") as f:
                budget, passed = _scan(f, _offset_after(f, newest), wanted, found, size, tail,
                                       oldest, budget)
        except OSError:
            continue
        if passed or budget <= 0:
            break
    return {run_id: _tail_text(found[run_id], tail) for run_id in runs}


def _offset_after(f, when, close_enough=64 << 10):
    """An offset of ``f`` at or after the end of its lines stamped up to ``when`` (within
    ``close_enough`` bytes after it): a binary search on the stamps of whole lines."""
    low, high = 0, os.fstat(f.fileno()).st_size
    while high - low > close_enough:
        middle = (low + high) // 2
        f.seek(middle)
        f.readline()                        # the rest of a line cut in the middle
        if _stamp(f.readline()) > when:     # +inf past the end: look lower
            high = middle
        else:
            low = middle
    return high


def _scan(f, pos, wanted, found, size, tail, oldest, budget):
    """Read ``f`` backwards from ``pos``, collecting the wanted runs' lines (newest first) until
    ``tail`` bytes of each; returns (budget left, whether a line older than ``oldest`` was met)."""
    rest = b""
    while pos > 0 and budget > 0:
        step = min(64 << 10, pos, budget)
        pos -= step
        budget -= step
        f.seek(pos)
        pieces = (f.read(step) + rest).split(b"\n")
        rest = pieces.pop(0) if pos > 0 else b""
        for raw in reversed(pieces):
            _take(raw, wanted, found, size, tail)
        if pieces and _stamp(pieces[0]) < oldest:
            return budget, True
    return budget, False        # (a line cut by the budget is left out)


def _take(raw, wanted, found, size, tail):
    parts = raw.split(b" ", 3)      # "<stamp> run <id> <stream>| <text>" (see tasklog.py)
    if len(parts) < 4 or parts[1] != b"run":
        return
    run_id = wanted.get(parts[2])
    if run_id is None or size[run_id] >= tail:
        return
    stream, sep, text = parts[3].partition(b"| ")
    if not sep or stream not in (b"out", b"err", b"sys"):
        return
    line = b"[torchcore] " + text if stream == b"sys" else text
    found[run_id].append(line)
    size[run_id] += len(line) + 1


def _stamp(raw):
    """The epoch of a log line's stamp; +inf when it has none (never ends a scan)."""
    try:
        return datetime.datetime.fromisoformat(raw.split(b" ", 1)[0].decode()).timestamp()
    except (ValueError, UnicodeDecodeError):
        return float("inf")


def _tail_text(lines_newest_first, tail):
    return tail_of(b"\n".join(reversed(lines_newest_first)), tail)


def tail_of(data, limit):
    """The last ``limit`` bytes of ``data`` as text: cut on a UTF-8 boundary, invalid bytes
    replaced, NUL (which PostgreSQL's text cannot hold) shown as U+FFFD."""
    if len(data) > limit:
        data = data[len(data) - limit:]
        start = 0
        while start < min(3, len(data)) and (data[start] & 0xC0) == 0x80:
            start += 1
        data = data[start:]
    return clean(data.decode("utf-8", "replace"))


def clean(text):
    """Text PostgreSQL takes: without NUL."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


# -- reading the state (status), on any connection ----------------------------------------------


def state_in(state_dir):
    """The fleet agent's state kept in the records database of ``state_dir``, or None."""
    path = paths.records_db(state_dir)
    if not os.path.exists(path):
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (STATE,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    try:
        return json.loads(row[0]) if row else None
    except ValueError:
        return None


STATE_WORDS = {
    "unreachable": "fleet database unreachable",
    "refused": "fleet database refusing this node",
    "schema": "fleet database schema not usable",
}


def summary(state, live=True):
    """Lines for ``status``: "fleet: shipping to URL as NODE, up to date" when all is well,
    "fleet database unreachable since HH:MM:SS, N records waiting" (and the error) when not;
    and a warning when this node's clock is more than CLOCK_TOLERANCE off the database's.
    The error is the database's text: its control characters are shown as \\xNN."""
    if not state:
        return []
    clock = clock_warning(state) if live else None
    return [printable(line) for line in _summary(state, live) + ([clock] if clock else [])]


def clock_warning(state):
    """"warning: this node's clock is 1.8 s ahead of ...", or None within the tolerance."""
    offset = state.get("clock_offset")
    if not isinstance(offset, (int, float)) or abs(offset) <= CLOCK_TOLERANCE:
        return None
    return (f"warning: this node's clock is {abs(offset):.1f} s "
            f"{'ahead of' if offset > 0 else 'behind'} the fleet database's (`run: once` claims "
            "and leases are timed by the database's clock): keep its time in sync")


def _summary(state, live):
    waiting = int(state.get("waiting") or 0)
    pending = f"{waiting} record{'s' if waiting != 1 else ''} waiting"
    what = state.get("state")
    if what in STATE_WORDS:
        since = time.strftime("%H:%M:%S", time.localtime(state.get("since") or 0))
        lines = [f"{STATE_WORDS[what]} since {since}, {pending}"]
        if state.get("error"):
            lines.append(f"  {state['error']}")
        return lines
    where = f"{state.get('database')} as {state.get('node')}"
    if what == "up" and live:
        return [f"fleet: shipping to {where}, {'up to date' if not waiting else pending}"]
    if what == "starting" and live:
        return [f"fleet: connecting to {where}, {pending}"]
    return [f"fleet: the agent is not running ({where}), {pending}"] if waiting else []
