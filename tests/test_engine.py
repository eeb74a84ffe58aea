"""The engine on real processes and real seconds: properties with margins for a loaded machine."""

import itertools
import os
import signal
import subprocess
import time

import psutil
import pytest
from daemon_harness import Daemon, processes_with, wait_for

pytestmark = pytest.mark.process


@pytest.fixture
def daemons(tmp_path):
    made = []

    def factory(body, settings="", subdir="d"):
        directory = tmp_path / f"{subdir}{len(made)}"
        directory.mkdir()
        daemon = Daemon(directory, body, settings)
        made.append(daemon)
        return daemon

    yield factory
    for daemon in made:
        daemon.kill()


def test_every_second_task_runs_each_second_once_and_is_recorded(daemons):
    d = daemons("""tasks:
  - {name: tick, schedule: "* * * * * *", command: "date +%s.%N"}
""").start()
    wait_for(lambda: len([r for r in d.runs("tick") if r["ended"]]) >= 4, 15, "4 runs")
    assert d.stop() == 0
    runs = [r for r in d.runs("tick") if r["skipped"] is None]
    seconds = [r["scheduled"] for r in runs]
    assert len(seconds) == len(set(seconds))                     # never twice for one second
    assert seconds == list(range(seconds[0], seconds[0] + len(seconds)))   # none lost
    assert all(r["exit_code"] == 0 for r in runs)
    assert all(0 <= r["started"] - r["scheduled"] < 1.0 for r in runs)
    log = open(os.path.join(d.dir, "state", "logs", "tick.log")).read().splitlines()
    assert len([line for line in log if " out| " in line]) == len(runs)


def test_ps_shows_the_supervisor_and_each_run_by_task_name(daemons):
    d = daemons("""tasks:
  - {name: sleeper, schedule: "* * * * * *", command: "sleep 30.11"}
""").start()
    wait_for(lambda: d.runs("sleeper"), 10, "a run")
    titles = wait_for(lambda: _titles_matching("torchcore: sleeper [run "), 10, "executor title")
    assert titles[0].startswith("torchcore: sleeper [run ")
    supervisor = " ".join(psutil.Process(d.proc.pid).cmdline())
    assert supervisor.startswith("torchcore: supervisor tasks.yaml (1 tasks, ")
    d.stop()


def _titles_matching(prefix):
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.startswith(prefix)]


def test_timeout_kills_the_whole_process_group_including_grandchildren(daemons):
    d = daemons("""tasks:
  - name: slow
    schedule: "* * * * * *"
    command: "sleep 987 & sleep 987 & wait"
    timeout: 1s
    kill_grace: 1s
""").start()
    wait_for(lambda: processes_with("sleep 987"), 10, "the task's sleeps")
    ended = wait_for(lambda: [r for r in d.runs("slow") if r["ended"]], 10, "the record")
    assert ended[0]["timed_out"] == 1 and ended[0]["signal"] == signal.SIGTERM
    # not before its timeout, which counts from the scheduled second (the command itself may
    # start late on a loaded machine), and not long after it
    assert ended[0]["ended"] - ended[0]["scheduled"] >= 0.95
    assert ended[0]["ended"] - ended[0]["started"] < 3.5
    d.stop()
    assert not processes_with("sleep 987")


def test_sigterm_stops_a_task_that_ignores_term_within_the_grace(daemons):
    d = daemons("""tasks:
  - name: stubborn
    schedule: "* * * * * *"
    command: "trap '' TERM; sleep 988 & sleep 988; wait"
    kill_grace: 60s
""", settings="  shutdown_grace: 2s\n").start()
    wait_for(lambda: len(processes_with("sleep 988")) >= 2, 10, "the task's sleeps")
    began = time.monotonic()
    assert d.stop() == 0
    took = time.monotonic() - began
    assert took < 2 + 2.5, took
    wait_for(lambda: not processes_with("sleep 988"), 1.0, "every process of the group gone")
    assert "killing" in d.log
    assert not os.path.exists(os.path.join(d.dir, "state", "torchcore.pid"))


def test_a_second_stop_signal_kills_at_once(daemons):
    d = daemons("""tasks:
  - name: stubborn
    schedule: "* * * * * *"
    command: "trap '' TERM; sleep 989"
    kill_grace: 60s
""", settings="  shutdown_grace: 60s\n").start()
    wait_for(lambda: processes_with("sleep 989"), 10, "the task")
    began = time.monotonic()
    d.signal(signal.SIGTERM)
    time.sleep(0.3)
    d.signal(signal.SIGINT)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - began < 5
    wait_for(lambda: not processes_with("sleep 989"), 2, "the task killed")


def test_many_short_runs_leave_no_zombie(daemons):
    tasks = "tasks:\n" + "".join(
        f'  - {{name: t{i}, schedule: "* * * * * *", command: "exit {i % 3}"}}\n' for i in range(8))
    d = daemons(tasks).start()
    wait_for(lambda: len(d.runs()) >= 24, 15, "24 runs")
    time.sleep(0.5)
    children = psutil.Process(d.proc.pid).children()
    zombies = [c for c in children if c.status() == psutil.STATUS_ZOMBIE]
    assert len(zombies) <= 8        # at most the ones that ended in this very second
    time.sleep(1.2)
    old = {z.pid for z in zombies}
    still = [c for c in psutil.Process(d.proc.pid).children()
             if c.pid in old and c.status() == psutil.STATUS_ZOMBIE]
    assert still == []
    assert d.stop() == 0
    failed = [r for r in d.runs() if r["ended"] and r["exit_code"] != 0]
    assert failed and all(r["exit_code"] in (1, 2) for r in failed)


def test_file_change_reloads_and_a_bad_file_keeps_the_old_tasks(daemons):
    d = daemons("""tasks:
  - {name: a, schedule: "* * * * * *", command: "true"}
""").start()
    wait_for(lambda: d.runs("a"), 10, "a runs")
    d.write("""tasks:
  - {name: a, schedule: "* * * * * *", command: "true"}
  - {name: b, schedule: "* * * * * *", command: "true"}
""")
    d.wait_log("reloaded (file changed)")
    wait_for(lambda: d.runs("b"), 10, "b runs")
    d.write("tasks:\n  - {name: a, schedule: '99 * * * * *', command: x}\n")
    d.wait_log("rejected")
    assert "tasks.yaml:5" in d.log and "out of range" in d.log
    count = len(d.runs("b"))
    wait_for(lambda: len(d.runs("b")) >= count + 2, 10, "b to keep running")
    assert d.stop() == 0


def test_sighup_reload_does_not_disturb_a_running_task(daemons):
    d = daemons("""tasks:
  - {name: long, schedule: "* * * * * *", command: "sleep 3.17; echo finished"}
""").start()
    wait_for(lambda: processes_with("sleep 3.17"), 10, "the long run")
    d.write("tasks:\n  - {name: other, schedule: '* * * * * *', command: 'true'}\n")
    d.signal(signal.SIGHUP)
    d.wait_log("reloaded (SIGHUP)")
    wait_for(lambda: [r for r in d.runs("long") if r["ended"]], 10, "the long run to end")
    assert d.runs("long")[0]["exit_code"] == 0
    d.stop()


def test_a_bad_file_at_start_exits_78_with_the_error(tmp_path):
    d = Daemon(tmp_path, "tasks:\n  - {name: x, schedule: '* * *', command: y}\n")
    d.start(wait=False)
    assert d.proc.wait(20) == 78
    assert "tasks.yaml:5" in d.log and "task 'x'" in d.log and "Traceback" not in d.log


def test_a_daemon_task_is_kept_running(daemons):
    d = daemons("""tasks:
  - {name: svc, type: daemon, command: "sleep 1.2; exit 1"}
""").start()
    wait_for(lambda: len([r for r in d.runs("svc") if r["ended"]]) >= 2, 15, "two instances")
    assert "failed to start" not in d.log          # lived over 1 s: plain restarts, no backoff
    d.stop()


def test_executor_records_its_run_when_the_supervisor_is_killed(daemons):
    d = daemons("""tasks:
  - {name: orphan, schedule: "* * * * * *", command: "sleep 2.07"}
""").start()
    wait_for(lambda: processes_with("sleep 2.07"), 10, "the run")
    time.sleep(0.3)
    d.proc.kill()
    d.proc.wait()
    wait_for(lambda: [r for r in d.runs("orphan") if r["ended"]], 10, "the executor's own record")
    assert d.runs("orphan")[0]["exit_code"] == 0


def test_limits_env_cwd_and_user_are_applied(daemons, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    os.chmod(workdir, 0o777)
    user = "nobody" if os.geteuid() == 0 else None
    d = daemons(f"""tasks:
  - name: hog
    schedule: "* * * * * *"
    command: ["{os.sys.executable}", "-c", "import time; b = bytearray(300 << 20); time.sleep(30)"]
    limits: {{memory: 100M}}
    kill_grace: 1s
  - name: env
    schedule: "* * * * * *"
    command: 'echo "$GREETING|$(pwd)|$(id -un)|$(ulimit -n)|$(ulimit -t)|$(env | grep -c ^TORCHCORE_)"'
    env: {{GREETING: "hello world"}}
    cwd: {workdir}
    limits: {{nofile: 123, cpu: 77}}
""" + (f"    user: {user}\n" if user else "")).start()
    hog = wait_for(lambda: [r for r in d.runs("hog") if r["ended"]], 15, "the hog to be stopped")[0]
    assert hog["signal"] in (signal.SIGTERM, signal.SIGKILL)
    assert hog["peak_rss"] >= 100 << 20
    assert "memory limit" in open(os.path.join(d.dir, "state", "logs", "hog.log")).read()
    wait_for(lambda: [r for r in d.runs("env") if r["ended"]], 10, "the env run")
    d.stop()
    with open(os.path.join(d.dir, "state", "logs", "env.log")) as handle:
        line = next(x for x in handle if " out| " in x)
    greeting, cwd, who, nofile, cpu, internals = line.split(" out| ")[1].strip().split("|")
    assert (greeting, cwd, nofile, cpu, internals) == ("hello world", str(workdir), "123", "77", "0")
    if user:
        assert who == user


def test_a_new_supervisor_counts_the_previous_ones_running_executors_against_max(daemons):
    d = daemons("""tasks:
  - {name: single, schedule: "* * * * * *", command: "sleep 4.13; echo done", max: 1}
""").start()
    wait_for(lambda: processes_with("sleep 4.13"), 10, "the first run")
    d.proc.kill()
    d.proc.wait()
    d.start()                                      # the stale pidfile is taken over
    d.wait_log("still runs: it counts against max")
    time.sleep(2)
    sleeps = [p for p in processes_with("sleep 4.13") if p.name() == "sleep"]
    assert len(sleeps) == 1                        # max 1 holds across the restart
    wait_for(lambda: len([r for r in d.runs("single") if r["ended"] and not r["skipped"]]) >= 2,
             15, "the old run's own record and a new run")
    assert d.stop() == 0
    ran = [r for r in d.runs("single") if r["started"] and not r["skipped"]]
    spans = sorted((r["started"], r["ended"]) for r in ran if r["ended"])
    assert all(a_end <= b_start + 0.05 for (_, a_end), (b_start, _) in itertools.pairwise(spans))


@pytest.mark.skipif(os.geteuid() != 0 or not __import__("shutil").which("unshare"),
                    reason="needs root and unshare(1) to run the daemon as PID 1 of a namespace")
def test_as_pid_1_the_supervisor_reaps_orphans_its_tasks_leave(tmp_path):
    d = Daemon(tmp_path, """tasks:
  - {name: leaver, schedule: "* * * * * *", command: "sleep 0.23 & exit 0"}
""")
    env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9")
    with open(d.err_path, "ab") as err:
        d.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", os.sys.executable, "-m", "torchcore",
             "start", "--foreground", "-c", d.path], stderr=err, cwd=d.dir, env=env)
    try:
        d.wait_log("torchcore started")
        wait_for(lambda: len([r for r in d.runs("leaver") if r["ended"]]) >= 4, 15, "4 runs")
        supervisor = psutil.Process(d.proc.pid).children()[0]
        assert "torchcore: supervisor" in " ".join(supervisor.cmdline())
        time.sleep(1.0)
        zombies = [c for c in supervisor.children() if c.status() == psutil.STATUS_ZOMBIE]
        assert not [z for z in zombies if "sleep" in z.name()]
    finally:
        d.kill()
