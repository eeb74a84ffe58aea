"""The loading child for real: its stream, its death, and a big reload that stops no clock."""

import os
import signal
import subprocess
import sys
import time

import pytest
from daemon_harness import wait_for

from torchcore import config, loadchild, tasktable
from torchcore.loadchild import StreamError
from torchcore.node import Node

pytestmark = pytest.mark.process

NODE = Node.detect(["10.9.9.9"], hostname="test-node")


def _read_all(fd):
    data = bytearray()
    while True:
        wait_for(lambda: _readable(fd), 30, "the loading child's stream")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return bytes(data)
        data += chunk


def _readable(fd):
    import select
    return select.select([fd], [], [], 0.05)[0]


def _file(tmp_path, count):
    lines = ["settings:", "  timezone: UTC", "  state_dir: state", "tasks:"]
    lines += [f"  - {{name: t{i}, schedule: '{i % 60} {i // 60 % 60} 3 1 1 *', command: 'job {i}'}}"
              for i in range(count)]
    path = tmp_path / "tasks.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_child_streams_what_config_load_finds(tmp_path):
    path = _file(tmp_path, 3000)
    pid, fd, _ = loadchild.spawn(path, NODE)
    try:
        data = _read_all(fd)
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    stream, collect = loadchild.Stream(), loadchild.Collector()
    stream.feed(data)
    for kind, value in stream.frames():
        collect.take(kind, value)
    stream.finish()
    expected = tasktable.Loaded.of_taskfile(config.load(path), NODE)
    assert collect.loaded(path).table.records == expected.table.records


def test_a_child_killed_mid_load_is_a_rejection_at_start_never_a_traceback(tmp_path):
    path = _file(tmp_path, 20000)
    pid, fd, _ = loadchild.spawn(path, NODE)
    os.kill(pid, signal.SIGKILL)
    try:
        data = _read_all(fd)
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    stream = loadchild.Stream()
    stream.feed(data)
    with pytest.raises(StreamError):
        list(stream.frames())
        stream.finish()


def test_start_says_what_is_wrong_with_the_file_as_before(tmp_path):
    (tmp_path / "tasks.yaml").write_text("tasks:\n  - {name: x, schedule: '61 * * * * *', command: x}\n")
    out = subprocess.run([sys.executable, "-m", "torchcore", "start", "--foreground", "-c",
                          "tasks.yaml"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env=dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9"))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "tasks.yaml:2: task 'x': schedule: second: value 61 is out of range 0-59" in out.stderr


@pytest.mark.slow
def test_a_reload_of_a_big_file_does_not_delay_an_every_second_task(tmp_path):
    count = 20000
    ticks = tmp_path / "ticks"
    lines = ["settings:", "  timezone: UTC", "  state_dir: state", "  watch: false", "tasks:",
             f"  - {{name: tick, schedule: '* * * * * *', command: 'date +%s.%N >> {ticks}'}}"]

    def write(changed):
        body = [f"  - {{name: t{i}, schedule: '{i % 60} {i // 60 % 60} 3 1 1 *', "
                f"command: 'job {i}{' changed' if i == changed else ''}'}}" for i in range(count)]
        (tmp_path / "tasks.yaml").write_text("\n".join(lines + body) + "\n")

    write(None)
    env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9")
    err = open(tmp_path / "daemon.err", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "torchcore", "start", "--foreground", "-c",
                               "tasks.yaml"], cwd=tmp_path, env=env, stderr=err,
                              stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: "torchcore started" in (tmp_path / "daemon.err").read_text(), 60,
                 "the daemon's start")
        time.sleep(3)
        first = int(time.time())
        write(77)
        out = subprocess.run([sys.executable, "-m", "torchcore", "reload", "-c", "tasks.yaml"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert out.returncode == 0 and "0 added, 1 changed, 0 removed" in out.stdout, out
        time.sleep(4)
        last = int(time.time()) - 1
        with open(tmp_path / "tasks.yaml", "a") as handle:
            handle.write("  - {name: bad, schedule: '61 * * * * *', command: x}\n")
        out = subprocess.run([sys.executable, "-m", "torchcore", "reload", "-c", "tasks.yaml"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert f"tasks.yaml:{count + 7}: task 'bad': schedule: second: value 61 is out of range" \
            in out.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        err.close()
    seconds = {}
    for line in ticks.read_text().split():
        seconds.setdefault(int(float(line)), []).append(float(line) % 1)
    window = range(first, last)
    assert [s for s in window if s not in seconds] == []            # none missed or coalesced
    assert max(min(seconds[s]) for s in window) < 0.5               # generous: a shared machine
    assert "reloaded (control request)" in (tmp_path / "daemon.err").read_text()
