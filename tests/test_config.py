"""The task file: format, defaults, targeting, and one clear error per problem."""

import hashlib
import ipaddress
import os
import textwrap

import pytest
import yaml

from torchcore import config
from torchcore.config import Limits, Task, loads
from torchcore.errors import ConfigError
from torchcore.node import Node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = """\
tasks:
  - name: job
    schedule: "0 30 2 * * *"
    command: echo hi
"""


def load(text, path="tasks.yaml"):
    return loads(textwrap.dedent(text), path)


def errors(text, path="tasks.yaml"):
    with pytest.raises(ConfigError) as info:
        load(text, path)
    return info.value.problems


def more(text):
    """More task items, to append to TASK."""
    return textwrap.indent(textwrap.dedent(text), "  ")


def one_error(text):
    problems = errors(text)
    assert len(problems) == 1, problems
    return problems[0]


def task_with(extra, base=TASK):
    """The one-task file with extra lines (already indented for the task) appended."""
    return base + textwrap.indent(textwrap.dedent(extra), "    ")


def node(*addresses, hostname="laptop"):
    return Node(addresses=tuple(ipaddress.ip_address(a) for a in addresses), hostname=hostname)


# -- the format ---------------------------------------------------------------------------------


def test_minimal_task_gets_every_default():
    task = load(TASK).task("job")
    assert task == Task(name="job", command="echo hi", schedule_text="0 30 2 * * *")
    assert (task.type, task.max, task.ips, task.hosts, task.enabled) == ("common", 1, (), (), True)
    assert (task.timeout, task.kill_grace, task.env, task.limits) == (None, 10, (), Limits())
    assert task.line == 2 and task.schedule.text == "0 30 2 * * *"


def test_string_command_runs_through_the_shell_and_a_list_is_argv():
    taskfile = load(TASK + more("""\
      - name: argv
        schedule: "@daily"
        command: [sleep, 10]
    """))
    assert taskfile.task("job").argv("/bin/bash") == ["/bin/bash", "-c", "echo hi"]
    assert taskfile.task("argv").argv("/bin/sh") == ["sleep", "10"]


def test_empty_task_list_is_valid():
    assert load("tasks: []\n").tasks == ()


@pytest.mark.parametrize("text, expected", [
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("settings: {}\n", "tasks: missing"),
    ("tasks:\n", "tasks: expected a list of tasks, got nothing (empty) (write 'tasks: []'"),
    ("- a\n- b\n", "expected a mapping with 'settings' and 'tasks'"),
    ("tasks: {name: x}\n", "tasks: expected a list of tasks, got a mapping"),
])
def test_a_file_without_a_task_list_is_an_error(text, expected):
    assert expected in one_error(text)


def test_the_error_names_file_line_task_and_field():
    problem = one_error(task_with("max: 2\n", TASK.replace("30 2", "61 2")))
    assert problem == "tasks.yaml:3: task 'job': schedule: minute: value 61 is out of range 0-59"


def test_every_error_is_reported_at_once_in_file_order():
    problems = errors("""\
        tasks:
          - name: a
            schedule: "0 61 * * * *"
            command: x
          - name: b
            command: y
            maxx: 2
          - name: c
            schedule: "@daily"
            command: z
            timeout: soon
    """)
    assert [p.split(":")[1] for p in problems] == ["3", "5", "7", "11"]
    assert "task 'b': schedule: missing" in problems[1]
    assert "task 'b': maxx: unknown key (did you mean 'max'?)" in problems[2]
    assert "task 'c': timeout: expected a duration" in problems[3]


@pytest.mark.parametrize("key, suggestion", [("maxx", "max"), ("comand", "command"),
                                             ("schedul", "schedule"), ("ip", "ips")])
def test_unknown_keys_suggest_the_known_one(key, suggestion):
    problem = one_error(task_with(f"{key}: 1\n"))
    assert f"{key}: unknown key (did you mean '{suggestion}'?)" in problem


def test_unknown_key_without_a_close_match_has_no_suggestion():
    assert one_error(task_with("zzzzzz: 1\n")).endswith("zzzzzz: unknown key")


def test_unknown_top_level_and_settings_keys():
    problems = errors("setings: {}\nsettings: {shel: /bin/sh}\ntasks: []\n")
    assert "tasks.yaml:1: setings: unknown key (did you mean 'settings'?)" in problems
    assert "tasks.yaml:2: settings: shel: unknown key (did you mean 'shell'?)" in problems


def test_duplicate_keys_name_the_first_one():
    problem = one_error(task_with("max: 2\nmax: 3\n"))
    assert problem == "tasks.yaml:6: task 'job': max: duplicate key (first at line 5)"


def test_duplicate_task_names():
    problem = one_error(TASK + "  - {name: job, command: x, type: daemon}\n")
    assert problem == "tasks.yaml:5: task 'job': name: duplicate task name (first defined at line 2)"


def test_duplicate_names_are_found_even_when_the_second_task_is_invalid():
    problems = errors(TASK + "  - {name: job, command: x, max: 0, type: daemon}\n")
    assert any("duplicate task name" in p for p in problems)


@pytest.mark.parametrize("name, expected", [
    ("'a b'", "'a b' is not a valid name"),
    ("x" * 65, "is not a valid name: use 1-64 of"),
    ("123", "name: expected a string, got 123 (YAML reads it as an integer); quote it"),
    ("yes", "got yes (YAML reads it as a boolean)"),
])
def test_bad_names(name, expected):
    problem = one_error(f"tasks:\n  - name: {name}\n    command: x\n    type: daemon\n")
    assert "task #1: " in problem and expected in problem


def test_a_task_without_a_name_is_labelled_by_position():
    problem = one_error("tasks:\n  - command: x\n    type: daemon\n")
    assert problem == "tasks.yaml:2: task #1: name: missing; every task needs a unique name"


def test_a_task_that_is_not_a_mapping():
    assert "task #1: expected a mapping" in one_error("tasks:\n  - echo hi\n")


def test_names_may_use_dots_dashes_and_underscores():
    assert load(TASK.replace("name: job", "name: Backup_db-2.daily")).tasks[0].name == "Backup_db-2.daily"


# -- types, with YAML's surprises -------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    ("description: 2026-01-01", ("description: expected a string, got 2026-01-01 (YAML reads it as a "
                                 "date); quote it: \"2026-01-01\"")),
    ("description: 1.5", "got 1.5 (YAML reads it as a number)"),
    ("cwd: on", "cwd: expected a path, got on (YAML reads it as a boolean)"),
    ("max: '2'", "max: expected a whole number >= 1, got '2'"),
    ("max: 0", "max: expected a whole number >= 1, got 0"),
    ("max: true", "max: expected a whole number >= 1, got true (YAML reads it as a boolean)"),
    ("max: 1.5", "got 1.5 (YAML reads it as a number)"),
    ("enabled: 'no'", "enabled: expected true or false, got 'no'"),
    ("timeout: 1.5", "timeout: expected a duration like 45s, 15m, 2h, 1d or 1h30m, got 1.5"),
    ("timeout: 5x", "timeout: expected a duration like 45s, 15m, 2h, 1d or 1h30m, got '5x'"),
    ("timeout: 0", "timeout: expected a duration of at least 1s, got 0"),
    ("env: [A]", "env: expected a mapping of NAME: value, got a list"),
    ("env: {A: yes}", "env: A: expected a string, got yes (YAML reads it as a boolean); quote it"),
    ("env: {A-B: x}", "env: 'A-B' is not an environment variable name"),
    ("ips: 10.0.0.5", "ips: expected a list of IP addresses or CIDR networks"),
    ("ips: [bogus]", "ips: 'bogus' is not an IPv4/IPv6 address or CIDR network"),
    ("ips: [10.0.1.5/24]", "ips: '10.0.1.5/24' has host bits set; did you mean 10.0.1.0/24?"),
    ("ips: [10.0.0.300]", "'10.0.0.300' is not an IPv4/IPv6 address"),
    ("hosts: [web 1]", "hosts: 'web 1' is not a hostname glob"),
    ("hosts: web-*", "hosts: expected a list of hostname globs"),
    ("type: deamon", "type: expected common or daemon, got 'deamon' (did you mean 'daemon'?)"),
    ("timezone: Europe/Berln", "timezone: unknown time zone 'Europe/Berln' (did you mean 'Europe/Berlin'?)"),
    ("timezone: Mars/Olympus", "timezone: unknown time zone 'Mars/Olympus'"),
    ("limits: {memory: lots}", "limits: memory: expected a size like 512K, 512M or 2G, got 'lots'"),
    ("limits: {cpux: 3}", "limits: cpux: unknown limit (did you mean 'cpu'?)"),
    ("limits: {nofile: 0}", "limits: nofile: expected a whole number >= 1, got 0"),
    ("limits: 512M", "limits: expected a mapping with memory, cpu and/or nofile"),
    ("user: 1000", "user: expected a user name, got the number 1000"),
    ("command: yes", "command: expected a string (run by the shell) or a list (argv), got yes"),
    ("command: []", "command: expected a non-empty list (argv), got an empty list"),
    ("command: '  '", "command: expected a string (run by the shell) or a list (argv), got an empty"),
])
def test_wrong_values_say_what_was_expected(line, expected):
    problem = one_error(task_with(line.replace("command:", "command:", 1) + "\n", TASK if "command" not in
                                  line else TASK.replace("    command: echo hi\n", "")))
    assert expected in problem
    assert problem.startswith(("tasks.yaml:5: task 'job': ", "tasks.yaml:4: task 'job': "))


def test_integers_in_argv_and_env_are_taken_as_written():
    task = load(task_with("env: {PORT: 8080, MODE: 0755}\n",
                          TASK.replace("echo hi", "[chmod, 0755, f]"))).tasks[0]
    assert task.command == ("chmod", "0755", "f")
    assert task.env == (("MODE", "0755"), ("PORT", "8080"))


def test_values_and_conversions():
    task = load(task_with("""\
        description: nightly
        max: 3
        timeout: 1h30m
        kill_grace: 45
        env: {B: "2", A: one, EMPTY: }
        user: backup
        group: staff
        enabled: off
        timezone: Europe/Paris
        ips: [10.0.0.5, 10.0.1.0/24, "2001:db8::1", "2001:db8:1::/48"]
        hosts: [web-*, db1]
        limits: {memory: 512M, cpu: 10m, nofile: 1024}
    """)).tasks[0]
    assert (task.description, task.max, task.timeout, task.kill_grace) == ("nightly", 3, 5400, 45)
    assert task.env == (("A", "one"), ("B", "2"), ("EMPTY", ""))
    assert (task.user, task.group, task.enabled, task.timezone) == ("backup", "staff", False, "Europe/Paris")
    assert [str(n) for n in task.ips] == ["10.0.0.5/32", "10.0.1.0/24", "2001:db8::1/128", "2001:db8:1::/48"]
    assert task.hosts == ("web-*", "db1")
    assert task.limits == Limits(memory=512 << 20, cpu=600, nofile=1024)


def test_null_values_mean_the_default():
    task = load(task_with("timeout:\nmax: ~\nenv:\n")).tasks[0]
    assert (task.timeout, task.max, task.env) == (None, 1, ())


def test_cwd_is_taken_from_the_task_file_directory(tmp_path):
    path = str(tmp_path / "tasks.yaml")
    assert load(task_with("cwd: work/dir\n"), path).tasks[0].cwd == str(tmp_path / "work" / "dir")
    assert load(task_with("cwd: /srv\n"), path).tasks[0].cwd == "/srv"


# -- schedules and types ------------------------------------------------------------------------


def test_a_common_task_needs_a_schedule():
    problem = one_error("tasks:\n  - name: job\n    command: x\n")
    assert problem.startswith("tasks.yaml:2: task 'job': schedule: missing; a common task needs one")


def test_a_daemon_takes_no_schedule():
    assert load("tasks:\n  - {name: d, type: daemon, command: x, max: 2}\n").tasks[0].schedule is None
    problem = one_error("tasks:\n  - {name: d, type: daemon, command: x, schedule: '@daily'}\n")
    assert "task 'd': schedule: a daemon task is kept running and takes no schedule" in problem


def test_a_bad_type_does_not_also_report_a_missing_schedule():
    problem = one_error("tasks:\n  - {name: d, type: deamon, command: x}\n")
    assert "type: expected common or daemon" in problem


def test_a_task_needs_a_command():
    assert "task 'job': command: missing" in one_error(TASK.replace("    command: echo hi\n", ""))


def test_schedule_errors_are_prefixed_with_the_field_and_line():
    problem = one_error(TASK.replace('"0 30 2 * * *"', '"0 30 * * *"'))
    assert problem == "tasks.yaml:3: task 'job': schedule: hour: value 30 is out of range 0-23"
    assert one_error(TASK.replace('"0 30 2 * * *"', '"@sometimes"')).startswith(
        "tasks.yaml:3: task 'job': schedule: unknown macro")
    assert one_error(TASK.replace('"0 30 2 * * *"', "2026-01-01")).startswith(
        "tasks.yaml:3: task 'job': schedule: expected a schedule like")


def test_the_schedule_gets_the_task_zone_else_the_settings_zone():
    taskfile = load("settings: {timezone: Asia/Tokyo}\n" + TASK + more("""\
      - {name: paris, schedule: "@daily", command: x, timezone: Europe/Paris}
    """))
    assert taskfile.task("job").timezone == "Asia/Tokyo"
    assert str(taskfile.task("job").schedule.tz) == "Asia/Tokyo"
    assert str(taskfile.task("paris").schedule.tz) == "Europe/Paris"
    assert load(TASK).task("job").timezone is None  # the system's local zone


def test_equal_specs_compare_equal_across_loads():
    assert load(TASK).tasks == load(TASK).tasks
    assert load(TASK).tasks != load(task_with("max: 2\n")).tasks


# -- YAML-level problems ------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line():
    problem = one_error("tasks:\n  - name: job\n    command: [echo\n")
    assert problem.startswith("tasks.yaml:4: YAML syntax error: ")


def test_tabs_in_indentation_are_named():
    problem = one_error("tasks:\n\t- name: job\n")
    assert problem == "tasks.yaml:2: YAML syntax error: a tab character here; YAML indents with spaces only"


def test_tabs_inside_a_command_are_fine():
    assert load(TASK.replace("echo hi", "'printf \"a\\tb\"'")).tasks[0].command == 'printf "a\\tb"'


def test_non_utf8_bytes_name_the_line():
    data = (TASK + "  - {name: caf\xe9, command: x, type: daemon}\n").encode("latin-1")
    with pytest.raises(ConfigError) as info:
        loads(data)
    assert str(info.value) == "tasks.yaml:5: the file is not valid UTF-8 (byte 0xe9); save it as UTF-8"


def test_utf8_with_bom_and_unicode_text_load():
    data = "\ufeff".encode() + TASK.replace("echo hi", "echo h\u00e9").encode()
    assert loads(data).tasks[0].command == "echo h\u00e9"


def test_control_characters_are_an_error_not_a_traceback():
    assert "control characters are not allowed" in one_error(TASK.replace("echo hi", "echo \x07"))


def test_merge_keys():
    taskfile = load("""\
        tasks:
          - &base {name: a, schedule: "@daily", command: x, timeout: 5m, max: 2}
          - <<: *base
            name: b
            max: 3
    """)
    assert taskfile.task("b").timeout == 300 and taskfile.task("b").max == 3
    assert taskfile.task("b").command == "x"


def test_merge_keys_work_in_every_nested_mapping_of_a_task_and_of_settings():
    """The class, not the example: every mapping the file holds (a task, its limits, its notify
    targets, settings.http, settings.fleet) takes ``<<`` the same way, explicit keys winning."""
    taskfile = load("""\
        settings:
          fleet: {<<: {database: "postgresql://tc@db/fleet", heartbeat: 7s}, heartbeat: 9s}
        tasks:
          - name: a
            schedule: "@daily"
            command: x
            limits: {<<: {memory: 512M, cpu: 10m}, nofile: 64}
            env: {<<: [{A: "1", B: "2"}], B: "3"}
            notify: [{<<: {webhook: "https://hooks.example.com/a", on: [failure]}, every: 1h}]
    """)
    task = taskfile.task("a")
    assert task.limits == Limits(memory=512 << 20, cpu=600, nofile=64)
    assert dict(task.env) == {"A": "1", "B": "3"}
    assert task.notify[0].url == "https://hooks.example.com/a" and task.notify[0].every == 3600
    assert taskfile.settings.fleet.heartbeat == 9
    assert "limits: cpux: unknown limit (did you mean 'cpu'?)" in one_error(
        task_with("limits: {<<: {cpux: 3}}"))
    assert "env: 'A-B' is not an environment variable name" in one_error(task_with("env: {<<: {A-B: x}}"))


@pytest.mark.parametrize("text", [
    "tasks:\n  - &a {<<: *a, name: x, command: y, type: daemon}\n",
    "settings: &s {<<: [*s]}\ntasks: []\n",
])
def test_a_mapping_merging_itself_is_an_error(text):
    assert "<<: a mapping cannot merge itself" in one_error(text)


def test_digest_is_the_sha256_of_the_bytes():
    assert load(TASK).digest == hashlib.sha256(TASK.encode()).hexdigest()


def test_load_reads_a_file_and_reports_a_missing_one(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(TASK)
    assert config.load(str(path)).task("job").command == "echo hi"
    with pytest.raises(ConfigError, match="no such task file"):
        config.load(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(str(tmp_path))


# -- settings -----------------------------------------------------------------------------------


def test_settings_defaults_live_beside_the_task_file(tmp_path):
    settings = load("tasks: []\n", str(tmp_path / "tasks.yaml")).settings
    state = str(tmp_path / ".torchcore")
    assert (settings.path, settings.state_dir) == (str(tmp_path / "tasks.yaml"), state)
    assert settings.log_dir == os.path.join(state, "logs")
    assert settings.pidfile == os.path.join(state, "torchcore.pid")
    assert (settings.timezone, settings.shell, settings.max_running) == (None, "/bin/sh", None)
    assert (settings.shutdown_grace, settings.misfire_grace, settings.watch) == (30, 60, True)
    assert (settings.log_max_bytes, settings.log_backups, settings.history_days) == (10 << 20, 5, 30)


def test_settings_values(tmp_path):
    settings = load("""\
        settings:
          state_dir: var/state
          timezone: UTC
          shell: /bin/bash
          max_running: 200
          shutdown_grace: 1m
          misfire_grace: 2m
          watch: false
          log_max_bytes: 1M
          log_backups: 0
          history_days: 7
        tasks: []
    """, str(tmp_path / "tasks.yaml")).settings
    assert settings.state_dir == str(tmp_path / "var" / "state")
    assert settings.log_dir == str(tmp_path / "var" / "state" / "logs")
    assert (settings.timezone, settings.shell, settings.max_running) == ("UTC", "/bin/bash", 200)
    assert (settings.shutdown_grace, settings.misfire_grace, settings.watch) == (60, 120, False)
    assert (settings.log_max_bytes, settings.log_backups, settings.history_days) == (1 << 20, 0, 7)


@pytest.mark.parametrize("line, expected", [
    ("timezone: Narnia", "settings: timezone: unknown time zone 'Narnia'"),
    ("max_running: 0", "settings: max_running: expected a whole number >= 1, got 0"),
    ("watch: sometimes", "settings: watch: expected true or false, got 'sometimes'"),
    ("log_max_bytes: big", "settings: log_max_bytes: expected a size like 512K"),
    ("shutdown_grace: -1", "settings: shutdown_grace: "),
])
def test_bad_settings(line, expected):
    assert expected in one_error(f"settings:\n  {line}\ntasks: []\n")


def test_settings_must_be_a_mapping():
    assert "settings: expected a mapping, got a list" in one_error("settings: [a]\ntasks: []\n")


# -- targeting ----------------------------------------------------------------------------------


def test_untargeted_tasks_run_everywhere():
    assert load(TASK).tasks[0].runs_on(node("192.0.2.1"))


def test_ips_select_addresses_inside_any_listed_network():
    task = load(task_with('ips: [10.0.0.5, 10.0.1.0/24, "2001:db8::/32"]\n')).tasks[0]
    assert task.runs_on(node("10.0.0.5"))
    assert task.runs_on(node("127.0.0.1", "10.0.1.77"))
    assert task.runs_on(node("2001:db8:5::1"))
    assert not task.runs_on(node("10.0.0.6", "10.0.2.1", "2001:db9::1"))


def test_ipv4_addresses_never_match_ipv6_networks():
    task = load(task_with('ips: ["::/96"]\n')).tasks[0]
    assert not task.runs_on(node("0.0.0.1"))


def test_hosts_match_globs_case_insensitively_and_short_names():
    task = load(task_with("hosts: [web-*, DB1]\n")).tasks[0]
    assert task.runs_on(node(hostname="web-3.example.com"))
    assert task.runs_on(node(hostname="db1.example.com"))
    assert task.runs_on(node(hostname="db1"))
    assert not task.runs_on(node(hostname="db2"))


def test_ips_or_hosts_either_selects():
    task = load(task_with("ips: [10.0.0.5]\nhosts: [db1]\n")).tasks[0]
    assert task.runs_on(node("192.0.2.1", hostname="db1"))
    assert task.runs_on(node("10.0.0.5", hostname="other"))
    assert not task.runs_on(node("192.0.2.1", hostname="other"))


def test_local_tasks_are_enabled_and_targeted_here():
    taskfile = load(TASK + more("""\
      - {name: disabled, schedule: "@daily", command: x, enabled: false}
      - {name: elsewhere, schedule: "@daily", command: x, ips: [10.9.9.9]}
    """))
    assert [t.name for t in taskfile.local_tasks(node("10.0.0.1"))] == ["job"]
    assert [t.name for t in taskfile.local_tasks(node("10.9.9.9"))] == ["job", "elsewhere"]
    with pytest.raises(KeyError):
        taskfile.task("nope")


# -- per-node checks ----------------------------------------------------------------------------


def test_node_problems_unknown_user_and_group_for_local_tasks_only():
    taskfile = load(TASK + more("""\
      - {name: a, schedule: "@daily", command: x, user: no-such-user-zz}
      - {name: b, schedule: "@daily", command: x, group: no-such-group-zz}
      - {name: c, schedule: "@daily", command: x, user: no-such-user-zz, ips: [10.9.9.9]}
      - {name: d, schedule: "@daily", command: x, user: no-such-user-zz, enabled: false}
    """))
    problems = config.node_problems(taskfile, node("10.0.0.1", hostname="box"), euid=0)
    assert problems == [
        "tasks.yaml:5: task 'a': user: no user 'no-such-user-zz' on this node (box)",
        "tasks.yaml:6: task 'b': group: no group 'no-such-group-zz' on this node (box)"]


def test_node_problems_switching_user_needs_root():
    taskfile = load(task_with("user: root\n"))
    assert config.node_problems(taskfile, node("10.0.0.1"), euid=0) == []
    problems = config.node_problems(taskfile, node("10.0.0.1"), euid=54321)
    assert problems == [("tasks.yaml:2: task 'job': user: running as 'root' needs root, "
                         "and torchcore runs as '54321' here")]


# -- the shipped example and robustness ---------------------------------------------------------


def test_the_shipped_task_file_is_valid_and_shows_every_feature():
    taskfile = config.load(os.path.join(ROOT, "tasks.yaml"))
    assert {t.type for t in taskfile.tasks} == {"common", "daemon"}
    keys = set()
    for item in yaml.safe_load(open(os.path.join(ROOT, "tasks.yaml")))["tasks"]:
        keys |= set(item)
    assert keys == set(config.TASK_FIELDS)
    for addresses in (["127.0.0.1"], ["10.0.0.5"], ["192.0.2.2", "fd00::2"]):
        here = Node(tuple(ipaddress.ip_address(a) for a in addresses), "laptop")
        assert config.node_problems(taskfile, here, euid=12345) == []
        assert config.node_problems(taskfile, here) == []

