"""The one rule for how a run ended: failed or not, and its outcome in a few words.

Records, ``history --failed``, ``status`` and the daemon's log line all decide
"failed" and describe an outcome here (records._FAILED is the same rule in SQL for
queries).  It imports only ``signal``: the executors, forked by the hundred, use it too.
"""

import signal as _signal


def run_failed(exit_code, signal, timed_out, error=None, stopped=None):
    """The one rule for an ended run: it failed unless it ended with exit 0, or a planned stop
    (shutdown, restart, reload) ended it.  A timeout, a signal, an error (the executor died, the
    command could not start, a memory limit) is a failure whatever the exit code.  Every place that
    says failed or ok uses this (_FAILED is the same rule in SQL)."""
    if stopped is not None:
        return False
    return exit_code != 0 or signal is not None or bool(timed_out) or error is not None


def describe_outcome(exit_code, signal, timed_out, error=None, stopped=None):
    """An ended run's outcome in a few words: "ok", "exit 3", "killed by SIGKILL", "timed out
    (killed by SIGTERM)", "stopped: shutdown", "failed: executor ended without a report ..."."""
    if stopped is not None:
        return f"stopped: {stopped}"
    if not run_failed(exit_code, signal, timed_out, error):
        return "ok"
    status = (f"killed by {signal_name(signal)}" if signal is not None
              else f"exit {exit_code}" if exit_code is not None else None)
    if timed_out:
        text = f"timed out ({status})" if status else "timed out"
    else:
        text = status or "failed"
    return f"{text}: {error}" if error is not None else text


def signal_name(number):
    """SIGTERM for 15; "signal 99" for a number without a name."""
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
