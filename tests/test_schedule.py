"""The schedule language, Schedule.matches/next_after, and the C-backed ScheduleTable."""

import random
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from torchcore._core import ffi, lib

from torchcore.errors import TorchcoreError
from torchcore.schedule import Schedule, ScheduleError, ScheduleTable

PARIS = ZoneInfo("Europe/Paris")
UTC = timezone.utc


def fires(text, start, count=5, tz=None):
    """The first `count` firing times after `start`, by next_after."""
    schedule, out = Schedule(text, tz=tz), []
    for _ in range(count):
        start = schedule.next_after(start)
        out.append(start)
    return out


def dt(*args):
    return datetime(*args)


# --- parsing: every construct --------------------------------------------------------------------

@pytest.mark.parametrize("text, start, expected", [
    ("* * * * * *", dt(2026, 1, 1), [dt(2026, 1, 1, 0, 0, s) for s in range(1, 6)]),
    ("*/20 * * * * *", dt(2026, 1, 1), [dt(2026, 1, 1, 0, 0, 20), dt(2026, 1, 1, 0, 0, 40),
                                        dt(2026, 1, 1, 0, 1), dt(2026, 1, 1, 0, 1, 20),
                                        dt(2026, 1, 1, 0, 1, 40)]),
    ("5 * * * *", dt(2026, 1, 1), [dt(2026, 1, 1, h, 5) for h in range(5)]),
    ("10-12 0 0 * * *", dt(2026, 1, 1), [dt(2026, 1, 1, 0, 0, 10), dt(2026, 1, 1, 0, 0, 11),
                                         dt(2026, 1, 1, 0, 0, 12), dt(2026, 1, 2, 0, 0, 10),
                                         dt(2026, 1, 2, 0, 0, 11)]),
    ("0 10-30/10 * * * *", dt(2026, 1, 1), [dt(2026, 1, 1, 0, 10), dt(2026, 1, 1, 0, 20),
                                            dt(2026, 1, 1, 0, 30), dt(2026, 1, 1, 1, 10),
                                            dt(2026, 1, 1, 1, 20)]),
    ("0 45/5 * * * *", dt(2026, 1, 1), [dt(2026, 1, 1, 0, 45), dt(2026, 1, 1, 0, 50),
                                        dt(2026, 1, 1, 0, 55), dt(2026, 1, 1, 1, 45),
                                        dt(2026, 1, 1, 1, 50)]),
    ("0 0 1,13,22 * * *", dt(2026, 1, 1), [dt(2026, 1, 1, 1), dt(2026, 1, 1, 13),
                                           dt(2026, 1, 1, 22), dt(2026, 1, 2, 1),
                                           dt(2026, 1, 2, 13)]),
    ("0 0 0 1 jan,Jul *", dt(2026, 1, 1), [dt(2026, 7, 1), dt(2027, 1, 1), dt(2027, 7, 1),
                                           dt(2028, 1, 1), dt(2028, 7, 1)]),
    ("0 0 0 1 MAR-may *", dt(2026, 1, 1), [dt(2026, 3, 1), dt(2026, 4, 1), dt(2026, 5, 1),
                                           dt(2027, 3, 1), dt(2027, 4, 1)]),
    ("0 0 * * mon-FRI", dt(2026, 11, 20), [dt(2026, 11, 23), dt(2026, 11, 24), dt(2026, 11, 25),
                                           dt(2026, 11, 26), dt(2026, 11, 27)]),
    ("0 0 * * 7", dt(2026, 11, 20), [dt(2026, 11, 22), dt(2026, 11, 29), dt(2026, 12, 6),
                                     dt(2026, 12, 13), dt(2026, 12, 20)]),
    ("0 0 * * 5-7", dt(2026, 11, 23), [dt(2026, 11, 27), dt(2026, 11, 28), dt(2026, 11, 29),
                                       dt(2026, 12, 4), dt(2026, 12, 5)]),
    ("0 0 L * *", dt(2026, 1, 1), [dt(2026, 1, 31), dt(2026, 2, 28), dt(2026, 3, 31),
                                   dt(2026, 4, 30), dt(2026, 5, 31)]),
    ("0 0 L 2 *", dt(2027, 3, 1), [dt(2028, 2, 29), dt(2029, 2, 28), dt(2030, 2, 28),
                                   dt(2031, 2, 28), dt(2032, 2, 29)]),
    ("0 0 15,L * *", dt(2026, 1, 1), [dt(2026, 1, 15), dt(2026, 1, 31), dt(2026, 2, 15),
                                      dt(2026, 2, 28), dt(2026, 3, 15)]),
    ("0 0 * * 5L", dt(2026, 1, 1), [dt(2026, 1, 30), dt(2026, 2, 27), dt(2026, 3, 27),
                                    dt(2026, 4, 24), dt(2026, 5, 29)]),
    ("0 0 * * 0L", dt(2026, 1, 1), [dt(2026, 1, 25), dt(2026, 2, 22), dt(2026, 3, 29),
                                    dt(2026, 4, 26), dt(2026, 5, 31)]),
    ("0 0 * * fri#2", dt(2026, 1, 1), [dt(2026, 1, 9), dt(2026, 2, 13), dt(2026, 3, 13),
                                       dt(2026, 4, 10), dt(2026, 5, 8)]),
    ("0 0 * * 1#5", dt(2026, 1, 1), [dt(2026, 3, 30), dt(2026, 6, 29), dt(2026, 8, 31),
                                     dt(2026, 11, 30), dt(2027, 3, 29)]),
    ("0 0 * * 1#1,5L", dt(2026, 1, 1), [dt(2026, 1, 5), dt(2026, 1, 30), dt(2026, 2, 2),
                                        dt(2026, 2, 27), dt(2026, 3, 2)]),
])
def test_constructs(text, start, expected):
    assert fires(text, start) == expected


@pytest.mark.parametrize("macro, equivalent", [
    ("@yearly", "0 0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"), ("@DAILY", "0 0 * * *"), ("  @hourly  ", "0 * * * *"),
])
def test_macros_equal_their_fields(macro, equivalent):
    start = dt(2026, 2, 27, 13, 14, 15)
    assert fires(macro, start, 3) == fires(equivalent, start, 3)
    assert Schedule(macro).fixed_time


def test_five_fields_mean_second_zero():
    assert fires("*/30 * * * *", dt(2026, 1, 1), 2) == [dt(2026, 1, 1, 0, 30), dt(2026, 1, 1, 1)]


def test_attributes():
    assert Schedule("@reboot").is_reboot and Schedule("@reboot").every is None
    assert Schedule("@every 1h30m").every == 5400
    assert Schedule("@every 90").every == 90
    assert not Schedule("@every 10s").is_reboot and not Schedule("@every 10s").fixed_time
    assert Schedule("0 30 2 * * *").fixed_time
    assert Schedule("7 30 * * * *").fixed_time
    assert not Schedule("* 30 2 * * *").fixed_time
    assert not Schedule("0 */5 * * * *").fixed_time
    assert not Schedule("@reboot").fixed_time
    schedule = Schedule("0 0 * * *", tz="Europe/Paris")
    assert schedule.text == "0 0 * * *" and schedule.tz == PARIS
    assert Schedule("@daily", tz=UTC).tz is UTC and Schedule("@daily").tz is None
    assert "Europe/Paris" in repr(schedule)


def test_reboot_never_matches():
    reboot = Schedule("@reboot")
    assert not reboot.matches(dt(2026, 1, 1))
    assert reboot.next_after(dt(2026, 1, 1)) is None


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("", "schedule: empty"),
    ("   ", "schedule: empty"),
    ("* * *", "expected 5 or 6 fields (sec min hour dom month dow), got 3"),
    ("* * * * * * *", "expected 5 or 6 fields (sec min hour dom month dow), got 7"),
    ("61 * * * *", "minute: value 61 is out of range 0-59"),
    ("60 * * * * *", "second: value 60 is out of range 0-59"),
    ("0 0 24 * * *", "hour: value 24 is out of range 0-23"),
    ("0 0 0 0 * *", "day-of-month: value 0 is out of range 1-31"),
    ("0 0 0 32 * *", "day-of-month: value 32 is out of range 1-31"),
    ("0 0 0 * 13 *", "month: value 13 is out of range 1-12"),
    ("0 0 0 * 0 *", "month: value 0 is out of range 1-12"),
    ("0 0 0 * * 8", "day-of-week: value 8 is out of range 0-7"),
    ("* * * * FOO", "day-of-week: unknown name 'FOO'"),
    ("* * * foo *", "month: unknown name 'foo'"),
    ("* * * * MONDAY", "day-of-week: unknown name 'MONDAY'"),
    ("MON * * * *", "minute: 'MON' is not a number in 0-59"),
    ("*/0 * * * *", "minute: step 0 is invalid"),
    ("* */0 * * * *", "minute: step 0 is invalid"),
    ("*/61 * * * * *", "second: step 61 is out of range 1-60"),
    ("0 0 0 * */13 *", "month: step 13 is out of range 1-12"),
    ("5-1 * * * *", "minute: range 5-1 is reversed"),
    ("* * * * FRI-MON", "day-of-week: range FRI-MON is reversed"),
    ("1,,2 * * * *", "minute: empty element in list '1,,2'"),
    ("1, * * * *", "minute: empty element"),
    ("1-2-3 * * * *", "minute: cannot parse '1-2-3'"),
    ("-5 * * * *", "minute: cannot parse '-5'"),
    ("*/ * * * *", "minute: cannot parse '*/'"),
    ("/5 * * * *", "minute: cannot parse '/5'"),
    ("5/ * * * *", "minute: cannot parse '5/'"),
    ("*/x * * * *", "minute: cannot parse '*/x'"),
    ("1.5 * * * *", "minute: cannot parse '1.5'"),
    ("L * * * *", "minute: 'L' is not a number in 0-59"),
    ("0 0 L/2 * *", "day-of-month: 'L' takes no range or step"),
    ("0 0 1-L * *", "day-of-month: 'L' takes no range or step"),
    ("0 0 * * L", "day-of-week: 'L' needs a weekday before it, like 5L"),
    ("0 0 * * 9L", "day-of-week: value 9 is out of range 0-7"),
    ("0 0 * * 1#6", "day-of-week: occurrence 6 in '1#6' is out of range 1-5"),
    ("0 0 * * 1#0", "day-of-week: occurrence 0 in '1#0' is out of range 1-5"),
    ("0 0 * * 8#1", "day-of-week: value 8 is out of range 0-7"),
    ("0 0 1#1 * *", "day-of-month: cannot parse '1#1'"),
    ("0 0 30 2 *", "day-of-month: day 30 never occurs in the selected months (FEB)"),
    ("0 0 31 4,6 *", "day-of-month: day 31 never occurs in the selected months (APR,JUN)"),
    ("0 0 31 4 */2", "day-of-month: day 31 never occurs"),
    ("@daily x", "@daily: unexpected text after the macro: 'x'"),
    ("@reboot now", "@reboot: unexpected text after the macro"),
    ("@every", "@every: expected one duration like 10s, 5m or 1h30m, got nothing"),
    ("@every 10s 5s", "@every: expected one duration"),
    ("@every 0s", "@every: the interval must be at least 1 second"),
    ("@every 0", "@every: the interval must be at least 1 second"),
    ("@every soon", "@every: expected a duration like 45s"),
    ("@every -5s", "@every: expected a duration like 45s"),
    ("@fortnightly", "unknown macro '@fortnightly'; expected one of @yearly"),
    ("@", "unknown macro '@'"),
    ("* * * * * @daily", "day-of-week: cannot parse '@daily'"),
])
def test_errors(text, message):
    with pytest.raises(ScheduleError) as info:
        Schedule(text)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TorchcoreError)


def test_field_errors_start_with_the_field_name():
    fields = ["second", "minute", "hour", "day-of-month", "month", "day-of-week"]
    for index, name in enumerate(fields):
        words = ["*"] * 6
        words[index] = "99"
        with pytest.raises(ScheduleError, match=f"^{name}: value 99 is out of range"):
            Schedule(" ".join(words))


@pytest.mark.parametrize("value", [None, 5, 1.5, b"* * * * *", ["*"] * 5])
def test_non_string_is_a_schedule_error(value):
    with pytest.raises(ScheduleError, match="schedule: expected a string, got"):
        Schedule(value)


def test_bad_zone():
    with pytest.raises(ScheduleError, match="time zone: unknown zone 'Mars/Olympus'"):
        Schedule("@daily", tz="Mars/Olympus")
    with pytest.raises(ScheduleError, match="time zone: expected an IANA name or a tzinfo"):
        Schedule("@daily", tz=3)
    with pytest.raises(ScheduleError, match="time zone: unknown zone"):
        ScheduleTable(tz="../etc/passwd")


def test_random_garbage_never_raises_anything_else():
    rng = random.Random(7)
    alphabet = "0123456789*/-,#LW@ ?abcMONJANxyz\t"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        try:
            Schedule(text)
        except ScheduleError:
            pass


# --- matches -------------------------------------------------------------------------------------

def test_matches_second_resolution():
    schedule = Schedule("*/15 * * * * *")
    assert schedule.matches(dt(2026, 1, 1, 0, 0, 15, 999999))
    assert not schedule.matches(dt(2026, 1, 1, 0, 0, 16))


def test_matches_converts_aware_datetimes():
    schedule = Schedule("0 30 2 * * *", tz="Europe/Paris")
    assert schedule.matches(datetime(2026, 1, 10, 1, 30, tzinfo=UTC))       # 02:30 in Paris
    assert not schedule.matches(datetime(2026, 1, 10, 2, 30, tzinfo=UTC))
    assert schedule.matches(dt(2026, 1, 10, 2, 30))                 # naive = Paris wall time
    assert Schedule("0 30 2 * * *", tz=UTC).matches(datetime(2026, 1, 10, 3, 30, tzinfo=PARIS))


def test_day_rule_is_debian_cron():
    # 2026-11-01 is a Sunday; 2026-11-02 a Monday.
    either = Schedule("0 0 0 1 * MON")        # both restricted: either matches
    assert either.matches(dt(2026, 11, 1)) and either.matches(dt(2026, 11, 2))
    assert not either.matches(dt(2026, 11, 3))
    both = Schedule("0 0 0 */2 * MON")         # dom starts with '*': both must match
    assert both.matches(dt(2026, 11, 9)) and not both.matches(dt(2026, 11, 2))
    assert not both.matches(dt(2026, 11, 3))
    both = Schedule("0 0 0 1-31/2 * */1")      # dow starts with '*': both must match
    assert both.matches(dt(2026, 11, 3)) and not both.matches(dt(2026, 11, 2))
    dom_only = Schedule("0 0 0 13 * *")
    assert dom_only.matches(dt(2026, 11, 13)) and not dom_only.matches(dt(2026, 11, 14))
    dow_only = Schedule("0 0 0 * * FRI")
    assert dow_only.matches(dt(2026, 11, 13)) and not dow_only.matches(dt(2026, 11, 12))
    last_or_friday = Schedule("0 0 0 L * 5#1")
    assert last_or_friday.matches(dt(2026, 11, 30)) and last_or_friday.matches(dt(2026, 11, 6))
    assert not last_or_friday.matches(dt(2026, 11, 13))


def test_every_is_aligned_to_the_epoch():
    schedule = Schedule("@every 10s", tz="Asia/Kolkata")      # +05:30: wall time is irrelevant
    epoch = 1_800_000_000
    assert schedule.matches(datetime.fromtimestamp(epoch, UTC))
    assert not schedule.matches(datetime.fromtimestamp(epoch + 5, UTC))
    wall = datetime.fromtimestamp(epoch, ZoneInfo("Asia/Kolkata")).replace(tzinfo=None)
    assert schedule.matches(wall)
    five = Schedule("@every 5m", tz="UTC")
    assert five.matches(dt(2026, 1, 1, 0, 5)) and not five.matches(dt(2026, 1, 1, 0, 5, 1))
    odd = Schedule("@every 7s", tz="UTC")
    assert odd.matches(datetime.fromtimestamp(7 * 250_000_000, UTC))


def test_every_next_after():
    schedule = Schedule("@every 90s", tz="UTC")
    assert schedule.next_after(dt(2026, 1, 1)) == dt(2026, 1, 1, 0, 1, 30)
    assert schedule.next_after(dt(2026, 1, 1, 0, 0, 0, 500)) == dt(2026, 1, 1, 0, 1, 30)
    aware = schedule.next_after(datetime(2026, 1, 1, 0, 1, 29, tzinfo=PARIS))
    assert aware.tzinfo == ZoneInfo("UTC") and aware.timestamp() % 90 == 0


# --- next_after ----------------------------------------------------------------------------------

def test_next_after_is_strictly_after():
    schedule = Schedule("0 0 12 * * *")
    assert schedule.next_after(dt(2026, 1, 1, 12)) == dt(2026, 1, 2, 12)
    assert schedule.next_after(dt(2026, 1, 1, 11, 59, 59, 999999)) == dt(2026, 1, 1, 12)


def test_next_after_leap_years():
    assert fires("0 0 0 29 2 *", dt(2026, 1, 1), 3) == [dt(2028, 2, 29), dt(2032, 2, 29),
                                                        dt(2036, 2, 29)]
    assert fires("0 0 0 29 2 *", dt(2096, 3, 1), 2) == [dt(2104, 2, 29), dt(2108, 2, 29)]
    assert fires("0 0 0 28-29 2 *", dt(2100, 1, 1), 2) == [dt(2100, 2, 28), dt(2101, 2, 28)]
    assert fires("0 0 0 * 2 1#5", dt(2026, 1, 1), 1) == [dt(2044, 2, 29)]


def test_next_after_is_fast_for_rare_schedules():
    started = time.perf_counter()
    for year in range(2000, 2040):
        Schedule("0 0 0 29 2 *", tz="Europe/Paris").next_after(datetime(year, 3, 1, tzinfo=UTC))
        Schedule("0 0 0 29 2 *").next_after(dt(year, 3, 1))
    assert time.perf_counter() - started < 2.0


def test_next_after_never_firing_is_none():
    assert Schedule("0 0 0 */20 * 0#5").next_after(dt(2026, 1, 1)) is None


def test_next_after_aware_returns_the_schedule_zone():
    schedule = Schedule("0 0 9 * * *", tz="Europe/Paris")
    found = schedule.next_after(datetime(2026, 6, 1, 12, tzinfo=UTC))
    assert found == datetime(2026, 6, 2, 9, tzinfo=PARIS)
    assert found.tzinfo == PARIS and found.utcoffset() == timedelta(hours=2)
    tokyo = Schedule("0 0 9 * * *", tz="Asia/Tokyo")
    assert tokyo.next_after(datetime(2026, 6, 1, 0, 0, tzinfo=UTC)) == datetime(
        2026, 6, 2, 0, 0, tzinfo=UTC)


def test_spring_gap_fixed_time_fires_at_the_end_of_the_gap():
    # Paris, 2026-03-29: 02:00 CET jumps to 03:00 CEST.
    schedule = Schedule("0 30 2 * * *", tz="Europe/Paris")
    found = schedule.next_after(datetime(2026, 3, 29, 0, 0, tzinfo=UTC))
    assert found == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)         # 03:00:00 CEST
    assert found.replace(tzinfo=None) == dt(2026, 3, 29, 3)
    assert schedule.next_after(found) == datetime(2026, 3, 30, 2, 30, tzinfo=PARIS)


def test_spring_gap_non_fixed_skips_missing_times():
    schedule = Schedule("0 */20 2 * * *", tz="Europe/Paris")     # three a night, not fixed-time
    found = schedule.next_after(datetime(2026, 3, 29, 0, 0, tzinfo=UTC))
    assert found == datetime(2026, 3, 30, 2, 0, tzinfo=PARIS)


def test_autumn_overlap_fixed_time_fires_once():
    # Paris, 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:xx happens twice.
    schedule = Schedule("0 30 2 * * *", tz="Europe/Paris")
    first = schedule.next_after(datetime(2026, 10, 24, 22, 0, tzinfo=UTC))
    assert first.timestamp() == datetime(2026, 10, 25, 0, 30, tzinfo=UTC).timestamp()  # CEST
    assert first.fold == 0 and first.replace(tzinfo=None) == dt(2026, 10, 25, 2, 30)
    assert schedule.next_after(first) == datetime(2026, 10, 26, 2, 30, tzinfo=PARIS)
    in_second_pass = datetime(2026, 10, 25, 1, 10, tzinfo=UTC)      # 02:10 CET
    assert schedule.next_after(in_second_pass) == datetime(2026, 10, 26, 2, 30, tzinfo=PARIS)


def test_autumn_overlap_non_fixed_fires_in_both_passes():
    schedule = Schedule("0 */30 2 * * *", tz="Europe/Paris")
    start = datetime(2026, 10, 24, 23, 59, tzinfo=UTC)
    found = fires("0 */30 2 * * *", start, 4, tz="Europe/Paris")
    assert [f.astimezone(UTC).replace(tzinfo=None) for f in found] == [
        dt(2026, 10, 25, 0, 0), dt(2026, 10, 25, 0, 30), dt(2026, 10, 25, 1, 0),
        dt(2026, 10, 25, 1, 30)]
    assert schedule.next_after(found[-1]) == datetime(2026, 10, 26, 2, 0, tzinfo=PARIS)


@pytest.fixture
def paris_local(monkeypatch):
    """Make the system's local zone Europe/Paris for the test."""
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_local_zone_follows_the_system(paris_local):
    schedule = Schedule("0 30 2 * * *")                               # tz=None: local time
    found = schedule.next_after(datetime(2026, 3, 29, 0, 0, tzinfo=UTC))
    assert found.timestamp() == datetime(2026, 3, 29, 1, 0, tzinfo=UTC).timestamp()
    assert found.utcoffset() == timedelta(hours=2)
    first = schedule.next_after(datetime(2026, 10, 24, 22, 0, tzinfo=UTC))
    assert first.timestamp() == datetime(2026, 10, 25, 0, 30, tzinfo=UTC).timestamp()
    assert schedule.next_after(first).replace(tzinfo=None) == dt(2026, 10, 26, 2, 30)
    assert schedule.matches(datetime(2026, 1, 10, 1, 30, tzinfo=UTC))
    table = ScheduleTable()
    table.set("job", schedule)
    assert table.match(datetime(2026, 1, 10, 1, 30, tzinfo=UTC)) == ["job"]
    assert table.match(dt(2026, 1, 10, 2, 30)) == ["job"]


def test_naive_next_after_is_pure_wall_time():
    schedule = Schedule("0 30 2 * * *", tz="Europe/Paris")
    assert schedule.next_after(dt(2026, 3, 29)) == dt(2026, 3, 29, 2, 30)
    assert schedule.next_after(dt(2026, 10, 25, 2, 30)) == dt(2026, 10, 26, 2, 30)


def test_southern_hemisphere_and_half_hour_zones():
    sydney = Schedule("0 30 2 * * *", tz="Australia/Sydney")       # 2026-10-04 02:00 -> 03:00
    found = sydney.next_after(datetime(2026, 10, 3, 12, 0, tzinfo=UTC))
    assert found.replace(tzinfo=None) == dt(2026, 10, 4, 3, 0)
    lord_howe = Schedule("0 15 2 * * *", tz="Australia/Lord_Howe")  # 02:00 -> 02:30
    found = lord_howe.next_after(datetime(2026, 10, 3, 12, 0, tzinfo=UTC))
    assert found.replace(tzinfo=None) == dt(2026, 10, 4, 2, 30)


def test_next_after_agrees_with_matches():
    rng = random.Random(3)
    texts = ["*/7 */13 * * * *", "0 0 0 L * *", "0 0 12 * * 1#2,5L", "30 15 3 */3 * *",
             "0 0 0 1 * MON", "0 0 0 * FEB,AUG SAT"]
    for text in texts:
        schedule = Schedule(text)
        for _ in range(20):
            start = dt(2026, 1, 1) + timedelta(seconds=rng.randrange(400 * 86400))
            found = schedule.next_after(start)
            assert schedule.matches(found) and found > start
            between = start + (found - start) * rng.random()
            if between.replace(microsecond=0) > start.replace(microsecond=0):
                assert between.replace(microsecond=0) == found or not schedule.matches(between)


# --- the table -----------------------------------------------------------------------------------

def test_table_set_replace_remove_len_contains():
    table = ScheduleTable(tz="UTC")
    table.set("a", Schedule("*/5 * * * * *"))
    table.set("b", Schedule("@every 10s"))
    table.set(("tuple", 1), Schedule("0 0 0 * * MON"))
    table.set("boot", Schedule("@reboot"))
    assert len(table) == 4 and "a" in table and ("tuple", 1) in table and "zzz" not in table
    monday = dt(2026, 11, 23)
    assert sorted(map(str, table.match(monday))) == sorted(map(str, ["a", "b", ("tuple", 1)]))
    assert table.match(monday + timedelta(seconds=5)) == ["a"]
    assert table.match(monday + timedelta(seconds=1)) == []
    table.set("a", Schedule("1 * * * * *"))                         # replace
    assert len(table) == 4
    assert table.match(monday + timedelta(seconds=1)) == ["a"]
    assert table.match(monday + timedelta(seconds=5)) == []
    table.remove("a")
    assert "a" not in table and len(table) == 3
    assert table.match(monday + timedelta(seconds=1)) == []
    with pytest.raises(KeyError):
        table.remove("a")
    with pytest.raises(TypeError, match="expected a Schedule"):
        table.set("a", "* * * * *")


def test_table_replace_switches_between_cron_and_every():
    table = ScheduleTable(tz="UTC")
    table.set("x", Schedule("@every 7s"))
    table.set("y", Schedule("@every 7s"))
    table.set("x", Schedule("@every 3s"))
    table.set("y", Schedule("0 * * * * *"))
    table.set("x", Schedule("@every 7s"))
    base = datetime.fromtimestamp(420 * 4_000_000, UTC)             # a multiple of 7 and of 60
    assert sorted(table.match(base)) == ["x", "y"]
    assert table.match(base + timedelta(seconds=3)) == []
    assert table.match(base + timedelta(seconds=7)) == ["x"]
    table.remove("x")
    assert table.match(base) == ["y"]
    assert table.match(base + timedelta(seconds=7)) == []


def test_table_match_uses_the_table_zone():
    table = ScheduleTable(tz="Europe/Paris")
    table.set("job", Schedule("0 30 2 * * *"))
    assert table.match(dt(2026, 1, 10, 2, 30)) == ["job"]
    assert table.match(datetime(2026, 1, 10, 1, 30, tzinfo=UTC)) == ["job"]
    assert table.match(datetime(2026, 1, 10, 2, 30, tzinfo=UTC)) == []


def test_table_every_uses_the_epoch_of_the_wall_time_with_fold():
    table = ScheduleTable(tz="Europe/Paris")
    table.set("e", Schedule("@every 7200s"))          # 2h: even UTC hours
    first = datetime(2026, 10, 25, 2, 0, fold=0)      # 00:00 UTC
    second = datetime(2026, 10, 25, 2, 0, fold=1)     # 01:00 UTC
    assert table.match(first) == ["e"] and table.match(second) == []


def test_table_many_keys_slot_reuse_and_growth():
    rng = random.Random(11)
    table, schedules = ScheduleTable(tz="UTC"), {}
    texts = ["* * * * * *", "*/2 * * * * *", "0 * * * * *", "@every 3s", "1-10 * * * * *",
             "0 0 * * * *", "*/5 * * * * MON-FRI", "@every 4s", "@reboot"]
    for step in range(6000):
        key = rng.randrange(1500)
        if key in schedules and rng.random() < 0.4:
            table.remove(key)
            del schedules[key]
        else:
            schedules[key] = Schedule(rng.choice(texts))
            table.set(key, schedules[key])
        if step % 500 == 0:
            check_table(table, schedules, dt(2026, 11, 23) + timedelta(seconds=rng.randrange(120)))
    assert len(table) == len(schedules)
    for second in range(0, 130, 7):
        check_table(table, schedules, dt(2026, 11, 23) + timedelta(seconds=second))
    for key in list(schedules):
        table.remove(key)
    assert len(table) == 0 and table.match(dt(2026, 11, 23)) == []


def check_table(table, schedules, when):
    expected = sorted(k for k, s in schedules.items() if s.matches(when.replace(tzinfo=UTC)))
    assert sorted(table.match(when)) == expected


def test_table_agrees_with_schedules_on_random_expressions():
    from test_schedule_differential import random_expression
    rng = random.Random(5)
    table, schedules = ScheduleTable(tz="UTC"), {}
    while len(schedules) < 400:
        try:
            schedule = Schedule(random_expression(rng), tz="UTC")
        except ScheduleError:
            continue
        schedules[len(schedules)] = schedule
        table.set(len(schedules) - 1, schedule)
    for _ in range(300):
        check_table(table, schedules, dt(2026, 1, 1) + timedelta(seconds=rng.randrange(10**8)))


def test_the_c_core_rejects_bad_specs_and_ticks():
    table = lib.tc_table_new(0)
    try:
        spec, slot = ffi.new("tc_spec *"), ffi.new("uint32_t *")
        spec.mon = 1                                  # bit 0: no month 0
        assert lib.tc_table_add(table, spec, slot) == lib.TC_ERR_SPEC
        spec.mon, spec.sec = 2, 1 << 60
        assert lib.tc_table_add(table, spec, slot) == lib.TC_ERR_SPEC
        spec.sec = 1
        assert lib.tc_table_add(table, spec, slot) == lib.TC_OK and slot[0] == 0
        assert lib.tc_table_remove(table, 0) == lib.TC_OK
        assert lib.tc_table_remove(table, 0) == lib.TC_ERR_SLOT
        assert lib.tc_table_replace(table, 5, spec) == lib.TC_ERR_SLOT
        tick, out, count = ffi.new("tc_tick *"), ffi.new("const uint32_t **"), ffi.new("size_t *")
        tick.year, tick.month, tick.day = 2026, 2, 29
        assert lib.tc_table_match(table, tick, out, count) == lib.TC_ERR_TIME
        assert ffi.string(lib.tc_strerror(lib.TC_ERR_TIME)) == b"time field out of range"
        assert ffi.string(lib.tc_strerror(99)) == b"unknown status"
    finally:
        lib.tc_table_free(table)


def brute_force_next(schedule, start, zone, limit):
    """The reference for aware next_after near DST changes: a scan over epoch seconds.

    A second fires if its wall time matches, except in the second pass of an overlap for a
    fixed-time schedule; a fixed-time schedule also fires at the first second after a gap
    in which one of the skipped wall times matches.
    """
    epoch = int(start.timestamp()) + 1
    for second in range(epoch, epoch + limit):
        now = datetime.fromtimestamp(second, zone)
        before = datetime.fromtimestamp(second - 1, zone)
        wall = now.replace(tzinfo=None)
        if schedule._wall_matches(wall) and not (schedule.fixed_time and now.fold):
            return now
        jump = now.utcoffset() - before.utcoffset()
        if schedule.fixed_time and jump > timedelta(0):
            skipped = (wall - jump + timedelta(seconds=s) for s in range(int(jump.total_seconds())))
            if any(schedule._wall_matches(w) for w in skipped):
                return now
    return None


@pytest.mark.parametrize("zone_name, change", [
    ("Europe/Paris", datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),
    ("Europe/Paris", datetime(2026, 10, 25, 1, 0, tzinfo=UTC)),
    ("Australia/Lord_Howe", datetime(2026, 4, 4, 15, 0, tzinfo=UTC)),
    ("Australia/Lord_Howe", datetime(2026, 10, 3, 15, 30, tzinfo=UTC)),
])
def test_aware_next_after_near_dst_changes_against_a_scan(zone_name, change):
    rng, zone = random.Random(zone_name + str(change)), ZoneInfo(zone_name)
    checked = 0
    while checked < 12:
        second = rng.choice(["0", "30", "*/20", "0-5"])
        minute = rng.choice(["0", "15", "30", "45", "*/10", "5-7", "*/29"])
        hour = rng.choice(["*", "0-4", "1,2", "2", "1-3", "*/2"])
        schedule = Schedule(f"{second} {minute} {hour} * * *", tz=zone)
        start = change + timedelta(seconds=rng.randrange(-3 * 3600, 2 * 3600))
        expected = brute_force_next(schedule, start, zone, 5 * 3600)
        if expected is None:
            continue
        found = schedule.next_after(start)
        assert found.timestamp() == expected.timestamp(), (schedule, start)
        checked += 1
