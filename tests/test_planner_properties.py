"""Property test of the scheduling core (torchcore.planner.Planner) as pure code.

Random schedules in several zones, random clock jumps, stalls and reloads.  Each wake is
checked against a reference written from the README's promises, which asks only
``Schedule.matches`` (not the C table) which wall times a task has:

* a normal wake (window of one second) starts exactly the tasks whose schedule matches the
  wall time of that second, except a fixed-time task at a wall time its zone has already passed
  (backward step, autumn overlap), plus each fixed-time task whose wall time a spring gap skipped;
* a window of several seconds up to 3 h (stall, forward step) starts each task once, for its
  latest due second, if that second is within misfire_grace; every other due second is missed;
* a forward step over 3 h matches only the new second; a backward step over 3 h forgets the
  wall times passed.

And, over the whole history: a (task, second) pair starts twice only if the clock stepped back
to or before that second in between, and the task is not fixed-time or the step was over 3 h.
"""

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchcore.planner import CLOCK_CORRECTION, Planner
from torchcore.schedule import Schedule

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
# Starts a little before daylight-saving changes (and one quiet day) so the gaps are crossed.
STARTS = [datetime(2026, 3, 29, 1, 0, tzinfo=timezone.utc), datetime(2026, 10, 25, 1, 0, tzinfo=timezone.utc),
          datetime(2026, 3, 8, 7, 0, tzinfo=timezone.utc), datetime(2026, 11, 1, 6, 0, tzinfo=timezone.utc),
          datetime(2026, 4, 4, 15, 0, tzinfo=timezone.utc), datetime(2026, 6, 10, 12, 0, tzinfo=timezone.utc)]
SCHEDULES = st.one_of(
    st.builds(lambda s, m, h: f"{s} {m} {h} * * *",
              st.sampled_from(["*", "*/7", "0", "13", "0,30"]),
              st.sampled_from(["*", "*/5", "0", "30", "17"]),
              st.sampled_from(["*", "2", "*/3", "1-3", "23"])),
    st.sampled_from(["@every 7s", "@every 90s", "@hourly", "30 2 * * *", "0 30 2 * * *"]))
JUMPS = st.one_of(
    st.sampled_from([90, -90, 86400, -86400, CLOCK_CORRECTION, CLOCK_CORRECTION + 1,
                     -CLOCK_CORRECTION, -CLOCK_CORRECTION - 1, 3600, -3600, -1, 2]),
    st.integers(-CLOCK_CORRECTION - 600, CLOCK_CORRECTION + 600))
OPS = st.lists(st.one_of(
    st.tuples(st.just("tick"), st.integers(1, 90)),
    st.tuples(st.just("stall"), st.integers(2, 400)),
    st.tuples(st.just("jump"), JUMPS),
    st.tuples(st.just("reload"), st.integers(0, 5), SCHEDULES, st.sampled_from(ZONES)),
    st.tuples(st.just("touch"), st.integers(0, 5))),
    min_size=1, max_size=14)


def wall(second, tz):
    return datetime.fromtimestamp(second, tz).replace(tzinfo=None, fold=0)


class Reference:
    """The promises, second by second, with Schedule.matches as the only matcher."""

    def __init__(self, grace):
        self.grace = grace
        self.schedules = {}     # name -> Schedule
        self.high = {}          # zone name -> highest wall time passed

    def due_at(self, second):
        """Names due at ``second`` under the wall-time rules (updates the zones' high marks)."""
        names = []
        for zone in {s.tz.key for s in self.schedules.values()}:
            tz = ZoneInfo(zone)
            here = {n: s for n, s in self.schedules.items() if s.tz.key == zone}
            now_wall = datetime.fromtimestamp(second, tz).replace(tzinfo=None)
            key = now_wall.replace(fold=0)
            high = self.high.get(zone)
            matching = [n for n, s in here.items() if s.matches(now_wall)]
            if high is not None and key <= high:
                names += [n for n in matching if not here[n].fixed_time]
                continue
            prev = wall(second - 1, tz)
            if timedelta(seconds=1) < key - prev <= timedelta(hours=3):
                skipped = [prev + timedelta(seconds=k) for k in range(1, int((key - prev).total_seconds()))]
                matching += [n for n, s in here.items() if s.fixed_time and n not in matching
                             and any(s.matches(w) for w in skipped)]
            names += matching
            self.high[zone] = key
        return set(names)

    def window(self, start, now):
        """(due, missed) for the window (start, now] of several seconds."""
        seconds = {}
        for second in range(start + 1, now + 1):
            for name in self.due_at(second):
                seconds.setdefault(name, []).append(second)
        due, missed = set(), set()
        for name, found in seconds.items():
            if now - found[-1] <= self.grace:
                due.add((name, found[-1]))
                if len(found) > 1:
                    missed.add((name, found[-2], len(found) - 1))
            else:
                missed.add((name, found[-1], len(found)))
        return due, missed


class History:
    """Every start, and the backward steps between them, for the no-double-run property."""

    def __init__(self):
        self.started = {}       # (name, second) -> index of the wake that started it
        self.back_steps = []    # (wake index, new now, step size)
        self.wake = 0
        self.doubled = []

    def check(self, due, fixed):
        self.wake += 1
        for name, second in due:
            before = self.started.get((name, second))
            if before is not None and not any(
                    index > before and now <= second and (name not in fixed or step > CLOCK_CORRECTION)
                    for index, now, step in self.back_steps):
                self.doubled.append((name, second))
            self.started[(name, second)] = self.wake


@pytest.mark.slow
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(start=st.sampled_from(STARTS), offset=st.integers(-7200, 3600),
       initial=st.lists(st.tuples(SCHEDULES, st.sampled_from(ZONES)), min_size=1, max_size=5),
       ops=OPS, grace=st.sampled_from([0, 5, 60, 3600]))
def test_planner_keeps_the_promises(start, offset, initial, ops, grace, figures):
    planner, ref, history = Planner(misfire_grace=grace), Reference(grace), History()
    for index, (text, zone) in enumerate(initial):
        schedule = Schedule(text, zone)
        planner.set(f"t{index}", schedule)
        ref.schedules[f"t{index}"] = schedule
    now = int(start.timestamp()) + offset
    planner.start(now)
    ref.due_at(now)             # the start second counts as passed, as the planner's first wake does
    checked = 0
    for op in ops:
        fixed = {n for n, s in ref.schedules.items() if s.fixed_time}
        if op[0] == "reload":
            _, index, text, zone = op
            schedule = Schedule(text, zone)
            planner.set(f"t{index}", schedule)          # changed or added, between two wakes
            ref.schedules[f"t{index}"] = schedule
            continue
        if op[0] == "touch":        # a changed task (command, env ...) with the same schedule
            name = f"t{op[1]}"
            if name in ref.schedules:
                planner.set(name, ref.schedules[name])
            continue
        if op[0] == "tick":
            for _ in range(op[1]):
                now += 1
                plan = planner.advance(now)
                expected = {(name, now) for name in ref.due_at(now)}
                assert set(plan.due) == expected and not plan.missed, now
                assert len(plan.due) == len(expected)
                history.check(plan.due, fixed)
                checked += len(expected)
            continue
        before, now = now, now + op[1]
        plan = planner.advance(now)
        if now < before:
            history.back_steps.append((history.wake + 1, now, before - now))
            if before - now > CLOCK_CORRECTION:
                ref.high.clear()
            expected, missed = {(name, now) for name in ref.due_at(now)}, set()
        elif now - before > CLOCK_CORRECTION or now - before == 1:
            expected, missed = {(name, now) for name in ref.due_at(now)}, set()
        else:
            expected, missed = ref.window(before, now)
        assert set(plan.due) == expected, (op, before, now)
        assert len(plan.due) == len(expected)
        assert set(plan.missed) == missed, (op, before, now)
        history.check(plan.due, fixed)
        checked += len(expected) + sum(count for _, _, count in missed)
    assert history.doubled == []
    figures.add(faults=sum(op[0] != "tick" for op in ops), runs=checked, doubled=len(history.doubled))


def test_reference_sees_one_berlin_0230_across_both_changes():
    """The reference itself: one 02:30:00 in Berlin on each change day, walked second by second."""
    ref = Reference(60)
    ref.schedules["dst"] = Schedule("0 30 2 * * *", "Europe/Berlin")
    for day in (datetime(2026, 3, 29, tzinfo=timezone.utc), datetime(2026, 10, 25, tzinfo=timezone.utc)):
        begin = int(day.timestamp())
        ref.high.clear()
        hits = [s for s in range(begin, begin + 3 * 3600) if ref.due_at(s)]
        assert len(hits) == 1


def test_a_changed_task_alone_in_its_zone_keeps_the_zone_wall_memory(figures):
    """Found by the property above: re-setting the only task of a zone after a backward step
    used to drop the zone's wall memory, and the fixed-time task ran its second again."""
    t0 = 1_767_225_600
    planner = Planner()
    planner.set("f", Schedule("0 0 * * * *", "UTC"))
    planner.start(t0 - 1)
    assert planner.advance(t0).due == [("f", t0)]
    for second in range(t0 + 1, t0 + 11):
        planner.advance(second)
    planner.advance(t0 - 5)                                 # the clock steps back 15 s
    planner.set("f", Schedule("0 0 * * * *", "UTC"))       # a reload changed the task's command
    due = [d for second in range(t0 - 4, t0 + 11) for d in planner.advance(second).due]
    assert due == []
    figures.add(faults=2, runs=1)
