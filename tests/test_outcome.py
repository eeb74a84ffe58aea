"""One failed rule everywhere: outcome.RunResult, the records' SQL, history --failed, status."""

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchcore import outcome
from torchcore.commands import status as cmd_status
from torchcore.outcome import RunResult
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
    assert not RunResult(0, None, False).failed
    for failed in [(1, None, False), (None, 9, False), (0, None, True), (None, None, False, "lost"),
                   (0, None, False, "memory limit exceeded")]:
        assert RunResult(*failed).failed, failed
    assert not RunResult(None, signal.SIGTERM, False, None, "shutdown").failed
    assert RunResult(None, 9, False, None, "shutdown").describe() == "stopped: shutdown"
    assert RunResult(None, None, False, "executor ended without a report "
                     "(killed by signal 9)").describe().startswith("failed: executor ended")
    assert RunResult(0, None, True).describe() == "timed out (exit 0)"


@settings(derandomize=True, max_examples=500, deadline=None)
@given(exit_code=st.one_of(st.none(), st.integers(-2, 255)),
       signal=st.one_of(st.none(), st.sampled_from([1, 2, 9, 15, 64, 99])),
       timed_out=st.booleans(),
       error=st.one_of(st.none(), st.sampled_from(["lost", "cannot start: x", ""])),
       stopped=st.one_of(st.none(), st.sampled_from(["shutdown", "stop requested"])))
def test_the_rule_for_every_combination(exit_code, signal, timed_out, error, stopped):
    """Every combination of an exit code (or none: the executor never saw one), a signal, a
    timeout, an error and a planned stop: ok only for exit 0 and nothing else, a planned stop
    never a failure; the words say which."""
    result = RunResult(exit_code, signal, timed_out, error, stopped)
    clean = exit_code == 0 and signal is None and not timed_out and error is None
    assert result.failed == (stopped is None and not clean)
    text = result.describe()
    if stopped is not None:
        assert text == f"stopped: {stopped}"
        return
    assert (text == "ok") == clean
    if clean:
        return
    if signal is not None:
        assert f"killed by {outcome.signal_name(signal)}" in text
    elif exit_code is not None:
        assert f"exit {exit_code}" in text
    else:
        assert text.startswith("timed out" if timed_out else "failed")  # no exit code known
    assert text.startswith("timed out") == timed_out
    assert text.endswith(f": {error}") == (error is not None)


@given(st.integers(-64, 255))
def test_a_return_code_is_an_exit_code_or_a_signal(code):
    result = RunResult.from_returncode(code)
    assert (result.exit_code, result.signal) == ((code, None) if code >= 0 else (None, -code))
    assert result.failed == (code != 0)
    assert result.ending() == (f"exit {code}" if code >= 0 else
                               f"killed by {outcome.signal_name(-code)}")
    assert result.ending(raw=True) == (f"exit status {code}" if code >= 0 else
                                       f"killed by signal {-code}")


def test_a_record_and_its_result_agree():
    ended = RunRecord(1, "t", "n", 5, 5.0, 6.0, None, 9, peak_rss=10, error="x")
    assert ended.result == RunResult(None, 9, False, "x", None, 5.0, 6.0, 10)
    assert ended.failed == ended.result.failed and ended.describe() == ended.result.describe()
    assert not RunRecord.of_skip(2, "t", "n", 5, "max 1 reached", False).failed
    lost = RunRecord.of_start(3, "t", "n", 5, 5.0, False, 42).lost(9.0, "gone")
    assert lost.failed and lost.describe() == "failed: lost: gone" and lost.ended == 9.0


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
        rule = ended and RunResult(record.exit_code, record.signal, record.timed_out,
                                   record.error, record.stopped).failed
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
