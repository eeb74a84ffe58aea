"""The SQL of the records database (records.py): the runs table, its journal of changes, the rule
of a failed run, and the rule every write of a run row keeps (records.write_rows applies it).

A run's row is a start (no end yet), a lost verdict (``error`` "lost: ...", the daemon's guess
that nobody will record the run's end: adopt.py) or a real end (ended, skipped or missed): its
``rank``, 0, 1 or 2.  A row is never replaced by one of a lower rank, so an executor's own end
record (written when its supervisor is gone) is never undone by the next supervisor's adoption,
whatever the order their writes land in: neither by the start row of a run it found without a
record, nor by the lost verdict of a run it found unfinished.  Between two rows of the same rank
the later wins, and a real end replaces a lost verdict.  A refused row is not written at all, so
the journal (an AFTER INSERT trigger) is not told of it either.  The writer looks up the stored
final rows among the runs it writes (final_among) in the transaction that writes, so no other
writer lands in between.
"""

from torchcore.runrecord import LOST

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY,
    task TEXT NOT NULL,
    node TEXT NOT NULL,
    scheduled INTEGER,
    started REAL,
    ended REAL,
    exit_code INTEGER,
    signal INTEGER,
    timed_out INTEGER NOT NULL DEFAULT 0,
    skipped TEXT,
    missed INTEGER NOT NULL DEFAULT 0,
    manual INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    peak_rss INTEGER,
    error TEXT,                 -- why a run failed without an exit code (executor died, cannot start)
    stopped TEXT,               -- why a planned stop ended the run (shutdown, reload): not a failure
    at REAL NOT NULL            -- sort key: started, else scheduled (skips and misses never start)
);
CREATE INDEX IF NOT EXISTS runs_at ON runs (at);
CREATE INDEX IF NOT EXISTS runs_task_at ON runs (task, at);
CREATE INDEX IF NOT EXISTS runs_failed ON runs (at) WHERE {failed};
"""

# Every write of a run row that lands (not one the rank rule refuses), in order (ended: an end, skip or
# miss; else a start; written: when, epoch seconds), added by a trigger in the writer's
# transaction: the notifier and the fleet agent follow it, each with its cursor (notifystore.py,
# fleetstore.py).  AUTOINCREMENT: a deleted number
# never comes back.  Pruned by ``written`` with the runs, from its oldest end (seq and written
# grow together), never scanned.
JOURNAL = (
    ("CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
     " run_id INTEGER NOT NULL, ended INTEGER NOT NULL,"
     " written REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0))"),
    ("CREATE TRIGGER IF NOT EXISTS runs_changed AFTER INSERT ON runs BEGIN"
     " INSERT INTO changes (run_id, ended) VALUES (NEW.run_id,"
     " NEW.ended IS NOT NULL OR NEW.skipped IS NOT NULL OR NEW.missed != 0); END"),
)

# The meta keys of the journal's readers' cursors (each the last entry it is done with): the
# notifier's (notifystore.py) and the fleet agent's (fleetstore.py).  An entry is dropped once
# every reader this database has is past it (trim_journal), never before.
JOURNAL_CURSORS = ("notify_cursor", "fleet_cursor")
TRIM_JOURNAL = ("DELETE FROM changes WHERE seq <= (SELECT min(CAST(value AS INTEGER)) FROM meta"
                 " WHERE key IN ({}))".format(", ".join("?" * len(JOURNAL_CURSORS))))

PRUNE_JOURNAL = ("DELETE FROM changes WHERE seq < coalesce((SELECT seq FROM changes"
                  " WHERE written >= ? ORDER BY seq LIMIT 1), (SELECT max(seq) + 1 FROM changes))")

# The rule of outcome.RunResult.failed in SQL (tests/test_outcome.py checks they agree).  Also the
# WHERE of the partial index runs_failed: a query must use the same text to use the index.
FAILED = ("(ended IS NOT NULL AND skipped IS NULL AND missed = 0 AND stopped IS NULL"
           " AND (exit_code IS NOT 0 OR signal IS NOT NULL OR timed_out != 0 OR error IS NOT NULL))")
COLUMNS = ("run_id", "task", "node", "scheduled", "started", "ended", "exit_code", "signal",
            "timed_out", "skipped", "missed", "manual", "pid", "peak_rss", "error", "stopped")
UPGRADE_FROM_1 = ("ALTER TABLE runs ADD COLUMN error TEXT", "ALTER TABLE runs ADD COLUMN stopped TEXT",
                   "DROP INDEX IF EXISTS runs_failed",
                   f"CREATE INDEX runs_failed ON runs (at) WHERE {FAILED}")
SELECT = "SELECT {} FROM runs".format(", ".join(COLUMNS))
# Only through records.write_rows, which drops first the rows the rank rule refuses.
UPSERT = "INSERT OR REPLACE INTO runs ({}, at) VALUES ({}?)".format(
    ", ".join(COLUMNS), "?, " * len(COLUMNS))
CHUNK = 256     # run ids per look at the stored final rows (final_among)
# the look for ``size`` run ids, padded with NULL to a power of two: nine statement texts in all,
# each cached by sqlite3, and a flush of one start binds one id, not CHUNK (a third of the cost)
_FINAL_AMONG = {size: ("SELECT run_id, ended, skipped, missed, error FROM runs WHERE run_id IN"
                       " ({}) AND (ended IS NOT NULL OR skipped IS NOT NULL OR missed != 0)"
                       ).format(", ".join("?" * size)) for size in (1 << n for n in range(9))}


def final_among(ids):
    """The statement and its parameters that look up the final rows among ``ids`` (at most
    CHUNK run ids): (run_id, ended, skipped, missed, error) of each."""
    size = 1 << (len(ids) - 1).bit_length()
    return _FINAL_AMONG[size], list(ids) + [None] * (size - len(ids))
_ENDED, _SKIPPED, _MISSED, _ERROR = (COLUMNS.index(name)
                                     for name in ("ended", "skipped", "missed", "error"))


def rank(ended, skipped, missed, error):
    """A run row's rank: 0 a start, 1 a lost verdict, 2 a real end (ended, skipped or missed)."""
    if ended is None and skipped is None and not missed:
        return 0
    return 1 if error is not None and error.startswith(LOST) else 2


def row_rank(row):
    """The rank of a row of UPSERT's parameters (records._row)."""
    return rank(row[_ENDED], row[_SKIPPED], row[_MISSED], row[_ERROR])
