"""Fuzzing the schedule parser and the C table (also run by tests/asan.sh under the sanitizers).

Only ScheduleError may come out of the parser; the C table, after any sequence of set, replace
and remove, answers exactly the keys whose Schedule.matches says yes; many set/remove cycles
do not grow the process.
"""

import os
from datetime import datetime, timedelta

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchcore.schedule import Schedule, ScheduleError, ScheduleTable

TOKENS = ["*", "/", "-", ",", "#", "L", "W", "?", "@", "every", "hourly", "daily", "reboot", "MON",
          "FRI", "JAN", "DEC", "sun", "0", "1", "7", "12", "23", "31", "59", "60", "61", "99",
          "-1", "4294967296", "1e3", "s", "m", "h", "d", "½", "\x00", "٣"]
FIELD = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=5).map("".join)
CRON = st.one_of(st.lists(FIELD, min_size=0, max_size=8).map(" ".join), st.text(max_size=40))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=CRON, zone=st.sampled_from([None, "UTC", "Europe/Berlin"]))
def test_schedule_parser_raises_only_schedule_error(text, zone, figures):
    try:
        schedule = Schedule(text, zone)
    except ScheduleError as exc:
        assert str(exc)
    else:
        schedule.matches(datetime(2026, 3, 29, 2, 30))      # a parsed schedule can be used
        if not schedule.is_reboot:
            schedule.next_after(datetime(2026, 3, 29, 2, 30))
    figures.add(faults=1)


SIMPLE = ["* * * * * *", "*/2 * * * * *", "0 * * * * *", "@every 3s", "@every 7s", "1-10 * * * * *",
          "0 0 * * * *", "*/5 * * * * MON-FRI", "0 0 0 L * *", "0 0 0 * * 5#2", "0 0 0 * * 5L", "@reboot",
          "30 2 * * *", "0 30 2 * * *", "0 0 12 29 2 *"]
OPS = st.lists(st.tuples(st.sampled_from(["set", "set", "remove", "match"]), st.integers(0, 40),
                         st.sampled_from(SIMPLE), st.integers(0, 10**8)), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]))
def test_c_table_agrees_with_schedule_matches_under_random_set_remove_match(ops, zone, figures):
    table, schedules = ScheduleTable(zone), {}
    start, checked = datetime(2026, 1, 1), 0
    for op, key, text, offset in ops:
        if op == "set":
            schedules[key] = Schedule(text, zone)
            table.set(key, schedules[key])
        elif op == "remove" and key in schedules:
            table.remove(key)
            del schedules[key]
        elif op == "match":
            when = start + timedelta(seconds=offset)
            expected = sorted(k for k, s in schedules.items() if s.matches(when))
            assert sorted(table.match(when)) == expected, when
            checked += len(schedules)
        assert len(table) == len(schedules)
    figures.add(faults=len(ops), runs=checked)



@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer's quarantine keeps freed memory; the C host checks leaks")
def test_table_set_remove_cycles_do_not_grow_the_process():
    table = ScheduleTable("UTC")
    schedules = [Schedule(text, "UTC") for text in SIMPLE]

    def cycle(rounds):
        for i in range(rounds):
            for key in range(200):
                table.set(key, schedules[(key + i) % len(schedules)])
            table.match(datetime(2026, 1, 1, 0, 0, i % 60))
            for key in range(200):
                table.remove(key)

    cycle(50)                                   # warm up: the table reaches its size
    before = psutil.Process().memory_info().rss
    cycle(500)                                  # 100,000 sets and removes
    assert psutil.Process().memory_info().rss - before < 4 << 20
    assert len(table) == 0
