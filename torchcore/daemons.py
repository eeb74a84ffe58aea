"""Daemon tasks: each kept at `max` instances, a crash loop backing off.

A `daemon` task has no schedule: the supervisor starts instances until `max` run, and starts
another when one exits.  An instance that lived less than FAILED_START_UNDER is a failed start:
the next waits 1, 2, 4 ... seconds, BACKOFF_MAX at most, until an instance lives long enough.
"""

import dataclasses
import logging

from torchcore.states import DaemonState

log = logging.getLogger("torchcore")

FAILED_START_UNDER = 1.0    # a daemon instance that lived less than this is a failed start
BACKOFF_MAX = 60.0


@dataclasses.dataclass
class DaemonSlot:
    """Bookkeeping for a `daemon` task: restarts and the crash-loop backoff."""

    state: str = DaemonState.RUNNING
    failures: int = 0           # consecutive failed starts
    next_try: float = 0.0       # monotonic time before which no instance starts
    restarts: int = 0
    last_exit: object = None    # the outcome.RunResult of the last instance that ended

    def exited(self, name, result, started, mono):
        """An instance ended with ``result`` (a RunResult; started at ``started``, wall time, if
        it does not say); ``mono``: now."""
        self.last_exit = result
        self.restarts += 1
        lived = result.ended - (started if result.started is None else result.started)
        if lived >= FAILED_START_UNDER:
            self.failures = 0
            self.next_try = 0.0
            if self.state == DaemonState.BACKOFF:
                self.state = DaemonState.RUNNING     # BACKOFF -> RUNNING
            return
        self.failures += 1
        delay = min(BACKOFF_MAX, 2.0 ** (self.failures - 1))
        self.next_try = mono + delay
        if self.state == DaemonState.RUNNING:
            self.state = DaemonState.BACKOFF         # RUNNING -> BACKOFF
        log.warning("daemon %s failed to start (%d in a row, lived %.2fs): next try in %ds",
                    name, self.failures, lived, delay)

    def status(self, mono):
        last = None if self.last_exit is None else self.last_exit.fields()
        return {"state": self.state, "restarts": self.restarts, "failures": self.failures,
                "last_exit": last, "next_try_in": max(0.0, self.next_try - mono)}


class Daemons:
    """The daemon tasks of this node, by name."""

    def __init__(self):
        self._slots = {}            # name -> DaemonSlot

    def __bool__(self):
        return bool(self._slots)

    def __iter__(self):
        return iter(self._slots)

    def __contains__(self, name):
        return name in self._slots

    def __getitem__(self, name):
        return self._slots[name]

    def get(self, name):
        return self._slots.get(name)

    def admit(self, name):
        """A new or changed daemon task: a fresh slot (no backoff)."""
        self._slots[name] = DaemonSlot()

    def retire(self, name):
        self._slots.pop(name, None)

    def items(self):
        return self._slots.items()
