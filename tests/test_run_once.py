"""`run: once` in the task file, and the pure logic of the fleet's claims (claims.py): the
rendezvous choice of a preferred node, eligibility, fencing tokens.  No database here; the
claims against a real PostgreSQL and real daemons are in test_fleet_once.py."""

import pytest

from torchcore import config, fleetspec, tasktable
from torchcore.errors import ConfigError

FLEET = "settings:\n  fleet:\n    database: postgresql://tc@db.internal/fleet\n"


def _load(tmp_path, text):
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    return str(path), lambda: config.load(str(path))


def test_run_once_and_each_load_and_survive_the_compact_record(tmp_path):
    _, load = _load(tmp_path, FLEET + "tasks:\n"
                    "  - {name: a, schedule: '* * * * * *', command: 'true', run: once}\n"
                    "  - {name: b, schedule: '* * * * * *', command: 'true', run: each}\n"
                    "  - {name: c, schedule: '* * * * * *', command: 'true'}\n")
    tasks = load().tasks
    assert [t.run for t in tasks] == ["once", "each", "each"]
    table = tasktable.TaskTable.of_tasks(tasks)
    assert [table[t.name].run for t in tasks] == ["once", "each", "each"]
    assert table["a"] == tasks[0]
    assert tasktable.record(tasks[0]) != tasktable.record(tasks[1].__class__(
        **{**{f: getattr(tasks[0], f) for f in tasks[0].__slots__}, "run": "each"}))


def test_run_once_without_settings_fleet_is_an_error_at_its_line_naming_the_setting(tmp_path):
    path, load = _load(tmp_path, "tasks:\n  - name: report\n    schedule: '0 30 2 * * *'\n"
                       "    command: 'true'\n    run: once\n")
    with pytest.raises(ConfigError) as error:
        load()
    assert f"{path}:5: task 'report': run: once needs settings.fleet" in str(error.value)


@pytest.mark.parametrize("task, problem", [
    ("{name: x, schedule: '* * * * * *', command: 'true', run: twice}",
     ":5: task 'x': run: expected each or once, got 'twice'"),
    ("{name: x, type: daemon, command: 'true', run: once}",
     ":5: task 'x': run: once is for scheduled tasks"),
    ("{name: x, schedule: '@reboot', command: 'true', run: once}",
     ":5: task 'x': run: once cannot be used with @reboot"),
])
def test_bad_run_values_name_file_line_task_and_field(tmp_path, task, problem):
    path, load = _load(tmp_path, FLEET + "tasks:\n  - " + task + "\n")
    with pytest.raises(ConfigError) as error:
        load()
    assert f"{path}{problem}" in str(error.value)


def test_takeover_and_lease_defaults_and_forms(tmp_path):
    _, load = _load(tmp_path, FLEET + "tasks: []\n")
    fleet = load().settings.fleet
    assert (fleet.takeover, fleet.lease) == (fleetspec.DEFAULT_TAKEOVER, fleetspec.DEFAULT_LEASE) \
        == (0.5, 15)
    for text, seconds in (("0.25s", 0.25), ("750ms", 0.75), ("1", 1.0), (".3", 0.3)):
        _, load = _load(tmp_path, FLEET + f"    takeover: {text}\n    lease: 1m\ntasks: []\n")
        assert (load().settings.fleet.takeover, load().settings.fleet.lease) == (seconds, 60)


@pytest.mark.parametrize("body, problem", [
    ("    takeover: 5s\n", ":4: settings: fleet: takeover: expected 0.1s to 3s, got 5s"),
    ("    takeover: soon\n", ":4: settings: fleet: takeover: expected seconds like 0.5s"),
    ("    lease: 5s\n", ":4: settings: fleet: lease: expected a duration of at least 6s"),
    ("    lease: 2h\n", ":4: settings: fleet: lease: at most 1h"),
])
def test_bad_takeover_and_lease_name_their_line(tmp_path, body, problem):
    path, load = _load(tmp_path, FLEET + body + "tasks: []\n")
    with pytest.raises(ConfigError) as error:
        load()
    assert f"{path}{problem}" in str(error.value)
