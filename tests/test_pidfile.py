"""Pidfile: real processes contending for one flock."""

import os
import subprocess
import sys
import textwrap

import pytest

from torchcore import pidfile as pidfile_mod
from torchcore.errors import DaemonError
from torchcore.pidfile import AlreadyRunning, Pidfile, pid_alive_and_locked, read_pid

pytestmark = pytest.mark.process

# A contender: try to acquire, say how it went, hold until stdin closes.
CONTENDER = textwrap.dedent("""
    import sys
    from torchcore.pidfile import AlreadyRunning, Pidfile
    pf = Pidfile(sys.argv[1])
    try:
        pf.acquire()
        print("won", flush=True)
    except AlreadyRunning as exc:
        print("lost", exc.pid, flush=True)
    sys.stdin.read()
    pf.release()
""")


def start_contender(path):
    return subprocess.Popen([sys.executable, "-c", CONTENDER, str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def finish(proc):
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def holder(tmp_path):
    """A separate process holding tmp_path/run/tc.pid."""
    path = tmp_path / "run" / "tc.pid"
    proc = start_contender(path)
    assert proc.stdout.readline().strip() == "won"
    yield proc, path
    finish(proc)


def test_acquire_writes_pid_and_creates_parent(tmp_path):
    path = tmp_path / "a" / "b" / "tc.pid"
    pf = Pidfile(path).acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    assert (path.stat().st_mode & 0o777) == 0o644 & ~current_umask()
    pf.release()
    assert not path.exists()


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_second_acquire_refused_with_pid_in_message(holder):
    proc, path = holder
    with pytest.raises(AlreadyRunning) as info:
        Pidfile(path).acquire()
    assert info.value.pid == proc.pid
    assert str(info.value) == f"torchcore is already running (pid {proc.pid}, pidfile {path})"
    assert isinstance(info.value, DaemonError)
    assert path.read_text() == f"{proc.pid}\n"  # the refused start truncated nothing


def test_same_process_twice_is_refused(tmp_path):
    pf = Pidfile(tmp_path / "tc.pid").acquire()
    with pytest.raises(DaemonError, match="already held"):
        pf.acquire()
    with pytest.raises(AlreadyRunning):
        Pidfile(tmp_path / "tc.pid").acquire()
    pf.release()


def test_stale_pidfile_taken_over(tmp_path):
    path = tmp_path / "tc.pid"
    path.write_text(f"{dead_pid()}\n")
    assert pid_alive_and_locked(path) is None
    pf = Pidfile(path).acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    pf.release()


def test_garbage_pidfile_taken_over(tmp_path):
    path = tmp_path / "tc.pid"
    path.write_bytes(b"\xff not a pid " * 20)
    assert read_pid(path) is None
    with Pidfile(path):
        assert read_pid(path) == os.getpid()


def test_ten_concurrent_acquirers_exactly_one_wins(tmp_path):
    path = tmp_path / "tc.pid"
    procs = [start_contender(path) for _ in range(10)]
    results = [proc.stdout.readline().split() for proc in procs]
    winners = [proc for proc, res in zip(procs, results) if res == ["won"]]
    assert len(winners) == 1, results
    winner = winners[0].pid
    losers = [res for res in results if res != ["won"]]
    assert all(res == ["lost", str(winner)] for res in losers), results
    assert read_pid(path) == winner
    assert pid_alive_and_locked(path) == winner
    for proc in procs:
        finish(proc)
    assert not path.exists()


def test_symlink_refused(tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    path = tmp_path / "tc.pid"
    path.symlink_to(target)
    with pytest.raises(DaemonError, match="symbolic link"):
        Pidfile(path).acquire()
    assert target.read_text() == "precious\n"
    dangling = tmp_path / "dangling.pid"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(DaemonError, match="symbolic link"):
        Pidfile(dangling).acquire()
    assert not (tmp_path / "nowhere").exists()


def test_unopenable_pidfile_is_a_clear_error(tmp_path):
    path = tmp_path / "adir"
    path.mkdir()
    with pytest.raises(DaemonError, match=f"cannot open pidfile {path}"):
        Pidfile(path).acquire()


def test_release_leaves_a_replaced_file(tmp_path):
    path = tmp_path / "tc.pid"
    pf = Pidfile(path).acquire()
    path.unlink()
    path.write_text(f"{os.getpid()}\n")  # same content, another inode
    pf.release()
    assert path.exists()


def test_release_leaves_a_file_with_another_pid(tmp_path):
    path = tmp_path / "tc.pid"
    pf = Pidfile(path).acquire()
    path.write_text("12345\n")  # same inode, rewritten
    pf.release()
    assert path.read_text() == "12345\n"
    assert pid_alive_and_locked(path) is None  # released: nobody holds it


def test_release_in_forked_child_only_closes(tmp_path):
    path = tmp_path / "tc.pid"
    pf = Pidfile(path).acquire()
    child = os.fork()
    if child == 0:
        try:
            pf.release()
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    assert read_pid(path) == os.getpid()
    assert pid_alive_and_locked(path) == os.getpid()
    pf.release()
    assert not path.exists()


def test_fd_is_close_on_exec(tmp_path):
    path = tmp_path / "tc.pid"
    pf = Pidfile(path).acquire()
    assert os.get_inheritable(pf.fd) is False
    listing = subprocess.run(
        ["sh", "-c", 'for f in /proc/$$/fd/*; do readlink "$f"; done; true'],
        close_fds=False, capture_output=True, text=True, check=True).stdout
    assert str(tmp_path) in os.readlink(f"/proc/self/fd/{pf.fd}")
    assert str(path) not in listing
    pf.release()


def test_lock_survives_child_exit_and_is_free_after_holder_dies(tmp_path):
    path = tmp_path / "tc.pid"
    proc = start_contender(path)
    assert proc.stdout.readline().strip() == "won"
    assert pid_alive_and_locked(path) == proc.pid
    proc.kill()
    proc.wait()
    assert read_pid(path) == proc.pid  # left behind: stale
    assert pid_alive_and_locked(path) is None
    with Pidfile(path):
        assert pid_alive_and_locked(path) == os.getpid()


def test_file_unlinked_between_open_and_lock_is_reopened(tmp_path, monkeypatch):
    path = tmp_path / "tc.pid"
    real_lock = pidfile_mod.lock_with_patience
    calls = []

    def racing_lock(fd, operation, patience=pidfile_mod.LOCK_PATIENCE):
        calls.append(fd)
        if len(calls) == 1:  # a rival removes the file and creates its own
            path.unlink()
            path.write_text("777\n")
        return real_lock(fd, operation, patience)

    monkeypatch.setattr(pidfile_mod, "lock_with_patience", racing_lock)
    pf = Pidfile(path).acquire()
    assert len(calls) == 2
    assert path.read_text() == f"{os.getpid()}\n"
    pf.release()


def test_probe_helpers_on_missing_file(tmp_path):
    assert read_pid(tmp_path / "none.pid") is None
    assert pid_alive_and_locked(tmp_path / "none.pid") is None


SLOW_WRITER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
    sys.stdin.read()
""")


def test_refusal_names_the_new_holder_not_the_dead_predecessor(tmp_path, monkeypatch):
    real_lock = pidfile_mod.lock_with_patience
    monkeypatch.setattr(pidfile_mod, "lock_with_patience",
                        lambda fd, operation: real_lock(fd, operation, patience=0))
    monkeypatch.setattr(pidfile_mod, "LOCK_PATIENCE", 5.0)  # generous wait for the pid
    path = tmp_path / "tc.pid"
    path.write_text(f"{dead_pid()}\n")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"  # locked, old pid still in the file
    with pytest.raises(AlreadyRunning) as info:
        Pidfile(path).acquire()
    assert info.value.pid == proc.pid
    finish(proc)


# ---- find_daemon: who may be signalled ---------------------------------------------------------

# A stand-in supervisor: titled as one, holding the pidfile until stdin closes or SIGTERM.
TITLED = textwrap.dedent("""
    import sys, setproctitle
    from torchcore.pidfile import Pidfile
    if sys.argv[2] == "titled":
        setproctitle.setproctitle("torchcore: supervisor tasks.yaml (1 tasks, 0 running)")
    pf = Pidfile(sys.argv[1]).acquire()
    print("won", flush=True)
    sys.stdin.read()
""")


def start_holder(path, titled):
    proc = subprocess.Popen([sys.executable, "-c", TITLED, str(path), titled],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "won"
    return proc


def stop_holder(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_find_daemon_signals_a_titled_holder_through_its_pidfd(tmp_path):
    path = tmp_path / "tc.pid"
    proc = start_holder(path, "titled")
    try:
        daemon = pidfile_mod.find_daemon(path)
        assert daemon is not None and daemon.pid == proc.pid
        with daemon:
            assert not daemon.wait(0.1)
            assert daemon.signal(15)
            assert daemon.wait(10)
        assert proc.wait(10) == -15
    finally:
        stop_holder(proc)


def test_find_daemon_on_a_missing_or_stale_pidfile_is_none(tmp_path):
    assert pidfile_mod.find_daemon(tmp_path / "none" / "tc.pid") is None
    (tmp_path / "stale.pid").write_text(f"{os.getpid()}\n")
    assert pidfile_mod.find_daemon(tmp_path / "stale.pid") is None


def test_a_lock_holder_that_is_not_torchcore_is_refused(tmp_path):
    path = tmp_path / "tc.pid"
    proc = start_holder(path, "untitled")       # `python -c ...`: not a torchcore supervisor
    try:
        with pytest.raises(DaemonError, match="is not a torchcore supervisor"):
            pidfile_mod.find_daemon(path)
        assert proc.poll() is None
    finally:
        stop_holder(proc)


def test_a_pid_that_does_not_hold_the_lock_is_refused(tmp_path):
    path = tmp_path / "tc.pid"
    proc = start_holder(path, "titled")
    victim = subprocess.Popen(["sleep", "60"])
    try:
        path.write_text(f"{victim.pid}\n")      # the file now names another process
        with pytest.raises(DaemonError, match=rf"names pid {victim.pid}, which does not hold "
                                              rf"its lock \(held by {proc.pid}\)"):
            pidfile_mod.find_daemon(path)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
        stop_holder(proc)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a holder as another uid")
def test_a_holder_running_as_another_user_is_refused(tmp_path):
    path = tmp_path / "tc.pid"
    path.write_text("")
    read_end, write_end = os.pipe()             # the child says it holds the lock
    hold_r, hold_w = os.pipe()                  # and holds it until this end closes
    child = os.fork()
    if child == 0:                              # open as root, then become nobody and lock
        try:
            os.close(read_end)
            os.close(hold_w)
            fd = os.open(path, os.O_RDONLY)
            os.setgid(65534)
            os.setuid(65534)
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(write_end, b"x")
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    try:
        os.close(write_end)
        os.close(hold_r)
        assert os.read(read_end, 1) == b"x"
        path.write_text(f"{child}\n")
        with pytest.raises(DaemonError, match="runs as uid 65534"):
            pidfile_mod.find_daemon(path)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(read_end)
        os.close(hold_w)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the pidfile to another user")
def test_a_pidfile_of_another_user_is_refused_by_start_and_stop(tmp_path):
    path = tmp_path / "tc.pid"
    path.write_text(f"{os.getpid()}\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(DaemonError, match="is owned by uid 65534"):
        pidfile_mod.find_daemon(path)
    with pytest.raises(DaemonError, match="is owned by uid 65534"):
        Pidfile(path).acquire()
    assert path.read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("words, expected", [
    (["torchcore: supervisor tasks.yaml (3 tasks, 0 running)"], True),
    (["/usr/bin/python3", "-m", "torchcore", "start", "--foreground"], True),
    (["/srv/venv/bin/torchcore", "restart", "-c", "t.yaml"], True),
    (["/srv/venv/bin/torchcore", "status"], False),
    (["flock", "/run/torchcore.pid", "sleep", "60"], False),
    (["sh", "-c", "torchcore start"], False),
    (["torchcore: launcher"], False),
    ([], False),
])
def test_what_counts_as_a_supervisor(words, expected):
    assert pidfile_mod.is_supervisor_command(words) is expected
