"""Idle means idle: the loop's work follows the seconds that have work, not the tasks loaded.

The supervisor runs on the fake clock with its selector's sleep simulated (the clock moves by
the timeout asked for), so a simulated hour takes a moment; the tests count the passes of the
loop, the planner's matches and the daemon tending it asked for.  The planner's quiet-second
skipping is checked against planning every second, one by one, around clock steps and DST.
"""

import random

import pytest
from supervisor_harness import T0

from torchcore import wakeups
from torchcore.planner import Planner
from torchcore.schedule import Schedule, ScheduleTable

IDLE = "".join(f"  - {{name: j{i}, schedule: '{i % 60} {i // 60 % 60} 3 1 1 *', command: x}}\n"
               for i in range(1000))


class Counted:
    """Counts the calls of a few functions (patched on their classes for the test)."""

    def __init__(self, monkeypatch):
        self.calls = {}
        self.monkeypatch = monkeypatch

    def count(self, cls, name):
        original = getattr(cls, name)
        self.calls[name] = 0

        def counted(*args, **kw):
            self.calls[name] += 1
            return original(*args, **kw)
        self.monkeypatch.setattr(cls, name, counted)


def simulate(sup, seconds, during=None):
    """Run the loop for ``seconds`` of fake time: each select moves the clock by its timeout
    (``during(sup, timeout)`` may move it otherwise, e.g. step the wall clock)."""
    real_select = sup.selector.select
    timeouts = []
    end = sup.clock.monotonic() + seconds

    def select(timeout=None):
        timeouts.append(timeout)
        events = real_select(0)         # whatever is already there (reports, inotify)
        if during is not None:
            during(sup, timeout)
        else:
            sup.clock.advance(max(0.0, min(timeout, end - sup.clock.monotonic())))
        return events
    def await_boundary():              # the spin to the boundary, on the fake clock
        if sup.table.prepared:
            boundary = sup.wakeups.boundary()
            if 0 < boundary - sup.clock.time() <= 2 * wakeups.EARLY_WAKE:
                sup.clock.advance(boundary - sup.clock.time())
    sup.selector.select = select
    sup.ahead.await_boundary = lambda boundary: await_boundary()
    while sup.clock.monotonic() < end:
        sup.loop_once()
    sup.selector.select = real_select
    del sup.ahead.await_boundary
    return timeouts


@pytest.mark.parametrize("launchers", [0, 1])
def test_an_idle_hour_asks_for_no_match_and_a_few_wakes(make, monkeypatch, launchers):
    counted = Counted(monkeypatch)
    sup = make("tasks:\n" + IDLE, launchers=launchers)
    counted.count(ScheduleTable, "match")
    counted.count(type(sup), "tick")
    simulate(sup, 30)                           # the first prune and stats line are behind
    passes = sup.wakeups.passes
    simulate(sup, 3600)
    assert counted.calls["match"] == 0                      # no second matched: none is busy
    assert sup.wakeups.passes - passes <= 3600 / wakeups.MAX_SLEEP + 3600 / 60 + 5
    assert counted.calls["tick"] <= sup.wakeups.passes      # a tick only on a pass that woke
    assert sup.planner.watermark == int(sup.clock.time())   # every second was passed
    assert sup.stats.errors == 0 and sup.system.forked == []


def test_the_wakes_follow_the_seconds_with_work(make, monkeypatch):
    """200 tasks due once a minute: one match a minute, a few wakes around it, every run on time."""
    counted = Counted(monkeypatch)
    every_minute = "".join(f"  - {{name: m{i}, schedule: '0 * * * * *', command: x}}\n"
                           for i in range(200))
    sup = make("tasks:\n" + IDLE + every_minute, launchers=1)
    counted.count(ScheduleTable, "match")
    simulate(sup, 30)
    passes, matches = sup.wakeups.passes, counted.calls["match"]
    simulate(sup, 600)
    assert counted.calls["match"] - matches <= 2 * 10        # the tick's and the look-ahead's
    assert sup.wakeups.passes - passes <= 10 * (60 / wakeups.MAX_SLEEP + 4)
    minutes = len([s for s in range(T0, int(sup.clock.time()) + 1) if s % 60 == 0])
    assert sup.stats.started == 200             # the runs never end here: `max` skips the rest
    assert sup.stats.started + sup.stats.skipped == 200 * minutes and sup.stats.missed == 0


def test_a_daemon_task_is_tended_when_a_run_comes_or_goes_not_every_second(make, monkeypatch):
    counted = Counted(monkeypatch)
    sup = make("tasks:\n  - {name: d, type: daemon, command: x, max: 2}\n")
    counted.count(type(sup.starter), "tend_daemons")
    simulate(sup, 600)
    assert len(sup.table.of_task("d")) == 2
    assert counted.calls["tend_daemons"] <= 2
    sup.end("d")                                 # one ends: tended again, started again
    simulate(sup, 5)
    assert len(sup.table.of_task("d")) == 2 and counted.calls["tend_daemons"] <= 4


def test_a_daemon_s_backoff_wakes_the_loop_when_it_runs_out(make):
    sup = make("tasks:\n  - {name: d, type: daemon, command: x}\n")
    simulate(sup, 2)
    for _ in range(3):                           # three failed starts: 8 s of backoff after the next
        sup.end("d", lived=0.1)
        simulate(sup, 20)
    sup.end("d", lived=0.1)
    simulate(sup, 0.5)
    assert len(sup.table.of_task("d")) == 0
    timeouts = simulate(sup, 9)
    assert len(sup.table.of_task("d")) == 1     # started again when its backoff was over
    assert timeouts[0] == pytest.approx(7.5)     # slept until the backoff ran out


def test_a_wall_clock_step_during_a_long_sleep_is_planned_as_before(make, caplog):
    """The step shows as wall and monotonic time parting: the planner gets the step, not a
    quiet stretch, and applies the catch-up and backward-step rules as it always did."""
    sup = make("tasks:\n  - {name: m, schedule: '0 * * * * *', command: x}\n" + IDLE)
    simulate(sup, 10)
    steps = [90]

    def step_forward(sup, timeout):
        sup.clock.advance(min(timeout, 2.0))
        if steps:
            sup.clock.step_wall(steps.pop())
    simulate(sup, 3, during=step_forward)
    assert "s were skipped (stall or clock step): catching up" in caplog.text
    skipped = int(caplog.text.split("s were skipped")[0].split()[-1])
    assert 89 <= skipped <= 92                   # the step, not the seconds slept quietly
    steps.append(-120)
    simulate(sup, 3, during=step_forward)
    assert "clock stepped back" in caplog.text
    back = int(caplog.text.split("clock stepped back ")[1].split("s")[0])
    assert 118 <= back <= 122


def test_the_loop_sleeps_no_longer_than_max_sleep_and_wakes_for_the_next_busy_second(make):
    sup = make("tasks:\n  - {name: m, schedule: '30 * * * * *', command: x}\n")
    simulate(sup, 0.5)                           # T0: the task is due at T0 + 30
    assert 5 < sup._sleep_time() <= wakeups.MAX_SLEEP      # nothing due for 29.5 s
    timeouts = simulate(sup, 31)
    assert max(timeouts) <= wakeups.MAX_SLEEP and len(timeouts) <= 6
    assert sup.system.forked == [("m", T0 + 30, False)]


# ---- the planner: quiet seconds passed in one step plan what one-by-one planning plans -------

SPECS = ["0 0 3 1 1 *", "*/7 * * * * *", "30 15 * * * *", "0 30 2 * * *", "0 0 * * * *",
         "@every 13s", "0 */20 * * * *", "45 59 1 * * *", "0 0 12 L * *"]


def _plans(zone, specs, start, wakes, skip):
    """The (due, missed) of each wake, each planned by ``advance`` alone (skip False: as the
    loop did when it woke every second, or after a stall) or after passing the quiet seconds
    before it in one step (skip True: as the loop does now); ``wakes``: epoch seconds."""
    planner = Planner(misfire_grace=60)
    for i, spec in enumerate(specs):
        planner.set(f"t{i}", Schedule(spec, zone))
    planner.start(start)
    out = []
    for now in wakes:
        if skip:
            planner.pass_quiet(now - 1)
        plan = planner.advance(now)
        out.append((sorted(plan.due), sorted(plan.missed)))
    return out


def _wakes(rng, first, last, planner=None):
    wakes, now = [], first
    while now < last:
        now += rng.choice([1, 1, 7, 60, 90, 600])
        wakes.append(now)
    return wakes


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/New_York"])
@pytest.mark.slow     # plans three hours of seconds both ways, five times per change: not a unit test
def test_passing_quiet_seconds_plans_what_planning_each_second_plans(zone):
    rng = random.Random(zone)
    starts = {"Europe/Paris": [1_774_738_800, 1_792_882_800],        # around both 2026 changes
              "America/New_York": [1_772_953_200, 1_793_512_800], "UTC": [T0]}[zone]
    for start in starts:
        for _ in range(5):
            specs = rng.sample(SPECS, 3)
            wakes = _wakes(rng, start - 5400, start + 5400)
            assert _plans(zone, specs, start - 5400, wakes, True) == \
                _plans(zone, specs, start - 5400, wakes, False), specs
            # The loop's own wakes (each busy second) against a wake every second: the same runs.
            every = list(range(start - 5399, start + 5400))
            planner = Planner(misfire_grace=60)
            for i, spec in enumerate(specs):
                planner.set(f"t{i}", Schedule(spec, zone))
            busy, second = [], start - 5400
            while (second := planner.next_busy(second, start + 5399 - second)) is not None:
                busy.append(second)
            ours = _plans(zone, specs, start - 5400, busy + [start + 5399], True)
            theirs = _plans(zone, specs, start - 5400, every, False)
            assert sorted(sum((due for due, _ in ours), [])) == \
                sorted(sum((due for due, _ in theirs), [])), specs
            assert all(not missed for _, missed in ours + theirs)


def test_next_busy_finds_matches_and_zone_changes_and_keeps_its_answer(monkeypatch):
    planner = Planner()
    planner.set("yearly", Schedule("0 0 3 1 1 *", "UTC"))
    planner.set("paris", Schedule("0 0 3 1 1 *", "Europe/Paris"))
    assert planner.next_busy(T0) == T0 + 3 * 3600 - 3600        # 03:00 Paris, in winter
    change = 1_774_746_000                                       # 2026-03-29 01:00 UTC
    assert planner.next_busy(change - 100) == change             # the DST rules act there
    searches = []
    original = ScheduleTable.first_match
    monkeypatch.setattr(ScheduleTable, "first_match",
                        lambda self, *a: searches.append(a) or original(self, *a))
    planner.next_busy(change + 10)
    planner.next_busy(change + 11)                               # looks a day further on
    count = len(searches)
    for second in range(change + 12, change + 1000):
        planner.next_busy(second)                                # the same quiet stretch
    assert len(searches) == count
    planner.set("often", Schedule("*/5 * * * * *", "UTC"))      # a change of the tables
    assert planner.next_busy(change + 11) == change + 15
