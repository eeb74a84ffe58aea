"""What wakes the supervisor's loop besides its own timer: the task file changing, the wall
clock being set.

- ``FileWatch``: inotify on the directory of the task file, and on the directory of the file
  it resolves to when that is elsewhere (a symlink), filtered by name: an edit in place
  (IN_CLOSE_WRITE, when the writer is done), an atomic rename over it (IN_MOVED_TO), a symlink
  swapped (IN_CREATE of a symlink, or a rename), a removal, a change of owner or mode are heard
  at once.  Watching the directories, not the file, keeps working across renames: the watch
  follows the name, not an inode.  Where inotify cannot be had (no instance left, no watch
  left, a kernel without it) the watch falls back to polling the file's stat signature on
  every pass, the loop waking each second as it did before inotify.  With inotify, the
  signature is still looked at every SAFETY_POLL seconds, for the changes inotify cannot see:
  a network file system written by another host, a directory symlink swapped higher up the
  path.
- ``ClockWatch``: a timerfd on CLOCK_REALTIME armed with TFD_TIMER_ABSTIME and
  TFD_TIMER_CANCEL_ON_SET: it turns readable the moment the wall clock is set, so a loop
  sleeping until its next busy second hears a clock step at once instead of when it wakes.

Both call Linux through ``torchcore._core`` (csrc/tc_sys.c): Python 3.10 has neither, and the
timerfd has to be there anyway; one C module also means one build, compiled -Wall -Wextra and
run under the sanitizers with the rest, and errno read the way cffi keeps it (no libc found by
name at run time, as ctypes would need).
"""

import errno
import logging
import os
import selectors
import struct

from torchcore._core import ffi, lib

log = logging.getLogger("torchcore")

SAFETY_POLL = 10.0      # seconds between looks at the file's signature while inotify watches
_EVENT = struct.Struct("iIII")      # struct inotify_event: wd, mask, cookie, len (then the name)
_DIR_MASK = (lib.TC_IN_CLOSE_WRITE | lib.TC_IN_MOVED_TO | lib.TC_IN_MOVED_FROM | lib.TC_IN_CREATE
             | lib.TC_IN_DELETE | lib.TC_IN_ATTRIB | lib.TC_IN_DELETE_SELF | lib.TC_IN_MOVE_SELF
             | lib.TC_IN_ONLYDIR)
_SELF_GONE = lib.TC_IN_DELETE_SELF | lib.TC_IN_MOVE_SELF | lib.TC_IN_IGNORED


def signature(path):
    """What a change of the file changes: device, inode, size, mtime and ctime (None: unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _inotify_open():
    """A non-blocking inotify descriptor; OSError when none can be had (tests replace this)."""
    fd = lib.tc_inotify_open()
    if fd < 0:
        raise _os_error("inotify_init1")
    return fd


def _inotify_add(fd, path, mask):
    wd = lib.tc_inotify_add(fd, os.fsencode(path), mask)
    if wd < 0:
        raise _os_error(f"inotify_add_watch {path}")
    return wd


def _os_error(what):
    code = ffi.errno
    return OSError(code, f"{what}: {os.strerror(code)}")


class FileWatch:
    """Tells the loop when to look at the task file again (``due``), and wakes it for that."""

    def __init__(self, path, clock):
        self.path = os.path.abspath(path)
        self.clock = clock
        self.mode = "off"           # "inotify", "poll" (the fallback) or "off" (watch: false)
        self.fd = None
        self.selector = None
        self._names = {}            # watch descriptor -> (directory, names in it that matter)
        self._dirty = False         # an event (or the start) asks for a look at the file
        self._next_poll = 0.0       # monotonic: the next safety look while inotify watches
        self._reason = None         # why the watch polls, once logged

    @property
    def polling(self):
        return self.mode == "poll"

    def start(self, selector):
        """Watch by inotify if it can be had, else poll; the first ``due`` is True either way
        (whatever changed before the watch began is looked for)."""
        if self.mode != "off":
            return
        self.selector = selector
        self._dirty = True
        try:
            self.fd = _inotify_open()
        except OSError as exc:
            self._poll(exc)
            return
        self.mode = "inotify"
        selector.register(self.fd, selectors.EVENT_READ, self.on_event)
        self._arm()

    def stop(self):
        """Watch nothing (``watch: false``, or the supervisor closing)."""
        if self.fd is not None:
            _release(self.selector, self.fd)
        self.fd = None
        self._names = {}
        self.mode = "off"

    def on_event(self, key=None, mask=None):
        """The selector saw the inotify descriptor readable: read what is there."""
        self._read()

    def due(self):
        """True when the file should be looked at now: an event about it came, the watch has
        just begun, a safety look is due (inotify), or on every pass (polling)."""
        if self.mode == "poll":
            return True
        if self.mode != "inotify":
            return False
        self._read()
        mono = self.clock.monotonic()
        if self._dirty or mono >= self._next_poll:
            if self._dirty and self.mode == "inotify":
                self._arm()         # the name may lead elsewhere now (a symlink swapped)
            self._dirty = False
            self._next_poll = mono + SAFETY_POLL
            return True
        return False

    def next_look(self):
        """Monotonic time of the next look the loop must wake for (None: only events wake it;
        polling: the loop wakes every second)."""
        return self._next_poll if self.mode == "inotify" else None

    # ---- inotify ----------------------------------------------------------------------------

    def _targets(self):
        """directory -> names in it whose changes are changes of the task file."""
        targets = {}
        for path in (self.path, os.path.realpath(self.path)):
            directory, name = os.path.split(path)
            targets.setdefault(directory, set()).add(name)
        return targets

    def _arm(self):
        """Watch the directories of the path and of what it resolves to now; drop the others."""
        names = {}
        try:
            for directory, wanted in self._targets().items():
                wd = _inotify_add(self.fd, directory, _DIR_MASK)
                names.setdefault(wd, (directory, set()))[1].update(wanted)
        except OSError as exc:
            self.stop()
            self._poll(exc)
            return
        for wd in set(self._names) - set(names):
            lib.tc_inotify_rm(self.fd, wd)      # gone already (IN_IGNORED) is no harm
        self._names = names

    def _read(self):
        while self.fd is not None:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                self.stop()
                self._poll(exc)
                return
            if not data:
                return
            self._parse(data)

    def _parse(self, data):
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = os.fsdecode(data[offset + _EVENT.size:offset + _EVENT.size + length]
                               .split(b"\0", 1)[0])
            offset += _EVENT.size + length
            watched = self._names.get(wd)
            if mask & lib.TC_IN_Q_OVERFLOW:
                self._dirty = True      # events were lost
            elif watched is None:
                continue                # a watch dropped by _arm (its IN_IGNORED)
            elif mask & _SELF_GONE:
                self._dirty = True      # a watched directory moved or went
            elif name in watched[1]:
                if mask & lib.TC_IN_CREATE and not os.path.islink(os.path.join(watched[0], name)):
                    continue    # a new regular file is looked at once written (IN_CLOSE_WRITE)
                self._dirty = True

    def _poll(self, exc):
        self.mode = "poll"
        self._dirty = True
        reason = f"{exc.strerror or exc}"
        if exc.errno in (errno.EMFILE, errno.ENOSPC):
            reason += " (the inotify instances or watches of this user are used up: " \
                      "fs.inotify.max_user_instances, fs.inotify.max_user_watches)"
        if reason != self._reason:
            self._reason = reason
            log.warning("watching %s by polling it every second: inotify: %s", self.path, reason)


class ClockWatch:
    """A timerfd that turns readable when the wall clock is set (None where it cannot be had)."""

    def __init__(self):
        self.fd = None
        self.selector = None
        self.sets = 0               # times the wall clock was heard being set

    def open(self, selector):
        self.selector = selector
        fd = lib.tc_clock_watch_open()
        if fd < 0:
            log.info("wall-clock steps are noticed at the next wake (no timerfd: %s)",
                     os.strerror(ffi.errno))
            return
        self.fd = fd
        selector.register(fd, selectors.EVENT_READ, self.on_event)

    def on_event(self, key=None, mask=None):
        """Read the timerfd: ECANCELED means the clock was set.  Armed again either way."""
        try:
            os.read(self.fd, 8)         # it expired (a year on): nothing to hear
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.ECANCELED:
                raise
            self.sets += 1
            log.debug("the wall clock was set")
        if lib.tc_clock_watch_arm(self.fd) != 0:
            log.warning("cannot arm the clock watch again (%s): wall-clock steps are noticed "
                        "at the next wake", os.strerror(ffi.errno))
            self.close()

    def close(self):
        if self.fd is None:
            return
        _release(self.selector, self.fd)
        self.fd = None


def _release(selector, fd):
    """Stop watching ``fd`` in ``selector`` (if it was registered there) and close it."""
    if selector is not None:
        try:
            selector.unregister(fd)
        except (KeyError, ValueError):
            pass
    os.close(fd)
