"""The scheduling core on a fake clock: windows, catch-up, clock steps, daylight saving."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from torchcore.planner import Planner
from torchcore.schedule import Schedule

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def epoch(text, tz=UTC):
    return int(datetime.fromisoformat(text).replace(tzinfo=tz).timestamp())


def planner(grace=60, **schedules):
    p = Planner(misfire_grace=grace)
    for name, (text, tz) in schedules.items():
        p.set(name, Schedule(text, tz))
    return p


def walk(p, start, end):
    """Advance second by second over [start, end]; return every (name, second) due."""
    due = []
    for now in range(start, end + 1):
        due.extend(p.advance(now).due)
    return due


def test_normal_ticks_start_each_due_second_once():
    p = planner(five=("*/5 * * * * *", UTC))
    t0 = epoch("2026-01-01T00:00:00")
    p.start(t0 - 1)
    due = walk(p, t0, t0 + 59)
    assert due == [("five", t0 + s) for s in range(0, 60, 5)]


def test_same_second_twice_starts_nothing_more():
    p = planner(every=("* * * * * *", UTC))
    t0 = epoch("2026-01-01T00:00:00")
    p.start(t0 - 1)
    assert p.advance(t0).due == [("every", t0)]
    assert p.advance(t0).due == []


def test_stall_within_grace_runs_each_task_once_for_its_latest_second():
    p = planner(grace=60, every=("* * * * * *", UTC), fixed=("10 0 0 * * *", UTC))
    t0 = epoch("2026-01-01T00:00:00")
    p.start(t0 - 1)
    plan = p.advance(t0 + 29)              # 30 seconds at once
    assert sorted(plan.due) == [("every", t0 + 29), ("fixed", t0 + 10)]
    assert plan.missed == [("every", t0 + 28, 29)]
    assert any("skipped" in event for event in plan.events)


def test_stall_beyond_grace_records_the_miss_and_runs_nothing():
    p = planner(grace=60, fixed=("0 0 0 * * *", UTC))
    t0 = epoch("2026-01-01T00:00:00")
    p.start(t0 - 1)
    plan = p.advance(t0 + 120)
    assert plan.due == []
    assert plan.missed == [("fixed", t0, 1)]


def test_forward_step_over_three_hours_is_a_correction():
    p = planner(fixed=("0 0 1 * * *", UTC), every=("* * * * * *", UTC))
    t0 = epoch("2026-01-01T00:00:00")
    p.start(t0 - 1)
    plan = p.advance(t0 + 4 * 3600)
    assert plan.due == [("every", t0 + 4 * 3600)]
    assert plan.missed == []
    assert any("clock correction" in event for event in plan.events)


def test_backward_step_never_repeats_a_fixed_time_but_frequent_tasks_go_on():
    p = planner(fixed=("30 0 12 * * *", UTC), often=("*/10 * * * * *", UTC))
    t0 = epoch("2026-01-01T12:00:00")
    p.start(t0 - 1)
    first = walk(p, t0, t0 + 60)
    assert ("fixed", t0 + 30) in first
    plan = p.advance(t0 - 30)              # the clock steps back 91 s
    assert any("stepped back" in event for event in plan.events)
    again = plan.due + walk(p, t0 - 29, t0 + 60)
    assert all(name == "often" for name, _ in again)
    assert ("often", t0 + 30) in again      # frequent tasks keep firing on the new wall time


def test_backward_step_over_three_hours_forgets_the_wall_times():
    p = planner(fixed=("30 0 12 * * *", UTC))
    t0 = epoch("2026-01-01T12:00:00")
    p.start(t0 - 1)
    assert walk(p, t0, t0 + 31) == [("fixed", t0 + 30)]
    plan = p.advance(t0 - 4 * 3600)
    assert any("clock correction" in event for event in plan.events)
    assert walk(p, t0 - 4 * 3600 + 1, t0 + 31) == [("fixed", t0 + 30)]


def test_spring_gap_runs_a_skipped_fixed_time_once_after_the_gap():
    # Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC).
    p = planner(nightly=("0 30 2 * * *", BERLIN), quarter=("0 */15 * * * *", BERLIN))
    start = epoch("2026-03-29T00:30:00")
    p.start(start - 1)
    due = walk(p, start, epoch("2026-03-29T02:00:00"))
    nightly = [second for name, second in due if name == "nightly"]
    assert nightly == [epoch("2026-03-29T01:00:00")]           # 03:00:00 CEST, once
    quarter = [second for name, second in due if name == "quarter"]
    # 01:30 and 01:45 CET, then 03:00 ... 04:00 CEST: a frequent task does not catch up the gap
    assert len(quarter) == len(set(quarter)) == 7


def test_autumn_overlap_runs_a_fixed_time_once_and_frequent_tasks_twice():
    # Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00 UTC); 02:xx happens twice.
    p = planner(nightly=("0 30 2 * * *", BERLIN), quarter=("0 */15 * * * *", BERLIN))
    start = epoch("2026-10-24T23:50:00")
    p.start(start - 1)
    due = walk(p, start, epoch("2026-10-25T02:10:00"))
    assert [s for n, s in due if n == "nightly"] == [epoch("2026-10-25T00:30:00")]
    quarter = [s for n, s in due if n == "quarter"]
    # 02:00-02:45 CEST and again CET: real elapsed time, every 15 minutes without a gap.
    assert quarter == list(range(quarter[0], quarter[-1] + 1, 900))
    assert len(quarter) == 9                                    # 00:00 ... 02:00 UTC


def test_reload_between_ticks_does_not_refire_the_processed_second():
    p = planner(a=("* * * * * *", UTC))
    t0 = epoch("2026-01-01T00:00:00")
    p.start(t0 - 1)
    assert p.advance(t0).due == [("a", t0)]
    p.set("b", Schedule("* * * * * *", UTC))
    p.set("a", Schedule("*/2 * * * * *", UTC))
    assert p.advance(t0).due == []
    assert sorted(p.advance(t0 + 1).due) == [("b", t0 + 1)]
    p.remove("b")
    assert p.advance(t0 + 2).due == [("a", t0 + 2)]
    assert len(p) == 1 and "b" not in p


def test_zones_are_matched_on_their_own_wall_time():
    p = planner(tokyo=("0 0 9 * * *", ZoneInfo("Asia/Tokyo")), utc=("0 0 9 * * *", UTC))
    start = epoch("2026-01-01T00:00:00")
    p.start(start - 1)
    due = walk(p, start, epoch("2026-01-01T09:00:00"))
    assert due == [("tokyo", epoch("2026-01-01T00:00:00")), ("utc", epoch("2026-01-01T09:00:00"))]


@pytest.mark.parametrize("text", ["@every 7s", "@every 90s"])
def test_every_is_aligned_to_epoch_seconds(text):
    p = planner(e=(text, UTC))
    t0 = epoch("2026-01-01T00:00:00")
    p.start(t0 - 1)
    interval = Schedule(text).every
    due = walk(p, t0, t0 + 400)
    assert due and all(second % interval == 0 for _, second in due)
    assert len(due) == len(range(t0 + (-t0) % interval, t0 + 401, interval))


def test_wall_time_helper_keeps_fold():
    from torchcore.planner import wall_time

    first = wall_time(epoch("2026-10-25T00:30:00"), BERLIN)
    second = wall_time(epoch("2026-10-25T01:30:00"), BERLIN)
    assert (first.hour, first.fold, second.hour, second.fold) == (2, 0, 2, 1)


def test_a_backward_step_right_after_the_start_does_not_run_earlier_wall_times():
    # Found by the property test: the start second's wall time counts as passed.
    p = planner(hourly=("@hourly", UTC))
    t0 = epoch("2026-03-29T01:00:00")
    p.start(t0)
    plan = p.advance(t0 - 3 * 3600)             # exactly 3 h back: not yet a clock correction
    assert plan.due == []
    assert any("stepped back" in event for event in plan.events)
