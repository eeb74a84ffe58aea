"""Bad input: the schedule parser, the task file and the C table under random input, and task
files of 100,000 tasks and of 50 MB.  Only our own errors may come out (ScheduleError,
ConfigError), never a crash, a traceback of another kind or a wrong match."""

import os
import random
import time
from datetime import datetime, timedelta

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchcore import config
from torchcore.errors import ConfigError
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


VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
              st.text(max_size=20), st.sampled_from(["* * * * * *", "@every 5s", "10.0.0.0/8", "1h"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=10), inner, max_size=3)),
    max_leaves=8)
TASK = st.dictionaries(
    st.sampled_from(["name", "schedule", "command", "type", "max", "ips", "hosts", "timeout",
                     "kill_grace", "env", "cwd", "user", "group", "enabled", "timezone", "limits",
                     "description", "bogus"]), VALUES, max_size=8)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tasks=st.lists(TASK, max_size=4), settings_=st.dictionaries(
    st.sampled_from(["timezone", "shell", "max_running", "misfire_grace", "log_dir", "watch"]),
    VALUES, max_size=3))
def test_task_files_of_random_structure_load_or_raise_config_error(tasks, settings_, figures):
    text = yaml.safe_dump({"settings": settings_, "tasks": tasks}, allow_unicode=True)
    try:
        config.loads(text)
    except ConfigError as exc:
        assert exc.problems and all(p.startswith("tasks.yaml") for p in exc.problems), exc.problems
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


def test_a_task_file_of_100000_tasks_loads(tmp_path):
    path = tmp_path / "tasks.yaml"
    rng = random.Random(3)
    lines = ["tasks:"] + [f'  - {{name: t{i}, schedule: "{rng.randrange(60)} {i % 60} * * * *", '
                          f'command: "true"}}' for i in range(100_000)]
    path.write_text("\n".join(lines) + "\n")
    began = time.monotonic()
    loaded = config.load(str(path))
    assert len(loaded.tasks) == 100_000
    assert time.monotonic() - began < 60


def test_task_files_of_50_mb_load_or_fail_cleanly(tmp_path):
    path = tmp_path / "tasks.yaml"
    big = 50 << 20
    path.write_text('tasks:\n  - {name: x, schedule: "* * * * * *", command: "' + "a" * big + '"}\n')
    assert len(config.load(str(path)).tasks[0].command) == big
    with open(path, "wb") as handle:                  # 50 MB of binary garbage
        handle.write(b"tasks:\n" + os.urandom(big))
    try:
        config.load(str(path))
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) or "tasks.yaml" in str(exc)
    path.write_text("tasks:\n" + "# a comment line\n" * (big // 17) + "  - {name: x, command: y}\n")
    try:
        config.load(str(path))
    except ConfigError as exc:
        assert "schedule" in str(exc)
