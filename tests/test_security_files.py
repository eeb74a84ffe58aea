"""Every file torchcore writes in log_dir and state_dir, with something planted at its name.

One table row per file (task log, each rotated backup, the rotation lock, the daemon's log,
the records database and its -wal/-shm/-journal, the pidfile, the control socket), crossed
with every plant (a symlink to a victim file, a dangling symlink, a hard link to the victim, a
FIFO): the writer must refuse or step around it (a task's output is dropped and counted, never
raised), the victim must stay byte-for-byte and mode-for-mode as it was, and a dangling
link's target must not be created. The directories themselves are covered by
test_safepaths.py, the same attacks by a real second user in test_security_users.py.
"""

import logging
import os
import stat

import pytest

from torchcore import records, safepaths
from torchcore.errors import TorchcoreError
from torchcore.pidfile import Pidfile
from torchcore.tasklog import TaskLog

BACKUPS = 3


def run_task_log(directory):
    """Write enough output to rotate the task's log several times; never raises."""
    log = TaskLog(str(directory), "t", 7, 200, BACKUPS)
    for index in range(40):
        log.write("out", f"line {index} {'x' * 40}\n".encode())
    log.close()


def open_daemon_log(directory):
    handler = safepaths.log_file_handler(str(directory / "torchcore.log"))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    handler.emit(record)
    handler.close()


def open_records(directory):
    db = records.Records(str(directory / "torchcore.db"))
    db.close()


def take_pidfile(directory):
    Pidfile(str(directory / "torchcore.pid")).acquire().release()


def serve_control(directory):
    from torchcore.control import ControlServer

    os.chmod(directory, 0o700)
    ControlServer(str(directory / "control.sock"), object()).close()


# (planted name, what writes it, whether the writer survives by design: task output is
# dropped and counted; everything else refuses with an error)
FILES = [("t.log", run_task_log, True)] + \
    [(f"t.log.{n}", run_task_log, True) for n in range(1, BACKUPS + 2)] + \
    [("t.log.lock", run_task_log, True),
     ("torchcore.log", open_daemon_log, False),
     ("torchcore.db", open_records, False),
     ("torchcore.db-wal", open_records, False),
     ("torchcore.db-shm", open_records, False),
     ("torchcore.db-journal", open_records, False),
     ("torchcore.pid", take_pidfile, False),
     ("control.sock", serve_control, False)]


def plant_symlink(path, victim):
    os.symlink(victim, path)


def plant_dangling_symlink(path, victim):
    os.symlink(str(victim) + ".created", path)


def plant_relative_symlink(path, victim):
    os.symlink(os.path.relpath(victim, os.path.dirname(path)), path)


def plant_hard_link(path, victim):
    os.link(victim, path)


def plant_fifo(path, victim):
    os.mkfifo(path, 0o666)


PLANTS = [plant_symlink, plant_dangling_symlink, plant_relative_symlink, plant_hard_link,
          plant_fifo]


def snapshot(path):
    info = os.stat(path)
    with open(path, "rb") as handle:
        return handle.read(), stat.S_IMODE(info.st_mode), info.st_mtime_ns, info.st_size


@pytest.mark.parametrize("plant", PLANTS, ids=lambda f: f.__name__[6:])
@pytest.mark.parametrize("name, writer, survives", FILES, ids=[row[0] for row in FILES])
def test_a_planted_file_is_never_followed(tmp_path, name, writer, survives, plant, capsys):
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o750)
    victim = tmp_path / "victim"
    victim.write_bytes(b"root:secret:0:0\n")
    os.chmod(victim, 0o600)
    before = snapshot(victim)
    plant(directory / name, victim)
    if survives:
        writer(directory)               # a task must not die of its log
    else:
        with pytest.raises((TorchcoreError, OSError)) as caught:
            writer(directory)
        assert name.split("-")[0] in str(caught.value) or "control.sock" in str(caught.value)
    assert snapshot(victim) == before
    assert not os.path.exists(str(victim) + ".created")


def test_task_output_goes_on_beside_planted_backups(tmp_path):
    """Links planted as every backup are moved or replaced by rotation, never written through."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep\n")
    before = snapshot(victim)
    directory = tmp_path / "logs"
    directory.mkdir()
    for n in range(1, BACKUPS + 2):
        os.symlink(victim, directory / f"t.log.{n}")
    run_task_log(directory)
    assert snapshot(victim) == before
    current = directory / "t.log"
    assert stat.S_ISREG(os.lstat(current).st_mode) and b"line 39" in current.read_bytes()


def test_files_are_created_with_the_documented_modes(tmp_path):
    old = os.umask(0)
    try:
        run_task_log(tmp_path)
        open_daemon_log(tmp_path)
        open_records(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes["t.log"] == modes["t.log.1"] == modes["t.log.lock"] == 0o640
    assert modes["torchcore.log"] == 0o640
    assert modes["torchcore.db"] == 0o600
    assert all(mode == 0o600 for name, mode in modes.items() if name.startswith("torchcore.db"))


def test_existing_looser_files_are_tightened(tmp_path):
    for name in ("t.log", "torchcore.log", "torchcore.db"):
        (tmp_path / name).write_bytes(b"")
        os.chmod(tmp_path / name, 0o666)
    run_task_log(tmp_path)
    open_daemon_log(tmp_path)
    open_records(tmp_path)
    assert stat.S_IMODE((tmp_path / "t.log.1").stat().st_mode) == 0o640     # rotated away
    assert stat.S_IMODE((tmp_path / "torchcore.log").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "torchcore.db").stat().st_mode) == 0o600
