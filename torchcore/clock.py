"""Time behind one small object so tests can substitute it.

The wall clock decides which seconds to match; the monotonic clock measures
timeouts, backoff and sleeping.
"""

import time


class SystemClock:
    """The real clocks."""

    def time(self):
        return time.time()

    def monotonic(self):
        return time.monotonic()


class FakeClock:
    """A clock the tests move by hand; ``step_wall`` changes only the wall clock."""

    def __init__(self, wall=1_700_000_000.0, mono=1000.0):
        self.wall = float(wall)
        self.mono = float(mono)

    def time(self):
        return self.wall

    def monotonic(self):
        return self.mono

    def advance(self, seconds):
        self.wall += seconds
        self.mono += seconds

    def step_wall(self, seconds):
        self.wall += seconds
