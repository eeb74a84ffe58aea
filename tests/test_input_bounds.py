"""Issue 12's input class: every number, string and YAML structure a task file (or a crontab
for ``import``) can hold is bounded at validation, refused at file:line naming the task and
the field, fast, and never with a traceback (see README "Semantics")."""

import os
import signal
import time
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchcore import config, crontab, taskwriter
from torchcore.commands import main
from torchcore.errors import ConfigError
from torchcore.schedule import Schedule, ScheduleError
from torchcore.units import MAX_COUNT, MAX_DURATION, MAX_SIZE, parse_duration, parse_size

HEAD = "tasks:\n  - name: job\n"
HUGE = "1" + "0" * 5000                      # over Python's 4,300-digit int() limit


def task(**fields):
    """A one-task file; each field written as given (YAML text)."""
    fields = {"schedule": "'@every 5s'", "command": "echo hi", **fields}
    return HEAD + "".join(f"    {key}: {value}\n" for key, value in fields.items())


def problems(text, path="tasks.yaml"):
    with pytest.raises(ConfigError) as info:
        config.loads(text, path)
    return info.value.problems


def one(text):
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# -- numbers --------------------------------------------------------------------------------

NUMBER_FIELDS = [  # (task or settings, key, a value over its maximum)
    ("task", "timeout", f"{MAX_DURATION + 1}"), ("task", "kill_grace", "99999999999d"),
    ("task", "max", f"{MAX_COUNT + 1}"), ("task", "limits", "{memory: 1025T}"),
    ("task", "limits", "{cpu: 36501d}"), ("task", "limits", f"{{nofile: {MAX_COUNT + 1}}}"),
    ("task", "schedule", "'@every 9223372036854775808s'"), ("task", "schedule", "'@every 99999999999d'"),
    ("settings", "log_backups", "1000000000000"), ("settings", "log_backups", "1001"),
    ("settings", "history_days", "36501"), ("settings", "shutdown_grace", "36501d"),
    ("settings", "misfire_grace", "9223372036854775808"), ("settings", "max_running", f"{MAX_COUNT + 1}"),
    ("settings", "log_max_bytes", "1025T"),
]


def place(where, key, value):
    if where == "task":
        return task(**{key: value})
    return f"settings:\n  {key}: {value}\n" + task()


@pytest.mark.parametrize("where,key,value", NUMBER_FIELDS)
def test_every_number_over_its_maximum_is_refused_at_its_line(where, key, value):
    text = place(where, key, value)
    problem = one(text)
    line = 1 + next(n for n, row in enumerate(text.splitlines()) if row.strip().startswith(f"{key}:")
                    and (where == "task") == row.startswith("    "))
    assert problem.startswith(f"tasks.yaml:{line}: "), problem
    assert f"{key}: " in problem and "out of range" in problem, problem
    if where == "task":
        assert "task 'job': " in problem


HUGE_FIELDS = [
    ("task", "timeout", HUGE), ("task", "kill_grace", HUGE + "d"), ("task", "max", HUGE),
    ("task", "limits", f"{{memory: {HUGE}T}}"), ("task", "limits", f"{{nofile: {HUGE}}}"),
    ("task", "schedule", f"'@every {HUGE}s'"), ("task", "schedule", f"'*/{HUGE} * * * * *'"),
    ("settings", "log_backups", HUGE), ("settings", "history_days", HUGE),
    ("settings", "misfire_grace", HUGE), ("settings", "log_max_bytes", HUGE),
]


@pytest.mark.parametrize("where,key,huge", HUGE_FIELDS)
def test_numerals_of_thousands_of_digits_are_refused_fast(where, key, huge):
    began = time.monotonic()
    problem = one(place(where, key, huge))
    assert time.monotonic() - began < 1
    assert "out of range" in problem and len(problem) < 400, problem


def test_the_maxima_themselves_load():
    text = ("settings:\n  log_backups: 1000\n  history_days: 36500\n  shutdown_grace: 36500d\n"
            f"  max_running: {MAX_COUNT}\n  log_max_bytes: 1024T\n"
            + task(timeout="36500d", max=str(MAX_COUNT), schedule="'@every 36500d'",
                   limits=f"{{memory: 1024T, cpu: 36500d, nofile: {MAX_COUNT}}}"))
    loaded = config.loads(text)
    assert loaded.settings.log_backups == 1000 and loaded.tasks[0].limits.memory == MAX_SIZE


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.integers(0, 10 ** 40), st.sampled_from(["", "s", "m", "h", "d"]))
def test_durations_are_exact_or_out_of_range(number, unit):
    text = f"{number}{unit}"
    seconds = number * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if seconds <= MAX_DURATION:
        assert parse_duration(text) == seconds
    else:
        with pytest.raises(ValueError, match="out of range"):
            parse_duration(text)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(categories=("Nd", "No")), min_size=1, max_size=6))
def test_only_ascii_digits_are_digits(digits):
    for parse in (parse_duration, parse_size):
        if digits.isascii():
            continue
        with pytest.raises(ValueError):
            parse(digits + "s" if parse is parse_duration else digits)
    for text in (f"*/{digits} * * * * *", f"{digits} * * * * *"):
        if not digits.isascii():
            with pytest.raises(ScheduleError):
                Schedule(text)


def test_unicode_digits_in_a_schedule_or_max_are_config_errors():
    assert "schedule: " in one(task(schedule="'*/² * * * * *'"))
    assert "max: expected a whole number" in one(task(max="'²'"))


@pytest.mark.parametrize("text", [f"*/{HUGE} * * * * *", f"{HUGE} * * * * *", f"0 0 0 * * 5#{HUGE}",
                                  f"0 0 0 1-{HUGE} * *", f"@every {HUGE}s"])
def test_huge_numerals_in_a_schedule_are_schedule_errors(text):
    with pytest.raises(ScheduleError, match="out of range"):
        Schedule(text)
    assert "schedule: " in one(task(schedule=f"'{text}'"))


def test_next_after_is_none_past_the_last_year_datetime_holds():
    schedule = Schedule("@every 36500d")
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for _ in range(200):
        when = schedule.next_after(when)
        if when is None:
            break
    assert when is None
    assert Schedule("0 0 0 1 1 *").next_after(datetime(9999, 6, 1)) is None


# -- the YAML budget ------------------------------------------------------------------------

def merge_bomb(levels=9, width=10):
    lines = ["tasks:", "- &a0 {name: x, command: y, schedule: '@every 1s'}"]
    for i in range(1, levels + 1):
        lines.append(f"- &a{i} {{<<: [" + ", ".join([f"*a{i - 1}"] * width) + "]}")
    return "\n".join(lines) + "\n"


def alias_bomb(levels=9):
    lines = ["settings:", "  x0: &a0 [a, a, a, a, a, a, a, a, a, a]"]
    lines += [f"  x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\ntasks:\n- {name: x, schedule: '@every 1s', command: *a9}\n"


def merge_chain(length=2000):
    lines = ["settings:", "  x0: &a0 {name: x}"]
    lines += [f"  x{i}: &a{i} {{<<: *a{i - 1}}}" for i in range(1, length)]
    return "\n".join(lines) + f"\ntasks:\n- <<: *a{length - 1}\n  command: y\n  schedule: '@every 1s'\n"


@pytest.mark.parametrize("text,line,what", [
    (merge_bomb(), 7, "aliases and merge keys"),
    (alias_bomb(), 6, "aliases and merge keys"),
    (merge_chain(), 65, "nested more than 64 levels"),
    ("tasks:\n- name: x\n  " + "<<: {" * 900 + "}" * 900 + "\n", 3, "nested more than 64 levels"),
])
def test_yaml_bombs_fail_fast_at_a_line(text, line, what):
    began = time.monotonic()
    problem = one(text)
    assert time.monotonic() - began < 1, "the budget must fail fast"
    assert problem.startswith(f"tasks.yaml:{line}: ") and what in problem, problem


def test_the_budget_allows_a_fleet_sharing_its_defaults():
    tasks = "".join(f"- {{<<: *d, name: t{i}, schedule: '@every 5s'}}\n" for i in range(2000))
    text = "tasks:\n- &d {name: d, command: 'true', schedule: '@every 5s', timeout: 10, kill_grace: 5}\n"
    assert len(config.loads(text + tasks).tasks) == 2001


def test_files_over_the_size_budget_are_refused_before_parsing(tmp_path):
    path = tmp_path / "tasks.yaml"
    with open(path, "wb") as handle:
        handle.truncate(config.MAX_FILE_BYTES + 1)
    with pytest.raises(ConfigError, match="larger than 64 MiB"):
        config.load(str(path))


def test_settings_only_reads_use_the_same_budget(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("settings:\n  state_dir: elsewhere\n  log_backups: 1000000000000\n" + merge_bomb()[7:]
                    .replace("tasks:", "tasks:"))
    began = time.monotonic()
    with pytest.raises(ConfigError):
        config.load_settings(str(path))
    assert time.monotonic() - began < 1
    path.write_text("settings:\n  state_dir: elsewhere\n  log_backups: 1000000000000\ntasks: 7\n")
    found = config.load_settings(str(path))
    assert found.state_dir == str(tmp_path / "elsewhere") and found.log_backups == 5


def test_an_unquoted_star_schedule_says_to_quote_it():
    problem = one("tasks:\n  - name: x\n    command: y\n    schedule: */20 * * * * *\n")
    assert problem.startswith("tasks.yaml:4: ") and "quote it" in problem, problem


# -- strings --------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("command", '"echo a\\0b"'), ("command", '[echo, "a\\0b"]'), ("env", '{A: "x\\0y"}'),
    ("user", '"ro\\0ot"'), ("group", '"wh\\0eel"'), ("cwd", '"/tmp\\0/x"'), ("description", '"a\\0"'),
    ("timezone", '"UTC\\0"'), ("hosts", '["web\\0"]'),
])
def test_nul_bytes_are_refused_in_every_string(key, value):
    problem = one(task(**{key: value}))
    assert problem.startswith("tasks.yaml:") and f"task 'job': {key}: " in problem, problem


@pytest.mark.parametrize("key,value", [("user", '"ro\\x1bot"'), ("group", '"a\\tb"'), ("cwd", '"/tmp\\n/x"')])
def test_control_characters_are_refused_in_names_and_paths(key, value):
    assert "control character" in one(task(**{key: value}))


@pytest.mark.parametrize("key", ["shell", "log_dir", "state_dir", "pidfile"])
def test_settings_paths_refuse_nul_and_control_characters(key):
    for value in ('"/x\\0y"', '"/x\\ny"'):
        problem = one(f"settings:\n  {key}: {value}\n" + task())
        assert problem.startswith("tasks.yaml:2: settings: ") and f"{key}: " in problem, problem


def test_jobs_too_big_for_exec_or_the_launcher_are_refused():
    word = "x" * config.MAX_ARG_BYTES
    assert config.loads(task(command=f"[echo, {word}]")).tasks[0].command[1] == word
    assert "bytes long" in one(task(command=f"[echo, {word}x]"))
    assert "bytes long" in one(task(command=f"'{word}x'"))
    assert "the most one variable can hold" in one(task(env=f"{{A: {word}}}"))
    many = "[" + ", ".join(["y" * 100_000] * 6) + "]"
    assert "as sent to a run" in one(task(command=many))
    wide = '"' + "\u00e9" * 100_000 + '"'              # 200 KB of UTF-8, 600 KB as JSON
    assert "command: " in one(task(command=f"[echo, {wide}, {wide}]"))


def test_a_job_at_the_bounds_fits_the_launcher_frame():
    from torchcore.jobspec import Job
    from torchcore.launcher import LINE_LIMIT
    wide = '"' + "\u00e9" * 25_000 + '"'
    text = task(command="[" + ", ".join([wide] * 2) + "]", env="{A: " + wide + "}")
    loaded = config.loads(text)
    job = Job.for_task(loaded.tasks[0], loaded.settings)
    assert len(job.to_json()) < LINE_LIMIT


# -- names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".", "..", "-rf", "-", ".hidden", "--help", "a/b", "x" * 65])
def test_names_that_are_path_or_option_tricks_are_refused(name):
    problem = one(f"tasks:\n  - name: '{name}'\n    command: y\n    schedule: '@every 1s'\n")
    assert "name: " in problem and "not a valid name" in problem, problem


@pytest.mark.parametrize("name", ["torchcore", "TorchCore"])
def test_the_daemon_log_name_is_reserved(name):
    problem = one(f"tasks:\n  - name: {name}\n    command: y\n    schedule: '@every 1s'\n")
    assert "is reserved" in problem and "daemon's own log" in problem, problem


def test_names_may_start_with_a_digit_or_underscore():
    text = "tasks:\n" + "".join(f"  - {{name: {n}, command: y, schedule: '@every 1s'}}\n"
                                for n in ("1st", "_x", "a.b-c_d", "torchcore-extra"))
    assert len(config.loads(text).tasks) == 4


def test_import_never_names_a_task_torchcore():
    result = crontab.convert("* * * * * /usr/bin/torchcore\n", "crontab")
    crontab.assign_names(result.entries)
    assert result.entries[0].name != "torchcore"
    taskwriter.validate(result)
    assert not result.problems


# -- import ---------------------------------------------------------------------------------

@pytest.mark.parametrize("line,why", [
    ("*/\u00b2 * * * * x", "step"), ("\u0661 * * * * x", "not a number"),
    ("* * * * * echo a\x00b", "NUL byte"), (f"*/{HUGE} * * * * x", "out of range"),
    (f"{HUGE} * * * * x", "out of range"),
])
def test_import_reports_lines_it_cannot_hold(line, why):
    result = taskwriter.validate(crontab.convert(line + "\n", "crontab"))
    assert not result.entries and why in result.problems[0].reason, result.problems
    rendered = taskwriter.render(result, ["crontab"])
    assert "\x00" not in rendered
    config.loads(rendered)                       # what import writes always loads


def test_import_cli_never_writes_a_nul(tmp_path, capsys):
    source = tmp_path / "crontab"
    source.write_bytes(b"* * * * * echo a\x00b\n*/\xc2\xb2 * * * * x\n0 * * * * ok\n")
    out = tmp_path / "tasks.yaml"
    assert main(["import", str(source), "-o", str(out)]) == 1
    assert b"\x00" not in out.read_bytes()
    assert [t.name for t in config.load(str(out)).tasks] == ["ok"]
    assert "NUL byte" in capsys.readouterr().err


# -- the CLI on the issue's examples --------------------------------------------------------

@pytest.mark.parametrize("schedule", ["0 0 0 */20 * 0#5", "@every 36500d"])
@pytest.mark.parametrize("command", ["check", "next", "status"])
def test_cli_commands_show_schedules_that_never_fire(tmp_path, capsys, schedule, command):
    path = tmp_path / "tasks.yaml"
    path.write_text(f"settings:\n  state_dir: state\ntasks:\n  - name: rare\n    schedule: '{schedule}'\n"
                    "    command: y\n")
    status = main([command, "-c", str(path)] + (["-n", "100"] if command == "next" else []))
    captured = capsys.readouterr()
    assert status in (0, 3), captured
    assert "Traceback" not in captured.err and "rare" in captured.out


@pytest.mark.parametrize("schedule", ["@every 99999999999d", f"*/{HUGE} * * * * *"])
@pytest.mark.parametrize("command", ["check", "next", "status"])
def test_cli_commands_report_out_of_range_schedules(tmp_path, capsys, schedule, command):
    path = tmp_path / "tasks.yaml"
    path.write_text(f"settings:\n  state_dir: state\ntasks:\n  - name: rare\n    schedule: '{schedule}'\n"
                    "    command: y\n")
    main([command, "-c", str(path)])
    err = capsys.readouterr().err
    assert "tasks.yaml:5: task 'rare': schedule: " in err and "out of range" in err, err
    assert os.path.exists(path)


# -- generated hostile files: the loader answers, fast, with ConfigError or a TaskFile ----------

class _TooSlow(Exception):
    pass


def _budgeted_load(text, seconds):
    """config.loads(text) under a wall-clock alarm: a hang fails the test instead of hanging it."""
    def alarm(signum, frame):
        raise _TooSlow
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds * 5)
    began = time.monotonic()
    try:
        try:
            config.loads(text)
        except ConfigError as exc:
            assert exc.problems and all(p.startswith("tasks.yaml") for p in exc.problems), exc.problems
    except _TooSlow:
        raise AssertionError(f"the loader took over {seconds * 5}s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return time.monotonic() - began


NUMERALS = st.one_of(st.integers(-2 ** 80, 2 ** 80).map(str), st.sampled_from(
    [HUGE, "9" * 4301, "0" * 5000 + "1", "²", "١٢", "1e400", ".inf", "0x" + "f" * 40, "1_0", "+7"]))
SCALARS = st.one_of(NUMERALS, NUMERALS.map(lambda n: f"'@every {n}s'"), NUMERALS.map(lambda n: f"{n}d"),
                    NUMERALS.map(lambda n: f"'*/{n} * * * * *'"), NUMERALS.map(lambda n: f"{n}T"),
                    st.text(max_size=12).map(lambda t: '"' + t.encode("unicode_escape").decode()
                                             .replace('"', '\\"') + '"'),
                    st.sampled_from(['"\\0"', '"a\\x00b"', '"\\x1b"', '"\\u202e"', '"\\ud800"', "~", "[]"]))
KEYS = st.sampled_from(["name", "schedule", "command", "max", "timeout", "kill_grace", "user", "group",
                        "cwd", "env", "limits", "description", "timezone", "type", "enabled"])


@st.composite
def hostile_files(draw):
    kind = draw(st.sampled_from(["fields", "merge", "alias", "chain", "deep", "settings"]))
    if kind == "fields":
        fields = draw(st.dictionaries(KEYS, SCALARS, max_size=8))
        return HEAD + "".join(f"    {k}: {v}\n" for k, v in fields.items())
    if kind == "settings":
        key = draw(st.sampled_from(["max_running", "log_backups", "history_days", "shutdown_grace",
                                    "misfire_grace", "log_max_bytes", "shell", "log_dir"]))
        return f"settings:\n  {key}: {draw(SCALARS)}\n" + task()
    if kind == "merge":
        return merge_bomb(draw(st.integers(2, 30)), draw(st.integers(1, 40)))
    if kind == "alias":
        return alias_bomb(draw(st.integers(2, 30)))
    if kind == "chain":
        return merge_chain(draw(st.integers(2, 4000)))
    depth = draw(st.integers(1, 1100))
    return HEAD + f"    schedule: '@every 1s'\n    command: {'[' * depth}x{']' * depth}\n"


@settings(derandomize=True, max_examples=300, deadline=None)
@given(hostile_files())
def test_generated_hostile_files_load_or_fail_within_a_time_budget(text):
    """Returns a TaskFile or raises ConfigError, within 2 s (the alarm at 10 s stops a hang)."""
    assert _budgeted_load(text, 2) < 2


@pytest.mark.parametrize("count", ["10001", HUGE, "\u0661\u0662"])
def test_next_counts_are_bounded_and_ascii(tmp_path, capsys, count):
    path = tmp_path / "tasks.yaml"
    path.write_text(task())
    with pytest.raises(SystemExit) as info:
        main(["next", "-c", str(path), "-n", count])
    assert info.value.code == 2 and "expected a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("key,value", [
    ("name", HUGE), ("description", HUGE), ("max", "'" + "x" * 200_000 + "'"),
    ("ips", f"['{'1' * 100_000}']"),
    ("schedule", "'" + "1" * 100_000 + "'"), ("kill_grace", "'" + "9" * 100_000 + "x'")])
def test_messages_about_huge_values_stay_short(key, value):
    problem = one(task(**{key: value}) if key != "name" else
                  f"tasks:\n  - name: {value}\n    command: y\n    schedule: '@every 1s'\n")
    assert len(problem) < 500, problem[:600]
