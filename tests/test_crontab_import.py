"""`torchcore import`: crontabs in, task files out, checked by the real loader and `torchcore next`."""

import json
import os
import subprocess
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from torchcore import config, crontab, taskwriter
from torchcore.commands import tasks as cmd_tasks
from torchcore.commands import main

# A user crontab as people write them: comments, blank lines, every environment form.
WEB1 = r"""# m h  dom mon dow   command
# Edit this file to introduce tasks to be run by cron.

MAILTO=ops@example.com
PATH = /usr/local/bin:/usr/bin:/bin
GREETING="hello world"
QUOTED_SINGLE = 'single quoted'
SPACED =   value with  spaces   
CRON_TZ=Europe/Berlin

# nightly backup, quietly
30 2 * * * cd / && nice -n 10 /usr/local/bin/backup.sh --full /srv/db >/dev/null 2>&1
*/15 9-17 * * mon-fri /usr/bin/php /var/www/app/artisan schedule:run
0-30/10 */2 1,15 jan-mar,oct * /opt/report/bin/report --monthly
0 6 * * 7 /usr/local/bin/rotate.sh weekly
0 18 * * sun /usr/local/bin/rotate.sh weekly
@reboot /opt/app/bin/start --daemon
@daily /usr/sbin/logrotate /etc/logrotate.conf
@midnight /usr/sbin/logrotate /etc/logrotate.conf
@annually /usr/local/bin/yearly.sh
5 4 * * * mail -s "disk: \%used" root%Disk report%see /var/log/disk.log%\%done\%
15 3 1-31/2 jul,dec 0-6/3 date +\%Y-\%m-\%d >> /var/log/dates.log
TZ=America/New_York
45 23 * * fri /usr/local/bin/weekend.sh
SHELL=/bin/bash
*/5 * * * * [[ -f /tmp/flag ]] && /usr/local/bin/handle-flag 'quoted: #not a comment' "a\b"
61 * * * * /bin/too-late
@every 10m /bin/not-cron
1 2 3 * /bin/too-few-fields
* * * * * * /bin/six-fields
10-5 * * * * /bin/backwards
"""
WEB1_PROBLEM_LINES = [27, 28, 29, 30, 31]

# Debian's /etc/crontab plus a cron.d-style line: a user column before the command.
SYSTEM = """SHELL=/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/sbin:/bin:/usr/sbin:/usr/bin

# Example of job definition:
17 *\t* * *\troot    cd / && run-parts --report /etc/cron.hourly
25 6\t* * *\troot\ttest -x /usr/sbin/anacron || { cd / && run-parts --report /etc/cron.daily; }
47 6\t* * 7\troot\ttest -x /usr/sbin/anacron || { cd / && run-parts --report /etc/cron.weekly; }
-*/10 * * * * nobody /usr/lib/sysstat/sa1 1 1
@reboot root /usr/local/sbin/firewall-up
"""

START = datetime(2026, 11, 24, 15, 30, 7)


def run_import(capsys, *argv):
    code = main(["import", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def imported(tmp_path, capsys, text=WEB1, *argv):
    src = write(tmp_path, "web1.cron", text)
    out = str(tmp_path / "tasks.yaml")
    code, _, err = run_import(capsys, src, "-o", out, *argv)
    return code, out, err


# --- the environment and % rules, as cron reads them ---------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("FOO=bar", ("FOO", "bar")),
    ('FOO="a b"', ("FOO", "a b")),
    ("FOO = 'a b'  ", ("FOO", "a b")),
    ("FOO =   spaced out   ", ("FOO", "spaced out")),
    ('"FOO" = x', ("FOO", "x")),
    ("MAILTO=", ("MAILTO", "")),
    ('MAILTO=""', ("MAILTO", "")),
    ("PATH=$HOME/bin:$PATH", ("PATH", "$HOME/bin:$PATH")),
    ('X=a "b"', ("X", 'a "b"')),
    ('X="a" b', None),                   # text after the closing quote: not an assignment
    ('X="unterminated', None),
    ("* * * * * FOO=bar cmd", None),
    ("0 2 * * * cmd", None),
    ("@daily A=1 cmd", None),
])
def test_environment_lines_are_recognised_like_cron(line, expected):
    assert crontab.parse_env(line) == expected


@pytest.mark.parametrize("command, expected", [
    ("echo hi", ("echo hi", None)),
    (r"date +\%F", ("date +%F", None)),
    ("cat%", ("cat", "")),
    ("cat%a%b", ("cat", "a\nb\n")),
    ("cat%a%", ("cat", "a\n")),
    (r"cat%50\% off%x\y", ("cat", "50% off\nx\\y\n")),
    ("cat%abc\\", ("cat", "abc\\\n")),      # a trailing backslash is written, then the newline
    ("cat%\\", ("cat", "\\")),
    (r"printf '\\%s' x%in", (r"printf '\\", "s' x\nin\n")),
])
def test_percent_splits_command_and_stdin_like_cron(command, expected):
    assert crontab.split_percent(command) == expected


def feed(shell, command):
    return subprocess.run([shell, "-c", command], capture_output=True, check=True).stdout


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_stdin_command_feeds_exactly_the_bytes_cron_would(shell):
    data = "line 1\n'quoted' \"double\" $HOME `x` \\ % é 日本\n\tEOF\n\n"
    command = crontab.with_stdin("cat; echo; echo second-reader >&2; exit 3", data)
    proc = subprocess.run([shell, "-c", command], capture_output=True, check=False)
    assert proc.stdout == data.encode() + b"\n"
    assert proc.returncode == 3                     # the command's own exit status
    # every part of a compound command reads the same stdin, as under cron
    assert feed(shell, crontab.with_stdin("read a; read b; echo \"$b\" # comment", "x\ny\n")) \
        == b"y\n"


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=40))
def test_any_text_after_percent_reaches_stdin_unchanged(tail):
    command, stdin = crontab.split_percent("cat%" + tail)
    assert command == "cat"
    assert feed("/bin/sh", crontab.with_stdin(command, stdin)) == stdin.encode()


# --- fields and lines -----------------------------------------------------------------------------

@pytest.mark.parametrize("line, reason", [
    ("61 * * * * x", "minute field: 61 is out of range 0-59"),
    ("* 24 * * * x", "hour field: 24 is out of range 0-23"),
    ("* * 0 * * x", "day-of-month field: 0 is out of range 1-31"),
    ("* * * 13 * x", "month field: 13 is out of range 1-12"),
    ("* * * * 8 x", "day-of-week field: 8 is out of range 0-7"),
    ("* * * * monday x", "'monday' is not a number or a name"),
    ("10-5 * * * * x", "range '10-5' runs backwards"),
    ("*/0 * * * * x", "step '0' must be a number above 0"),
    ("5/10 * * * * x", "a single value with a step"),
    ("1 2 3 *", "the line ends before its day-of-week field"),
    ("* * * * * * x", "no command after the schedule"),
    ("@every 10s x", "unknown time macro '@every'"),
    ("0 1 * * *", "no command after the schedule"),
    ("0 1 * * * %x", "the command before '%' is empty"),
])
def test_bad_lines_name_field_and_reason(line, reason):
    [problem] = crontab.convert(line + "\n", "c").problems
    assert reason in problem.reason and problem.lineno == 1


def test_percent_inside_quotes_is_split_like_cron_with_a_note():
    [entry] = crontab.convert('0 1 * * * date "+%Y"\n', "c").entries
    assert entry.command == "printf '%s' 'Y\"\n' | (\ndate \"+\n)"
    assert any("inside quotes" in note for note in entry.notes)
    # the command before '%' never ends in an odd run of backslashes (that '%' would be
    # escaped), so the line break after it in the generated text is always safe
    [entry] = crontab.convert("0 1 * * * echo a\\\\%x\n", "c").entries
    assert feed("/bin/sh", entry.command) == b"a\\\n"


def test_names_ranges_steps_and_sunday_7_keep_their_meaning():
    days = crontab.parse_field("mon-fri", crontab.FIELDS[4])
    assert days == {1, 2, 3, 4, 5}
    assert crontab.parse_field("0-30/10", crontab.FIELDS[0]) == {0, 10, 20, 30}
    assert crontab.parse_field("JAN-mar,Oct", crontab.FIELDS[3]) == {1, 2, 3, 10}
    assert crontab.parse_field("7", crontab.FIELDS[4]) == {7}


# --- names ------------------------------------------------------------------------------------------

def test_names_are_readable_unique_and_stable():
    first = crontab.assign_names(crontab.convert(WEB1, "web1").entries, "web1")
    again = crontab.assign_names(crontab.convert(WEB1, "web1").entries, "web1")
    names = [e.name for e in first]
    assert names == [e.name for e in again]
    assert len(set(names)) == len(names)
    assert names[:3] == ["web1-backup.sh-db", "web1-php-artisan", "web1-report"]
    rotate = [n for n in names if n.startswith("web1-rotate.sh-weekly")]
    assert len(rotate) == 2 and all(len(n) == len("web1-rotate.sh-weekly") + 7 for n in rotate)
    assert all(crontab.re.fullmatch(r"[A-Za-z0-9._-]{1,64}", n) for n in names)


@pytest.mark.parametrize("command, name", [
    ("/usr/local/bin/backup.sh --full /srv/db", "backup.sh-db"),
    ("cd / && run-parts --report /etc/cron.daily", "run-parts-cron.daily"),
    ("test -x /usr/sbin/anacron || { cd / && run-parts --report /etc/cron.weekly; }",
     "run-parts-cron.weekly"),
    ("FOO=1 timeout 30 flock -n /tmp/x.lock python3 manage.py clearsessions", "python3-manage.py"),
    ("curl -fsS https://example.com/cron.php?key=1 >/dev/null 2>&1", "curl-cron.php"),
    ("bash -c 'sleep 5; /opt/x/bin/job now'", "job-now"),
    ("/opt/bin/déjà-vu.sh 'Ünïcode arg'", "deja-vu.sh-Unicode-arg"),
    ("echo 'unterminated", "echo-unterminated"),
    ("日本", "task"),
])
def test_names_come_from_program_and_first_real_argument(command, name):
    assert crontab.base_name(command) == name


def test_long_prefix_and_command_still_fit_the_name_limit():
    entries = crontab.convert("0 1 * * * /x/" + "a" * 200 + " b\n0 2 * * * /x/" + "a" * 200
                              + " b\n", "c").entries
    crontab.assign_names(entries, "p" * 40)
    assert all(len(e.name) <= 64 for e in entries) and entries[0].name != entries[1].name


# --- YAML ------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_every_scalar_reads_back_exactly(text):
    assert yaml.safe_load(taskwriter.yaml_str(text)) == text
    assert "\n" not in taskwriter.yaml_str(text)


@pytest.mark.parametrize("command", [
    "echo 'single' \"double\" key: value # not a comment",
    r"printf 'a\\b\tc' C:\path\\",
    "echo résumé 日本語 ✓ 🙂",
    "- leading dash: [not] {a} &anchor *alias !tag | > @ `",
    "echo \x7f\x85\u2028\ufeff end",
])
def test_awkward_commands_survive_the_task_file(tmp_path, capsys, command):
    code, out, err = imported(tmp_path, capsys, f"0 1 * * * {command}\n")
    assert code == 0, err
    [task] = config.load(out).tasks
    assert task.command == command


# --- the whole file: check and next against the original schedules --------------------------------

def test_realistic_crontab_round_trips_through_check_and_next(tmp_path, capsys, monkeypatch):
    code, out, _ = imported(tmp_path, capsys, WEB1, "--ip", "10.0.0.5", "--prefix", "web1")
    assert code == 1                                      # some lines could not be converted
    assert main(["check", "-c", out, "--node-ip", "10.0.0.5"]) == 0
    capsys.readouterr()
    taskfile = config.load(out)
    lines = WEB1.splitlines()
    monkeypatch.setattr(cmd_tasks, "now", lambda: START.replace(tzinfo=ZoneInfo("UTC")))
    assert main(["next", "-c", out, "--json", "-n", "12"]) == 0
    plans = {t["name"]: t["next"] for t in json.loads(capsys.readouterr().out)["tasks"]}
    compared = 0
    for task in taskfile.tasks:
        line = lines[int(task.description.rsplit(" ", 1)[1]) - 1]
        assert task.ips and str(task.ips[0]) == "10.0.0.5/32"
        if task.schedule_text == "@reboot":
            assert plans[task.name] == [] and line.startswith("@reboot")
            continue
        expr = line.split()[0] if line.startswith("@") else " ".join(line.split()[:5])
        zone = ZoneInfo(task.timezone)
        it = croniter(expr, START.replace(tzinfo=ZoneInfo("UTC")).astimezone(zone))
        expected = [it.get_next(datetime).isoformat() for _ in range(12)]
        assert plans[task.name] == expected, (line, task.schedule_text)
        compared += 1
    assert compared == len(taskfile.tasks) - 1 >= 11


def test_environment_timezone_shell_and_mail_are_carried_over(tmp_path, capsys):
    code, out, _ = imported(tmp_path, capsys)
    assert code == 1
    tasks = {t.description.rsplit(" ", 1)[1]: t for t in config.load(out).tasks}
    backup, weekend, flag = tasks["12"], tasks["24"], tasks["26"]
    env = dict(backup.env)
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "GREETING": "hello world",
                   "QUOTED_SINGLE": "single quoted", "SPACED": "value with  spaces"}
    assert "MAILTO" not in env and "CRON_TZ" not in env
    assert backup.timezone == "Europe/Berlin" and backup.command.startswith("cd / && nice")
    assert weekend.timezone == "Europe/Berlin"              # CRON_TZ wins over TZ
    assert dict(weekend.env)["TZ"] == "America/New_York"    # the job still sees its TZ
    assert flag.command[:2] == ("/bin/bash", "-c")          # SHELL=/bin/bash: argv, not /bin/sh
    text = Path(out).read_text(encoding="utf-8")
    assert "# note: MAILTO=ops@example.com" in text
    assert "# nightly backup, quietly" in text


def test_tz_without_cron_tz_becomes_the_timezone(tmp_path, capsys):
    code, out, _ = imported(tmp_path, capsys, "TZ=Asia/Tokyo\n0 9 * * * /bin/morning\n")
    assert code == 0 and config.load(out).tasks[0].timezone == "Asia/Tokyo"


def test_posix_tz_stays_in_env_and_local_time(tmp_path, capsys):
    code, out, _ = imported(tmp_path, capsys, "TZ=EST5EDT,M3.2.0,M11.1.0\n0 9 * * * /bin/x\n")
    [task] = config.load(out).tasks
    assert code == 0 and task.timezone is None and dict(task.env)["TZ"].startswith("EST5EDT,")
    assert "not an IANA zone" in Path(out).read_text(encoding="utf-8")


def test_latin1_comment_is_kept_and_a_latin1_job_reported(tmp_path, capsys):
    src = tmp_path / "c"
    src.write_bytes(b"# caf\xe9\n0 1 * * * echo caf\xe9\n")
    code, out, err = run_import(capsys, str(src))
    assert code == 1 and "c:2: cannot convert: the line is not valid UTF-8" in err
    assert "# café" in out and "NOT CONVERTED (the line is not valid UTF-8): 0 1 * * * echo café" in out


def test_invalid_cron_tz_reports_the_lines_it_governs(tmp_path, capsys):
    code, out, err = imported(tmp_path, capsys, "CRON_TZ=Mars/Olympus\n0 9 * * * /bin/a\n"
                              "CRON_TZ=UTC\n0 9 * * * /bin/b\n")
    assert code == 1
    assert "web1.cron:1: cannot convert: CRON_TZ='Mars/Olympus'" in err
    assert "web1.cron:2: cannot convert:" in err
    assert [t.name for t in config.load(out).tasks] == ["b"]


def test_stdin_task_runs_with_the_same_input_cron_gave(tmp_path, capsys):
    code, out, _ = imported(tmp_path, capsys, "0 1 * * * cat > " + str(tmp_path / "in")
                            + r"%Disk report%50\% used%" + "\n")
    assert code == 0
    [task] = config.load(out).tasks
    subprocess.run(task.argv("/bin/sh"), check=True)
    assert (tmp_path / "in").read_bytes() == b"Disk report\n50% used\n"


def test_unconvertible_lines_are_reported_and_kept(tmp_path, capsys):
    code, out, err = imported(tmp_path, capsys)
    assert code == 1
    text = Path(out).read_text(encoding="utf-8")
    for lineno in WEB1_PROBLEM_LINES:
        assert f"web1.cron:{lineno}: cannot convert:" in err
        assert f"web1.cron:{lineno}: NOT CONVERTED (" in text
    assert "13 task(s) converted, 5 line(s) not converted" in err
    # every job line is either a task or a NOT CONVERTED comment: nothing vanished
    jobs = [n for n, line in enumerate(WEB1.splitlines(), 1)
            if line.strip() and not line.startswith("#") and crontab.parse_env(line) is None]
    described = {int(t.description.rsplit(" ", 1)[1]) for t in config.load(out).tasks}
    assert set(jobs) == described | set(WEB1_PROBLEM_LINES)


def test_no_log_dash_is_dropped_with_a_note_and_system_users_kept(tmp_path, capsys):
    src = write(tmp_path, "crontab", SYSTEM)
    code, out, err = run_import(capsys, "--system", src, "--host", "db*")
    assert code == 0, err
    doc = yaml.safe_load(out)
    by_name = {t["name"]: t for t in doc["tasks"]}
    assert set(by_name) == {"run-parts-cron.hourly", "run-parts-cron.daily",
                            "run-parts-cron.weekly", "sa1", "firewall-up"}
    assert by_name["sa1"]["user"] == "nobody" and by_name["sa1"]["schedule"] == "*/10 * * * *"
    assert by_name["firewall-up"]["schedule"] == "@reboot"
    assert all(t["hosts"] == ["db*"] for t in doc["tasks"])
    assert "cron's '-' flag" in out
    path = write(tmp_path, "out.yaml", out)
    assert main(["check", "-c", path]) == 0


def test_user_crontab_user_and_home_as_cwd(tmp_path, capsys):
    code, out, _ = imported(tmp_path, capsys, "HOME=/srv/app\n0 1 * * * ./nightly\n",
                            "--user", "nobody")
    assert code == 0
    [task] = config.load(out).tasks
    assert task.user == "nobody" and task.cwd == "/srv/app"


def test_stdin_and_stdout_and_atomic_output(tmp_path, capsys, monkeypatch):
    import io
    import sys
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"0 1 * * * /bin/x\n")))
    code, out, _ = run_import(capsys)
    assert code == 0 and yaml.safe_load(out)["tasks"][0]["name"] == "x"
    assert "from stdin" in out
    target = tmp_path / "t.yaml"
    target.write_text("old")
    os.chmod(target, 0o640)
    src = write(tmp_path, "c", "0 1 * * * /bin/x\n")
    assert run_import(capsys, src, "-o", str(target))[0] == 0
    assert target.stat().st_mode & 0o777 == 0o640 and "name:" in target.read_text()
    assert sorted(os.listdir(tmp_path)) == ["c", "t.yaml"]


def test_empty_crontab_gives_a_valid_empty_file(tmp_path, capsys):
    code, out, _ = imported(tmp_path, capsys, "# nothing here\nMAILTO=\"\"\n")
    assert code == 0 and config.load(out).tasks == ()


def test_bad_options_are_clear_errors(tmp_path, capsys):
    src = write(tmp_path, "c", "0 1 * * * /bin/x\n")
    assert main(["import", src, "--ip", "10.0.0.999"]) == 1
    assert "--ip '10.0.0.999' is not an IP address" in capsys.readouterr().err
    assert main(["import", src, "--prefix", "bad prefix"]) == 1
    assert main(["import", src, "--timezone", "Nowhere/Else"]) == 1
    assert main(["import", str(tmp_path / "missing")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["import", src, "-o", str(tmp_path / "no" / "such" / "dir.yaml")]) == 1
    assert "cannot write" in capsys.readouterr().err


# --- merging machines into one fleet file ---------------------------------------------------------

WEB2 = r"""MAILTO=ops@example.com
PATH = /usr/local/bin:/usr/bin:/bin
GREETING="hello world"
QUOTED_SINGLE = 'single quoted'
SPACED =   value with  spaces   
CRON_TZ=Europe/Berlin
30 2 * * * cd / && nice -n 10 /usr/local/bin/backup.sh --full /srv/db >/dev/null 2>&1
*/15 9-17 * * mon-fri /usr/bin/php /var/www/app/artisan schedule:run
*/15 9-17 * * mon-fri /usr/bin/php /var/www/app/artisan queue:work
0 4 * * * /usr/local/bin/only-on-web2
"""


def test_two_machines_merge_into_one_file_with_the_union_of_ips(tmp_path, capsys):
    code, fleet, _ = imported(tmp_path, capsys, WEB1, "--ip", "10.0.0.1")
    with Path(fleet).open("a", encoding="utf-8") as f:
        f.write("# kept: a hand-written comment at the end\n")
    before = Path(fleet).read_text(encoding="utf-8")
    src2 = write(tmp_path, "web2.cron", WEB2)
    code, _, err = run_import(capsys, src2, "--ip", "10.0.0.2", "--merge", fleet, "-o", fleet)
    assert code == 0, err
    after = Path(fleet).read_text(encoding="utf-8")
    tasks = {t.name: t for t in config.load(fleet).tasks}
    ips = {name: sorted(str(n) for n in t.ips) for name, t in tasks.items()}
    assert ips["backup.sh-db"] == ips["php-artisan"] == ["10.0.0.1/32", "10.0.0.2/32"]
    assert ips["rotate.sh-weekly-" + crontab._short_hash("0 6 * * 7")] == ["10.0.0.1/32"]
    new = [n for n in tasks if n.startswith("php-artisan-") or n == "only-on-web2"]
    assert len(new) == 2 and all(ips[n] == ["10.0.0.2/32"] for n in new)
    assert "same job as task 'backup.sh-db' (added 10.0.0.2)" in err
    # the existing text is kept: every original line is still there, in order
    kept = iter(after.splitlines())
    assert all(any(line == other for other in kept) for line in before.splitlines()
               if "ips:" not in line)
    # merging the same machine again changes nothing
    assert run_import(capsys, src2, "--ip", "10.0.0.2", "--merge", fleet, "-o", fleet)[0] == 0
    assert Path(fleet).read_text(encoding="utf-8") == after


@pytest.mark.parametrize("existing", [
    ("tasks:\n  - name: a\n    schedule: '0 4 * * *'\n    command: /usr/local/bin/only-on-web2\n"
     "    ips:\n      - 10.0.0.1   # first\n    max: 1\n"),
    ("tasks:\n- name: a\n  schedule: '0 0 4 * * *'\n  command: /usr/local/bin/only-on-web2\n"
     "  hosts: [web1]\nsettings:\n  shell: /bin/sh\n"),
    ("tasks:\n  - {name: b, command: x, schedule: '@daily'}\n"
     "  - name: a\n    command: /usr/local/bin/only-on-web2\n    schedule: 0 4 * * *\n"
     "    ips: [10.0.0.1]"),
    ("# café 🙂 日本\ntasks:\n  - name: a  # ü\n    description: \"🙂🙂\"\n"
     "    command: /usr/local/bin/only-on-web2\n    schedule: 0 4 * * *\n"
     "    ips: [\"10.0.0.1\"]  # 日本\n"),
])
def test_merge_edits_block_flow_and_missing_lists_in_place(tmp_path, capsys, existing):
    fleet = write(tmp_path, "tasks.yaml", existing)
    src = write(tmp_path, "c", "0 4 * * * /usr/local/bin/only-on-web2\n0 5 * * * /bin/new\n")
    code, out, err = run_import(capsys, src, "--ip", "10.0.0.2", "--merge", fleet)
    assert code == 0, err
    merged = config.loads(out)
    a = merged.task("a")
    assert "10.0.0.2/32" in [str(n) for n in a.ips]
    assert [str(n) for n in merged.task("new").ips] == ["10.0.0.2/32"]
    assert out.startswith(existing.split("\n", 1)[0])


def test_merge_refuses_an_invalid_file_and_needs_targeting(tmp_path, capsys):
    fleet = write(tmp_path, "tasks.yaml", "tasks:\n  - name: a\n    command: x\n    shedule: '@daily'\n")
    src = write(tmp_path, "c", "0 4 * * * /bin/x\n")
    assert main(["import", src, "--ip", "10.0.0.2", "--merge", fleet]) == 1
    err = capsys.readouterr().err
    assert "refusing to merge into" in err and "shedule" in err and "Traceback" not in err
    assert main(["import", src, "--merge", fleet]) == 1
    assert "--merge needs --ip or --host" in capsys.readouterr().err


def test_merge_into_a_non_sh_file_keeps_cron_shell(tmp_path, capsys):
    fleet = write(tmp_path, "tasks.yaml", "settings:\n  shell: /bin/bash\ntasks: []\n")
    src = write(tmp_path, "c", "0 4 * * * echo $0\n")
    code, out, _ = run_import(capsys, src, "--ip", "10.0.0.2", "--merge", fleet)
    assert code == 0
    assert config.loads(out).tasks[0].command == ("/bin/sh", "-c", "echo $0")


def test_cron_day_rule_is_kept_for_star_led_fields(tmp_path, capsys):
    # cron: day-of-month starting with '*' means a day must match BOTH fields (odd Mondays)
    code, out, _ = imported(tmp_path, capsys, "0 0 */2 * 1 /bin/odd-mondays\n")
    assert code == 0
    [task] = config.load(out).tasks
    when, fires = datetime(2026, 1, 1), []
    for _ in range(8):
        when = task.schedule.next_after(when)
        fires.append(when)
    assert all(d.weekday() == 0 and d.day % 2 == 1 for d in fires)


def test_system_mode_reads_the_files_cron_reads(tmp_path, capsys, monkeypatch):
    from torchcore.commands import importer as cmd_import
    crond = tmp_path / "cron.d"
    crond.mkdir()
    for name in ("php", "sysstat", "backup.dpkg-old", "notes~", ".hidden"):
        (crond / name).write_text(f"0 1 * * * root /usr/bin/{name.strip('.~')}-job\n")
    main_tab = write(tmp_path, "crontab", SYSTEM)
    monkeypatch.setattr(cmd_import, "SYSTEM_CRONTAB", main_tab)
    monkeypatch.setattr(cmd_import, "SYSTEM_CRON_DIR", str(crond))
    code, out, err = run_import(capsys, "--system")
    assert code == 0, err
    names = [t["name"] for t in yaml.safe_load(out)["tasks"]]
    assert "php-job" in names and "sysstat-job" in names and len(names) == 7
    for skipped in ("backup.dpkg-old", "notes~", ".hidden"):
        assert f"{skipped}: skipped" in err


@pytest.mark.parametrize("existing", [
    ("tasks:\n  - {name: a, command: /bin/x, schedule: '0 4 * * *', ips: [10.0.0.1]}\n"
     "  - {name: b, command: /bin/y, schedule: '@daily', ips: [10.0.0.1]}\n"),
    ("tasks:\n  - name: a\n    command: /bin/x\n    schedule: '0 4 * * *'\n"
     "    ips: &web [10.0.0.1]\n  - name: b\n    command: /bin/y\n    schedule: '@daily'\n"
     "    ips: *web\n"),
    ("tasks:\n  - &base\n    name: b\n    command: /bin/y\n    schedule: '@daily'\n"
     "    ips: [10.0.0.1]\n  - <<: *base\n    name: a\n    command: /bin/x\n"
     "    schedule: '0 4 * * *'\n"),
])
def test_merge_never_edits_what_other_tasks_share(tmp_path, capsys, existing):
    fleet = write(tmp_path, "tasks.yaml", existing)
    src = write(tmp_path, "c", "0 4 * * * /bin/x\n")
    code, out, err = run_import(capsys, src, "--ip", "10.0.0.2", "--merge", fleet)
    assert code == 0, err
    merged = config.loads(out)
    assert out.startswith(existing)
    assert [str(n) for n in merged.task("b").ips] == ["10.0.0.1/32"]
    assert [str(n) for n in merged.task("a").ips] == ["10.0.0.1/32"]
    [new] = [t for t in merged.tasks if t.name not in ("a", "b")]
    assert new.command == "/bin/x" and [str(n) for n in new.ips] == ["10.0.0.2/32"]
