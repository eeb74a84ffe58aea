"""The loop's wake-ups from outside: the task file watched by inotify (and by polling where
inotify cannot be had), the wall clock's steps heard through a timerfd; and the C core's
search for the next second that fires, against matching second by second.
"""

import errno
import os
import random
import selectors
import time
from datetime import datetime, timedelta

import pytest
from supervisor_harness import rewrite

from torchcore import watch
from torchcore.clock import FakeClock
from torchcore.schedule import Schedule, ScheduleTable

FAR = "tasks:\n  - {name: far, schedule: '0 0 3 1 1 *', command: x}\n"
EVERY_BODY = "  - {name: every, schedule: '* * * * * *', command: x}\n"


@pytest.fixture
def watched(tmp_path):
    """A FileWatch on tmp_path/dir/tasks.yaml, started on a selector of its own."""
    directory = tmp_path / "dir"
    directory.mkdir()
    path = directory / "tasks.yaml"
    path.write_text("one\n")
    selector = selectors.DefaultSelector()
    file_watch = watch.FileWatch(str(path), FakeClock())
    file_watch.start(selector)
    assert file_watch.due()         # the first look: whatever changed before the watch began
    yield file_watch, path, selector
    file_watch.stop()
    selector.close()


def _replace(path, text):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def test_inotify_hears_an_edit_in_place_when_its_writer_closes_the_file(watched):
    file_watch, path, selector = watched
    assert file_watch.mode == "inotify" and not file_watch.due()
    with open(path, "w") as handle:
        handle.write("two")
        handle.flush()
        assert not file_watch.due()     # still being written: not looked at half written
    assert selector.select(0)           # the loop wakes...
    assert file_watch.due()             # ...and looks
    assert not file_watch.due()


def test_inotify_hears_an_atomic_rename_a_removal_and_a_new_file(watched):
    file_watch, path, _ = watched
    _replace(path, "two\n")
    assert file_watch.due() and not file_watch.due()
    os.unlink(path)
    assert file_watch.due()
    with open(path, "w") as handle:     # created: looked at once written, not before
        assert not file_watch.due()
        handle.write("three\n")
    assert file_watch.due()


def test_inotify_ignores_the_other_files_of_the_directory(watched):
    file_watch, path, _ = watched
    (path.parent / "other.yaml").write_text("x")
    _replace(path.parent / "other2.yaml", "y")
    assert not file_watch.due()


def test_inotify_hears_symlink_swaps_and_edits_of_the_target_elsewhere(tmp_path):
    releases = tmp_path / "releases"
    releases.mkdir()
    (releases / "a.yaml").write_text("a\n")
    (releases / "b.yaml").write_text("b\n")
    link = tmp_path / "tasks.yaml"
    link.symlink_to(releases / "a.yaml")
    selector = selectors.DefaultSelector()
    file_watch = watch.FileWatch(str(link), FakeClock())
    file_watch.start(selector)
    try:
        assert file_watch.due() and not file_watch.due()
        (releases / "a.yaml").write_text("a2\n")            # the target, in another directory
        assert file_watch.due()
        tmp = tmp_path / "tasks.yaml.new"                    # ln -s b new && mv -T new tasks.yaml
        tmp.symlink_to(releases / "b.yaml")
        os.replace(tmp, link)
        assert file_watch.due() and not file_watch.due()
        (releases / "a.yaml").write_text("a3\n")            # no longer the target
        assert not file_watch.due()
        (releases / "b.yaml").write_text("b2\n")            # the new one is watched
        assert file_watch.due()
        os.unlink(link)                                      # ln -sf: unlink, then symlink
        link.symlink_to(releases / "a.yaml")
        assert file_watch.due()
    finally:
        file_watch.stop()
        selector.close()


def test_a_safety_look_comes_every_so_often_while_inotify_watches(watched):
    file_watch, _, _ = watched
    assert not file_watch.due()
    file_watch.clock.advance(watch.SAFETY_POLL)
    assert file_watch.due() and not file_watch.due()
    assert file_watch.next_look() == file_watch.clock.monotonic() + watch.SAFETY_POLL


@pytest.mark.parametrize("where, code", [("_inotify_open", errno.EMFILE),
                                         ("_inotify_add", errno.ENOSPC),
                                         ("_inotify_open", errno.ENOSYS)])
def test_without_inotify_the_watch_polls_on_every_pass(tmp_path, monkeypatch, caplog, where, code):
    def refuse(*args):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(watch, where, refuse)
    path = tmp_path / "tasks.yaml"
    path.write_text("x")
    selector = selectors.DefaultSelector()
    file_watch = watch.FileWatch(str(path), FakeClock())
    file_watch.start(selector)
    try:
        assert file_watch.mode == "poll" and file_watch.polling and file_watch.fd is None
        assert file_watch.due() and file_watch.due()             # every pass looks
        assert file_watch.next_look() is None
        assert "by polling it every second" in caplog.text
        if code != errno.ENOSYS:
            assert "max_user_" in caplog.text
    finally:
        file_watch.stop()
        selector.close()


# ---- the supervisor: a change of the file reloads at once, by inotify or by polling ----------

def _loop_until_reloaded(sup, timeout=3.0):
    """Real passes of the loop (real sleeps, the fake clock still): seconds until it reloaded."""
    start = time.monotonic()
    while sup.last_reload is None and time.monotonic() - start < timeout:
        sup.loop_once()
    return time.monotonic() - start


@pytest.mark.parametrize("how", ["edit", "rename", "symlink"])
def test_a_changed_file_wakes_the_sleeping_loop_and_reloads_it(make, how):
    sup = make(FAR)
    sup.clock.advance(0.5)
    sup.loop_once()                             # the watch begins (and looks once)
    assert sup.filewatch.mode == "inotify"
    assert sup._sleep_time() > 5                # nothing due: the loop would sleep long
    path = sup.settings.path
    if how == "edit":
        rewrite(sup, FAR + EVERY_BODY)
    elif how == "rename":
        _replace(path, open(path).read() + EVERY_BODY)
    else:
        target = path + ".v2"
        with open(target, "w") as handle:
            handle.write(open(path).read() + EVERY_BODY)
        os.symlink(target, path + ".new")
        os.replace(path + ".new", path)
    took = _loop_until_reloaded(sup)
    assert sup.last_reload and sup.last_reload[1] is True and "every" in sup.tasks
    assert took < 1.0                           # woken by inotify, not by the sleep's end


@pytest.mark.slow     # waits out real timeouts: not a unit test
def test_without_inotify_the_loop_polls_the_file_each_second(make, monkeypatch):
    def refuse():
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(watch, "_inotify_open", refuse)
    sup = make(FAR)
    sup.clock.advance(0.5)
    sup.loop_once()
    assert sup.filewatch.polling
    assert sup._sleep_time() <= 1.0006          # the fallback: a look every second, as before
    rewrite(sup, FAR + EVERY_BODY)
    sup.clock.advance(1)
    sup.loop_once()
    assert sup.last_reload and sup.last_reload[1] is True and "every" in sup.tasks


def test_watch_false_watches_nothing(make):
    sup = make("  watch: false\n" + FAR)
    sup.loop_once()
    assert sup.filewatch.mode == "off" and sup.filewatch.fd is None


# ---- the clock watch ---------------------------------------------------------------------------

def test_the_clock_watch_is_armed_and_quiet_until_the_clock_is_set(monkeypatch):
    selector = selectors.DefaultSelector()
    clock_watch = watch.ClockWatch()
    clock_watch.open(selector)
    try:
        assert clock_watch.fd is not None
        assert selector.select(0) == []         # armed a year ahead: nothing to hear
        clock_watch.on_event()                  # a spurious wake reads nothing
        assert clock_watch.sets == 0

        def cancelled(fd, size):
            raise OSError(errno.ECANCELED, "Operation canceled")
        monkeypatch.setattr(os, "read", cancelled)
        clock_watch.on_event()                  # what read() says when the clock was set
        monkeypatch.undo()
        assert clock_watch.sets == 1 and clock_watch.fd is not None
        assert selector.select(0) == []         # armed again
    finally:
        clock_watch.close()
        selector.close()


def test_the_supervisor_listens_to_the_clock_watch(make):
    sup = make(FAR)
    assert sup.clockwatch.fd is not None
    assert sup.clockwatch.fd in {key.fd for key in sup.selector.get_map().values()}


# ---- the C core: the next second that fires ---------------------------------------------------

SPECS = ["0 0 3 1 1 *", "*/7 * * * * *", "30 15 * * * *", "0 0 0 29 2 *", "0 0 12 L * *",
         "0 30 2 * * 0", "@every 13s", "@every 3600s", "5 5 5 * * 5L", "0 0 0 * * 1#2",
         "0 0 9 1-7 * 1", "59 59 23 31 12 *", "0 * * * * *"]


def test_first_match_agrees_with_matching_each_second():
    rng = random.Random(15)
    for _ in range(40):
        table = ScheduleTable("UTC")
        for i, spec in enumerate(rng.sample(SPECS, rng.randint(1, 3))):
            table.set(i, Schedule(spec, "UTC"))
        start = datetime(2026, 1, 1) + timedelta(seconds=rng.randint(0, 800 * 86400))
        limit = rng.choice([1, 59, 3600, 7200])
        expected = next((k for k in range(limit) if table.match(start + timedelta(seconds=k))),
                        None)
        assert table.first_match(start, limit) == expected


def test_first_match_passes_an_idle_year_whole_and_stops_at_year_9999():
    table = ScheduleTable("UTC")
    for i in range(5000):
        table.set(i, Schedule(f"{i % 60} {i // 60 % 60} 3 1 1 *", "UTC"))
    start = datetime(2026, 1, 2)
    begun = time.perf_counter()
    ahead = table.first_match(start, 400 * 86400)
    assert time.perf_counter() - begun < 0.05
    assert start + timedelta(seconds=ahead) == datetime(2027, 1, 1, 3, 0, 0)
    assert table.first_match(datetime(9999, 12, 31, 23, 59), 86400) is None
    assert ScheduleTable("UTC").first_match(start, 86400) is None       # an empty table
