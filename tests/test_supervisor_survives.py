"""The supervisor outlives what slips past validation, on the fake clock (tests/supervisor_harness.py).

A reload whose apply step fails is rejected whole; one task whose start raises does not stop the
others; prepared runs get their go before the rest of their second is forked; adopted runs are
runs (counted, stopped, closed); a daemon's wait for a limit counts once.
"""

import logging
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from supervisor_harness import T0, Harness, rewrite, taskfile

from torchcore import jobspec, prepare, records
from torchcore.launcher import JobTooLarge
from torchcore.schedule import ScheduleTable

OLD = """tasks:
  - {name: keep, schedule: "* * * * * *", command: "sleep 100", max: 5}
  - {name: change, schedule: "*/2 * * * * *", command: "true", max: 5}
  - {name: gone, schedule: "* * * * * *", command: "true", max: 5}
  - {name: d, type: daemon, command: "sleep 100"}
"""
NEW = """tasks:
  - {name: keep, schedule: "* * * * * *", command: "sleep 100", max: 5}
  - {name: change, schedule: "*/3 * * * * *", command: "true", max: 5}
  - {name: d, type: daemon, command: "sleep 200"}
  - {name: added, schedule: "* * * * * *", command: "true"}
"""


def _fail_on(monkeypatch, name):
    real = ScheduleTable.set

    def set_or_fail(self, key, schedule):
        if key == name:
            raise OverflowError("int too big to convert")
        return real(self, key, schedule)
    monkeypatch.setattr(ScheduleTable, "set", set_or_fail)


def _snapshot(sup):
    return (dict(sup.tasks), {s: sorted(sup.planner.peek(s)) for s in range(T0, T0 + 7)},
            set(sup.daemons), sup.taskfile.digest, sup.settings)


def test_a_reload_whose_apply_fails_is_rejected_whole_and_disturbs_nothing(make, monkeypatch,
                                                                          caplog, figures):
    sup = make(OLD)
    sup.starter.tend_daemons()
    sup.second()
    before, killed = _snapshot(sup), list(sup.system.killed)
    rewrite(sup, NEW)
    _fail_on(monkeypatch, "added")          # after 'gone' and 'change' were already taken off
    with caplog.at_level(logging.ERROR, logger="torchcore"):
        accepted, problems = sup.reload("test")
    assert not accepted and "cannot apply: OverflowError" in problems[0]
    assert _snapshot(sup) == before and sup.system.killed == killed     # the daemon was not stopped
    assert sup.reload_error and sup.last_reload[1] is False
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 1
    sup.second()
    assert {f[0] for f in sup.system.forked if f[1] == T0 + 1} == {"keep", "gone"}   # old schedules
    monkeypatch.undo()
    assert sup.reload("test") == (True, [])                      # the same file, applied now
    assert set(sup.tasks) == {"keep", "change", "d", "added"}
    figures.add(faults=1)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(old=st.sets(st.sampled_from("abcdefgh"), max_size=6),
       new=st.sets(st.sampled_from("abcdefgh"), max_size=6),
       steps=st.lists(st.sampled_from(["*/2", "*/3", "*", "5", "@daily"]), min_size=8, max_size=8),
       failing=st.sampled_from("abcdefgh"))
def test_a_failed_apply_leaves_the_schedule_table_as_it_was(tmp_path_factory, old, new, steps,
                                                           failing):
    """Any old and new task set, the table failing on any one name: the seconds fire as before."""
    directory = tmp_path_factory.mktemp("rollback")

    def body(names, shift):
        lines = [f"  - {{name: {n}, schedule: '{_sched(steps[(i + shift) % 8])}', command: 'true'}}"
                 for i, n in enumerate(sorted(names))]
        return "tasks:\n" + ("\n".join(lines) if lines else "  []") + "\n"

    path = directory / "tasks.yaml"
    path.write_text("settings:\n  timezone: UTC\n  state_dir: state\n" + body(old, 0).replace(
        "tasks:\n  []", "tasks: []"))
    from torchcore import config
    sup = Harness(config.load(str(path)))
    sup.start()
    try:
        before = {s: sorted(sup.planner.peek(s)) for s in range(T0, T0 + 13)}
        path.write_text("settings:\n  timezone: UTC\n  state_dir: state\n" + body(new, 3).replace(
            "tasks:\n  []", "tasks: []"))
        real, failed = ScheduleTable.set, []

        def set_or_fail(self, key, schedule):
            if key == failing and not failed:       # the new schedule; the old one goes back
                failed.append(key)
                raise OverflowError("int too big")
            return real(self, key, schedule)
        ScheduleTable.set = set_or_fail
        try:
            accepted, _ = sup.reload("test")
        finally:
            ScheduleTable.set = real
        after = {s: sorted(sup.planner.peek(s)) for s in range(T0, T0 + 13)}
        if not accepted:
            assert after == before
    finally:
        sup.close()


def _sched(step):
    return step if step.startswith("@") else f"{step} * * * * *"


def test_one_task_whose_start_raises_does_not_stop_the_others(make, monkeypatch, caplog, figures):
    sup = make("""tasks:
  - {name: a, schedule: "* * * * * *", command: "true", max: 9}
  - {name: bad, schedule: "* * * * * *", command: "true", max: 9}
  - {name: z, schedule: "* * * * * *", command: "true", max: 9}
""")
    real = jobspec.Job.for_task

    def for_task(task, *args, **kw):
        if task.name == "bad":
            raise ValueError("a bug of ours")
        return real(task, *args, **kw)
    monkeypatch.setattr(jobspec.Job, "for_task", for_task)
    with caplog.at_level(logging.ERROR, logger="torchcore"):
        sup.second(5)
    assert sorted((f[0], f[1]) for f in sup.system.forked) == sorted(
        (name, s) for name in "az" for s in range(T0, T0 + 5))
    assert sup.stats.errors == 5
    assert len([r for r in caplog.records if "starting bad failed" in r.getMessage()]) == 1
    figures.add(faults=5, runs=10)


def test_an_exception_in_a_pass_of_the_loop_is_contained(tmp_path, monkeypatch):
    sup = Harness(taskfile(tmp_path, OLD))
    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("once")
        sup.stopping = True
    monkeypatch.setattr(sup, "loop_once", broken)
    assert sup.run() == 0 and len(calls) == 2 and sup.stats.errors == 1


def test_prepared_runs_get_their_go_before_the_rest_of_their_second_is_forked(make, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_PREPARED", 3)
    sup = make("tasks:\n" + "".join(
        f"  - {{name: t{i}, schedule: '* * * * * *', command: 'true'}}\n" for i in range(10)),
               launchers=1)
    timeline = [("prepare" if job.prepared else "fork", job.name)   # at T0 - 0.5, when it started
                for job, _ in sup.system.submitted]
    assert [e for e in timeline if e[0] == "prepare"] == [("prepare", f"t{i}") for i in range(3)]
    del timeline[:]
    launcher = sup.system.launched[0]
    launcher.go = lambda run_ids: timeline.append(("go", len(run_ids)))
    submit = launcher.submit

    def submit_and_note(job):
        timeline.append(("prepare" if job.prepared else "fork", job.name))
        submit(job)
    launcher.submit = submit_and_note
    sup.clock.advance(0.5)
    sup.tick(T0)
    assert timeline[0] == ("go", 3)
    assert sorted(name for kind, name in timeline[1:]) == [f"t{i}" for i in range(3, 10)]


def test_a_daemon_waiting_for_a_limit_counts_one_skip_not_one_each_pass(make):
    sup = make("""  max_running: 1
tasks:
  - {name: hog, schedule: "* * * * * *", command: "sleep 100"}
  - {name: d, type: daemon, command: "sleep 100"}
""")
    sup.second()                            # hog takes the only slot
    for _ in range(50):                     # many passes over many seconds
        sup.starter.tend_daemons()
        sup.clock.advance(0.2)
    assert sup.stats.skipped == 1 and sup.skipped_last["d"] == "max_running 1 reached"
    sup.end("hog")
    sup.starter.tend_daemons()
    assert "d" in {f[0] for f in sup.system.forked} and "d" not in sup.skipped_last


def _adopt(sup, name, scheduled=None):
    """A run of ``name`` a killed supervisor left running, found by the new one."""
    sup.system.group = 7777
    run_id = sup.records.allocate_run_id()
    sup.records.add(records.RunRecord(run_id=run_id, task=name, node="n", scheduled=scheduled,
                                      started=T0 - 30, ended=None, exit_code=None, signal=None,
                                      pid=4242))
    sup.records.flush()
    sup.adopt_previous_executors()
    return sup.table.get(run_id)


def test_an_adopted_daemon_run_counts_as_its_instance_and_is_stopped_at_shutdown(make, monkeypatch,
                                                                                 figures):
    sup = make("""tasks:
  - {name: d, type: daemon, command: "sleep 100"}
""")
    run = _adopt(sup, "d")
    for _ in range(20):
        sup.starter.tend_daemons()
        sup.clock.advance(1)
    assert sup.system.forked == [] and sup.stats.skipped == 0          # it is the instance: no second
    sup.begin_shutdown("test")
    assert (4242, signal.SIGTERM) in sup.system.killed
    assert not sup.finished()                                  # stop waits for it
    sup.kill_all("test")
    assert (-7777, signal.SIGKILL) in sup.system.killed                 # its command's group too
    sup.system.alive = False              # its executor is gone
    sup.housekeeping()
    assert sup.finished()
    rows = [r for r in sup.records.query(task="d") if r.run_id == run.run_id]
    assert len(rows) == 1 and rows[0].ended is not None and rows[0].error.startswith("lost")
    figures.add(faults=1, runs=1)


def test_an_adopted_daemon_run_is_stopped_by_a_reload_that_removes_its_task(make, monkeypatch):
    sup = make("""tasks:
  - {name: d, type: daemon, command: "sleep 100"}
  - {name: other, schedule: "@daily", command: "true"}
""")
    _adopt(sup, "d")
    rewrite(sup, 'tasks:\n  - {name: other, schedule: "@daily", command: "true"}\n')
    assert sup.reload("test")[0]
    assert (4242, signal.SIGTERM) in sup.system.killed


def test_an_adopted_instance_of_a_daemon_task_gone_from_the_file_is_stopped(make, monkeypatch):
    sup = make('tasks:\n  - {name: other, schedule: "@daily", command: "true"}\n')
    _adopt(sup, "vanished")
    assert (4242, signal.SIGTERM) in sup.system.killed


def test_an_adopted_common_run_counts_against_max_and_finishes_undisturbed(make, monkeypatch):
    sup = make("""tasks:
  - {name: every, schedule: "* * * * * *", command: "true"}
""")
    _adopt(sup, "every", scheduled=T0 - 30)
    sup.second(3)
    assert sup.system.forked == [] and sup.stats.skipped == 3          # max 1: skipped while it runs
    assert sup.system.killed == []
    sup.system.alive = False              # its executor is gone
    sup.housekeeping()
    sup.second()
    assert [f[:2] for f in sup.system.forked] == [("every", T0 + 3)]


def test_a_job_too_large_for_a_launcher_is_recorded_failed_once_and_not_retried(make, figures):
    sup = make("""tasks:
  - {name: big, schedule: "* * * * * *", command: "true", max: 5}
""")
    sup.system.fork_error = JobTooLarge("its job message is 1500000 bytes")
    sup.second(3)
    sup.system.fork_error = None
    sup.second()
    sup.records.flush()
    rows = sup.records.query(task="big")
    refused = [r for r in rows if r.exit_code == 126 and r.ended is not None]
    assert sorted(r.scheduled for r in refused) == [T0, T0 + 1, T0 + 2]
    assert sup.stats.failed == 3 and sup.stats.fork_failures == 0 and sup.starter.retry == []
    assert [f[:2] for f in sup.system.forked] == [("big", T0 + 3)]
    figures.add(faults=3, runs=4)


def test_a_launcher_handle_never_raises_on_a_dead_launcher(tmp_path):
    import os

    from torchcore.launcher import LINE_LIMIT, Launcher

    report_r, report_w = os.pipe()
    launcher = Launcher(report_w, stderr=os.devnull)
    try:
        job = jobspec.Job(run_id=1, name="x", argv=("true",), log_dir=str(tmp_path))
        with pytest.raises(JobTooLarge):
            launcher.submit(jobspec.Job(run_id=2, name="x", argv=("x" * LINE_LIMIT,)))
        launcher.proc.kill()
        launcher.proc.wait()
        for _ in range(50):                 # until the socket says so
            launcher.submit(job)
            launcher.go([1])
            if launcher.dead:
                break
        assert launcher.dead and launcher.answers() is None
    finally:
        launcher.close()
        os.close(report_r)
        os.close(report_w)


def test_the_daemon_log_handler_never_raises_and_reports_a_failure_once(tmp_path, capsys):
    import os
    import shutil

    from torchcore.daemonlog import DaemonLogHandler

    path = tmp_path / "logs" / "torchcore.log"
    handler = DaemonLogHandler(str(path))
    logger = logging.getLogger("torchcore-test-daemonlog")
    logger.handlers[:], logger.propagate = [handler], False
    try:
        logger.warning("one")
        shutil.rmtree(tmp_path / "logs")              # removed under it: made again
        logger.warning("two")
        assert "two" in path.read_text()
        os.rename(tmp_path / "logs", tmp_path / "moved")
        (tmp_path / "logs").write_text("")            # a file where the directory was: no way
        for _ in range(3):
            logger.warning("lost")
        assert handler.failures == 3
        assert capsys.readouterr().err.count("cannot write the daemon log") == 1
        os.unlink(tmp_path / "logs")
        logger.warning("three")
        text = path.read_text()
        assert "3 lines lost" in text and "three" in text
        from torchcore import daemonlog
        logging.getLogger().addHandler(handler)
        try:
            assert daemonlog.failures() == 3        # what stats and status show
        finally:
            logging.getLogger().removeHandler(handler)
    finally:
        handler.close()


def test_a_records_database_removed_while_open_is_made_again_with_ids_going_on(tmp_path, caplog):
    import os

    path = str(tmp_path / "torchcore.db")
    with records.Records(path, id_block=10) as db:
        first = [db.allocate_run_id() for _ in range(3)]
        for run_id in first:
            db.add(records.RunRecord(run_id, "t", "n", T0, T0, T0 + 1, 0, None))
        assert db.flush()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
        later = db.allocate_run_id()
        db.add(records.RunRecord(later, "t", "n", T0 + 5, T0 + 5, T0 + 6, 0, None))
        with caplog.at_level(logging.WARNING):
            assert db.flush()
            db.add(records.RunRecord(later + 1, "t", "n", T0 + 6, T0 + 6, T0 + 7, 0, None))
            assert db.flush()
        assert db.recreated == 1 and os.path.exists(path)
        assert [r.run_id for r in db.query()] == [later + 1, later]
        assert len([r for r in caplog.records if "removed or replaced" in r.getMessage()]) == 1
        assert db.allocate_run_id() > later     # the new file's counter starts after them all
    with records.Records(path) as again:
        assert again.allocate_run_id() > later + 1
