"""The supervisor's decisions on a fake clock, with fork and kill substituted."""

import errno
import signal
import threading

import pytest
from supervisor_harness import T0, Harness, rewrite, taskfile

from torchcore import wire
from torchcore.states import DaemonState

EVERY = """tasks:
  - name: every
    schedule: "* * * * * *"
    command: "true"
"""


def test_due_tasks_are_forked_once_per_second(make):
    sup = make(EVERY)
    sup.second(3)
    sup.end("every")
    assert [f[:2] for f in sup.system.forked] == [("every", T0)]  # max 1: seconds 2 and 3 were skipped
    assert sup.stats.skipped == 2
    sup.second()
    assert sup.system.forked[-1][:2] == ("every", T0 + 3)


def test_skips_by_max_are_recorded_with_the_reason(make):
    sup = make(EVERY)
    sup.second(2)
    sup.records.flush()
    rows = sup.records.query(task="every")
    assert [r.skipped for r in rows] == ["max 1 reached", None]


def test_max_running_caps_the_node(make):
    sup = make("""  max_running: 2
tasks:
  - {name: a, schedule: "* * * * * *", command: "true", max: 5}
  - {name: b, schedule: "* * * * * *", command: "true", max: 5}
""")
    sup.second(2)
    assert len(sup.system.forked) == 2
    assert sup.skipped_last == {"a": "max_running 2 reached", "b": "max_running 2 reached"}


def test_fork_failure_is_counted_and_retried_next_second(make):
    sup = make("""tasks:
  - {name: fixed, schedule: "0 * * * * *", command: "true"}
""")
    sup.system.fork_error = OSError(errno.EAGAIN, "Resource temporarily unavailable")
    sup.second()                      # T0: due, fork fails
    assert sup.stats.fork_failures == 1 and not sup.system.forked
    sup.system.fork_error = None
    sup.second()
    assert sup.system.forked == [("fixed", T0, False)]


def test_reload_keeps_unchanged_tasks_and_lets_removed_runs_finish(make):
    sup = make("""tasks:
  - {name: keep, schedule: "* * * * * *", command: "sleep 100"}
  - {name: gone, schedule: "* * * * * *", command: "sleep 100"}
""")
    sup.second()
    assert {f[0] for f in sup.system.forked} == {"keep", "gone"}
    rewrite(sup, """tasks:
  - {name: keep, schedule: "* * * * * *", command: "sleep 100"}
  - {name: new, schedule: "*/2 * * * * *", command: "true"}
""")
    accepted, problems = sup.reload("test")
    assert accepted and problems == []
    assert sup.system.killed == []                       # nothing running was disturbed
    assert "gone" not in sup.planner and "new" in sup.planner
    assert sup.table.count("gone") == 1          # its run goes on until it ends
    assert "1 added, 0 changed, 1 removed" in sup.last_reload[2]


def test_invalid_reload_keeps_everything(make):
    sup = make(EVERY)
    rewrite(sup, "tasks:\n  - name: every\n    schedule: '61 * * * * *'\n    command: x\n")
    accepted, problems = sup.reload("test")
    assert not accepted
    assert "out of range" in problems[0] and "tasks.yaml" in problems[0]
    assert "every" in sup.planner and sup.reload_error
    sup.second()
    assert sup.system.forked == [("every", T0, False)]


def test_changed_daemon_is_stopped_gracefully_and_started_again(make):
    sup = make("""tasks:
  - {name: d, type: daemon, command: "sleep 100"}
""")
    sup.starter.tend_daemons()
    assert sup.system.forked == [("d", None, False)]
    old_pid = sup.table.oldest("d").executor_pid
    rewrite(sup, """tasks:
  - {name: d, type: daemon, command: "sleep 200"}
""")
    sup.reload("test")
    assert sup.system.killed == [(old_pid, signal.SIGTERM)]
    sup.starter.tend_daemons()
    assert len(sup.system.forked) == 1                   # waits for the old instance to exit
    sup.end("d")
    sup.starter.tend_daemons()
    assert len(sup.system.forked) == 2


def test_daemon_failed_starts_back_off_doubling_to_a_minute(make):
    sup = make("""tasks:
  - {name: crash, type: daemon, command: "false"}
""")
    delays = []
    for _ in range(9):
        sup.starter.tend_daemons()
        sup.end("crash", lived=0.01, exit_code=1)
        slot = sup.daemons["crash"]
        delays.append(slot.next_try - sup.clock.monotonic())
        sup.clock.advance(slot.next_try - sup.clock.monotonic())
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert slot.state == DaemonState.BACKOFF
    sup.starter.tend_daemons()
    sup.end("crash", lived=3.0)                   # a healthy run resets the backoff
    assert slot.failures == 0 and slot.state == DaemonState.RUNNING


def test_daemon_is_not_restarted_before_its_backoff(make):
    sup = make("""tasks:
  - {name: crash, type: daemon, command: "false"}
""")
    sup.starter.tend_daemons()
    sup.end("crash", lived=0.01, exit_code=1)
    sup.clock.advance(0.5)
    sup.starter.tend_daemons()
    assert len(sup.system.forked) == 1
    sup.clock.advance(0.6)
    sup.starter.tend_daemons()
    assert len(sup.system.forked) == 2


def test_reboot_tasks_run_at_start_only(make):
    sup = make("""tasks:
  - {name: boot, schedule: "@reboot", command: "true"}
""")
    assert [f[0] for f in sup.system.forked] == ["boot"]       # started with the supervisor
    sup.end("boot")
    sup.reload("test")
    sup.second(5)
    assert len(sup.system.forked) == 1


def test_shutdown_terms_every_run_then_kills_after_the_grace(make):
    sup = make("""  shutdown_grace: 5s
tasks:
  - {name: a, schedule: "* * * * * *", command: "sleep 100"}
""")
    sup.second()
    run = next(iter(sup.table))
    run.pgid = 4242
    sup.begin_shutdown("test")
    assert sup.system.killed == [(run.executor_pid, signal.SIGTERM)]
    sup.clock.advance(5)
    sup.drive_shutdown()
    killed = sup.system.killed
    assert (-4242, signal.SIGKILL) in killed and (run.executor_pid, signal.SIGKILL) in killed
    sup.second()
    assert len(sup.system.forked) == 1                   # nothing new starts while stopping


def test_manual_run_counts_against_max(make):
    sup = make("""tasks:
  - {name: m, schedule: "0 0 0 1 1 *", command: "true"}
""")
    assert sup.replies.control_run({"task": "m"})["run_id"]
    with pytest.raises(Exception, match="max 1 reached"):
        sup.replies.control_run({"task": "m"})
    with pytest.raises(Exception, match="not in the task file"):
        sup.replies.control_run({"task": "nope"})


def test_fork_refuses_when_another_thread_runs(make):
    sup = make(EVERY)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="single-threaded"):
            sup.starter.fork(None)
    finally:
        stop.set()
        thread.join()


def test_a_pass_of_the_loop_with_prepared_runs_waiting_meets_no_error(make):
    """A whole pass (its sleep, the boundary, reaping, the daemons, preparing, housekeeping)
    on the fake system, while a prepared run waits for its second."""
    sup = make(EVERY, launchers=1)
    assert sup.table.prepared                     # T0, prepared when it started (T0 - 0.5)
    sup.clock.advance(0.49)                         # T0 - 0.01: the pass sleeps a few ms
    sup.loop_once()
    assert sup.stats.errors == 0 and sup.table.prepared


def test_runs_are_prepared_ahead_and_big_bursts_earlier(make):
    from torchcore import prepare

    burst = "".join(f"  - {{name: b{i}, schedule: '30 * * * * *', command: 'true'}}\n"
                    for i in range(1000))
    sup = make("tasks:\n  - {name: every, schedule: '* * * * * *', command: 'true'}\n" + burst,
               wall=T0 - 0.8, launchers=2)

    def prepared():
        return [(job.name, job.scheduled, round(at - job.scheduled, 3))
                for job, at in sup.system.submitted]
    lead = 1000 * prepare.PREPARE_COST / 2            # 3 s with two launchers
    sup.starter.prepare_ahead()                                  # T0 - 0.8
    assert prepared() == []                                      # T0 is more than 0.5 s away
    assert sup.ahead.next_at == pytest.approx(T0 - 0.5)
    sup.clock.advance(0.3)
    sup.starter.prepare_ahead()
    assert prepared() == [("every", T0, -0.5)]
    sup.clock.advance(T0 + 30 - lead - 0.5 - sup.clock.time())
    sup.starter.prepare_ahead()
    assert {s for _, s, _ in prepared()} == {T0, T0 + 27}   # seconds already past are not prepared
    sup.clock.advance(0.5)
    sup.starter.prepare_ahead()
    burst_runs = [p for p in prepared() if p[0].startswith("b")]
    assert len(burst_runs) == 1000 and {s for _, s, _ in burst_runs} == {T0 + 30}
    assert all(ahead == -lead for _, _, ahead in burst_runs)
    assert ("every", T0 + 30, -lead) in prepared()                # seconds are prepared in order
    assert ("every", T0 + 28, -1.0) in prepared() and ("every", T0 + 29, -2.0) in prepared()


def test_the_first_second_is_prepared_before_the_loop_first_sleeps(tmp_path):
    """A daemon started 0.5 s before a second prepares it then, not after its first tick
    (which used to launch the first second's runs the slow way)."""
    seen = []

    def ready():                # the loop is next: its first pass would sleep
        seen.append([(job.name, job.scheduled, job.prepared) for job, _ in sup.system.submitted])
        sup.begin_shutdown("test")

    sup = Harness(taskfile(tmp_path, "tasks:\n"                     # its clock: T0 - 0.5
                           "  - {name: every, schedule: '* * * * * *', command: 'true'}\n"),
                  launchers=1, on_ready=ready)
    sup.run()
    assert seen == [[("every", T0, True)]]


def test_runs_of_a_burst_hold_their_wrap_up_for_as_long_as_its_starts_take(make):
    from torchcore import prepare

    burst = "".join(f"  - {{name: b{i}, schedule: '*/10 * * * * *', command: 'true'}}\n"
                    for i in range(1000))
    sup = make("tasks:\n  - {name: every, schedule: '* * * * * *', command: 'true'}\n"
               "  - {name: pair, schedule: '*/10 * * * * *', command: 'true'}\n" + burst,
               launchers=2, cores=2)
    sup.housekeeping()                             # its first pass prunes (and flushes)

    def holds():
        return {(job.name, job.scheduled): job.hold_until for job, _ in sup.system.submitted}
    sup.clock.advance(0.4)                          # T0 - 0.1: T0 and its burst are prepared
    sup.starter.prepare_ahead()
    cost, margin = prepare.START_COST, prepare.HOLD_MARGIN
    assert holds()[("b7", T0)] == pytest.approx(T0 + 1002 * cost / 2 * margin)    # 1.503 s
    assert holds()[("every", T0)] == T0 + 0.3        # due again in a second: 0.3 of it at most
    sup.clock.advance(0.15)
    pending_at_go = []
    sup.system.launched[0].go = lambda run_ids: pending_at_go.append(sup.records.pending)
    sup.tick(T0)                                    # the burst fires
    assert pending_at_go == [0]                     # go first, the start records after
    sup.housekeeping()
    assert sup.records.pending == 1002              # no database writes during its starts...
    last = max(run.run_id for run in sup.table)
    for run in sup.table:                           # its starts spread over 0.9 s
        started = T0 + 0.9 * run.run_id / last
        sup.report(wire.End(run=run.run_id, started=started, ended=started + 0.01, exit_code=0))
    sup.clock.advance(1.6)
    sup.housekeeping()
    assert sup.records.pending == 0                 # ...but once they are over
    sup.clock.advance(7.95)                         # T0 + 9.6: the next burst is prepared
    sup.starter.prepare_ahead()
    measured = 0.9 * 2 / 1002                       # CPU per start, measured
    assert holds()[("b7", T0 + 10)] == pytest.approx(T0 + 10 + 1002 * measured / 2 * margin)


def test_runs_that_are_no_burst_do_not_hold(make):
    sup = make("tasks:\n  - {name: solo, schedule: '* * * * * *', command: 'true'}\n"
               "  - {name: duo, schedule: '* * * * * *', command: 'true'}\n", launchers=1, cores=2)
    sup.clock.advance(0.4)
    sup.starter.prepare_ahead()
    holds = {job.name: job.hold_until for job, _ in sup.system.submitted}
    assert holds == {"solo": None, "duo": None}      # no more runs than cores: no hold


def test_a_file_put_back_as_it_runs_clears_the_rejected_reload(make):
    sup = make(EVERY)
    rewrite(sup, "tasks:\n  - name: every\n    schedule: '61 * * * * *'\n    command: x\n")
    sup.watch_file()
    assert sup.reload_error and "out of range" in sup.reload_error
    rewrite(sup, EVERY)                         # the running version again, byte for byte
    sup.watch_file()
    assert sup.reload_error is None and sup.last_reload[1] is False   # history stays history
    sup.second()
    assert sup.system.forked == [("every", T0, False)]
