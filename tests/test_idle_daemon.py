"""Idle means idle, on the real daemon: a changed task file is heard at once (inotify), a
wall-clock step while the loop sleeps long is planned as before, and an idle daemon wakes a
few times a minute, not every second.
"""

import os
import re
import time

import pytest
from daemon_harness import wait_for
from test_faults_daemon import FAKETIME_LIBS, FakeWall, started

pytestmark = pytest.mark.process

FAR = "tasks:\n  - {name: far, schedule: '0 0 3 1 1 *', command: 'true'}\n"


def _reloads(d):
    return d.log.count("reloaded (file changed)")


def test_a_changed_file_reloads_an_idle_daemon_at_once(daemons, tmp_path):
    d = daemons(FAR).start()
    time.sleep(1.5)                                 # into its long sleep
    releases = tmp_path / "releases"
    releases.mkdir()
    took = []

    def changed(count, change):
        begun = time.monotonic()
        change()
        wait_for(lambda: _reloads(d) >= count, 5, "the reload")
        took.append(time.monotonic() - begun)

    body = FAR + "  - {name: t%d, schedule: '0 0 3 1 1 *', command: 'true'}\n"
    changed(1, lambda: d.write(body % 1))                       # an atomic rename
    with open(d.path, "a") as handle:                           # an edit in place
        handle.write("  - {name: t9, schedule: '0 0 3 1 1 *', command: 'true'}\n")
    wait_for(lambda: _reloads(d) >= 2, 5, "the reload of the edit")
    (releases / "v3.yaml").write_text(open(d.path).read().replace("t1", "t3"))
    os.symlink(releases / "v3.yaml", d.path + ".new")           # a symlink swapped in
    changed(3, lambda: os.replace(d.path + ".new", d.path))
    (releases / "v3.yaml").write_text(open(d.path).read().replace("t3", "t4"))   # its target
    wait_for(lambda: _reloads(d) >= 4, 5, "the reload of the target's edit")
    assert max(took) < 0.5, took                    # heard, not polled (once a second)
    assert "by polling" not in d.log
    assert d.stop() == 0


@pytest.mark.slow
def test_an_idle_daemon_wakes_a_few_times_a_minute(daemons):
    d = daemons(FAR).start()
    time.sleep(62)                                  # one stats line, with its count of wakes
    wakes = int(re.search(r"stats: .* wakes=(\d+)", d.log).group(1))
    assert wakes <= 20, wakes       # MAX_SLEEP 10 s, the stats line, the start (was ~120: twice a second)
    assert d.stop() == 0


@pytest.mark.slow
@pytest.mark.skipif(not FAKETIME_LIBS, reason="libfaketime is not installed (Debian package "
                    "`faketime`; tests/setup-system.sh installs it)")
def test_a_wall_clock_step_during_the_idle_sleep_is_noticed_and_planned(daemons, monkeypatch):
    """libfaketime moves the daemon's wall clock only (the kernel's timerfd cannot hear it): the
    step is seen at the next wake, 10 s later at most, as the wall and monotonic clocks parting;
    the hourly run comes on time at its second, and the step is logged as one."""
    d = daemons("tasks:\n  - {name: hourly, schedule: '0 0 * * * *', command: 'true'}\n")
    hour = (int(time.time()) // 3600 + 5) * 3600
    wall = FakeWall(d.dir, hour - 300 - int(time.time()))     # 5 min before a full hour
    for key, value in wall.env.items():
        monkeypatch.setenv(key, value)
    d.start()
    time.sleep(2)
    wall.step(+260)                                            # 40 s before the hour, nearly
    wait_for(lambda: "s were skipped (stall or clock step)" in d.log, 15, "the step in the log")
    wait_for(lambda: started(d.runs("hourly")), 60, "the hourly run")
    run = started(d.runs("hourly"))[0]
    assert run["scheduled"] == hour and not run["missed"]
    assert run["started"] - hour < 1.0                         # on time, not caught up late
    skipped = int(re.search(r"(\d+)s were skipped", d.log).group(1))
    assert 255 <= skipped <= 262
    assert d.stop() == 0
