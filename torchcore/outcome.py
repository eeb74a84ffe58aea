"""How a run ended (``RunResult``): the one rule for "failed", and its outcome in a few words.

Records, ``history --failed``, ``status``, the daemon's log line, a daemon task's last exit and
the executor's own "run ended" line all decide "failed" and describe an outcome here
(records._FAILED is the same rule in SQL for queries; tests/test_outcome.py checks they agree).
It imports only ``signal``: the executors, forked by the hundred, use it too.
"""

import signal as _signal


class RunResult:
    """How one run ended: its exit code or signal, a timeout, an error (the executor died, the
    command could not start, a memory limit), a planned stop and why, its start and end (epoch
    seconds) and its peak memory (bytes).

    The executor fills one in as its run goes (a plain class with slots, no dataclass: see
    proctitle); everyone else only reads one.
    """

    FIELDS = ("exit_code", "signal", "timed_out", "error", "stopped", "started", "ended",
              "peak_rss")
    __slots__ = FIELDS

    def __init__(self, exit_code=None, signal=None, timed_out=False, error=None, stopped=None,
                 started=None, ended=None, peak_rss=None):
        self.exit_code = exit_code
        self.signal = signal
        self.timed_out = timed_out
        self.error = error
        self.stopped = stopped          # why a planned stop (shutdown, reload) ended it, or None
        self.started = started
        self.ended = ended
        self.peak_rss = peak_rss

    @classmethod
    def from_returncode(cls, code, **fields):
        """A result from a return code as Popen and os.waitstatus_to_exitcode give it (minus
        the signal number when a signal ended the process)."""
        exit_code, signal = split_returncode(code)
        return cls(exit_code=exit_code, signal=signal, **fields)

    @classmethod
    def from_report(cls, end, stop_reason, killed=False):
        """The result an executor's end report (wire.End) says, ``stop_reason`` the planned
        stop the supervisor asked for (if the report says a stop request ended the run, or
        ``killed``: the supervisor sent SIGKILL to the command's group itself, and the executor,
        killed a moment later, saw its command die of it first and reported that)."""
        stopped = end.stopped or (killed and end.signal == _signal.SIGKILL)
        return cls(exit_code=end.exit_code, signal=end.signal, timed_out=bool(end.timed_out),
                   error=end.error, stopped=stop_reason if stopped else None,
                   started=end.started, ended=end.ended, peak_rss=end.peak_rss)

    @property
    def failed(self):
        """The one rule for an ended run: it failed unless it ended with exit 0, or a planned
        stop (shutdown, restart, reload) ended it.  A timeout, a signal, an error is a failure
        whatever the exit code; so is an end without an exit code (the executor never saw one).
        Every place that says failed or ok uses this (_FAILED is the same rule in SQL)."""
        if self.stopped is not None:
            return False
        return self.exit_code != 0 or self.signal is not None or bool(self.timed_out) or \
            self.error is not None

    def ending(self, raw=False):
        """How its process ended: "exit 3", "killed by SIGKILL", or None when unknown.  ``raw``:
        in the numbers of a wait status ("exit status 3", "killed by signal 9"), as the daemon
        tells an executor's own end apart from its command's."""
        if self.signal is not None:
            return f"killed by signal {self.signal}" if raw else \
                f"killed by {signal_name(self.signal)}"
        if self.exit_code is not None:
            return f"exit status {self.exit_code}" if raw else f"exit {self.exit_code}"
        return None

    def describe(self):
        """The outcome in a few words: "ok", "exit 3", "killed by SIGKILL", "timed out
        (killed by SIGTERM)", "stopped: shutdown", "failed: executor ended without a report ..."."""
        if self.stopped is not None:
            return f"stopped: {self.stopped}"
        if not self.failed:
            return "ok"
        status = self.ending()
        if self.timed_out:
            text = f"timed out ({status})" if status else "timed out"
        else:
            text = status or "failed"
        return f"{text}: {self.error}" if self.error is not None else text

    def fields(self):
        """The result as a plain dict (JSON: a daemon task's last exit in ``status``)."""
        return {name: getattr(self, name) for name in self.FIELDS}

    def __eq__(self, other):
        return type(other) is RunResult and self.fields() == other.fields()

    __hash__ = None

    def __repr__(self):
        return "RunResult({})".format(", ".join(f"{k}={v!r}" for k, v in self.fields().items()
                                                if v is not None and v is not False))


def split_returncode(code):
    """(exit code, signal) of a return code (negative: the signal that ended the process)."""
    return (None, -code) if code < 0 else (code, None)


def signal_name(number):
    """SIGTERM for 15; "signal 99" for a number without a name."""
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
