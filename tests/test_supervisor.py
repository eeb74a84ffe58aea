"""The supervisor's decisions on a fake clock, with fork and kill substituted."""

import errno
import signal
import threading

import pytest
from supervisor_harness import T0, FakeLauncher, Harness, rewrite

from torchcore import config
from torchcore.states import DaemonState
from torchcore.supervisor import Supervisor

EVERY = """tasks:
  - name: every
    schedule: "* * * * * *"
    command: "true"
"""


def test_due_tasks_are_forked_once_per_second(make):
    sup = make(EVERY)
    sup.second(3)
    sup.end("every")
    assert [f[:2] for f in sup.forked] == [("every", T0)]  # max 1: seconds 2 and 3 were skipped
    assert sup.stats.skipped == 2
    sup.second()
    assert sup.forked[-1][:2] == ("every", T0 + 3)


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
    assert len(sup.forked) == 2
    assert sup.skipped_last == {"a": "max_running 2 reached", "b": "max_running 2 reached"}


def test_fork_failure_is_counted_and_retried_next_second(make):
    sup = make("""tasks:
  - {name: fixed, schedule: "0 * * * * *", command: "true"}
""")
    sup.fork_error = OSError(errno.EAGAIN, "Resource temporarily unavailable")
    sup.second()                      # T0: due, fork fails
    assert sup.stats.fork_failures == 1 and not sup.forked
    sup.fork_error = None
    sup.second()
    assert sup.forked == [("fixed", T0, False)]


def test_reload_keeps_unchanged_tasks_and_lets_removed_runs_finish(make):
    sup = make("""tasks:
  - {name: keep, schedule: "* * * * * *", command: "sleep 100"}
  - {name: gone, schedule: "* * * * * *", command: "sleep 100"}
""")
    sup.second()
    assert {f[0] for f in sup.forked} == {"keep", "gone"}
    rewrite(sup, """tasks:
  - {name: keep, schedule: "* * * * * *", command: "sleep 100"}
  - {name: new, schedule: "*/2 * * * * *", command: "true"}
""")
    accepted, problems = sup.reload("test")
    assert accepted and problems == []
    assert sup.killed == []                       # nothing running was disturbed
    assert "gone" not in sup.planner and "new" in sup.planner
    assert len(sup.by_task["gone"]) == 1          # its run goes on until it ends
    assert "1 added, 0 changed, 1 removed" in sup.last_reload[2]


def test_invalid_reload_keeps_everything(make):
    sup = make(EVERY)
    rewrite(sup, "tasks:\n  - name: every\n    schedule: '61 * * * * *'\n    command: x\n")
    accepted, problems = sup.reload("test")
    assert not accepted
    assert "out of range" in problems[0] and "tasks.yaml" in problems[0]
    assert "every" in sup.planner and sup.reload_error
    sup.second()
    assert sup.forked == [("every", T0, False)]


def test_changed_daemon_is_stopped_gracefully_and_started_again(make):
    sup = make("""tasks:
  - {name: d, type: daemon, command: "sleep 100"}
""")
    sup._tend_daemons()
    assert sup.forked == [("d", None, False)]
    old_pid = sup.runs[min(sup.by_task["d"])].executor_pid
    rewrite(sup, """tasks:
  - {name: d, type: daemon, command: "sleep 200"}
""")
    sup.reload("test")
    assert sup.killed == [(old_pid, signal.SIGTERM)]
    sup._tend_daemons()
    assert len(sup.forked) == 1                   # waits for the old instance to exit
    sup.end("d")
    sup._tend_daemons()
    assert len(sup.forked) == 2


def test_daemon_failed_starts_back_off_doubling_to_a_minute(make):
    sup = make("""tasks:
  - {name: crash, type: daemon, command: "false"}
""")
    delays = []
    for _ in range(9):
        sup._tend_daemons()
        sup.end("crash", lived=0.01, exit_code=1)
        slot = sup.daemons["crash"]
        delays.append(slot.next_try - sup.clock.monotonic())
        sup.clock.advance(slot.next_try - sup.clock.monotonic())
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert slot.state == DaemonState.BACKOFF
    sup._tend_daemons()
    sup.end("crash", lived=3.0)                   # a healthy run resets the backoff
    assert slot.failures == 0 and slot.state == DaemonState.RUNNING


def test_daemon_is_not_restarted_before_its_backoff(make):
    sup = make("""tasks:
  - {name: crash, type: daemon, command: "false"}
""")
    sup._tend_daemons()
    sup.end("crash", lived=0.01, exit_code=1)
    sup.clock.advance(0.5)
    sup._tend_daemons()
    assert len(sup.forked) == 1
    sup.clock.advance(0.6)
    sup._tend_daemons()
    assert len(sup.forked) == 2


def test_reboot_tasks_run_at_start_only(make):
    sup = make("""tasks:
  - {name: boot, schedule: "@reboot", command: "true"}
""")
    sup._start_reboot_tasks()
    assert [f[0] for f in sup.forked] == ["boot"]
    sup.end("boot")
    sup.reload("test")
    sup.second(5)
    assert len(sup.forked) == 1


def test_shutdown_terms_every_run_then_kills_after_the_grace(make):
    sup = make("""  shutdown_grace: 5s
tasks:
  - {name: a, schedule: "* * * * * *", command: "sleep 100"}
""")
    sup.second()
    run = next(iter(sup.runs.values()))
    run.pgid = 4242
    sup.begin_shutdown("test")
    assert sup.killed == [(run.executor_pid, signal.SIGTERM)]
    sup.clock.advance(5)
    sup._drive_shutdown()
    assert (-4242, signal.SIGKILL) in sup.killed and (run.executor_pid, signal.SIGKILL) in sup.killed
    sup.second()
    assert len(sup.forked) == 1                   # nothing new starts while stopping


def test_manual_run_counts_against_max(make):
    sup = make("""tasks:
  - {name: m, schedule: "0 0 0 1 1 *", command: "true"}
""")
    assert sup.control_run({"task": "m"})["run_id"]
    with pytest.raises(Exception, match="max 1 reached"):
        sup.control_run({"task": "m"})
    with pytest.raises(Exception, match="not in the task file"):
        sup.control_run({"task": "nope"})


def test_fork_refuses_when_another_thread_runs(make):
    sup = make(EVERY)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="single-threaded"):
            Supervisor.fork(sup, None)
    finally:
        stop.set()
        thread.join()


def test_runs_are_prepared_ahead_and_big_bursts_earlier(make):
    from torchcore import supervisor as supervisor_module

    burst = "".join(f"  - {{name: b{i}, schedule: '30 * * * * *', command: 'true'}}\n"
                    for i in range(1000))
    sup = make("tasks:\n  - {name: every, schedule: '* * * * * *', command: 'true'}\n" + burst)
    sup.launchers = [FakeLauncher(), FakeLauncher()]
    prepared = []

    def fork(job):
        prepared.append((job.name, job.scheduled, round(sup.clock.time() - job.scheduled, 3)))
        sup._handed_to = sup.launchers[len(prepared) % 2]
    sup.fork = fork
    lead = 1000 * supervisor_module.PREPARE_COST / 2            # 3 s with two launchers
    sup.clock.advance(-0.3)                                      # T0 - 0.8
    sup._maybe_prepare()
    assert prepared == []                                        # T0 is more than 0.5 s away
    assert sup._prepare_at == pytest.approx(T0 - 0.5)
    sup.clock.advance(0.3)
    sup._maybe_prepare()
    assert prepared == [("every", T0, -0.5)]
    sup.clock.advance(T0 + 30 - lead - 0.5 - sup.clock.time())
    sup._maybe_prepare()
    assert {s for _, s, _ in prepared} == {T0, T0 + 27}     # seconds already past are not prepared
    sup.clock.advance(0.5)
    sup._maybe_prepare()
    burst_runs = [p for p in prepared if p[0].startswith("b")]
    assert len(burst_runs) == 1000 and {s for _, s, _ in burst_runs} == {T0 + 30}
    assert all(ahead == -lead for _, _, ahead in burst_runs)
    assert ("every", T0 + 30, -lead) in prepared                  # seconds are prepared in order
    assert ("every", T0 + 28, -1.0) in prepared and ("every", T0 + 29, -2.0) in prepared
    sup.launchers = []                  # nothing to stop at the end


def test_the_first_second_is_prepared_before_the_loop_first_sleeps(tmp_path):
    """A daemon started 0.5 s before a second prepares it then, not after its first tick
    (which used to launch the first second's runs the slow way)."""
    path = tmp_path / "tasks.yaml"
    path.write_text("settings:\n  timezone: UTC\n  state_dir: state\ntasks:\n"
                    "  - {name: every, schedule: '* * * * * *', command: 'true'}\n")
    sup = Harness(config.load(str(path)))        # its clock: T0 - 0.5
    prepared, seen = [], []

    def start_launchers():
        sup.launchers = [FakeLauncher()]

    def fork(job):
        prepared.append((job.name, job.scheduled, job.prepared))
        sup._handed_to = sup.launchers[0]

    def loop_once():
        seen.append(list(prepared))
        sup.launchers, sup.stopping = [], True

    sup._start_launchers, sup.fork, sup.loop_once = start_launchers, fork, loop_once
    sup.run()
    assert seen == [[("every", T0, True)]]


def test_runs_of_a_burst_hold_their_wrap_up_for_as_long_as_its_starts_take(make):
    import json

    from torchcore import supervisor as supervisor_module

    burst = "".join(f"  - {{name: b{i}, schedule: '*/10 * * * * *', command: 'true'}}\n"
                    for i in range(1000))
    sup = make("tasks:\n  - {name: every, schedule: '* * * * * *', command: 'true'}\n"
               "  - {name: pair, schedule: '*/10 * * * * *', command: 'true'}\n" + burst)
    sup.launchers, sup._cores = [FakeLauncher(), FakeLauncher()], 2
    sup._housekeeping()                             # its first pass prunes (and flushes)
    holds = {}

    def fork(job):
        holds[(job.name, job.scheduled)] = job.hold_until
        sup._handed_to = sup.launchers[0]
    sup.fork = fork
    sup.clock.advance(0.4)                          # T0 - 0.1: T0 and its burst are prepared
    sup._maybe_prepare()
    cost, margin = supervisor_module.START_COST, supervisor_module.HOLD_MARGIN
    assert holds[("b7", T0)] == pytest.approx(T0 + 1002 * cost / 2 * margin)    # 1.503 s
    assert holds[("every", T0)] == T0 + 0.3        # due again in a second: 0.3 of it at most
    sup.clock.advance(0.15)
    pending_at_go = []
    sup.launchers[0].go = lambda run_ids: pending_at_go.append(sup.records.pending)
    sup.tick(T0)                                    # the burst fires
    assert pending_at_go == [0]                     # go first, the start records after
    sup._housekeeping()
    assert sup.records.pending == 1002              # no database writes during its starts...
    for run in list(sup.runs.values()):             # its starts spread over 0.9 s
        started = T0 + 0.9 * run.run_id / max(sup.runs)
        sup._handle_report(json.dumps({"e": "end", "run": run.run_id, "started": started,
                                       "ended": started + 0.01, "exit_code": 0}).encode())
    sup.clock.advance(1.6)
    sup._housekeeping()
    assert sup.records.pending == 0                 # ...but once they are over
    sup.clock.advance(7.95)                         # T0 + 9.6: the next burst is prepared
    sup._maybe_prepare()
    measured = 0.9 * 2 / 1002                       # CPU per start, measured
    assert holds[("b7", T0 + 10)] == pytest.approx(T0 + 10 + 1002 * measured / 2 * margin)
    sup.launchers = []


def test_runs_that_are_no_burst_do_not_hold(make):
    sup = make("tasks:\n  - {name: solo, schedule: '* * * * * *', command: 'true'}\n"
               "  - {name: duo, schedule: '* * * * * *', command: 'true'}\n")
    sup.launchers, sup._cores = [FakeLauncher()], 2
    holds = {}

    def fork(job):
        holds[job.name] = job.hold_until
        sup._handed_to = sup.launchers[0]
    sup.fork = fork
    sup.clock.advance(0.4)
    sup._maybe_prepare()
    assert holds == {"solo": None, "duo": None}      # no more runs than cores: no hold
    sup.launchers = []
