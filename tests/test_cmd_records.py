import functools
import json
import os
import time
from types import SimpleNamespace

import pytest

from torchcore import tasklog
from torchcore.commands import history as cmd_records
from torchcore.commands import main
from torchcore.records import Records, RunRecord, db_path


@pytest.fixture
def taskfile(tmp_path, monkeypatch):
    tasks = {"backup", "report"}

    def task(name):
        if name not in tasks:
            raise KeyError(name)
        return SimpleNamespace(name=name, runs_on=lambda node: True)

    tf = SimpleNamespace(
        path=str(tmp_path / "tasks.yaml"), task=task, index=dict.fromkeys(tasks),
        settings=SimpleNamespace(state_dir=str(tmp_path / "state"), log_dir=str(tmp_path / "logs"),
                                 timezone="UTC"))
    monkeypatch.setattr(cmd_records, "_load_taskfile", lambda args: tf)
    return tf


def seed(tf, now):
    store = Records(db_path(tf.settings.state_dir))
    rows = [
        RunRecord(1, "backup", "n1", int(now - 7200), now - 7200, now - 7000, 0, None),
        RunRecord(2, "report", "n1", int(now - 3600), now - 3600, now - 3599.5, 3, None),
        RunRecord(3, "backup", "n1", int(now - 1800), None, None, None, None,
                  skipped="max 1 reached"),
        RunRecord(4, "report", "n1", None, now - 600, now - 540, None, 15, timed_out=True,
                  manual=True),
        RunRecord(5, "backup", "n1", int(now - 60), now - 60, None, None, None, pid=4242),
    ]
    for row in rows:
        store.add(row)
    store.close()


def test_history_without_database(taskfile, capsys):
    assert main(["history"]) == 0
    assert "no runs recorded yet" in capsys.readouterr().out
    assert main(["history", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_history_table(taskfile, capsys):
    seed(taskfile, time.time())
    assert main(["history"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "TASK", "WHEN", "DURATION", "RESULT", "NODE"]
    assert [line.split()[0] for line in lines[1:]] == ["5", "4", "3", "2", "1"]
    text = "\n".join(lines)
    assert "running (pid 4242)" in text and "timed out (killed by SIGTERM) (manual)" in text
    assert "skipped: max 1 reached" in text and "exit 3" in text
    assert "2h ago" in lines[5] and "3m20s" in lines[5] and "ok" in lines[5]
    assert "0.5s" in lines[4]
    assert len({line.index("RESULT") if i == 0 else None for i, line in enumerate(lines)}) == 2


def test_history_filters(taskfile, capsys):
    seed(taskfile, time.time())
    main(["history", "backup", "--json"])
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [5, 3, 1]
    main(["history", "--failed", "--json"])
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [4, 2]
    main(["history", "--since", "45m", "--json"])
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [5, 4, 3]
    main(["history", "--limit", "2", "--json"])
    assert len(json.loads(capsys.readouterr().out)) == 2
    main(["history", "report", "--since", "1m"])
    assert "no matching runs" in capsys.readouterr().out


def test_history_json_fields(taskfile, capsys):
    now = 1795534200.25
    seed(taskfile, now)
    main(["history", "--json", "--limit", "0"])
    runs = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(runs[1]) >= {"task", "run_id", "scheduled", "started", "ended", "exit_code",
                            "signal", "timed_out", "skipped", "missed", "duration", "manual"}
    assert runs[1]["started"] == "2026-11-24T13:30:00.250+00:00"
    assert runs[1]["scheduled"] == "2026-11-24T13:30:00+00:00"
    assert runs[1]["duration"] == 200.0 and runs[1]["exit_code"] == 0
    assert runs[3]["skipped"] is True and runs[3]["skip_reason"] == "max 1 reached"
    assert runs[3]["started"] is None and runs[3]["duration"] is None
    assert runs[4]["signal"] == 15 and runs[4]["timed_out"] is True and runs[4]["manual"] is True


def test_history_bad_arguments(taskfile, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["history", "--since", "soon"])
    assert exc.value.code == 2 and "duration" in capsys.readouterr().err
    assert main(["history", "../etc"]) == 1
    assert "not a task name" in capsys.readouterr().err


def write_log(tf, task, run_id, lines):
    log = tasklog.TaskLog(tf.settings.log_dir, task, run_id, 0, 0)
    for line in lines:
        log.write("out", line.encode() + b"\n")
    log.close()


def test_logs_last_lines_and_one_run(taskfile, capsys):
    write_log(taskfile, "backup", 1, ["a1", "a2"])
    write_log(taskfile, "backup", 2, ["b1", "b2", "b3"])
    assert main(["logs", "backup", "-n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("| ", 1)[1] for line in out] == ["b2", "b3"]
    assert " run 2 out| " in out[0]
    main(["logs", "backup", "--run", "1"])
    assert [line.split("| ", 1)[1] for line in capsys.readouterr().out.splitlines()] == ["a1", "a2"]


def test_logs_without_output(taskfile, capsys):
    assert main(["logs", "report"]) == 0
    assert "no output recorded yet for task 'report'" in capsys.readouterr().err
    assert main(["logs", "nosuch"]) == 1
    assert "no task 'nosuch'" in capsys.readouterr().err


def test_logs_follow_until_ctrl_c(taskfile, capsys, monkeypatch):
    write_log(taskfile, "backup", 1, ["before"])
    calls = []

    def sleep(_):
        calls.append(1)
        if len(calls) == 1:
            write_log(taskfile, "backup", 2, ["after"])
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(tasklog, "follow_log", functools.partial(tasklog.follow_log, sleep=sleep))
    assert main(["logs", "backup", "-f", "-n", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("| ", 1)[1] for line in out] == ["before", "after"]


@pytest.mark.process
def test_real_task_file_end_to_end(tmp_path):
    import subprocess
    import sys
    (tmp_path / "tasks.yaml").write_text(
        "settings:\n  state_dir: ./st\n  timezone: UTC\n"
        "tasks:\n  - name: backup\n    schedule: '0 * * * * *'\n    command: echo hi\n")
    store = Records(str(tmp_path / "st" / "torchcore.db"))
    store.add(RunRecord(store.allocate_run_id(), "backup", "n1", 1795534200, 1795534200.5,
                        1795534201.0, 0, None))
    store.flush()                                 # the daemon keeps its connection open
    log = tasklog.TaskLog(str(tmp_path / "st" / "logs"), "backup", 1, 0, 0)
    log.write("out", b"hi\n")
    log.close()
    cmd = [sys.executable, "-m", "torchcore"]
    out = subprocess.run(cmd + ["history", "-c", str(tmp_path / "tasks.yaml"), "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)[0]["ended"] == "2026-11-24T15:30:01.000+00:00"
    out = subprocess.run(cmd + ["logs", "backup", "-c", str(tmp_path / "tasks.yaml")],
                         capture_output=True, text=True, check=True).stdout
    assert out.endswith(" run 1 out| hi\n")
    store.close()


def test_history_and_logs_of_an_unreadable_state_say_so_never_no_runs(taskfile, monkeypatch, capsys):
    seed(taskfile, time.time())
    os.makedirs(taskfile.settings.log_dir, exist_ok=True)
    real_stat, real_listdir = cmd_records.os.stat, tasklog.os.listdir

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(cmd_records.os, "stat", denied)
    for argv in (["history"], ["history", "--json"], ["history", "--failed"]):
        assert main(argv) != 0
        err = capsys.readouterr()
        assert "Permission denied" in err.err and "no runs" not in err.out and err.out == ""
    monkeypatch.setattr(cmd_records.os, "stat", real_stat)
    monkeypatch.setattr(tasklog.os, "listdir", denied)
    assert main(["logs", "backup"]) != 0
    err = capsys.readouterr().err
    assert "Permission denied" in err and "Traceback" not in err
    monkeypatch.setattr(tasklog.os, "listdir", real_listdir)


def test_logs_escape_control_characters_so_output_cannot_forge_lines(taskfile, capsys):
    log = tasklog.TaskLog(taskfile.settings.log_dir, "backup", 7, 1 << 20, 1)
    log.write("out", b"hello\r2026-12-01T00:00:00.000+00:00 run 1 sys| run ended: ok\n"
                     b"\x1b]0;title\x07 bell \x00 tab\tkept\n")
    log.close()
    assert main(["logs", "backup"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out and "\x07" not in out and "\x00" not in out
    assert "hello\\x0d2026" in out and "\\x1b]0;title\\x07" in out and "tab\tkept" in out


def test_logs_of_a_run_with_no_lines_says_so(taskfile, capsys):
    log = tasklog.TaskLog(taskfile.settings.log_dir, "backup", 7, 1 << 20, 1)
    log.write("out", b"one line\n")
    log.close()
    assert main(["logs", "backup", "--run", "99999"]) == 1
    assert "no output of run 99999" in capsys.readouterr().err
