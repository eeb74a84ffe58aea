"""Task logs: each task's output in ``log_dir/<task>.log``, one stamped line per output line.

A line looks like ``2026-11-24T15:30:00.123+00:00 run 17 out| text``: local time
with its offset, the run id, the stream (``out`` or ``err`` for what the task printed, ``sys`` for
torchcore's own lines: a timeout, a limit, the run's end) and the text.

Several runs of one task append to the same file at once, each from its own
executor process: every write is O_APPEND and holds whole lines only, so lines
never interleave.  When the file reaches ``max_bytes`` it is rotated to
``<task>.log.1`` .. ``<task>.log.N`` under an flock on ``<task>.log.lock``; the
other writers notice the new inode and reopen.  A write error (disk full, the
directory gone) is counted (lines and bytes lost) and reported once on stderr,
never raised: a task must not die because its log cannot be written.

Writing never holds up a run: the file is written without blocking (a FIFO or a
full pipe in its place loses lines rather than stopping the writer), a writer that
finds another one rotating does not wait for the lock (it appends to the current
file, which that writer rotates), and a rotation costs a rename for each backup
that exists, however large ``backups`` is.

Every file here is opened through ``safepaths.open_file`` (O_NOFOLLOW, our own
plain file, mode 0640): a symlink or a file planted under a task's log name is
refused, never followed; rotation only renames, which never follows a link.
"""

import datetime
import fcntl
import os
import sys
import time

from torchcore import safepaths

MAX_LINE = 64 * 1024          # bytes of one line kept; the rest of it is dropped
MAX_WRITE = 64 * 1024         # bytes of whole lines gathered into one write()
CUT_MARKER = " [line cut at {} bytes]"
_READ_BLOCK = 64 * 1024
SYS = "sys"                   # the stream of torchcore's own lines, never the task's


def log_path(log_dir, task):
    """The current log file of a task."""
    return os.path.join(log_dir, f"{task}.log")


def format_stamp(epoch):
    """Local time with milliseconds and offset: ``2026-11-24T15:30:00.123+00:00``."""
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="milliseconds")


def _utf8_cut(data, size):
    """``data[:size]`` moved back so it does not end inside a UTF-8 sequence."""
    end = size
    while end > size - 4 and end > 0 and (data[end] & 0xC0) == 0x80:
        end -= 1
    return data[:end] if end > size - 4 else data[:size]


class TaskLog:
    """The log writer of one run (used in its executor child)."""

    def __init__(self, log_dir, task, run_id, max_bytes, backups, *, clock=time.time,
                 max_line=MAX_LINE):
        self.path = log_path(log_dir, task)
        self.task, self.run_id = task, run_id
        self.max_bytes, self.backups = max_bytes, backups
        self.max_line = max_line
        self.errors = 0                     # failed writes (lines lost)
        self.lost_bytes = 0                 # bytes of those writes
        self.first_error = None
        self._log_dir = log_dir
        self._clock = clock
        self._partial = {}                  # stream -> bytes of an unfinished line
        self._discarding = set()            # streams inside a cut line, until its newline
        self._fd = None
        self._ino = None

    # -- lines --------------------------------------------------------------------------------

    def write(self, stream, data):
        """Add a raw chunk of a stream; complete lines are stamped and written at once."""
        if not data:
            return
        pending = self._partial.pop(stream, b"") + data
        pieces = pending.split(b"\n")
        tail = pieces.pop()
        prefix = self._prefix(stream)
        lines = []
        for piece in pieces:
            if stream in self._discarding:
                self._discarding.discard(stream)       # the end of a line already cut
                continue
            lines.append(self._line(prefix, piece, cut=len(piece) > self.max_line))
        if stream not in self._discarding and len(tail) > self.max_line:
            lines.append(self._line(prefix, tail, cut=True))
            self._discarding.add(stream)
        if tail and stream not in self._discarding:
            self._partial[stream] = tail
        self._emit(lines)

    def finish_lines(self):
        """Write unfinished lines (a last line without a newline) as lines, now."""
        lines = [self._line(self._prefix(stream), tail) for stream, tail in self._partial.items()]
        self._partial.clear()
        self._emit(lines)

    def close(self):
        """Write unfinished lines (as lines) and close the file."""
        self.finish_lines()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _prefix(self, stream):
        return f"{format_stamp(self._clock())} run {self.run_id} {stream}| "

    def _line(self, prefix, raw, cut=False):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if cut:
            raw = _utf8_cut(raw, self.max_line)
        text = raw.decode("utf-8", "replace")
        marker = CUT_MARKER.format(self.max_line) if cut else ""
        return (prefix + text + marker + "\n").encode("utf-8")

    def _emit(self, lines):
        """Write lines in as few write() calls as possible, each holding whole lines."""
        batch, size = [], 0
        for line in lines:
            if batch and size + len(line) > MAX_WRITE:
                self._write(b"".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            self._write(b"".join(batch))

    # -- the file -----------------------------------------------------------------------------

    def _write(self, data):
        try:
            self._prepare()
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            self._failed(exc, len(data))

    def _failed(self, exc, size=0):
        self.errors += 1
        self.lost_bytes += size
        if self.errors == 1:
            self.first_error = str(exc)
            try:
                print(f"torchcore: cannot write the log of task {self.task!r} (run {self.run_id}) "
                      f"to {self.path}: {exc}; further errors are counted, not shown",
                      file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass            # no stderr either (a closed pipe): the count is reported

    def problem(self):
        """What was lost, for the run's record line: None when every write went through."""
        if not self.errors:
            return None
        return (f"its log lost {self.lost_bytes} bytes in {self.errors} writes "
                f"({self.first_error})")

    def _prepare(self):
        """Open the file, reopen it after another writer rotated it, rotate it when full."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self._fd is None or st is None or st.st_ino != self._ino:
            self._open()
            st = os.fstat(self._fd)
        if self.max_bytes and st.st_size >= self.max_bytes:
            self._rotate()

    def _open(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._fd = open_log_file(self._log_dir, self.path, os.O_WRONLY | os.O_APPEND)
        self._ino = os.fstat(self._fd).st_ino
        os.set_blocking(self._fd, False)     # a FIFO in its place must not stop the run

    def _rotate(self):
        """Shift <task>.log.N-1 .. .log to .N .. .1 once, however many writers see the file full."""
        lock = open_log_file(self._log_dir, self.path + ".lock", os.O_WRONLY)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return                      # another writer rotates it now: append meanwhile
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_ino == self._ino and st.st_size >= self.max_bytes:
                self._shift()
            self._open()
        finally:
            os.close(lock)                  # releases the flock

    def _shift(self):
        """.log.N-1 .. .log.1 move up one (the one at ``backups`` is dropped), .log to .log.1:
        one rename for each backup that exists (never a walk up to ``backups``)."""
        if self.backups <= 0:
            os.unlink(self.path)
            return
        for n in sorted(self._backup_numbers(), reverse=True):
            older = f"{self.path}.{n}"
            if n >= self.backups:
                os.unlink(older)
            else:
                os.replace(older, f"{self.path}.{n + 1}")
        os.replace(self.path, self.path + ".1")

    def _backup_numbers(self):
        prefix = os.path.basename(self.path) + "."
        numbers = []
        for name in os.listdir(self._log_dir):
            suffix = name[len(prefix):] if name.startswith(prefix) else ""
            if suffix.isdigit() and suffix[0] != "0":
                numbers.append(int(suffix))
        return numbers


def open_log_file(log_dir, path, flags):
    """Open (creating, 0640) a file of ``log_dir`` without following a link; a log_dir
    gone meanwhile is made again (0750, its path checked)."""
    flags |= os.O_CREAT
    try:
        return safepaths.open_file(path, flags, safepaths.LOG_MODE, what="task log")
    except FileNotFoundError:
        safepaths.secure_dir(log_dir, safepaths.LOG_DIR_MODE, what="log_dir")
        return safepaths.open_file(path, flags, safepaths.LOG_MODE, what="task log")


# -- reading ----------------------------------------------------------------------------------

def log_files(log_dir, task):
    """The task's log files, oldest first: ``.log.N`` .. ``.log.1``, ``.log`` (existing ones)."""
    base = log_path(log_dir, task)
    numbered = []
    prefix = os.path.basename(base) + "."
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return []
    for name in names:
        suffix = name[len(prefix):] if name.startswith(prefix) else ""
        if suffix.isdigit():
            numbered.append((int(suffix), os.path.join(log_dir, name)))
    files = [p for _, p in sorted(numbered, reverse=True)]
    return files + ([base] if os.path.exists(base) else [])


def line_run_id(line):
    """The run id of a stamped log line (str or bytes), or None for a line of another shape."""
    parts = line.split(None, 3)
    if len(parts) >= 3 and parts[1] in ("run", b"run") and parts[2].isdigit():
        return int(parts[2])
    return None


def _lines_backwards(f, end):
    """Lines of an open binary file before offset ``end``, last first (bytes, no newline)."""
    pos, rest = end, b""
    while pos > 0:
        size = min(_READ_BLOCK, pos)
        pos -= size
        f.seek(pos)
        chunk = f.read(size) + rest
        pieces = chunk.split(b"\n")
        rest = pieces.pop(0)
        yield from reversed([p for p in pieces if p] if pieces else [])
    if rest:
        yield rest


def _tail(sources, lines, run_id):
    """Last ``lines`` lines (all if None) of (open file, end offset) sources given oldest first."""
    found = []
    for f, end in reversed(sources):
        for raw in _lines_backwards(f, end):
            if run_id is None or line_run_id(raw) == run_id:
                found.append(raw.decode("utf-8", "replace"))
                if lines is not None and len(found) >= lines:
                    return found[::-1]
    return found[::-1]


def read_log(log_dir, task, lines=None, run_id=None):
    """The last ``lines`` lines of a task's log across its rotated files (all if None),
    only those of run ``run_id`` if given; oldest first, without newlines."""
    if lines is not None and lines <= 0:
        return []
    opened = []
    try:
        for path in log_files(log_dir, task):
            try:
                f = open(path, "rb")  # noqa: SIM115 (closed by the caller)
            except FileNotFoundError:           # rotated away meanwhile
                continue
            opened.append((f, os.fstat(f.fileno()).st_size))
        return _tail(opened, lines, run_id)
    finally:
        for f, _ in opened:
            f.close()


def follow_log(log_dir, task, lines=10, run_id=None, poll=0.5, sleep=time.sleep):
    """Yield the last ``lines`` lines, then every new line as it is written, forever.

    Polls every ``poll`` seconds; survives rotation (drains the rotated file, then
    reads the new one from its start) and waits for a file that does not exist yet.
    """
    path = log_path(log_dir, task)
    follower = _Follower(path, run_id)
    if follower.f is None:
        yield from read_log(log_dir, task, lines, run_id)
    else:
        yield from follower.initial(log_dir, task, lines)
    while True:
        got = follower.poll()
        yield from got
        if not got:
            sleep(poll)


class _Follower:
    """The reading position of follow_log in the current file."""

    def __init__(self, path, run_id):
        self.path, self.run_id = path, run_id
        self.f, self.ino, self.rest = None, None, b""
        self._open(at_end=True)

    def _open(self, at_end):
        try:
            self.f = open(self.path, "rb")  # noqa: SIM115 (kept open while following)
        except FileNotFoundError:
            self.f = None
            return
        st = os.fstat(self.f.fileno())
        self.ino = st.st_ino
        self.f.seek(st.st_size if at_end else 0)
        self.rest = b""

    def initial(self, log_dir, task, lines):
        """The last lines up to where following starts (older files, then this one)."""
        if lines is not None and lines <= 0:
            return []
        older = [p for p in log_files(log_dir, task) if p != self.path]
        opened, start = [], self.f.tell()
        try:
            for path in older:
                try:
                    f = open(path, "rb")  # noqa: SIM115 (closed by the caller)
                except FileNotFoundError:
                    continue
                opened.append((f, os.fstat(f.fileno()).st_size))
            return _tail(opened + [(self.f, start)], lines, self.run_id)
        finally:
            for f, _ in opened:
                f.close()
            self.f.seek(start)

    def poll(self):
        """New complete lines since the last poll."""
        if self.f is None:
            self._open(at_end=False)
            return self._read() if self.f is not None else []
        got = self._read()
        try:
            rotated = os.stat(self.path).st_ino != self.ino
        except FileNotFoundError:
            rotated = True
        if rotated:
            got += self._read()                 # what was written before the rotation
            if self.rest:
                got += self._keep([self.rest])
            self.f.close()
            self._open(at_end=False)
            if self.f is not None:
                got += self._read()
        return got

    def _read(self):
        data = self.f.read()
        if not data:
            return []
        pieces = (self.rest + data).split(b"\n")
        self.rest = pieces.pop()
        return self._keep(pieces)

    def _keep(self, pieces):
        return [p.decode("utf-8", "replace") for p in pieces
                if self.run_id is None or line_run_id(p) == self.run_id]
