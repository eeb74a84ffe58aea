"""One failed rule everywhere: outcome.run_failed, the records' SQL, history --failed, status."""

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchcore import outcome
from torchcore.commands import status as cmd_status
from torchcore.records import Records, RunRecord
from torchcore.states import TaskHealth

_ENDED = st.fixed_dictionaries({
    "exit_code": st.one_of(st.none(), st.integers(0, 255)),
    "signal": st.one_of(st.none(), st.sampled_from([2, 9, 15, 64, 99])),
    "timed_out": st.booleans(),
    "error": st.one_of(st.none(), st.sampled_from(
        ["executor ended without a report (killed by signal 9)", "cannot start: embedded null byte",
         "memory limit 1 bytes exceeded (2)", "lost: its supervisor and executor stopped"])),
    "stopped": st.one_of(st.none(), st.sampled_from(["shutdown", "task removed by reload"])),
})
_KIND = st.sampled_from(["ended", "running", "skipped", "missed"])


def _record(run_id, kind, fields):
    ended = 1000.0 + run_id if kind in ("ended", "skipped", "missed") else None
    return RunRecord(run_id, "t", "n", 1000 + run_id, 999.0 + run_id if kind != "skipped" else None,
                     ended, skipped="max 1" if kind == "skipped" else None,
                     missed=kind == "missed", **fields)


def test_the_rule_by_example():
    assert not outcome.run_failed(0, None, False)
    for failed in [(1, None, False), (None, 9, False), (0, None, True), (None, None, False, "lost"),
                   (0, None, False, "memory limit exceeded")]:
        assert outcome.run_failed(*failed), failed
    assert not outcome.run_failed(None, signal.SIGTERM, False, None, "shutdown")
    assert outcome.describe_outcome(None, 9, False, None, "shutdown") == "stopped: shutdown"
    assert outcome.describe_outcome(None, None, False, "executor ended without a report "
                                    "(killed by signal 9)").startswith("failed: executor ended")
    assert outcome.describe_outcome(0, None, True) == "timed out (exit 0)"


@pytest.mark.slow
@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.lists(st.tuples(_KIND, _ENDED), min_size=1, max_size=12))
def test_sql_records_history_and_status_agree_with_the_rule(tmp_path_factory, runs):
    """Generated outcomes: the SQL of history --failed selects exactly the runs the rule calls
    failed; the description says ok only for a success; status says failing exactly then."""
    path = str(tmp_path_factory.mktemp("db") / "torchcore.db")
    records = [_record(i + 1, kind, fields) for i, (kind, fields) in enumerate(runs)]
    with Records(path) as store:
        for record in records:
            store.add(record)
        store.flush()
        selected = {r.run_id for r in store.query(limit=None, failed=True)}
        stored = {r.run_id: r for r in store.query(limit=None)}
    expected = set()
    for record in records:
        ended = record.ended is not None and record.skipped is None and not record.missed
        rule = ended and outcome.run_failed(record.exit_code, record.signal, record.timed_out,
                                           record.error, record.stopped)
        assert record.failed == rule == stored[record.run_id].failed
        if rule:
            expected.add(record.run_id)
        text = record.describe()
        if ended:
            assert (text == "ok") == (not rule and record.stopped is None), text
            assert text.startswith("stopped: ") == (record.stopped is not None)
            health = cmd_status._health(_Task(), None, {}, record)
            assert health == (TaskHealth.FAILING if rule else TaskHealth.OK)
    assert selected == expected


class _Task:
    enabled = True

    def runs_on(self, node):
        return True


def test_a_version_1_database_is_upgraded_and_keeps_its_runs(tmp_path):
    import sqlite3

    path = str(tmp_path / "torchcore.db")
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE runs (run_id INTEGER PRIMARY KEY, task TEXT NOT NULL, node TEXT NOT NULL,
            scheduled INTEGER, started REAL, ended REAL, exit_code INTEGER, signal INTEGER,
            timed_out INTEGER NOT NULL DEFAULT 0, skipped TEXT, missed INTEGER NOT NULL DEFAULT 0,
            manual INTEGER NOT NULL DEFAULT 0, pid INTEGER, peak_rss INTEGER, at REAL NOT NULL);
        CREATE INDEX runs_failed ON runs (at) WHERE (exit_code != 0 OR signal IS NOT NULL OR timed_out != 0);
        INSERT INTO meta VALUES ('schema_version', '1'), ('next_run_id', '10');
        INSERT INTO runs VALUES (1, 't', 'n', 5, 5.0, 6.0, NULL, NULL, 0, NULL, 0, 0, 7, NULL, 5.0);
    """)
    conn.close()
    with Records(path) as store:
        (run,) = store.query(failed=True)
        assert run.run_id == 1 and run.error is None and run.describe().startswith("failed")
