"""Loading the task file in a child: the compact records, the stream, the reload in slices."""

import random

import pytest

from torchcore import config, loadchild, reloading, tasktable
from torchcore.clock import FakeClock
from torchcore.loadchild import StreamError
from torchcore.node import Node

NODE = Node.detect(["10.0.0.5"], hostname="web-1")
BODY = """settings:
  timezone: UTC
tasks:
  - {name: plain, schedule: "*/5 * * * * *", command: "echo hi"}
  - name: full
    schedule: "0 30 2 * * MON-FRI"
    command: [/bin/echo, a, "b c"]
    description: all the fields
    max: 3
    ips: [10.0.0.0/8, "2001:db8::/32"]
    hosts: [web-*]
    timeout: 15m
    kill_grace: 3s
    env: {B: "2", A: x}
    cwd: /tmp
    inherit_env: true
    timezone: Europe/Berlin
    limits: {memory: 512M, cpu: 10m, nofile: 100}
  - {name: daemon, type: daemon, command: "sleep 100", max: 2}
  - {name: boot, schedule: "@reboot", command: "true"}
  - {name: every, schedule: "@every 7s", command: "true"}
  - {name: elsewhere, schedule: "* * * * * *", command: "true", hosts: [db-*]}
  - {name: disabled, schedule: "* * * * * *", command: "true", enabled: false}
"""


@pytest.fixture
def path(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(BODY)
    return str(path)


def frames_of(path):
    verdict, taskfile = loadchild.verdict_of(path, NODE)
    return list(loadchild.stream_frames(taskfile, NODE, verdict))


def test_a_record_decodes_to_an_equal_task_with_the_same_schedule(path):
    taskfile = config.load(path)
    for task in taskfile.local_tasks(NODE):
        back = tasktable.decode(task.name, tasktable.record(task))
        assert back == task
        if task.schedule is not None:
            assert (back.schedule._spec, back.schedule.is_reboot, back.schedule.fixed_time,
                    back.schedule.every, str(back.schedule.tz)) == \
                (task.schedule._spec, task.schedule.is_reboot, task.schedule.fixed_time,
                 task.schedule.every, str(task.schedule.tz))
    table = tasktable.TaskTable.of_tasks(taskfile.local_tasks(NODE))
    assert table.daemons == {"daemon"} and table.reboot == {"boot"}
    assert table.schedule_of("daemon") is None and table.schedule_of("boot") is None


def test_equal_tasks_give_equal_records_whatever_their_line(tmp_path, path):
    moved = tmp_path / "moved.yaml"
    moved.write_text(BODY.replace("tasks:\n", "tasks:\n  - {name: first, schedule: '@daily', "
                                              "command: 'true'}\n"))
    old = {t.name: tasktable.record(t) for t in config.load(path).local_tasks(NODE)}
    new = {t.name: tasktable.record(t) for t in config.load(str(moved)).local_tasks(NODE)}
    assert all(new[name] == old[name] for name in old)


def test_the_stream_round_trips_in_any_chunks(path):
    data = b"".join(frames_of(path))
    expected = tasktable.Loaded.of_taskfile(config.load(path), NODE)
    for seed in range(20):
        rng = random.Random(seed)
        stream, collect = loadchild.Stream(), loadchild.Collector()
        at = 0
        while at < len(data):
            step = rng.randint(1, 40)
            stream.feed(data[at:at + step])
            at += step
            for kind, value in stream.frames():
                collect.take(kind, value)
        stream.finish()
        loaded = collect.loaded(path)
        assert loaded.table.records == expected.table.records
        assert loaded.others == expected.others == {
            "elsewhere": "does not run on this node (it runs on hosts db-*)", "disabled": "is disabled"}
        assert loaded.settings == config.load(path).settings and loaded.digest == expected.digest


def test_a_stream_cut_anywhere_is_a_stream_error_never_a_traceback(path):
    data = b"".join(frames_of(path))
    for cut in range(0, len(data), 7):
        stream = loadchild.Stream()
        stream.feed(data[:cut])
        with pytest.raises(StreamError):
            list(stream.frames())
            stream.finish()


@pytest.mark.parametrize("garbage", [b"X\x00\x00\x00\x01x", b"V\x00\x00\x00\x03abc",
                                     b"T\x00\x00\x00\x02[]", b"V\xff\xff\xff\xff",
                                     b"V\x00\x00\x00\x02[]"])
def test_a_garbled_stream_is_a_stream_error(garbage):
    stream = loadchild.Stream()
    stream.feed(garbage)
    with pytest.raises(StreamError):
        list(stream.frames())
        stream.finish()


def test_a_garbled_task_batch_is_a_rejected_reload(path):
    frames = frames_of(path)
    frames[1] = loadchild.frame(loadchild.TASKS, b"\x00garbage")
    reload = reloading.Reload("test", path, tasktable.TaskTable(), FakeClock())
    reload.feed_frames(frames)
    reload.step()
    assert reload.done and not reload.ready
    assert reload.problems[0].startswith(f"{path}: cannot load: the loading process failed: garbled")


def test_a_rejected_file_gives_the_messages_of_config_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {name: x, schedule: '61 * * * * *', command: x}\n"
                   "  - {name: y, schedule: '* * * * * *', command: x, user: nobody-such-user}\n")
    reload = reloading.in_process("test", str(bad), NODE, tasktable.TaskTable(), FakeClock())
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(bad))
    assert reload.problems == caught.value.problems and not reload.ready
    missing = reloading.in_process("test", str(tmp_path / "none.yaml"), NODE, tasktable.TaskTable(),
                                   FakeClock())
    assert missing.problems == [(f"{tmp_path / 'none.yaml'}: no such task file (give one with -c "
                                 "FILE or $TORCHCORE_TASKS)")]


class TickingClock(FakeClock):
    """Each look at the monotonic clock costs ``cost`` seconds: work measured in clock reads."""

    def __init__(self, cost):
        super().__init__()
        self.cost = cost

    def monotonic(self):
        self.mono += self.cost
        return self.mono


def _big(tmp_path, count, change=None):
    path = tmp_path / "big.yaml"
    lines = ["settings:", "  timezone: UTC", "tasks:"]
    for i in range(count):
        command = f"job {i}" if i != change else "job changed"
        lines.append(f"  - {{name: t{i}, schedule: '{i % 60} {i // 60 % 60} 3 1 1 *', "
                     f"command: '{command}'}}")
    lines.append("  - {name: d, type: daemon, command: 'sleep 1'}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_difference_is_found_in_slices_none_over_the_budget(tmp_path):
    path = _big(tmp_path, 5000)
    running = tasktable.Loaded.of_taskfile(config.load(path), NODE).table
    path = _big(tmp_path, 5000, change=1234)
    clock = TickingClock(cost=reloading.SLICE / 8)    # a look at the clock per CHECK_EVERY records
    reload = reloading.Reload("test", path, running, clock)
    verdict, taskfile = loadchild.verdict_of(path, NODE)
    reload.feed_frames(loadchild.stream_frames(taskfile, NODE, verdict))
    slices = []
    while not reload.done:
        start = clock.mono
        reload.step(start + reloading.SLICE)
        slices.append(clock.mono - start)
    assert reload.ready and len(slices) > 3
    assert max(slices) <= reloading.SLICE + clock.cost     # each ends at its deadline
    assert reload.counts() == {"added": 0, "changed": 1, "removed": 0}
    assert reload.changed == ["t1234"]
    assert reload.table.records["t1"] is running.records["t1"]      # unchanged: shared, not copied
    assert reload.table.daemons == {"d"}


def test_a_record_that_differs_for_an_equal_task_is_no_change(tmp_path, path):
    taskfile = config.load(path)
    running = tasktable.TaskTable.of_tasks(taskfile.local_tasks(NODE))
    import marshal
    kind, spec, fields = marshal.loads(running.records["daemon"])
    running.records["daemon"] = marshal.dumps((kind, spec, fields), 4)   # other bytes, same Task
    reload = reloading.in_process("test", path, NODE, running, FakeClock())
    assert reload.ready and reload.counts() == {"added": 0, "changed": 0, "removed": 0}


class FakeHost:
    """What a Reloader reads of the supervisor, with a fake child."""

    def __init__(self, path):
        self.settings = config.load(path).settings
        self.tasks = tasktable.TaskTable()
        self.planner = None
        self.node = NODE
        self.clock = TickingClock(cost=0.0001)
        self.finished = []
        self.system = self
        self.loads_in_child = True
        self.stopping = False
        self.selector = self
        self.spawned = []

    def spawn_loader(self, path, node, stderr, spare=False):
        import os
        read_fd, write_fd = os.pipe()
        verdict, taskfile = loadchild.verdict_of(path, node)
        data = b"".join(loadchild.stream_frames(taskfile, node, verdict))
        self.spawned.append((read_fd, write_fd, data))
        return 4242 + len(self.spawned), read_fd, None

    def register(self, fd, events, callback):
        pass

    def unregister(self, fd):
        pass

    def kill(self, pid, signum):
        pass

    def finish_reload(self, reload):
        self.finished.append(reload)
        if reload.ready:
            self.tasks = reload.table
        return reload.ready, reload.problems or []


def test_a_reload_asked_for_while_one_is_under_way_comes_after_it(tmp_path, monkeypatch):
    import os
    monkeypatch.setattr(loadchild, "INLINE_BYTES", 0)      # a child for any file
    path = _big(tmp_path, 300)
    host = FakeHost(path)
    reloader = reloading.Reloader(host)
    answers = []
    reloader.request("first", lambda *a: answers.append(("first", a)))
    reloader.request("second", lambda *a: answers.append(("second", a)))
    reloader.request("third", lambda *a: answers.append(("third", a)))
    assert len(host.spawned) == 1 and reloader.pending[0] == "second"
    for number in range(2):
        read_fd, write_fd, data = host.spawned[number]
        os.write(write_fd, data[:5000])
        reloader._readable()
        reloader.work()
        assert reloader.current is not None and not answers[number:]
        os.write(write_fd, data[5000:])
        os.close(write_fd)
        while reloader.current is not None and reloader.current.pid == 4243 + number:
            reloader._readable()
            reloader.work()
    assert [name for name, _ in answers] == ["first", "second", "third"]
    assert all(accepted for _, (accepted, _) in answers)
    first, second = host.finished
    assert first.counts()["added"] == 301 and second.counts() == {"added": 0, "changed": 0,
                                                                   "removed": 0}


def test_a_big_change_is_set_aside_and_taken_whole_keeping_the_wall_memory(tmp_path):
    from torchcore.planner import Planner
    path = _big(tmp_path, 3000)
    running_file = tasktable.Loaded.of_taskfile(config.load(path), NODE)
    planner = Planner()
    planner.reschedule({}, [], [running_file.table.entry(n) for n in running_file.table])
    planner.start(1_767_225_600)
    before = {key: zone.wall_high for key, zone in planner._zones.items()}
    path = tmp_path / "big.yaml"
    path.write_text(path.read_text().replace("command: 'job ", "command: 'task "))
    reload = reloading.Reload("test", str(path), running_file.table, TickingClock(0.00001), planner)
    verdict, taskfile = loadchild.verdict_of(str(path), NODE)
    reload.feed_frames(loadchild.stream_frames(taskfile, NODE, verdict))
    while not reload.done:
        reload.step(reload.clock.mono + reloading.SLICE)
    assert reload.ready and reload.counts()["changed"] == 3000 and reload.aside is not None
    assert len(planner) == 3000 and len(reload.aside) == 3000
    watermark = planner.watermark
    planner.take(reload.aside)
    assert planner.watermark == watermark and len(planner) == 3000
    assert {key: zone.wall_high for key, zone in planner._zones.items()} == before
    assert sorted(planner.peek(1_767_225_600 + 3 * 3600)) == ["t0"]       # Jan 1st, 03:00:00


@pytest.mark.slow     # builds and reads a big task file: seconds, not a unit test
def test_a_big_file_s_settings_are_found_in_its_head_as_the_whole_file_gives_them(tmp_path):
    tasks = "".join(f"  - {{name: t{i}, schedule: '@daily', command: 'job {i} {'x' * 40}'}}\n"
                    for i in range(20000))
    settings = "settings:\n  state_dir: st\n  shutdown_grace: 2m\n  pidfile: run/tc.pid\n"
    for text in (settings + "tasks:\n" + tasks, "tasks:\n" + tasks + settings, "tasks:\n" + tasks):
        path = tmp_path / "big.yaml"
        path.write_text(text)
        assert path.stat().st_size > config.PEEK_WHOLE_BYTES
        assert config.peek_settings(str(path)) == config.load_settings(str(path))


@pytest.mark.parametrize("notify", ["", "    notify: [{to: 'mailto://ops@example.com'}]\n"])
def test_the_services_ask_a_loaded_file_what_they_asked_the_task_file(tmp_path, notify):
    from torchcore import notifyspec
    path = tmp_path / "tasks.yaml"
    path.write_text("settings:\n  timezone: UTC\ntasks:\n  - name: a\n    schedule: '@daily'\n"
                    "    command: 'true'\n" + notify)
    taskfile = config.load(str(path))
    verdict, _ = loadchild.verdict_of(str(path), NODE)
    assert loadchild.settings_of(verdict) == taskfile.settings
    collect = loadchild.Collector()
    for kind, value in _frames_decoded(loadchild.stream_frames(taskfile, NODE, verdict)):
        collect.take(kind, value)
    for loaded in (collect.loaded(str(path)), tasktable.Loaded.of_taskfile(taskfile, NODE)):
        assert notifyspec.asks_for_notifier(loaded, NODE) == \
            notifyspec.asks_for_notifier(taskfile, NODE) == bool(notify)


def _frames_decoded(frames):
    stream = loadchild.Stream()
    for data in frames:
        stream.feed(data)
    yield from stream.frames()


def test_an_unchanged_run_once_task_stays_claimed_after_a_reload(tmp_path):
    path = tmp_path / "tasks.yaml"
    text = ("settings:\n  fleet: {database: 'postgresql://tc@db/fleet'}\ntasks:\n"
            "  - {name: once, schedule: '@daily', command: x, run: once}\n"
            "  - {name: each, schedule: '@daily', command: y}\n")
    path.write_text(text)
    running = tasktable.Loaded.of_taskfile(config.load(str(path)), NODE).table
    assert running.once == {"once"}
    path.write_text(text.replace("command: y", "command: z"))
    reload = reloading.Reload("test", str(path), running, FakeClock(1000.0))
    verdict, taskfile = loadchild.verdict_of(str(path), NODE)
    reload.feed_frames(loadchild.stream_frames(taskfile, NODE, verdict))
    reload.step()
    assert reload.ready and reload.counts() == {"added": 0, "changed": 1, "removed": 0}
    assert reload.table.once == {"once"}
