"""Bad task files: random structure, 100,000 tasks, 50 MB.  Only ConfigError may come out
(see also test_config_fuzz.py for byte-level mutations and test_schedule_fuzz.py)."""

import os
import random
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchcore import config
from torchcore.errors import ConfigError

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_task_files_of_50_mb_load_or_fail_cleanly(tmp_path):
    path = tmp_path / "tasks.yaml"
    big = 50 << 20
    path.write_text('tasks:\n  - {name: x, schedule: "* * * * * *", command: "' + "a" * big + '"}\n')
    with pytest.raises(ConfigError, match=r"tasks.yaml:2: task 'x': command: 52,428,800 bytes long"):
        config.load(str(path))          # no exec can take a 50 MB word (MAX_ARG_STRLEN is 128 KiB)
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
