"""The daemon's pidfile: an flock held for the daemon's whole life.

The lock, not the file's existence, says whether a daemon runs (cronie's
``acquire_daemonlock``): a pidfile left behind by a crash holds a pid but no
lock, and the next start takes it over silently. The file is opened without
truncation, so a refused start never erases the running daemon's pid; it is
truncated and written only once the lock is ours and is verified to still be
the file at the path (another daemon may have unlinked it in between).

    pidfile = Pidfile("/run/torchcore.pid")
    pidfile.acquire()          # AlreadyRunning if a live daemon holds it
    ...
    pidfile.release()          # unlinks only our own file, then unlocks
"""

import errno
import fcntl
import logging
import os
import time

from torchcore.errors import DaemonError

log = logging.getLogger(__name__)

OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
MODE = 0o644
# A short retry covers a lock held for microseconds by a status probe
# (pid_alive_and_locked) and a rival that unlinked the file under us.
LOCK_PATIENCE = 0.2
LOCK_RETRY_SLEEP = 0.01
MAX_REOPENS = 50


class AlreadyRunning(DaemonError):
    """A live daemon holds the pidfile's lock."""

    def __init__(self, pid, path):
        self.pid = pid
        self.path = path
        shown = pid if pid is not None else "unknown"
        super().__init__(f"torchcore is already running (pid {shown}, pidfile {path})")


class Pidfile:
    """One pidfile at ``path``; ``fd`` is the locked descriptor while acquired."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.fd = None
        self.pid = None

    def acquire(self):
        """Lock the pidfile and write our pid; raise AlreadyRunning if it is held."""
        if self.fd is not None:
            raise DaemonError(f"pidfile {self.path} is already held by this process")
        make_parent_dir(self.path)
        for _ in range(MAX_REOPENS):
            fd = open_pidfile(self.path)
            try:
                held = lock_with_patience(fd, fcntl.LOCK_EX)
                if is_file_at_path(fd, self.path):
                    if not held:
                        raise AlreadyRunning(read_pid_fd(fd, wait=True), self.path)
                    write_pid(fd, self.path)
                    self.fd, self.pid = fd, os.getpid()
                    log.debug("pidfile %s acquired pid=%d", self.path, self.pid)
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # unlinked or replaced between our open and our lock: retry
        raise DaemonError(f"pidfile {self.path} keeps being replaced by another process; "
                          "is something else managing this path?")

    def release(self):
        """Remove the file if it is still ours (same inode, our pid), then unlock.

        In a forked child (``os.getpid()`` differs) the file is left alone and
        only the descriptor is closed.
        """
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if self.pid == os.getpid() and is_file_at_path(fd, self.path) \
                    and read_pid_fd(fd) == self.pid:
                os.unlink(self.path)
                log.debug("pidfile %s removed", self.path)
        except OSError as exc:
            log.warning("could not remove pidfile %s: %s", self.path, exc.strerror)
        finally:
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def make_parent_dir(path):
    """Create the pidfile's directory, turning failure into a DaemonError."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise DaemonError(f"cannot create the pidfile directory {parent}: {exc.strerror}") from None


def open_pidfile(path):
    """Open (creating, never truncating, never following a symlink) the pidfile."""
    try:
        return os.open(path, OPEN_FLAGS, MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DaemonError(f"pidfile {path} is a symbolic link; refusing to follow it "
                              "(remove it or choose another pidfile path)") from None
        raise DaemonError(f"cannot open pidfile {path}: {exc.strerror}") from None


def lock_with_patience(fd, operation, patience=LOCK_PATIENCE):
    """flock(operation | LOCK_NB), retrying for ``patience`` seconds; True if locked."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_RETRY_SLEEP)


def is_file_at_path(fd, path):
    """True if ``fd`` is still the file that ``path`` names (same device and inode)."""
    try:
        at_path = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)


def write_pid(fd, path):
    """Replace the file's content with our pid and a newline, durably."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
    except OSError as exc:
        raise DaemonError(f"cannot write pidfile {path}: {exc.strerror}") from None


def read_pid_fd(fd, wait=False):
    """The pid written in the file, or None.

    ``wait`` is for a file whose lock is held: its holder may not have written
    its pid yet (the file is empty, or still shows a dead predecessor's pid),
    so allow it a moment to finish.
    """
    deadline = time.monotonic() + (LOCK_PATIENCE if wait else 0)
    while True:
        pid = parse_pid(os.pread(fd, 64, 0))
        settled = pid is not None and (not wait or pid_exists(pid))
        if settled or time.monotonic() >= deadline:
            return pid
        time.sleep(LOCK_RETRY_SLEEP)


def parse_pid(data):
    """``b"123\\n"`` -> 123; anything else (empty, garbage, <= 0) -> None."""
    try:
        pid = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return pid if pid > 0 else None


def read_pid(path):
    """The pid written in the pidfile at ``path``, or None if missing or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return read_pid_fd(fd)
    finally:
        os.close(fd)


def pid_alive_and_locked(path):
    """The pid of the live daemon holding the pidfile, or None (missing or stale file).

    The probe takes a shared lock for an instant when nobody holds it; a
    starting daemon waits that instant out (see lock_with_patience).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it: stale (our lock goes with the close)
        except BlockingIOError:
            pass
        pid = read_pid_fd(fd, wait=True)
        return pid if pid is not None and pid_exists(pid) else None
    finally:
        os.close(fd)


def pid_exists(pid):
    """True if a process with this pid exists (EPERM still means it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
