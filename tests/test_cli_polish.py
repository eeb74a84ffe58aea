"""The operator's commands agree with each other: finding the daemon, reload, pids, names, output.

Unit tests first (pure, in-process); the daemon-level ones are marked ``process``.
"""

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from daemon_harness import SETTINGS, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from torchcore import commands, config
from torchcore.commands import common
from torchcore.commands import daemon as cmd_daemon
from torchcore.commands import main

TASKS = """tasks:
  - {name: tick, schedule: "* * * * * *", command: "echo tick"}
  - {name: later, schedule: "0 0 0 1 1 *", command: "echo manual run"}
"""

# Nested merge keys that take minutes to expand (at the top level, and inside the tasks).
MERGE_BOMB = "a0: &a0 {x: 1}\n" + "".join(
    f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 10)}]}}\n" for i in range(1, 10))
TASK_BOMB = "x-anchors:\n  - &b0 {name: z, command: 'true'}\n" + "".join(
    f"  - &b{i} {{<<: [{', '.join([f'*b{i - 1}'] * 10)}]}}\n" for i in range(1, 10)) + \
    "tasks:\n  - {<<: *b9, name: t, schedule: '@hourly'}\n"


def tc(directory, *args, timeout=30, config="tasks.yaml"):
    env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9")
    env.pop("NO_COLOR", None)
    return subprocess.run([sys.executable, "-m", "torchcore", *args, "-c", config],
                          capture_output=True, text=True, cwd=directory, env=env, timeout=timeout)


# ---- finding the daemon: the settings block, read within a budget ---------------------------

def test_peek_settings_reads_only_the_settings_block(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("settings:\n  state_dir: st  # here\n  pidfile: /run/x/tc.pid\n"
                    "  shutdown_grace: 2m\n" + MERGE_BOMB + "tasks: [\n")
    found = config.peek_settings(str(path))
    assert found.state_dir == str(tmp_path / "st")
    assert found.pidfile == "/run/x/tc.pid" and found.shutdown_grace == 120
    assert found.log_dir == str(tmp_path / "st" / "logs")


@settings(derandomize=True, max_examples=150, deadline=2000)
@given(junk=st.one_of(st.binary(max_size=3000), st.text(max_size=3000).map(str.encode),
                      st.sampled_from([MERGE_BOMB.encode(), b"settings: *a\n", b"settings: [\n",
                                       b"settings:\n  state_dir: " + b"9" * 5000 + b"\n",
                                       b"settings:\n  shutdown_grace: " + b"9" * 5000 + b"\n",
                                       b"settings:\n  state_dir: \"a\\0b\"\n",
                                       b"settings:\n" + b"  " * 40000 + b"- x\n"])),
       head=st.sampled_from([b"", b"settings:\n  state_dir: st\n"]))
def test_peek_settings_never_fails_whatever_the_file_holds(tmp_path_factory, junk, head):
    path = tmp_path_factory.mktemp("peek") / "tasks.yaml"
    path.write_bytes(head + junk)
    began = time.monotonic()
    found = config.peek_settings(str(path))
    assert time.monotonic() - began < 1.5
    assert os.path.isabs(found.state_dir) and os.path.isabs(found.pidfile)
    if head:
        assert found.state_dir == str(path.parent / "st")


def test_peek_settings_of_a_huge_file_reads_only_its_head(tmp_path):
    path = tmp_path / "tasks.yaml"
    with open(path, "wb") as handle:
        handle.write(b"settings:\n  state_dir: big\ntasks:\n")
        handle.truncate(200 << 20)         # sparse: 200 MB of NULs after the settings
    began = time.monotonic()
    assert config.peek_settings(str(path)).state_dir == str(tmp_path / "big")
    assert time.monotonic() - began < 1.0


# ---- reload's words ---------------------------------------------------------------------------

def test_reload_text_says_the_file_watch_already_applied_it():
    at = datetime.datetime(2026, 5, 1, 4, 12, 31).timestamp()
    reply = {"accepted": True, "summary": "2 tasks on this node: 0 added, 0 changed, 0 removed",
             "already": {"at": at, "reason": "file changed", "added": 0, "changed": 1,
                         "removed": 0}}
    assert cmd_daemon.reload_text(reply) == "already applied by the file watch at 04:12:31: 1 changed"
    del reply["already"]
    assert cmd_daemon.reload_text(reply).startswith("reloaded: 2 tasks")


# ---- fleet status's clock column ----------------------------------------------------------------

@pytest.mark.parametrize("offset, shown", [(-0.0002, "+0.000s"), (-0.0004, "+0.000s"),
                                           (0.004, "+0.004s"), (-0.012, "-0.012s"),
                                           (1.83, "+1.830s (off)")])
def test_fleet_status_shows_a_clock_offset_that_rounds_to_zero_without_a_minus(offset, shown):
    from torchcore.commands import fleet as cmd_fleet

    node = {"name": "web-1", "addresses": ["10.0.0.1"], "version": "0.1.0", "file_commit": None,
            "file_digest": "65a520e57135", "drifted": False, "clock_offset": offset,
            "clock_flagged": abs(offset) > 1, "since": None, "state": "up", "running": 0,
            "failed_24h": 0}
    assert cmd_fleet._node_row(node, time.time(), datetime.timezone.utc)[-1] == shown


def test_status_json_has_a_clock_offset_that_rounds_to_zero_as_0_not_minus_0(tmp_path):
    """The agent keeps the offset to 0.1 s for `status --json`: -0.02 s is 0.0, not -0.0."""
    import dataclasses

    from torchcore import fleetagent, fleetspec, taskspec

    class Store:
        saved = None

        def waiting(self):
            return 0

        def save_state(self, state):
            self.saved = state

    url = "postgresql://a@127.0.0.1:1/x"
    settings = dataclasses.replace(taskspec.default_settings(str(tmp_path / "tasks.yaml")),
                                   fleet=fleetspec.FleetSettings(database=url))
    store = Store()
    agent = fleetagent.Agent(store, settings, "n1", url, monotonic=lambda: 1000.0)
    for offset, kept in ((-0.02, "0.0"), (0.02, "0.0"), (-0.06, "-0.1"), (1.84, "1.8")):
        agent.offset = offset
        agent.save()
        assert json.dumps(store.saved["clock_offset"]) == kept


# ---- names: did-you-mean wherever a name is looked up ------------------------------------------

PLACES = """settings:\n  timezone: UTC\n  state_dir: state\ntasks:
  - {name: backup, schedule: "@hourly", command: "true"}
  - {name: far, schedule: "@daily", ips: [10.1.0.0/16], hosts: ["web*"], command: "true"}
"""


@pytest.fixture
def places(tmp_path, monkeypatch):
    (tmp_path / "tasks.yaml").write_text(PLACES)
    monkeypatch.setenv("TORCHCORE_NODE_IP", "10.9.9.9")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv", [["next", "bakup"], ["logs", "bakup"], ["history", "bakup"],
                                  ["run", "--local", "bakup"], ["logs", "-f", "bakup"]])
def test_a_misspelt_task_name_gets_a_suggestion(places, capsys, argv):
    assert main(argv) == 1
    assert "did you mean 'backup'?" in capsys.readouterr().err


def test_import_suggests_the_time_zone(places, capsys):
    (places / "cron").write_text("0 5 * * * true\n")
    assert main(["import", "--timezone", "Europe/Berln", "cron"]) == 1
    assert "did you mean 'Europe/Berlin'?" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["next", "logs"])
def test_a_task_of_other_nodes_is_said_so_with_its_targets(places, capsys, command):
    assert main([command, "far"]) == 0
    err = capsys.readouterr().err
    assert "does not run on this node" in err and "10.9.9.9" in err
    assert "ips 10.1.0.0/16" in err and "hosts web*" in err
    assert "no output recorded yet" not in err
    assert main([command, "backup"]) == 0
    assert "does not run on this node" not in capsys.readouterr().err


# ---- --since: one parser -----------------------------------------------------------------------

NOW = datetime.datetime(2026, 11, 24, 15, 30, 5).astimezone().timestamp()


@pytest.mark.parametrize("text, expected", [
    ("1d", NOW - 86400), ("90m", NOW - 5400), ("1w", NOW - 7 * 86400), ("2w", NOW - 14 * 86400),
    ("today", datetime.datetime(2026, 11, 24).astimezone().timestamp()),
    ("yesterday", datetime.datetime(2026, 11, 23).astimezone().timestamp()),
    ("2026-11-20", datetime.datetime(2026, 11, 20).astimezone().timestamp()),
    ("2026-11-20T10:15", datetime.datetime(2026, 11, 20, 10, 15).astimezone().timestamp()),
    ("2026-11-20T10:15:00+00:00", datetime.datetime(2026, 11, 20, 10, 15,
                                                    tzinfo=datetime.timezone.utc).timestamp()),
])
def test_since_takes_durations_weeks_words_and_iso_times(text, expected):
    assert common.parse_since(text, now=NOW) == pytest.approx(expected)


@settings(derandomize=True, max_examples=200)
@given(st.text(max_size=30))
def test_since_refuses_anything_else_with_a_usage_error(text):
    import argparse
    try:
        value = common.parse_since(text, now=NOW)
    except argparse.ArgumentTypeError as exc:
        assert "yesterday" in str(exc)
    else:
        assert isinstance(value, float)


def test_history_since_accepts_the_new_forms(places, capsys):
    for since in ("1w", "yesterday", "today", "2026-11-20"):
        assert main(["history", "--since", since]) == 0
    capsys.readouterr()


# ---- against the real daemon --------------------------------------------------------------

@pytest.fixture
def site(tmp_path):
    (tmp_path / "tasks.yaml").write_text(SETTINGS + TASKS)
    (tmp_path / "pids").mkdir()
    yield tmp_path
    for pidfile in (tmp_path / "state" / "torchcore.pid", tmp_path / "pids" / "tc.pid"):
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.mark.process
def test_every_command_finds_a_daemon_started_with_another_pidfile(site):
    pidfile = site / "pids" / "tc.pid"
    started = tc(site, "start", "--pidfile", str(pidfile))
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text())
    status = tc(site, "status")
    assert status.returncode == 0 and f"pid {pid}" in status.stdout, status.stderr
    shown = json.loads(tc(site, "status", "--json").stdout)["daemon"]
    assert shown["pid"] == pid and shown["pidfile"] == str(pidfile)
    assert tc(site, "run", "later").returncode == 0
    misspelt = tc(site, "run", "latter")
    assert misspelt.returncode == 1 and "did you mean 'later'?" in misspelt.stderr
    assert tc(site, "reload").returncode == 0
    assert "settings.pidfile changed" not in (site / "state" / "logs" / "torchcore.log").read_text()
    restarted = tc(site, "restart")
    assert restarted.returncode == 0, restarted.stderr
    assert int(pidfile.read_text()) != pid          # restarted with the pidfile it had
    assert not (site / "state" / "torchcore.pid").exists()
    stopped = tc(site, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert tc(site, "status").returncode == 3


@pytest.mark.process
@pytest.mark.parametrize("content", [
    MERGE_BOMB.encode(), b"\0\xff" * 1000, b"tasks: [\n",
    pytest.param(TASK_BOMB.encode(), marks=pytest.mark.slow)])
def test_stop_and_status_work_whatever_the_file_now_holds(site, content):
    (site / "tasks.yaml").write_text(SETTINGS + "  watch: false\n" + TASKS)
    assert tc(site, "start").returncode == 0
    pid = int((site / "state" / "torchcore.pid").read_text())
    if content.startswith(b"x-anchors"):        # the whole file replaced: its tasks expand forever
        (site / "tasks.yaml").write_bytes(SETTINGS.encode() + content)
    else:
        with open(site / "tasks.yaml", "ab") as handle:
            handle.write(content)
    status = tc(site, "status", timeout=60)
    assert status.returncode == 0 and f"pid {pid}" in status.stdout, status
    assert "the task file on disk is invalid" in status.stdout and "tick" in status.stdout
    stopped = tc(site, "stop", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert _gone(pid)


def _gone(pid):
    """Exited: no such process, or a zombie its reaper (init here) has not collected yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.process
def test_a_pidfile_in_a_missing_directory_is_refused(site):
    missing = site / "nowhere" / "dir" / "tc.pid"
    refused = tc(site, "start", "--pidfile", str(missing))
    assert refused.returncode == 1
    assert f"{missing.parent} does not exist" in refused.stderr and "--create-dirs" in refused.stderr
    assert not missing.parent.parent.exists()
    made = tc(site, "start", "--pidfile", str(missing), "--create-dirs")
    assert made.returncode == 0, made.stderr
    os.kill(int(missing.read_text()), signal.SIGKILL)


@pytest.mark.process
def test_the_supervisor_title_is_set_before_start_returns(site):
    assert tc(site, "start").returncode == 0
    pid = int((site / "state" / "torchcore.pid").read_text())
    title = " ".join(part for part in psutil.Process(pid).cmdline() if part)
    assert title.startswith("torchcore: supervisor"), title
    assert tc(site, "stop").returncode == 0


@pytest.mark.process
def test_reload_after_the_file_watch_says_it_was_already_applied(site):
    assert tc(site, "start").returncode == 0
    (site / "tasks.yaml").write_text(SETTINGS + TASKS.replace("echo tick", "echo tock"))
    wait_for(lambda: json.loads(tc(site, "status", "--json").stdout)["daemon"]["last_reload"],
             15, "the file watch's reload")
    reload = tc(site, "reload")
    assert reload.returncode == 0
    assert "already applied by the file watch at " in reload.stdout
    assert reload.stdout.rstrip().endswith(": 1 changed")
    assert tc(site, "stop").returncode == 0


@pytest.mark.process
def test_status_json_has_iso_times_each_task_once_and_no_wire_keys(site):
    (site / "tasks.yaml").write_text(SETTINGS + TASKS + "  - {name: d, type: daemon, command: \"exit 3\"}\n")
    assert tc(site, "start").returncode == 0
    wait_for(lambda: json.loads(tc(site, "status", "--json").stdout)["tasks"][0].get("last"), 15,
             "a finished run")
    wait_for(lambda: '"restarts": 0' not in tc(site, "status", "--json").stdout, 15, "a restart")
    doc = json.loads(tc(site, "status", "--json").stdout)
    text = json.dumps(doc)
    assert '"e":' not in text and "digest" not in text
    assert [task["name"] for task in doc["tasks"]] == ["tick", "later", "d"]
    assert "tasks" not in doc["daemon"]
    for when in (doc["daemon"]["started"], doc["tasks"][1]["next_run"],
                 doc["tasks"][0]["last"]["ended"]):
        assert datetime.datetime.fromisoformat(when).utcoffset() is not None
    last_exit = doc["tasks"][2]["daemon"]["last_exit"]
    assert set(last_exit) == {"exit_code", "signal", "timed_out", "ended"}
    assert last_exit["exit_code"] == 3
    assert tc(site, "stop").returncode == 0


# ---- run ids: dense across clean restarts, unique always ------------------------------------

def _store_run(store, run_id):
    from torchcore.records import RunRecord
    store.add(RunRecord(run_id, "t", "n", None, 1.0, 2.0, 0, None))


def test_run_ids_go_on_densely_after_a_clean_close(tmp_path):
    from torchcore.records import Records
    path = str(tmp_path / "torchcore.db")
    for expected in (range(1, 109), range(109, 112), range(112, 1400)):
        store = Records(path)
        ids = [store.allocate_run_id() for _ in expected]
        for run_id in ids:
            _store_run(store, run_id)
        store.close()
        assert ids == list(expected)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["alloc", "close", "open"]),
                                st.integers(1, 40)), max_size=30))
def test_run_ids_stay_unique_whatever_owners_open_and_close(tmp_path_factory, steps):
    from torchcore.records import Records
    path = str(tmp_path_factory.mktemp("ids") / "torchcore.db")
    owners, seen = {}, []
    for who, action, n in steps:
        if action == "open" and who not in owners:
            owners[who] = Records(path, id_block=16)
        elif action == "alloc" and who in owners:
            ids = [owners[who].allocate_run_id() for _ in range(n)]
            for run_id in ids[::3]:             # some ids recorded, some lost with their owner
                _store_run(owners[who], run_id)
            seen += ids
        elif action == "close" and who in owners:
            owners.pop(who).close()
    for store in owners.values():
        store.close()
    assert len(seen) == len(set(seen))


@pytest.mark.process
def test_torchcores_own_lines_in_a_task_log_are_tagged_sys(site):
    (site / "tasks.yaml").write_text(
        SETTINGS + 'tasks:\n  - {name: slow, schedule: "0 0 0 1 1 *", timeout: 1s, '
        'command: "echo hello; echo oops >&2; sleep 30"}\n')
    assert tc(site, "start").returncode == 0
    assert tc(site, "run", "slow").returncode == 0
    wait_for(lambda: "run ended" in tc(site, "logs", "slow").stdout, 20, "the end of the run")
    lines = tc(site, "logs", "slow").stdout.splitlines()
    tags = {line.split("| ", 1)[1]: line.split("| ", 1)[0].rsplit(" ", 1)[1] for line in lines}
    assert tags["hello"] == "out" and tags["oops"] == "err"
    assert tags["timeout 1s reached: stopping"] == "sys"
    assert [tag for text, tag in tags.items() if text.startswith("run ended")] == ["sys"]
    assert tc(site, "stop").returncode == 0


# ---- one pid per run: the command's ---------------------------------------------------------

@pytest.mark.process
def test_status_history_and_records_show_the_commands_pid(site):
    marker = f"sleep 4.{os.getpid()}"
    (site / "tasks.yaml").write_text(
        SETTINGS + f'tasks:\n  - {{name: nap, schedule: "0 0 0 1 1 *", command: "{marker}; true"}}\n')
    assert tc(site, "start").returncode == 0
    assert tc(site, "run", "nap").returncode == 0

    def command_pid():
        found = [p.pid for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and " ".join(p.info["cmdline"]).endswith(f"-c {marker}; true")]
        return found[0] if found else None
    pid = wait_for(command_pid, 10, "the command")

    def shown():
        running = json.loads(tc(site, "status", "--json").stdout)["tasks"][0]["running"]
        history = json.loads(tc(site, "history", "--json").stdout)
        return running and history and history[0]["pid"] and (running[0]["pid"], history[0]["pid"])
    # the record has its executor's pid until the command's is known and written (within a second)
    wait_for(lambda: shown() == (pid, pid), 10, "the command's pid in status and history",
             lambda: shown())
    running = json.loads(tc(site, "status", "--json").stdout)["tasks"][0]["running"][0]
    assert psutil.Process(pid).ppid() == running["executor_pid"]    # only where asked for
    assert f"running (pid {pid})" in tc(site, "history").stdout
    wait_for(lambda: json.loads(tc(site, "history", "--json").stdout)[0]["ended"], 20, "the end")
    assert json.loads(tc(site, "history", "--json").stdout)[0]["pid"] == pid
    assert tc(site, "stop").returncode == 0


# ---- import: warnings that point at the line ------------------------------------------------

def test_import_warns_about_a_percent_and_a_missing_user(places, capsys):
    (places / "cron").write_text("0 5 * * * date +%F > /tmp/day\n0 6 * * * echo 100\\% ok\n")
    assert main(["import", "cron"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert warnings[0].startswith("warning: cron:1: unescaped '%'") and "'\\%'" in warnings[0]
    assert "without --user" in warnings[1] and "2 task(s)" in warnings[1]
    assert "printf '%s' 'F > /tmp/day\n' | (\ndate +\n)" in captured.out.replace("\\n", "\n") \
        or "date +" in captured.out                     # converted as cron runs it
    assert main(["import", "--user", "bob", "cron"]) == 0
    assert "without --user" not in capsys.readouterr().err


@settings(derandomize=True, max_examples=200)
@given(st.text(alphabet="ab %\\+F", min_size=1, max_size=20).filter(lambda t: t.strip(" %")))
def test_the_percent_warning_is_given_exactly_when_cron_would_cut(command):
    from torchcore import crontab
    line = "0 5 * * * x" + command + "\n"
    result = crontab.convert(line, "cron")
    cut = crontab.split_percent("x" + command)[1] is not None
    warned = any("unescaped '%'" in warning for warning in result.warnings)
    assert warned == cut or not result.entries


# ---- help, completion, man page: made from the parser ---------------------------------------

def _parser_commands():
    from torchcore.commands import manual as cmd_help
    parser = commands.build_parser()
    return parser, cmd_help.commands(parser)


def test_help_command_shows_the_commands_and_one_commands_help(capsys):
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    _, subs = _parser_commands()
    assert all(name in out for name in subs)
    assert main(["help", "stop"]) == 0
    assert capsys.readouterr().out.startswith("usage: torchcore stop")
    assert main(["help", "stpo"]) == 1
    assert "did you mean 'stop'?" in capsys.readouterr().err


def test_the_man_page_matches_the_parser():
    import re

    from torchcore.commands import manual as cmd_help
    parser, subs = _parser_commands()
    page = cmd_help.man_page(parser)
    sections = re.split(r'^\.SS "(.*)"$', page.split(".SH EXIT STATUS")[0], flags=re.M)[1:]
    documented = dict(zip(sections[::2], sections[1::2]))
    assert list(documented) == list(subs)
    for name, sub in subs.items():
        shown = set(re.findall(r"\\fB(.*?)\\fR", documented[name]))
        expected = {cmd_help.roff(opt) for action in cmd_help.options(sub)
                    for opt in action.option_strings}
        assert shown == expected, name


@pytest.mark.skipif(not os.path.exists("/usr/bin/groff"), reason="no groff")
def test_the_man_page_renders_without_warnings():
    from torchcore.commands import manual as cmd_help
    page = cmd_help.man_page(commands.build_parser())
    done = subprocess.run(["groff", "-man", "-ww", "-z"], input=page, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and not done.stderr


def _bash_complete(script, *words, cwd=None):
    line = " ".join(f"'{word}'" for word in words)
    program = (script + f"\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _torchcore; "
               'printf "%s\\n" "${COMPREPLY[@]}"')
    env = {key: value for key, value in os.environ.items() if key != "TORCHCORE_TASKS"}
    done = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True,
                          timeout=30, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completion_knows_every_command_and_option():
    from torchcore.commands import manual as cmd_help
    parser, subs = _parser_commands()
    script = cmd_help.bash_script(parser)
    assert set(_bash_complete(script, "torchcore", "sta")) == {"start", "status"}
    for name, sub in subs.items():
        offered = _bash_complete(script, "torchcore", name, "-")
        for action in cmd_help.options(sub):
            assert set(action.option_strings) <= set(offered), (name, action.option_strings)
    assert "stop" in _bash_complete(script, "torchcore", "help", "st")
    assert set(_bash_complete(script, "torchcore", "completion", "")) == {"bash", "zsh", "--help"}


def test_bash_completion_offers_the_task_names_of_the_file(places):
    from torchcore.commands import manual as cmd_help
    script = cmd_help.bash_script(commands.build_parser())
    (places / "other.yaml").write_text('tasks:\n  - name: "quoted-one"\n    command: x\n'
                                       '  - {name: flow.two, command: y}\n')
    assert set(_bash_complete(script, "torchcore", "run", "", cwd=places)) >= {"backup", "far"}
    assert _bash_complete(script, "torchcore", "logs", "b", cwd=places) == ["backup"]
    offered = _bash_complete(script, "torchcore", "history", "-c", "other.yaml", "", cwd=places)
    assert {"quoted-one", "flow.two"} <= set(offered) and "backup" not in offered


def test_zsh_completion_names_every_command_and_option():
    from torchcore.commands import manual as cmd_help
    parser, subs = _parser_commands()
    script = cmd_help.zsh_script(parser)
    assert script.startswith("#compdef torchcore\n")
    for name, sub in subs.items():
        case = next(line for line in script.splitlines() if line.strip().startswith(f"({name})"))
        for action in cmd_help.options(sub):
            for opt in action.option_strings:
                assert f"'{opt}[" in case, (name, opt)


# ---- tables: the terminal's width, colour only on a terminal without NO_COLOR ---------------

@settings(derandomize=True, max_examples=300)
@given(rows=st.lists(st.lists(st.text(alphabet="abc xyz-0123", max_size=60), min_size=4,
                              max_size=4), max_size=8),
       width=st.integers(20, 200))
def test_tables_fit_the_width_and_keep_their_columns(rows, width):
    from torchcore.textfmt import format_table
    headers = ["NAME", "STATE", "WHEN", "NOTE"]
    text = format_table(headers, rows, width=width, colour=False)
    lines = text.split("\n")
    assert len(lines) == len(rows) + 1
    floor = sum(max(len(h), 6) for h in headers) + 6
    assert all(len(line) <= max(width, floor) for line in lines)
    if width >= max(len(line) for line in format_table(headers, rows, width=None,
                                                         colour=False).split("\n")):
        assert text == format_table(headers, rows, width=None, colour=False)   # nothing cut


def test_result_words_are_coloured_only_when_asked():
    from torchcore.textfmt import format_table
    rows = [["a", "ok"], ["b", "failing"], ["c", "skipped by max"], ["d", "never ran"]]
    plain = format_table(["NAME", "STATE"], rows, width=None, colour=False)
    assert "\x1b[" not in plain
    painted = format_table(["NAME", "STATE"], rows, width=None, colour=True)
    assert "\x1b[32mok\x1b[0m" in painted and "\x1b[31mfailing\x1b[0m" in painted
    assert "\x1b[33mskipped by max\x1b[0m" in painted
    assert painted.replace("\x1b[32m", "").replace("\x1b[31m", "").replace("\x1b[33m", "") \
        .replace("\x1b[0m", "") == plain


def _in_a_terminal(args, directory, columns=50, no_color=None):
    """Run torchcore with its stdout on a pty; returns what it printed there."""
    import pty
    env = dict(os.environ, COLUMNS=str(columns), TORCHCORE_NODE_IP="10.9.9.9")
    env.pop("NO_COLOR", None)
    if no_color is not None:
        env["NO_COLOR"] = no_color
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "torchcore", *args], stdout=slave,
                            stderr=subprocess.DEVNULL, cwd=directory, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(30)
    os.close(master)
    return out.decode()


@pytest.mark.process
def test_commands_fit_the_terminal_and_colour_only_there(tmp_path):
    (tmp_path / "tasks.yaml").write_text(
        SETTINGS + 'tasks:\n  - {name: a-task-with-a-rather-long-name-indeed, '
        'schedule: "0 0 0 1 1 *", command: "true"}\n')
    shown = _in_a_terminal(["status"], tmp_path, columns=70)
    table = shown.split("\r\n\r\n", 1)[1]
    assert all(len(line) <= 70 for line in re.sub("\x1b\\[[0-9;]*m", "", table).split("\r\n"))
    assert "\x1b[33mnever ran" in table
    assert "\x1b[" not in _in_a_terminal(["status"], tmp_path, no_color="1")
    assert "\x1b[" not in _in_a_terminal(["status", "--json"], tmp_path)
    piped = tc(tmp_path, "status")
    assert "\x1b[" not in piped.stdout and "a-task-with-a-rather-long-name-indeed" in piped.stdout


@pytest.mark.process
def test_run_of_a_task_of_other_nodes_names_its_targets(tmp_path):
    (tmp_path / "tasks.yaml").write_text(PLACES)
    try:
        assert tc(tmp_path, "start").returncode == 0
        refused = tc(tmp_path, "run", "far")
        assert refused.returncode == 1
        assert "does not run on this node (it runs on ips 10.1.0.0/16; hosts web*)" in refused.stderr
    finally:
        tc(tmp_path, "stop")


def test_history_and_logs_still_read_what_ran_when_the_file_is_invalid(places, capsys):
    from torchcore import tasklog
    from torchcore.records import Records, RunRecord, db_path
    store = Records(db_path(str(places / "state")))
    store.add(RunRecord(store.allocate_run_id(), "backup", "n1", None, 1000.0, 1001.0, 0, None))
    store.close()
    log = tasklog.TaskLog(str(places / "state" / "logs"), "backup", 1, 1 << 20, 1)
    log.write("out", b"hello\n")
    log.close()
    with open(places / "tasks.yaml", "a") as handle:
        handle.write("  - {name: broken, maxx: 1}\n")
    assert main(["history", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["task"] == "backup" and "does not validate" in captured.err
    assert main(["logs", "backup"]) == 0
    assert "hello" in capsys.readouterr().out


@pytest.mark.process
@pytest.mark.slow
def test_status_of_a_daemon_that_does_not_answer_says_so(site):
    assert tc(site, "start").returncode == 0
    pid = int((site / "state" / "torchcore.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        status = tc(site, "status", timeout=60)
        assert status.returncode == 1
        assert f"torchcore runs (pid {pid}" in status.stdout and "does not answer" in status.stdout
        daemon = json.loads(tc(site, "status", "--json", timeout=60).stdout)["daemon"]
        assert daemon["pid"] == pid and daemon["running"] and not daemon["answering"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert tc(site, "stop").returncode == 0


def test_a_misspelt_command_gets_a_suggestion(capsys):
    assert main(["stauts"]) == 2
    assert "did you mean 'status'?" in capsys.readouterr().err


@pytest.mark.process
def test_a_second_start_with_another_pidfile_is_refused_at_once(site):
    assert tc(site, "start").returncode == 0
    pid = int((site / "state" / "torchcore.pid").read_text())
    second = tc(site, "start", "--pidfile", str(site / "pids" / "other.pid"))
    assert second.returncode == 1
    assert f"already running (pid {pid}" in second.stderr
    assert not (site / "pids" / "other.pid").exists()
    assert tc(site, "stop").returncode == 0


def test_status_of_an_invalid_file_without_a_daemon_says_first_that_it_does_not_run(tmp_path, capsys):
    from torchcore.commands import main as cli_main
    path = tmp_path / "tasks.yaml"
    path.write_text('tasks:\n  - {name: a, schedule: "61 * * * * *", command: x}\n')
    assert cli_main(["status", "-c", str(path)]) == 78
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("torchcore is not running; the task file does not validate:"), err
    assert "out of range" in err[1]
