"""Which processes a restarted supervisor takes for a killed one's executors (procscan.match).

Generated worlds of open runs and processes, derandomized (hypothesis' fixed seed): each open
run's executor is alive (ours: this user, this daemon's mark, started after its record less
EARLIEST) or gone; around them, processes that must never be taken: another daemon's executor
with the same title (another mark), another user's, one holding no mark, one started long
before the record (its pid reused, or an older database's run id), one titled as another task's
run of that id, and the command an executor forked (it keeps the title until it execs).  The
match finds exactly the live executors, each by its own pid.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from supervisor_harness import T0

from torchcore import procscan, records
from torchcore.procscan import EARLIEST, Proc, executor_title, match, parse_title

OURS, OTHER_DAEMON, UID, OTHER_UID = (8, 100), (8, 200), 1000, 1001
DECOYS = ["foreign", "other_user", "unmarked", "too_old", "other_task", "forked_child"]


@st.composite
def worlds(draw):
    """(wanted, procs, expected, unmarked_ok): open runs, the processes, the runs' executors."""
    count = draw(st.integers(0, 12))
    run_ids = draw(st.lists(st.integers(1, 10_000), min_size=count, max_size=count, unique=True))
    tasks = ["a", "b c", "d [run 9]", "x"]
    pids = iter(draw(st.permutations(range(300, 400))))
    wanted, procs, expected = {}, [], {}
    for run_id in run_ids:
        task = draw(st.sampled_from(tasks))
        started = T0 + draw(st.integers(0, 3600))
        wanted[run_id] = (task, started)
        title = executor_title(task, run_id)
        alive = draw(st.booleans())
        if alive:
            pid = next(pids)
            created = started + draw(st.floats(-EARLIEST + 0.5, 30))
            procs.append(Proc(pid, 1, UID, title, frozenset({OURS}), created))
            expected[run_id] = pid
        for decoy in draw(st.lists(st.sampled_from(DECOYS), max_size=4)):
            created = started + draw(st.floats(-EARLIEST + 0.5, 30))
            marks = frozenset({OURS})
            uid, name, parent = UID, title, 1
            if decoy == "foreign":
                marks = frozenset({OTHER_DAEMON})
            elif decoy == "other_user":
                uid = OTHER_UID
            elif decoy == "unmarked":
                marks = frozenset()
            elif decoy == "too_old":
                created = started - EARLIEST - draw(st.floats(0.5, 1e6))
            elif decoy == "other_task":
                name = executor_title(next(t for t in tasks if t != task), run_id)
            elif alive:             # forked_child: the live executor's, as old or younger
                executor = next(p for p in procs if p.pid == expected[run_id])
                parent, created = executor.pid, executor.created + draw(st.floats(0, 1))
            else:
                continue            # no executor, so no child of one
            procs.append(Proc(next(pids), parent, uid, name, marks, created))
    # processes of runs no record is open for, and of no run at all
    for _ in range(draw(st.integers(0, 5))):
        procs.append(Proc(next(pids), 1, UID, executor_title("a", draw(st.integers(20_000, 30_000))),
                          frozenset({OURS}), T0))
    procs.append(Proc(next(pids), 1, UID, "torchcore: launcher", frozenset({OURS}), T0))
    procs.append(Proc(next(pids), 1, UID, "sleep 100", frozenset(), T0))
    return wanted, draw(st.permutations(procs)), expected


@settings(derandomize=True, max_examples=200, deadline=None)
@given(worlds())
def test_the_match_takes_exactly_the_live_executors_of_the_open_runs(world):
    wanted, procs, expected = world
    assert match(wanted, procs, OURS, UID) == expected


@settings(derandomize=True, max_examples=100, deadline=None)
@given(worlds())
def test_at_a_recorded_pid_an_unmarked_executor_is_taken_and_another_daemon_s_never(world):
    wanted, procs, expected = world
    found = match(wanted, procs, OURS, UID, unmarked=True)
    by_pid = {proc.pid: proc for proc in procs}
    for run_id, pid in found.items():
        proc = by_pid[pid]
        assert parse_title(proc.title) == (wanted[run_id][0], run_id)
        assert proc.uid == UID and OTHER_DAEMON not in proc.marks
        assert proc.created >= wanted[run_id][1] - EARLIEST
    assert set(expected) <= set(found)
    assert all(found[run_id] == pid for run_id, pid in expected.items())


@settings(derandomize=True, max_examples=50, deadline=None)
@given(worlds())
def test_without_a_mark_of_its_own_a_supervisor_takes_nothing_by_the_scan(world):
    wanted, procs, _ = world
    assert match(wanted, procs, None, UID) == {}


def test_titles_parse_back_whatever_the_task_name_holds():
    rng = random.Random(15)             # seed recorded
    alphabet = "ab -_.[]:0123456789 run"
    for _ in range(500):
        task = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        run_id = rng.randint(1, 10**12)
        assert parse_title(executor_title(task, run_id)) == (task, run_id)
    assert parse_title("torchcore: launcher") is None
    assert parse_title("torchcore: supervisor tasks.yaml (3 tasks, 1 running)") is None
    assert parse_title("xtorchcore: a [run 1]") is None


def test_a_process_that_cannot_be_read_whole_is_passed_over(monkeypatch):
    """Another user's descriptors cannot be read (PermissionError); a process may end between
    its command line and its descriptors: neither is an executor found, neither an error."""
    monkeypatch.setattr(procscan, "_title", lambda pid: "torchcore: a [run 1]")

    def refused(pid):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(procscan, "_marks", refused)
    import os
    assert procscan.read(os.getpid()) is None
    monkeypatch.setattr(procscan, "_marks", lambda pid: (_ for _ in ()).throw(FileNotFoundError()))
    assert procscan.read(os.getpid()) is None
    assert procscan.read(2 ** 22 + 7) is None           # no such process


@pytest.mark.parametrize("created, taken", [(T0 - EARLIEST - 1, False), (T0 - EARLIEST + 1, True),
                                             (T0 + 3600, True)])
def test_an_executor_started_long_before_its_record_is_not_its_run_s(created, taken):
    procs = [Proc(500, 1, UID, executor_title("a", 7), frozenset({OURS}), created)]
    assert match({7: ("a", T0)}, procs, OURS, UID) == ({7: 500} if taken else {})


def test_run_ids_not_given_back_tell_a_supervisor_killed_since_its_last_clean_stop(tmp_path):
    path = str(tmp_path / "torchcore.db")
    with records.Records(path) as db:
        assert not db.ids_not_given_back()                  # a first start
        for _ in range(3):
            db.add(records.RunRecord(run_id=db.allocate_run_id(), task="t", node="n",
                                     scheduled=None, started=T0))
    with records.Records(path) as db:                       # stopped cleanly: ids given back
        assert not db.ids_not_given_back()
        assert db.recorded([1, 3, 4, 99]) == {1, 3} and db.recorded([]) == set()
        db.add(records.RunRecord(run_id=db.allocate_run_id(), task="t", node="n",
                                 scheduled=None, started=T0))
        db.allocate_run_id()                                # handed out, its start never written
        db.flush()
        killed = records.Records(path)                      # read while the block is still held
        assert killed.ids_not_given_back()
        killed.close()


def _stray(sup, name, created, pid=5151):
    """An executor of run ``name`` the killed supervisor left without any record of its start."""
    run_id = sup.records.allocate_run_id()          # handed out, never given back
    sup.system.strays[run_id] = Proc(pid, 1, UID, executor_title(name, run_id),
                                     frozenset({OURS}), created)
    return run_id


def test_an_executor_of_a_run_without_any_record_is_adopted_with_its_start_written(make):
    sup = make("""tasks:
  - {name: every, schedule: "* * * * * *", command: "true"}
  - {name: d, type: daemon, command: "sleep 100"}
""")
    every = _stray(sup, "every", T0 - 10.4, pid=5151)
    daemon = _stray(sup, "d", T0 - 3.2, pid=5252)
    done = _stray(sup, "every", T0 - 20, pid=5353)
    sup.records.add(records.RunRecord(run_id=done, task="every", node="n", scheduled=T0 - 20,
                                      started=T0 - 20, ended=T0 - 19, exit_code=0))
    sup.records.flush()
    sup.adopt_previous_executors()
    assert sup.table.get(every).executor_pid == 5151 and sup.table.get(every).scheduled == T0 - 10
    assert sup.table.get(daemon).executor_pid == 5252 and sup.table.get(daemon).scheduled is None
    assert sup.table.get(done) is None                      # its end is on record already
    rows = {r.run_id: r for r in sup.records.query()}
    assert rows[every].pid == 5151 and rows[every].ended is None and rows[every].started == T0 - 10.4
    assert rows[daemon].scheduled is None and rows[daemon].ended is None
    sup.second(2)
    assert sup.system.killed == [] and sup.system.forked == []  # neither stopped nor doubled
    assert sup.stats.skipped == 2                           # every: max 1, its adopted run counts


def test_without_ids_held_back_no_executor_of_an_unrecorded_run_is_looked_for(make):
    sup = make('tasks:\n  - {name: d, type: daemon, command: "sleep 100"}\n')
    sup.system.strays[77] = Proc(5151, 1, UID, executor_title("d", 77), frozenset({OURS}), T0)
    sup.adopt_previous_executors()                          # a first start: every id given back
    assert sup.table.get(77) is None


def test_the_scan_for_strays_takes_this_daemon_s_executors_of_unknown_runs_only(monkeypatch):
    """Another daemon's executor titled with the same run id (another task) hides nothing."""
    procs = [Proc(601, 1, UID, executor_title("theirs", 5), frozenset({OTHER_DAEMON}), T0),
             Proc(600, 1, UID, executor_title("mine", 5), frozenset({OURS}), T0),
             Proc(602, 600, UID, executor_title("mine", 5), frozenset({OURS}), T0),
             Proc(603, 1, OTHER_UID, executor_title("x", 6), frozenset({OURS}), T0),
             Proc(604, 1, UID, executor_title("open", 7), frozenset({OURS}), T0)]
    for order in (procs, procs[::-1]):
        monkeypatch.setattr(procscan, "scan", lambda wanted, order=order: list(order))
        record = records.RunRecord(run_id=7, task="open", node="n", scheduled=None, started=T0)
        found, strays = procscan.find([record], OURS, uid=UID, strays=True)
        assert found == {7: 604} and {k: v.pid for k, v in strays.items()} == {5: 600}


@pytest.mark.parametrize("pid", [-5, -1, 2 ** 70])
def test_a_recorded_pid_no_process_can_have_is_looked_for_by_the_scan_never_a_crash(pid, monkeypatch):
    """A records database edited or damaged by hand: a start must not fail on its pid."""
    record = records.RunRecord(run_id=9, task="t", node="n", scheduled=None, started=T0, ended=None,
                               exit_code=None, signal=None, pid=pid)
    scanned = []
    monkeypatch.setattr(procscan, "scan", lambda wanted: scanned.append(wanted) or [])
    assert procscan.find([record], (1, 2)) == ({}, {})
    assert scanned == [{9: ("t", T0)}]
