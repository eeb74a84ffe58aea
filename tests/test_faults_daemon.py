"""Breaking the real daemon on purpose: clock steps, stops, kills, reload storms, garbage.

Each test checks the promises of the README's "Semantics" section through the records
database and records what it tried in the suite's figure table (tests/conftest.py).
"""

import glob
import itertools
import os
import re
import signal
import socket
import time

import psutil
import pytest
from daemon_harness import processes_with, wait_for

pytestmark = pytest.mark.process

FAKETIME_LIBS = glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + \
    glob.glob("/usr/lib/faketime/libfaketime.so.1")


def started(rows):
    return [r for r in rows if r["started"] is not None and not r["skipped"]]


def missed_seconds(rows, every=1):
    """Seconds a missed record stands for: 'missed N run(s)' ending at its scheduled second."""
    covered = set()
    for r in rows:
        if r["missed"]:
            count = int(re.search(r"missed (\d+)", r["skipped"]).group(1))
            covered.update(r["scheduled"] - every * k for k in range(count))
    return covered


def lost_seconds(rows, first, last, every=1):
    """Due seconds of an every-``every``-seconds task in [first, last] with no run, miss or skip."""
    accounted = {r["scheduled"] for r in rows if r["scheduled"] is not None} | missed_seconds(rows, every)
    return [s for s in range(first, last + 1) if s % every == 0 and s not in accounted]


# ---- the wall clock steps under a running daemon (libfaketime) ---------------------------------

class FakeWall:
    """Moves the wall clock of every process started with ``env`` (monotonic stays real)."""

    def __init__(self, directory, offset):
        self.path = os.path.join(str(directory), "faketime-offset")
        self.offset = 0
        self.set(offset)
        self.env = {"LD_PRELOAD": FAKETIME_LIBS[0], "FAKETIME_TIMESTAMP_FILE": self.path,
                    "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    def set(self, offset):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(f"{offset:+d}\n")
        os.replace(tmp, self.path)
        self.offset = offset

    def step(self, seconds):
        self.set(self.offset + seconds)

    def now(self):
        return time.time() + self.offset


@pytest.mark.skipif(not FAKETIME_LIBS, reason="libfaketime is not installed (Debian package "
                    "`faketime`; tests/setup-system.sh installs it)")
def test_wall_clock_steps_under_a_running_daemon(daemons, monkeypatch, figures):
    """+90 s, +1 day, -90 s, -1 day while tasks run: the promises hold in the records."""
    d = daemons("""tasks:
  - {name: every, schedule: "* * * * * *", command: "true", max: 3}
  - {name: hourly, schedule: "0 0 * * * *", command: "true"}
""")
    # Start 6 s before a full hour of the fake wall clock.
    hour = (int(time.time()) // 3600 + 5) * 3600
    wall = FakeWall(d.dir, hour - 6 - int(time.time()))
    for key, value in wall.env.items():
        monkeypatch.setenv(key, value)
    d.start()
    wait_for(lambda: started(d.runs("hourly")), 15, "the hourly run at the full hour")
    time.sleep(1.5)
    reached = int(wall.now())
    wall.step(-90)                         # back before the hour it already ran
    time.sleep(2.5)
    wall.step(+80)                         # forward again, 4-8 s before that hour
    time.sleep(10)                         # ... and the wall clock passes it a second time
    d.wait_log("fixed-time tasks will not repeat")
    mark = int(wall.now())
    wall.step(+90)                         # within 3 h: caught up within misfire_grace
    time.sleep(3)
    wall.step(+86400)                      # a day: a clock correction
    time.sleep(3)
    wall.step(-86400)                      # and back: watermark reset
    time.sleep(3)
    assert d.stop() == 0
    log = d.log
    assert "treated as a clock correction, nothing caught up" in log
    assert "treated as a clock correction, watermark reset" in log
    hourly = started(d.runs("hourly"))
    assert [r["scheduled"] for r in hourly] == [hour]          # once, despite passing it twice
    every = d.runs("every")
    after_back = [r["scheduled"] for r in started(every) if r["scheduled"] > hour - 90]
    assert len([s for s in after_back if s < hour]) >= 3       # frequent tasks kept firing
    # The +90 s stall: the latest second ran, the 89 before it are recorded as missed.
    jump = [r for r in every if r["missed"] and mark < r["scheduled"] <= mark + 95]
    assert jump and int(re.search(r"missed (\d+)", jump[0]["skipped"]).group(1)) >= 85
    # The day-long step caught nothing up: no miss record of that size.
    assert all(int(re.search(r"missed (\d+)", r["skipped"]).group(1)) < 200
               for r in every if r["missed"])
    lost = lost_seconds(every, mark + 1, mark + 90)
    # Seconds up to ``reached`` came again after the step back: frequent tasks may run them twice.
    seconds = [r["scheduled"] for r in started(every) if r["scheduled"] > reached + 1]
    doubled = len(seconds) - len(set(seconds))
    assert lost == [] and doubled == 0
    figures.add(faults=6, runs=len(started(every)) + len(hourly) + 90, lost=len(lost), doubled=doubled)


# ---- a stopped supervisor, a killed supervisor -------------------------------------------------

def test_sigstop_for_20s_the_executor_still_times_out_and_the_stall_is_caught_up(daemons, figures):
    d = daemons("""tasks:
  - {name: slow, schedule: "* * * * * *", command: "sleep 60", timeout: 5s, kill_grace: 1s}
  - {name: tick, schedule: "* * * * * *", command: "true", max: 3}
""").start()
    wait_for(lambda: processes_with("sleep 60"), 10, "the slow run")
    time.sleep(1)
    stopped_at = time.time()
    d.signal(signal.SIGSTOP)
    time.sleep(20)
    d.signal(signal.SIGCONT)
    resumed = time.time()
    time.sleep(3)
    assert d.stop() == 0
    slow = [r for r in started(d.runs("slow")) if r["started"] < stopped_at]
    assert slow and slow[-1]["timed_out"] and slow[-1]["ended"] < stopped_at + 5 + 1 + 3
    assert d.log.count("s were skipped (stall or clock step)") >= 1
    tick = d.runs("tick")
    stall = [r for r in tick if r["missed"] and stopped_at < r["scheduled"] <= resumed + 1]
    assert stall and int(re.search(r"missed (\d+)", stall[0]["skipped"]).group(1)) >= 15
    ran = [r["scheduled"] for r in started(tick)]
    assert any(stopped_at + 15 < s <= resumed + 1 for s in ran)   # its latest second ran
    first, last = min(ran), max(ran)
    lost = lost_seconds(tick, first, last)
    assert lost == [] and len(ran) == len(set(ran))
    figures.add(faults=2, runs=last - first + 1 + len(slow), lost=len(lost),
                doubled=len(ran) - len(set(ran)))


def test_kill9_then_restart_keeps_max_and_every_started_run_gets_its_end_record(daemons, figures):
    """Records complete: every run either supervisor started has exactly one row, and that row
    has an end (written by its executor when the supervisor was gone) or, for an executor that
    vanished with it, says it was lost.  No row stays open; no (task, second) started twice."""
    d = daemons("""tasks:
  - {name: single, schedule: "* * * * * *", command: "sleep 3", max: 1}
  - {name: short, schedule: "* * * * * *", command: "sleep 1.5", max: 3}
""").start()
    wait_for(lambda: len(started(d.runs("short"))) >= 3, 10, "runs in flight")
    d.proc.kill()
    d.proc.wait()
    killed_at = time.time()
    d.start()
    time.sleep(5)
    assert d.stop() == 0
    rows = d.runs()
    assert all(r["ended"] is not None for r in started(rows))         # nothing left open
    ran = [r for r in started(rows) if not (r["error"] or "").startswith("lost")]
    before = [r for r in ran if r["started"] < killed_at]
    assert len(before) >= 3
    assert all(r["exit_code"] == 0 for r in before)                   # they finished undisturbed
    stopped = [r for r in ran if r["started"] >= killed_at and r["exit_code"] != 0]
    assert all(r["signal"] == signal.SIGTERM for r in stopped)        # only the final stop's TERM
    keys = [(r["task"], r["scheduled"]) for r in ran]
    spans = sorted((r["started"], r["ended"]) for r in ran if r["task"] == "single")
    overlaps = sum(a_end > b_start + 0.05 for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert overlaps == 0 and len(keys) == len(set(keys))
    figures.add(faults=1, runs=len(ran), doubled=overlaps + len(keys) - len(set(keys)))


def test_a_daemon_that_crashes_at_once_backs_off_without_spinning(daemons, figures):
    d = daemons("""tasks:
  - {name: crash, type: daemon, command: "exit 3"}
  - {name: tick, schedule: "* * * * * *", command: "true"}
""").start()
    time.sleep(1)
    proc = psutil.Process(d.proc.pid)
    cpu0, began = sum(proc.cpu_times()[:2]), time.monotonic()
    time.sleep(10)
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    elapsed = time.monotonic() - began
    assert d.stop() == 0
    starts = started(d.runs("crash"))
    assert 3 <= len(starts) <= 6, len(starts)          # 1, 2, 4, 8 s apart: ~5 in 11 s
    gaps = [b["started"] - a["started"] for a, b in itertools.pairwise(starts)]
    # The k-th wait is 2**k s, started at the next wake (a second boundary) after it ends.
    assert all(2 ** k - 0.1 <= gap <= 2 ** k + 1.6 for k, gap in enumerate(gaps)), gaps
    assert cpu < 0.1 * elapsed, cpu                    # under 10% of a core, ticks included
    assert "failed to start" in d.log
    figures.add(faults=len(starts), runs=len(starts))


# ---- garbage, a full disk, descriptors ---------------------------------------------------------

def test_garbage_on_the_control_socket_does_not_stop_the_scheduling(daemons, figures):
    d = daemons("""tasks:
  - {name: tick, schedule: "* * * * * *", command: "true"}
""").start()
    path = os.path.join(d.dir, "state", "control.sock")
    payloads = [b"\x00\xff" * 5000, b"{" * 70000, b"not json\n", b'{"cmd": 7}\n', b"[]\n",
                b'{"cmd": "run", "task": {"x": 1}}\n', b'{"cmd": "reload", "extra": ' + b"9" * 5000 + b"}\n",
                os.urandom(4096), b"\n" * 10000, b'{"cmd":"status"}']
    socks = []
    for payload in payloads * 3:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        try:
            sock.sendall(payload)
        except OSError:
            pass
        socks.append(sock)
        if len(socks) % 2:
            sock.close()                                   # half of them hang up at once
    time.sleep(3)
    for sock in socks:
        sock.close()
    time.sleep(1)
    assert d.proc.poll() is None
    assert d.stop() == 0
    ran = [r["scheduled"] for r in started(d.runs("tick"))]
    lost = lost_seconds(d.runs("tick"), min(ran), max(ran))
    assert len(ran) >= 4 and lost == [] and len(ran) == len(set(ran))
    figures.add(faults=len(payloads) * 3, runs=len(ran), lost=len(lost))


def test_a_full_log_disk_is_survived_and_the_runs_are_recorded(daemons, figures):
    d = daemons("""tasks:
  - {name: loud, schedule: "* * * * * *", command: "echo hello; echo oops >&2"}
""")
    logs = os.path.join(d.dir, "state", "logs")
    os.makedirs(logs, mode=0o700)
    os.chmod(os.path.join(d.dir, "state"), 0o700)
    os.symlink("/dev/full", os.path.join(logs, "loud.log"))     # every write: ENOSPC
    d.start()
    wait_for(lambda: len([r for r in d.runs("loud") if r["ended"]]) >= 3, 15, "3 runs")
    assert d.stop() == 0
    ran = started(d.runs("loud"))
    assert all(r["exit_code"] == 0 for r in ran if r["ended"])
    seconds = [r["scheduled"] for r in ran]
    lost = lost_seconds(d.runs("loud"), min(seconds), max(seconds))
    assert lost == [] and len(seconds) == len(set(seconds))
    figures.add(faults=len(ran), runs=len(ran), lost=len(lost))


def test_a_task_inherits_no_descriptor_or_variable_of_torchcore(daemons):
    d = daemons("""tasks:
  - name: peek
    schedule: "* * * * * *"
    command: [python3, -c, "import os, sys; print(' '.join(str(n) for n in range(1024) if os.path.exists(f'/proc/self/fd/{n}'))); print(*(f'{k}={v}' for k, v in os.environ.items()), sep=chr(10))"]
""")
    d.start()
    wait_for(lambda: [r for r in d.runs("peek") if r["ended"]], 10, "a run")
    d.stop()
    out = [line.split(" out| ", 1)[1].rstrip("\n")
           for line in open(os.path.join(d.dir, "state", "logs", "peek.log")) if " out| " in line]
    # the descriptors the command has, each looked at by stat alone (a shell's own pipes and
    # saved descriptors, or a listing's directory, would count for it)
    first_fds = out[0].split()
    assert sorted(first_fds) == ["0", "1", "2"], first_fds        # no db, pidfile, socket or pipe
    assert not [line for line in out if line.startswith(("TORCHCORE_", "NOTIFY_SOCKET="))]


def test_a_planted_pidfile_symlink_is_not_followed(daemons, tmp_path):
    d = daemons("tasks:\n  - {name: t, schedule: '* * * * * *', command: 'true'}\n")
    state = os.path.join(d.dir, "state")
    os.makedirs(state, mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, os.path.join(state, "torchcore.pid"))
    d.start(wait=False)
    assert d.proc.wait(15) != 0
    assert victim.read_text() == "precious\n"
    assert "symlink" in d.log or "link" in d.log


# ---- a reload storm ----------------------------------------------------------------------------

def storm_file(version):
    """80 stable tasks, 20 that come, go and change, and a long task edited on each version."""
    lines = ["tasks:"]
    lines += [f'  - {{name: s{i}, schedule: "* * * * * *", command: "true", max: 2}}' for i in range(80)]
    lines.append(f'  - {{name: long, schedule: "* * * * * *", command: "sleep 2.5; : {version}", max: 3}}')
    lines += [f'  - {{name: v{i}, schedule: "* * * * * *", command: "exit {version % 3}", max: 2}}'
              for i in range(20) if (i + version) % 3]
    return "\n".join(lines) + "\n"


def test_reload_storm_loses_doubles_and_kills_nothing(daemons, figures):
    """50 reloads in 10 s while 100 tasks fire every second: edits in place, atomic renames,
    symlink swaps and truncated (invalid) files.  Stable tasks lose and double nothing; changed
    and removed tasks double nothing; no running task is killed."""
    d = daemons(storm_file(0), settings="  misfire_grace: 5s\n")
    d.start()
    time.sleep(2)
    links = [os.path.join(d.dir, name) for name in ("a.yaml", "b.yaml")]
    header = "settings:\n  timezone: UTC\n  state_dir: state\n  misfire_grace: 5s\n"
    began = time.time()
    for version in range(1, 51):
        text = header + storm_file(version)
        kind = version % 4
        if kind == 0:                                   # an edit in place
            with open(d.path, "w") as handle:
                handle.write(text)
        elif kind == 1:                                 # an atomic rename
            d.write(storm_file(version), "  misfire_grace: 5s\n")
        elif kind == 2:                                 # a symlink swap
            target = links[version % 2]
            with open(target, "w") as handle:
                handle.write(text)
            os.symlink(target, d.path + ".new")
            os.replace(d.path + ".new", d.path)
        else:                                           # a truncated file: rejected, old tasks stay
            with open(d.path, "w") as handle:
                handle.write(text[:len(text) - 40])
        d.signal(signal.SIGHUP)                         # a reload of each version, not only those
        time.sleep(0.2)                                 # the file watch happens to see
    ended = time.time()
    d.write(storm_file(51), "  misfire_grace: 5s\n")
    time.sleep(4)                                       # let every long run finish
    assert d.stop() == 0
    rows = d.runs()
    ran = started(rows)
    keys = [(r["task"], r["scheduled"]) for r in ran]
    doubled = len(keys) - len(set(keys))
    assert doubled == 0
    killed = [r for r in ran if r["signal"] is not None and r["started"] < ended + 1]
    assert killed == []                                 # nothing running was disturbed
    lost = []
    for i in range(80):
        mine = [r for r in rows if r["task"] == f"s{i}"]
        lost += lost_seconds(mine, int(began), int(ended))
    assert lost == []
    assert d.log.count("rejected") >= 6 and d.log.count("reloaded (") >= 20
    figures.add(faults=50, runs=80 * (int(ended) - int(began) + 1), lost=len(lost), doubled=doubled)
