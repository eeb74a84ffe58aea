"""Breaking the real daemon on purpose: clock steps, stops, kills, reload storms, garbage.

Each test checks the promises of the README's "Semantics" section through the records
database and records what it tried in the suite's figure table (tests/conftest.py).
"""

import glob
import os
import re
import signal
import socket
import time
from datetime import datetime, timezone

import psutil
import pytest

from daemon_harness import Daemon, processes_with, wait_for

FAKETIME_LIBS = glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + \
    glob.glob("/usr/lib/faketime/libfaketime.so.1")


@pytest.fixture
def daemons(tmp_path):
    made = []

    def factory(body, settings=""):
        directory = tmp_path / f"d{len(made)}"
        directory.mkdir()
        made.append(Daemon(directory, body, settings))
        return made[-1]

    yield factory
    for daemon in made:
        daemon.kill()


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
