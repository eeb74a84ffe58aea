"""The daemon's own log file: follows logrotate, comes back after its directory goes, never raises.

The standard WatchedFileHandler reopens a moved file, but it reopens outside
logging's error handling: with ``log_dir`` renamed or removed, the reopen raises
FileNotFoundError into whatever called ``log.info`` -- the supervisor's loop.  A
full disk makes every write fail as well.  :class:`DaemonLogHandler` recreates the
directory and the file when it can; when it cannot, the line is dropped and
counted, the first failure of a stretch is reported once on stderr, and the first
line written afterwards says how many were lost and why.
"""

import datetime
import logging
import logging.handlers
import math
import os
import sys
import time

DIR_MODE = 0o750


class Formatter(logging.Formatter):
    """The lines of the daemon's log and its services': ``2026-12-01T13:05:09.123+01:00 INFO ...``
    (ISO 8601, local time with its offset, as the records and ``history --json`` write times).

    The supervisor logs a line for each run that ends: a plain line (no traceback, no stack) is
    made here directly, with the stamp's date, time and offset worked out once a second, the
    same text as ``logging.Formatter`` with ``formatTime`` gives (tests/test_daemonlog_format.py).
    """

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._second = None         # the whole second of the stamp kept below, and the zone
                                    # then (time.tzset may change it within a second)
        self._stamp = ("", "")      # its ISO text to the second, and its offset

    def formatTime(self, record, datefmt=None):
        whole, micros = _split(record.created)
        second = (whole, time.timezone, time.altzone, time.tzname)
        if second != self._second:
            text = datetime.datetime.fromtimestamp(whole).astimezone().isoformat()
            self._stamp, self._second = (text[:19], text[19:]), second
        head, offset = self._stamp
        return f"{head}.{micros // 1000:03d}{offset}"

    def format(self, record):
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.message}"


def _split(created):
    """Epoch seconds as (whole seconds, microseconds), rounded as datetime.fromtimestamp
    rounds them (to the nearest microsecond, halves to even)."""
    fraction, whole = math.modf(created)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return int(whole), micros


def log_to_stderr(level=logging.INFO):
    """A service's logging: its stderr (the daemon's log file, or the foreground's stderr),
    in the daemon's line format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class DaemonLogHandler(logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler that survives any failure to write its file (see the module)."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=DIR_MODE, exist_ok=True)
        super().__init__(path)
        self.lost = 0               # lines dropped since the log could last be written
        self.failures = 0           # every failed line, over the handler's life
        self.first_error = None     # why the current stretch of failures began

    def emit(self, record):
        try:
            try:
                self.reopenIfNeeded()
            except OSError:
                self.stream = None          # the old file is gone and the new one cannot open
            if self.stream is None:
                self._recreate()
        except OSError as exc:
            self._failed(exc)
            return
        if self.lost:
            self._report_recovery()
        super(logging.handlers.WatchedFileHandler, self).emit(record)

    def _open(self):
        """Open (and create) the file without following a link planted at its name."""
        from torchcore.safepaths import LOG_MODE, open_file

        fd = open_file(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_MODE,
                       what="the daemon's log")
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)

    def _recreate(self):
        """Open the file again, making its directory first if it was removed or renamed."""
        directory = os.path.dirname(self.baseFilename)
        made = not os.path.isdir(directory)
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
        self.stream = self._open()
        self._statstream()
        if made:                    # say so: the old directory (and its logs) went somewhere
            note = logging.LogRecord("torchcore", logging.WARNING, __file__, 0,
                                     "the log directory %s was removed or renamed while in use; "
                                     "made it again", (directory,), None)
            super(logging.handlers.WatchedFileHandler, self).emit(note)

    def handleError(self, record):
        """A write failed (disk full, I/O error): counted, never raised, never a traceback."""
        self._failed(sys.exc_info()[1])

    def _failed(self, exc):
        self.failures += 1
        self.lost += 1
        if self.first_error is not None:
            return
        self.first_error = f"{type(exc).__name__}: {exc}"
        try:
            sys.stderr.write(f"torchcore: cannot write the daemon log {self.baseFilename}: "
                             f"{self.first_error}; lines are counted, not written, until it works\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def _report_recovery(self):
        lost, why = self.lost, self.first_error
        self.lost, self.first_error = 0, None
        line = logging.LogRecord("torchcore", logging.WARNING, __file__, 0,
                                 "the daemon log could not be written for a while: %d lines lost "
                                 "(%s)", (lost, why), None)
        super(logging.handlers.WatchedFileHandler, self).emit(line)


def failures():
    """Lines the daemon's log could not take, over the process's life (for stats and status)."""
    return sum(handler.failures for handler in logging.getLogger().handlers
               if isinstance(handler, DaemonLogHandler))
