"""Directories and files under paths other local users may share: checked, created, opened safely.

A root daemon writing into ``/var/log/torchcore`` or a directory under ``/tmp``
must not follow what another user planted there: a directory they pre-created,
a symlink named like a task log pointing at ``/etc/shadow``, a hard link, a
FIFO. The kernel does not always stop this (``fs.protected_symlinks=0``), so
torchcore does, in two layers:

* **Directories.** ``secure_dir`` walks the path from ``/`` one component at a
  time on directory descriptors (``openat`` with ``O_NOFOLLOW``; a symlink is
  resolved by hand, and only when the directory holding it is trusted) and
  creates what is missing. Every directory on the way must be owned by root or
  the daemon's user and not writable by group or others, unless it is sticky
  (``/tmp``), in which case the entry taken from it must itself be owned by
  root or the daemon's user. The directory itself must be the daemon user's
  and not writable by group or others; ``private`` (state_dir) also refuses
  any access by them, and a looser readable mode of a log directory is
  tightened. Once the whole chain is trusted nobody else can change what the
  path resolves to, so later opens by path are safe.
* **Files.** ``open_file`` opens with ``O_NOFOLLOW | O_CLOEXEC`` (and
  ``O_NONBLOCK`` so a planted FIFO cannot hang the open), then checks the
  descriptor: a regular file, ours, with one link; a looser mode is tightened.

Modes: state_dir 0700, log_dir 0750, task logs and the daemon's log 0640, the
records database (and its -wal/-shm) 0600, the control socket 0600.

    safepaths.secure_dir(settings.log_dir, safepaths.LOG_DIR_MODE, what="log_dir")
    fd = safepaths.open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, safepaths.LOG_MODE)
"""

import errno
import os
import stat

from torchcore.errors import DaemonError

STATE_DIR_MODE = 0o700
LOG_DIR_MODE = 0o750
PARENT_DIR_MODE = 0o755         # directories created on the way to one of the above
LOG_MODE = 0o640
PRIVATE_MODE = 0o600
MAX_SYMLINKS = 40
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class UnsafePath(DaemonError, OSError):
    """A path torchcore refuses to use: another user could redirect what it writes.

    An OSError too, so writers that survive I/O errors (task logs) survive it.
    """

    def __init__(self, message):
        DaemonError.__init__(self, message)
        self.errno, self.strerror, self.filename = errno.EPERM, message, None

    def __str__(self):
        return self.strerror


def owner_name(uid):
    """``uid 1001 (alice)``, or ``uid 1001`` when it has no name."""
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def describe(info):
    """Owner and mode of a stat result, for error messages."""
    return f"owned by {owner_name(info.st_uid)}, mode {stat.S_IMODE(info.st_mode):04o}"


def trusted_uids():
    """Owners whose directories the daemon may pass through: root and itself."""
    return {0, os.geteuid()}


def secure_dir(path, mode, *, what="directory", create=True, private=False, shared=False):
    """Create ``path`` (mode ``mode``, parents 0755) if missing and check the whole chain.

    ``shared`` checks the directory itself only as a directory on the way (root's
    or ours; writable by others only if sticky): for one that holds a single
    file of ours checked on its own, like a pidfile in ``/run`` or ``/tmp``.
    Raises UnsafePath naming the offending path, its owner and mode; DaemonError
    for a directory that cannot be created. Returns the stat of the directory.
    """
    path = os.path.abspath(os.fspath(path))
    walk = _Walk(path, mode, what, create)
    try:
        fd, info = walk.run()
    finally:
        walk.close()
    try:
        if shared:
            _check_ancestor(info, path, what)
            return info
        return _check_final(fd, info, path, mode, what, private)
    finally:
        os.close(fd)


def check_dir(path, *, what="directory", private=False, shared=False):
    """``secure_dir`` without creating or changing anything (a missing one is a DaemonError)."""
    return secure_dir(path, 0, what=what, create=False, private=private, shared=shared)


class _Walk:
    """Resolves a path component by component on directory descriptors."""

    def __init__(self, path, mode, what, create):
        self.path, self.mode, self.what, self.create = path, mode, what, create
        self.stack = []             # [(fd, shown path, stat)] from "/" down
        self.links = 0

    def close(self):
        for fd, _, _ in self.stack:
            os.close(fd)
        self.stack.clear()

    def run(self):
        """(fd of the final directory, its stat); the caller closes the fd."""
        self._push_root()
        parts = _components(self.path)
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(self.stack) > 1:
                    os.close(self.stack.pop()[0])
                continue
            self._step(name, parts)
        fd, _, info = self.stack.pop()
        return fd, info

    def _push_root(self):
        fd = os.open("/", _DIR_FLAGS)
        info = os.fstat(fd)
        self.stack.append((fd, "/", info))
        _check_ancestor(info, "/", f"{self.what} {self.path}")

    def _step(self, name, parts):
        parent_fd, shown_parent, parent_info = self.stack[-1]
        shown = os.path.join(shown_parent, name)
        info = self._lstat_or_create(parent_fd, name, shown, last=not parts)
        if _shared(parent_info) and info.st_uid not in trusted_uids():
            raise UnsafePath(f"{self.what} {self.path}: {shown} is {describe(info)}, in "
                             f"{shown_parent}, which others can write to; another user "
                             "created it, so torchcore will not use it")
        if stat.S_ISLNK(info.st_mode):
            self._follow(parent_fd, name, shown, parts)
            return
        if not stat.S_ISDIR(info.st_mode):
            raise DaemonError(f"{self.what} {self.path}: {shown} is not a directory")
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        opened = os.fstat(fd)
        self.stack.append((fd, shown, opened))
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise UnsafePath(f"{self.what} {self.path}: {shown} was replaced while checked")
        if parts:
            _check_ancestor(opened, shown, f"{self.what} {self.path}")

    def _lstat_or_create(self, parent_fd, name, shown, last):
        try:
            return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            if not self.create:
                raise DaemonError(f"{self.what} {self.path}: {shown} does not exist") from None
        try:
            os.mkdir(name, self.mode if last else PARENT_DIR_MODE, dir_fd=parent_fd)
        except FileExistsError:
            pass            # someone made it in between: checked like any other below
        except OSError as exc:
            raise DaemonError(f"cannot create {self.what} {self.path}: {shown}: "
                              f"{exc.strerror}") from None
        return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)

    def _follow(self, parent_fd, name, shown, parts):
        self.links += 1
        if self.links > MAX_SYMLINKS:
            raise DaemonError(f"{self.what} {self.path}: too many levels of symbolic links")
        target = os.readlink(name, dir_fd=parent_fd)
        if target.startswith("/"):
            while len(self.stack) > 1:
                os.close(self.stack.pop()[0])
        parts[:0] = _components(target)


def _components(path):
    return [part for part in path.split("/") if part not in ("", ".")]


def _shared(info):
    """A directory others may create entries in (sticky ones only let them touch their own)."""
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _check_ancestor(info, shown, what):
    """A directory on the way: root's or ours, and others may not rename entries in it."""
    if info.st_uid not in trusted_uids():
        raise UnsafePath(f"{what}: {shown} is {describe(info)}: another user could redirect "
                         "the paths under it; use a directory owned by root or by "
                         f"{owner_name(os.geteuid())}")
    if _shared(info) and not info.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"{what}: {shown} is {describe(info)}: writable by group or others "
                         "without the sticky bit, so they could replace what is under it; "
                         f"run: chmod go-w {shown}")


def _check_final(fd, info, path, mode, what, private):
    """The directory itself: ours, not writable by others; tighten a readable mode."""
    if info.st_uid != os.geteuid():
        raise UnsafePath(f"{what} {path} is {describe(info)}, not by the daemon's user "
                         f"{owner_name(os.geteuid())}; chown it or choose another {what}")
    loose = stat.S_IMODE(info.st_mode) & ~(mode or 0o777) & 0o077
    if private and info.st_mode & 0o077:
        raise UnsafePath(f"{what} {path} (owned by {owner_name(info.st_uid)}) is accessible by "
                         f"group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
                         f"run: chmod 700 {path}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePath(f"{what} {path} is {describe(info)}: writable by group or others; "
                         f"run: chmod go-w {path}")
    if loose and mode:
        _tighten_dir(fd, path, stat.S_IMODE(info.st_mode) & ~loose, what)
    return info


def _tighten_dir(path_fd, path, mode, what):
    """chmod through a real descriptor of the same directory (O_PATH ones cannot fchmod)."""
    import logging

    fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    logging.getLogger(__name__).warning("%s %s: mode tightened to %04o", what, path, mode)


def open_file(path, flags, mode, *, what="file"):
    """``os.open`` that never follows a symlink and accepts only our own plain file.

    ``flags`` are the usual open flags (O_CREAT to create with ``mode``);
    O_NOFOLLOW, O_CLOEXEC are added. A file owned by someone else, not regular
    (FIFO, device, directory) or with other hard links is refused with
    UnsafePath; one ours with a looser mode than ``mode`` is tightened to it.
    """
    try:
        fd = os.open(path, flags | _FILE_FLAGS, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{what} {path} is a symbolic link; torchcore does not follow "
                             "links where it writes (remove it)") from None
        if exc.errno == errno.ENXIO:        # a FIFO without a reader, O_NONBLOCK
            raise UnsafePath(f"{what} {path} is not a regular file; remove it") from None
        raise
    try:
        check_open_file(fd, path, mode, what)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_open_file(fd, path, mode, what="file"):
    """The checks of ``open_file`` on a descriptor already open."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePath(f"{what} {path} is not a regular file; remove it")
    if info.st_uid != os.geteuid():
        raise UnsafePath(f"{what} {path} is {describe(info)}, not by the daemon's user "
                         f"{owner_name(os.geteuid())}; torchcore will not write to it")
    if info.st_nlink != 1:
        raise UnsafePath(f"{what} {path} has {info.st_nlink} hard links; torchcore writes "
                         "only to files with one (remove it)")
    if stat.S_IMODE(info.st_mode) & ~mode:
        os.fchmod(fd, stat.S_IMODE(info.st_mode) & mode)
    return info


def check_existing_file(path, mode, what="file"):
    """``open_file`` without creating: tighten and check ``path`` if it exists."""
    try:
        fd = open_file(path, os.O_RDONLY, mode, what=what)
    except FileNotFoundError:
        return
    os.close(fd)


def log_file_handler(path):
    """The daemon's log handler: a daemonlog.DaemonLogHandler, whose every (re)open goes through
    ``open_file``.  Imported on first use, so the executors, which import this module, never
    load logging."""
    from torchcore.daemonlog import DaemonLogHandler

    return DaemonLogHandler(path)


def problem_with(setting, path):
    """Why a start would refuse ``path`` as its ``state_dir``, ``log_dir`` or ``pidfile``;
    "" if it would not. Creates and changes nothing (a reload's check of a new setting)."""
    options = {"state_dir": {"private": True}, "log_dir": {}, "pidfile": {"shared": True}}
    kwargs = options[setting]
    probe = os.path.dirname(path) if setting == "pidfile" else path
    while probe != "/" and not os.path.lexists(probe):
        probe, kwargs = os.path.dirname(probe), {"shared": True}   # it would be created there
    try:
        check_dir(probe, what=setting, **kwargs)
    except DaemonError as exc:
        return str(exc)
    return ""
