"""The control requests behind the API's enable and disable: a task off the schedule until the
next reload, on the supervisor's fake clock (tests/supervisor_harness.py)."""

import pytest
from supervisor_harness import rewrite

BODY = """tasks:
  - {name: tick, schedule: "* * * * * *", command: "true", max: 100}
  - {name: other, schedule: "* * * * * *", command: "true", max: 100}
  - {name: loop, type: daemon, command: "sleep 1000"}
"""


def forked(sup, name):
    return sum(1 for f in sup.system.forked if f[0] == name)


def test_disable_stops_scheduling_until_enable(make):
    sup = make(BODY)
    sup.second()
    before = forked(sup, "tick")
    assert sup.replies.control_disable({"task": "tick"}) == {"disabled": True, "changed": True}
    assert sup.replies.control_disable({"task": "tick"}) == {"disabled": True, "changed": False}
    sup.second(3)
    assert forked(sup, "tick") == before and forked(sup, "other") >= 4
    status = sup.replies.control_status({})
    assert status["disabled"] == ["tick"] and status["tasks"]["tick"]["disabled"] is True
    assert sup.replies.control_run({"task": "tick"})["run_id"]      # by hand it still runs
    assert sup.replies.control_enable({"task": "tick"}) == {"disabled": False, "changed": True}
    sup.second(2)
    assert forked(sup, "tick") == before + 1 + 2


def test_a_reload_ends_a_disable(make):
    sup = make(BODY)
    sup.replies.control_disable({"task": "tick"})
    assert "tick" not in sup.planner
    rewrite(sup, BODY)
    assert sup.reload("test")[0]
    assert "tick" in sup.planner and sup.replies.control_status({})["disabled"] == []


def test_disabling_a_daemon_task_stops_its_instances(make):
    sup = make(BODY)
    sup.starter.tend_daemons()
    assert forked(sup, "loop") == 1
    sup.replies.control_disable({"task": "loop"})
    assert sup.system.killed, "its instance was not told to stop"
    assert sup.daemons.get("loop") is None
    sup.replies.control_enable({"task": "loop"})
    assert sup.daemons.get("loop") is not None


def test_unknown_tasks_are_refused_as_run_refuses_them(make):
    sup = make(BODY)
    with pytest.raises(Exception, match="not in the task file"):
        sup.replies.control_disable({"task": "tik"})
    with pytest.raises(Exception, match="not in the task file"):
        sup.replies.control_enable({"task": None})


def test_reloads_and_tick_durations_are_counted(make):
    from torchcore.ledger import TICK_BUCKETS, Stats

    sup = make(BODY)
    rewrite(sup, BODY)
    assert sup.reload("test")[0]
    rewrite(sup, "tasks: [oops\n")
    assert not sup.reload("test")[0]
    stats = sup.replies.control_status({})["stats"]
    assert (stats["reloads_accepted"], stats["reloads_rejected"]) == (1, 1)
    counted = Stats()
    for seconds in (0.0001, 0.0005, 0.003, 2.0):
        counted.tick_took(seconds)
    assert counted.ticks == 4 and counted.tick_seconds == pytest.approx(2.0036)
    assert counted.tick_buckets == [2, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert len(counted.tick_buckets) == len(TICK_BUCKETS) + 1


def test_an_active_status_lists_only_tasks_with_something_live(make):
    sup = make(BODY + "  - {name: idle, schedule: \"0 0 3 * * *\", command: \"true\"}\n")
    sup.starter.tend_daemons()
    sup.second()
    sup.replies.control_disable({"task": "other"})
    full = sup.replies.control_status({})
    active = sup.replies.control_status({"active": True})
    assert set(full["tasks"]) == {"tick", "other", "loop", "idle"}
    assert set(active["tasks"]) == {"tick", "other", "loop"}       # idle has nothing live
    assert active["tasks"]["tick"] == full["tasks"]["tick"]
