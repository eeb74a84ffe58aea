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

The pidfile may live in a directory other users share (``/tmp``, a directory
they made): its directory must be root's or ours (writable by others only if
sticky), and the file itself ours, plain and singly linked, or it is refused.
And a pid read from a file is never signalled on its word: ``find_daemon``
returns the process only if it holds the pidfile's lock (``/proc/locks``), runs
as the pidfile's owner (who must be the caller) and is a torchcore supervisor
(its title or command line); the signal goes through a pidfd opened before
those checks, so a pid reused meanwhile is never hit.

    daemon = find_daemon("/run/torchcore.pid")   # None if no daemon holds it
    daemon.signal(signal.SIGTERM); daemon.wait(30); daemon.close()
"""

import errno
import fcntl
import logging
import os
import select
import signal
import stat
import time

from torchcore import safepaths
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

    def __init__(self, pid, path, socket=None):
        self.pid = pid
        self.path = path
        shown = pid if pid is not None else "unknown"
        served = f"; it serves the control socket {socket}" if socket else ""
        super().__init__(f"torchcore is already running (pid {shown}, pidfile {path}{served})")


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
                safepaths.check_open_file(fd, self.path, MODE, what="pidfile")
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
    """Create the pidfile's directory (0755) and check its whole path (see safepaths)."""
    parent = os.path.dirname(path)
    try:
        safepaths.secure_dir(parent, safepaths.PARENT_DIR_MODE, what="pidfile directory",
                             shared=True)
    except DaemonError:
        raise
    except OSError as exc:
        raise DaemonError(f"cannot create the pidfile directory {parent}: {exc.strerror}") from None


def open_pidfile(path):
    """Open (creating, never truncating, never following a symlink) the pidfile."""
    try:
        fd = os.open(path, OPEN_FLAGS | os.O_NONBLOCK, MODE)   # a planted FIFO must not hang us
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise DaemonError(f"pidfile {path} is not a regular file; remove it") from None
        if exc.errno == errno.ELOOP:
            raise DaemonError(f"pidfile {path} is a symbolic link; refusing to follow it "
                              "(remove it or choose another pidfile path)") from None
        raise DaemonError(f"cannot open pidfile {path}: {exc.strerror}") from None
    os.set_blocking(fd, True)
    return fd


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
        held, pid = _holder(fd)
        return pid if held and pid is not None and pid_exists(pid) else None
    finally:
        os.close(fd)


def _holder(fd):
    """(held, pid) of an open pidfile: whether a process holds its lock, and the pid it names
    (None when it names none).  Not held: stale, and our probe's lock goes with the close."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False, None
    except BlockingIOError:
        return True, read_pid_fd(fd, wait=True)


def pid_exists(pid):
    """True if a process with this pid exists (EPERM still means it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- signalling the daemon named by a pidfile ----------------------------------------------

SUPERVISOR_TITLE = "torchcore: supervisor"


def find_daemon(path):
    """The torchcore supervisor holding the pidfile at ``path`` as a DaemonProcess, or None.

    None when no process holds the file's lock (no file, stale file). Raises
    DaemonError, naming the pidfile and pid, when the file or its directory
    belongs to another user, or the pid it names does not hold its lock, runs
    as another user, or is not a torchcore supervisor: nothing is signalled then.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.dirname(path)):
        return None
    safepaths.check_dir(os.path.dirname(path), what="pidfile directory", shared=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DaemonError(f"pidfile {path} is a symbolic link; refusing to use it") from None
        raise DaemonError(f"cannot open pidfile {path}: {exc.strerror}") from None
    try:
        info = check_pidfile_owner(fd, path)
        held, pid = _holder(fd)
    finally:
        os.close(fd)
    if not held:
        return None                     # nobody holds it: stale
    if pid is None:
        raise DaemonError(f"pidfile {path} is locked but names no pid; refusing to signal")
    return DaemonProcess.verified(pid, info, path)


def check_pidfile_owner(fd, path):
    """The pidfile's stat; DaemonError if it is not a plain file of the caller's."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise DaemonError(f"pidfile {path} is not a plain file with one link; refusing to use it")
    if info.st_uid != os.geteuid():
        raise DaemonError(f"pidfile {path} is {safepaths.describe(info)}, not by "
                          f"{safepaths.owner_name(os.geteuid())} who runs this command: "
                          "torchcore trusts no pid it names (run this command as its owner, "
                          "or as root for a daemon of root's)")
    return info


class DaemonProcess:
    """A verified supervisor: signal it and wait for it through a pidfd where there is one."""

    def __init__(self, pid, pidfd):
        self.pid, self.pidfd = pid, pidfd

    @classmethod
    def verified(cls, pid, info, path):
        """Open a pidfd on ``pid`` and check the process behind it (see find_daemon)."""
        pidfd = _pidfd_open(pid)
        if pidfd is False:
            return None                 # gone already
        try:
            problem = supervisor_problem(pid, info)
        except BaseException:
            _close(pidfd)
            raise
        if problem == "gone":
            _close(pidfd)
            return None
        if problem:
            _close(pidfd)
            raise DaemonError(f"pidfile {path} names pid {pid}, {problem}; "
                              "refusing to signal it")
        return cls(pid, pidfd)

    def signal(self, signum):
        """Send ``signum``; False if the process is already gone."""
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout):
        """True once the process has exited, False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if self.pidfd is not None:
                if select.select([self.pidfd], [], [], max(remaining, 0))[0]:
                    return True
            elif not pid_exists(self.pid):
                return True
            if remaining <= 0:
                return False
            if self.pidfd is None:
                time.sleep(min(0.05, remaining))

    def close(self):
        _close(self.pidfd)
        self.pidfd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _pidfd_open(pid):
    """A pidfd for ``pid``; None where the kernel has none; False if the process is gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        return None


def _close(fd):
    if fd is not None:
        os.close(fd)


def supervisor_problem(pid, info):
    """Why ``pid`` is not the torchcore supervisor holding the pidfile ``info``; "" if it is.

    "gone" if the process no longer exists.
    """
    holders = lock_holders(info.st_dev, info.st_ino)
    if pid not in holders:
        held_by = ", ".join(str(p) for p in sorted(holders)) or "no process it can see"
        return f"which does not hold its lock (held by {held_by})"
    try:
        uids = _status_uids(pid)
        words = _cmdline(pid)
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    if any(uid != info.st_uid for uid in uids):
        return (f"which runs as uid {'/'.join(map(str, uids))}, not as the pidfile's owner "
                f"{info.st_uid}")
    if not is_supervisor_command(words):
        shown = " ".join(words)[:200] or "(none)"
        return f"which is not a torchcore supervisor (command line: {shown})"
    return ""


def lock_holders(dev, ino):
    """Pids holding a lock on the file (dev, ino), from /proc/locks (waiters excluded)."""
    holders = set()
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return holders
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == (os.major(dev), os.minor(dev), ino):
                holders.add(int(fields[4]))
        except ValueError:
            continue
    return holders


def _status_uids(pid):
    """Real and effective uid of ``pid``."""
    with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("Uid:"):
                return [int(value) for value in line.split()[1:3]]
    return []


def _cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        raw = handle.read()
    return [word.decode(errors="replace") for word in raw.split(b"\0") if word]


def is_supervisor_command(words):
    """A supervisor's title, or a ``torchcore start``/``restart`` not yet titled."""
    title = " ".join(words)
    if title.startswith(SUPERVISOR_TITLE):
        return True
    named = any(os.path.basename(word) == "torchcore" for word in words)
    return named and any(word in ("start", "restart") for word in words)
