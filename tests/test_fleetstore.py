"""The fleet agent's side of the records database, in process (no PostgreSQL): the journal shared
by the notifier and the agent, the first start's history, a run's output tail from its task log,
the state `status` shows, and the rows the agent ships."""

import dataclasses
import os
import tempfile
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from torchcore import fleetagent, fleetdb, fleetrows, fleetspec, fleetstore, notifystore, records, tasklog
from torchcore.notifier import Batch as NotifyBatch
from torchcore.runrecord import RunRecord

OPS = st.lists(st.one_of(st.tuples(st.just("write"), st.integers(1, 7)),
                         st.tuples(st.just("notify"), st.integers(1, 5)),
                         st.tuples(st.just("ship"), st.integers(1, 5))), max_size=25)


def write_runs(path, first, count, now):
    """``count`` runs from id ``first``: each a start row, then its end row (two journal entries)."""
    with records.Records(path) as store:
        for run_id in range(first, first + count):
            store.add(RunRecord.of_start(run_id, "t", "n", int(now), now, False, 1))
        store.flush()
        for run_id in range(first, first + count):
            store.add(RunRecord(run_id, "t", "n", int(now), now, now + 1, 0))
        store.flush()


def journal(path):
    conn = records.connect(path, 5.0)
    try:
        return [row[0] for row in conn.execute("SELECT seq FROM changes ORDER BY seq")]
    finally:
        conn.close()


@settings(derandomize=True, max_examples=40, deadline=None)
@given(OPS)
def test_the_notifier_and_the_agent_each_see_every_journal_entry(ops):
    """Both follow the journal; whichever is ahead, neither drops an entry the other has not read
    (records.trim_journal), and once both are past an entry it is gone."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "torchcore.db")
        notes, agent = notifystore.Store(path), fleetstore.Store(path)
        written, noticed, shipped, next_id = [], [], [], 1
        now = time.time()

        def notify(limit):
            changes = notes.changes(limit)
            if changes:
                noticed.extend(seq for seq, *_ in changes)
                notes.commit(NotifyBatch(), cursor=changes[-1][0])

        def ship(limit):
            batch = agent.next_batch(limit)
            if batch:
                shipped.append(batch.cursor)
                agent.commit(batch)

        for op, n in ops + [("notify", 10**6), ("ship", 10**6)]:
            if op == "write":
                write_runs(path, next_id, n, now)
                written.extend(range(next_id, next_id + n))
                next_id += n
            elif op == "notify":
                notify(n * 2)
            else:
                ship(n * 2)
        all_entries = 2 * len(written)
        assert noticed == list(range(1, all_entries + 1))      # each entry once, in order
        assert agent.cursor() == all_entries and (shipped[-1] if shipped else 0) == agent.cursor()
        assert journal(path) == []                              # both past all: trimmed
        notes.close()
        agent.close()


def test_an_agent_behind_the_notifier_keeps_its_entries(tmp_path):
    path = str(tmp_path / "torchcore.db")
    notes, agent = notifystore.Store(path), fleetstore.Store(path)
    write_runs(path, 1, 3, time.time())
    notes.commit(NotifyBatch(), cursor=notes.changes(100)[-1][0])
    assert journal(path) == [1, 2, 3, 4, 5, 6]          # the agent has read none of them
    assert agent.waiting() == 3
    batch = agent.next_batch(4)         # starts 1, 2, 3, the end of 1: each run once, as it is now
    assert [r.run_id for r in batch.records] == [2, 3, 1] and batch.cursor == 4
    assert all(r.ended is not None for r in batch.records)
    agent.commit(batch)
    assert journal(path) == [5, 6]
    batch = agent.next_batch()
    assert [r.run_id for r in batch.records] == [2, 3] and batch.cursor == 6


def test_a_first_start_ships_the_history_before_the_journal(tmp_path):
    path = str(tmp_path / "torchcore.db")
    now = time.time()
    write_runs(path, 1, 5, now)
    agent = fleetstore.Store(path)
    write_runs(path, 6, 2, now)                          # written after the agent's first start
    assert agent.waiting() == 5 + 2
    batches = []
    while (batch := agent.next_batch(3)):
        batches.append([r.run_id for r in batch.records])
        agent.commit(batch)
    assert batches[:3] == [[1, 2, 3], [4, 5, 6], [7]]    # the history, in run id order
    assert {run_id for batch in batches[3:] for run_id in batch} == {6, 7}     # then the journal
    assert agent.waiting() == 0 and agent.backfill() is None
    agent.close()
    assert fleetstore.Store(path).backfill() is None    # a restart does not start it over


LINES = st.lists(st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from(["out", "err"]),
                           st.text(st.characters(blacklist_characters="\n\r"), max_size=40)),
                 max_size=40)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(LINES, st.integers(1, 200), st.integers(150, 4000))
def test_a_run_s_output_tail_is_its_last_bytes_on_a_utf8_boundary(lines, tail, max_bytes):
    """Whatever a run printed (any text, NUL included) and however often its log rotated: the
    tail is valid text PostgreSQL takes, at most ``tail`` bytes, the end of what it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        logs = {run_id: tasklog.TaskLog(tmp, "job", run_id, max_bytes, 50) for run_id in (1, 2, 3)}
        for run_id, stream, text in lines:
            logs[run_id].write(stream, text.encode() + b"\n")
        for log in logs.values():
            log.close()
        now = time.time()
        got = fleetstore.outputs(tmp, "job", {1: (now - 5, now), 2: (now - 5, now)}, tail)
        for run_id in (1, 2):
            printed = "\n".join(text for rid, _, text in lines if rid == run_id)
            expected = printed.replace("\x00", "\ufffd")
            assert "\x00" not in got[run_id]
            assert len(got[run_id].encode()) <= tail
            assert expected.endswith(got[run_id])
            assert len(got[run_id].encode()) > tail - 4 or got[run_id] == expected


def test_a_backlog_s_output_is_read_from_its_time_window_not_the_whole_log(tmp_path):
    """Runs shipped long after they ended (an outage): their lines are found by their stamps,
    in rotated files too, reading about their own window, not everything printed since."""
    clock = [1_800_000_000.0]
    for run_id in range(1, 2001):       # a run a second, about 400 KB of log in all, rotated
        log = tasklog.TaskLog(str(tmp_path), "job", run_id, 150_000, 5, clock=lambda: clock[0])
        log.write("out", f"run {run_id} says\n".encode() + b"x" * 100 + b"\n")
        log.close()
        clock[0] += 1
    assert len(tasklog.log_files(str(tmp_path), "job")) >= 3
    started = 1_800_000_000.0 + 699         # run 700
    for run_id in (700, 1999):
        at = 1_800_000_000.0 + run_id - 1
        got = fleetstore.outputs(str(tmp_path), "job", {run_id: (at, at + 0.5)}, 1000,
                                 scan_limit=128 << 10)
        assert got == {run_id: f"run {run_id} says\n" + "x" * 100}
    assert fleetstore.outputs(str(tmp_path), "job", {5000: (started, started)}, 1000) == {5000: ""}


def test_tail_of_cuts_on_a_character_boundary():
    assert fleetstore.tail_of("aé€😀".encode(), 4) == "😀"
    assert fleetstore.tail_of("aé€😀".encode(), 6) == "😀"
    assert fleetstore.tail_of("aé€😀".encode(), 7) == "€😀"
    assert fleetstore.tail_of(b"a\x00b", 10) == "a\ufffdb"


def test_the_state_status_shows(tmp_path):
    state_dir = str(tmp_path)
    assert fleetstore.state_in(state_dir) is None and fleetstore.summary(None) == []
    store = fleetstore.Store(records.db_path(state_dir))
    since = time.mktime((2026, 11, 24, 15, 30, 5, 0, 0, -1))
    store.save_state({"state": "unreachable", "since": since, "waiting": 1234,
                      "error": "cannot connect to the fleet database postgresql://u:***@db/x: refused",
                      "database": "postgresql://u:***@db/x", "node": "web-1"})
    state = fleetstore.state_in(state_dir)
    assert fleetstore.summary(state) == [
        "fleet database unreachable since 15:30:05, 1234 records waiting",
        "  cannot connect to the fleet database postgresql://u:***@db/x: refused"]
    up = {**state, "state": "up", "waiting": 0}
    assert fleetstore.summary(up) == ["fleet: shipping to postgresql://u:***@db/x as web-1, up to date"]
    assert fleetstore.summary({**up, "waiting": 1}) == [
        "fleet: shipping to postgresql://u:***@db/x as web-1, 1 record waiting"]
    assert fleetstore.summary(up, live=False) == []
    assert fleetstore.summary({**up, "state": "stopped", "waiting": 3}, live=False) == [
        "fleet: the agent is not running (postgresql://u:***@db/x as web-1), 3 records waiting"]


def test_the_row_shipped_of_a_record():
    failed = RunRecord(7, "job", "host", 100, 101.5, 102.0, 3, error="bad\x00byte")
    row = dict(zip(fleetrows._RUN_COLUMNS, fleetrows.run_row("web-1", failed, "tail")))
    assert (row["node"], row["run_id"], row["failed"], row["at"], row["output"]) == (
        "web-1", 7, True, 101.5, "tail")
    assert row["error"] == "bad\ufffdbyte"
    skipped = RunRecord(8, "job", "host", 100, skipped="max 1 reached")
    row = dict(zip(fleetrows._RUN_COLUMNS, fleetrows.run_row("web-1", skipped, None)))
    assert (row["failed"], row["at"], row["skipped"]) == (False, 100, "max 1 reached")
    stopped = RunRecord(9, "job", "host", 100, 101.0, 102.0, None, signal=15, stopped="shutdown")
    assert dict(zip(fleetrows._RUN_COLUMNS, fleetrows.run_row("n", stopped, "")))["failed"] is False


def test_the_agent_runs_only_with_settings_fleet():
    from torchcore import config, services

    assert services.REGISTRY["fleet"].module == "torchcore.fleetagent"
    without = config.loads("tasks: []\n")
    assert not fleetagent.wanted(without)
    with_fleet = config.loads("settings:\n  fleet:\n    database: postgresql://tc@db/tc\ntasks: []\n")
    assert fleetagent.wanted(with_fleet)


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class _NoStore:
    def waiting(self):
        return 0

    def save_state(self, state):
        pass


def _retrying_agent(error, jitter=lambda: 0.0):
    """An Agent whose every connect fails with ``error``; the waits between its tries."""
    from torchcore import taskspec

    def connect(url):
        raise error
    clock = _Clock()
    settings = taskspec.default_settings("tasks.yaml")
    settings = dataclasses.replace(settings, fleet=fleetspec.FleetSettings(database="postgresql://db/x"))
    agent = fleetagent.Agent(_NoStore(), settings, "n", "postgresql://db/x", connect=connect,
                             clock=clock, monotonic=clock, jitter=jitter)
    waits = []
    for _ in range(12):
        agent.step()
        waits.append(agent.next_try - clock.now)
        clock.now = agent.next_try
    return agent, waits


def test_an_unreachable_database_is_tried_at_least_every_few_seconds(caplog):
    agent, waits = _retrying_agent(fleetdb.FleetUnreachable("cannot connect: refused"))
    assert waits == [1.0, 2.0] + [fleetagent.RETRY_UNREACHABLE] * 10
    assert agent.state == fleetagent.UNREACHABLE
    assert caplog.text.count("cannot connect: refused") == 1        # once per state change
    _, jittered = _retrying_agent(fleetdb.FleetUnreachable("x"), jitter=lambda: 0.999)
    assert all(0.8 * w <= j <= w for w, j in zip(waits, jittered))


def test_a_refusing_database_backs_off_to_30s():
    agent, waits = _retrying_agent(fleetdb.FleetRefused("password authentication failed"))
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0] + [fleetagent.RETRY_MAX] * 7
    assert agent.state == fleetagent.REFUSED
    agent.connect = lambda url: (_ for _ in ()).throw(fleetdb.FleetUnreachable("gone"))
    agent.monotonic.now = agent.next_try
    agent.step()                    # the server went away too: back to a short wait at once
    assert agent.next_try - agent.monotonic.now == fleetagent.RETRY_UNREACHABLE


def test_the_agent_s_file_digest_is_the_loader_s(tmp_path):
    from torchcore import taskset

    path = tmp_path / "tasks.yaml"
    path.write_text("tasks: []\n")
    assert fleetagent.file_digest(str(path)) == taskset.digest(str(path)) is not None
    assert fleetagent.file_digest(str(tmp_path / "none.yaml")) is None


def test_the_agent_process_loads_psycopg_without_python_s_openssl(tmp_path):
    """~5 MB of the agent's resident memory (docs/fleet.md): psycopg works, the file's digest is
    the same, and neither ssl nor _hashlib (nor the system's libcrypto) is loaded."""
    import subprocess
    import sys

    path = tmp_path / "tasks.yaml"
    path.write_text("tasks: []\n")
    code = ("import sys; from torchcore import fleetagent; fleetagent._without_python_ssl(); "
            "import psycopg, hashlib; from torchcore import config, fleetrows; "
            f"print(fleetagent.file_digest({str(path)!r}), hashlib.sha256(b'x').hexdigest(), "
            "sys.modules.get('ssl'), sys.modules.get('_hashlib'), "
            "'libcrypto.so' in open('/proc/self/maps').read().replace('libcrypto-', ''))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    from torchcore import taskset
    import hashlib
    assert out.stdout.split() == [taskset.digest(str(path)), hashlib.sha256(b"x").hexdigest(),
                                  "None", "None", "False"], out.stderr
