"""When the supervisor's loop wakes, and what it skips when it does: idle means idle.

The loop sleeps until the next second that has work, never walking the tasks or the runs to
find it: the next busy second comes from the planner (a task matches, or a zone changes its
UTC offset; found by the C core and kept between passes), the rest from a few deadlines: the
prepare-ahead time of the next burst, a retry, a daemon's backoff, the stats line, the prune,
a launcher to start again, the file watch's safety look.  What needs a look every second
wakes the loop each second only while it is there: runs followed by pid, records waiting to
be written, control clients, the task file when it is polled (no inotify).  MAX_SLEEP bounds
every sleep, so a wall-clock step the timerfd cannot hear (none, or a clock faked inside the
process) is still seen within it.

Waking, the loop passes the quiet seconds it slept through in one step (Planner.pass_quiet),
as if it had ticked each one; a wall-clock step shows as the wall and monotonic clocks parting,
and then only the seconds before the step are passed so the planner sees the step as it always
did.  Daemon tasks are tended when a run came or went, a reload happened, or a backoff ran out.

A busy loop (a burst's reports and launchers' answers arriving one by one) naps between passes
that come less than COALESCE apart, so each pass reads a batch of them: the CPU a run costs the
supervisor is then mostly its own work, not that of a pass for each message.  A signal or a
control request ends a nap; no nap goes past the next second's work or a boundary.
"""

import math

from torchcore.prepare import EARLY_WAKE

MAX_SLEEP = 10.0            # the longest sleep: a wall-clock step no timerfd heard is seen by then
STEP_TOLERANCE = 0.5        # wall and monotonic time parting by more: the wall clock was stepped
COALESCE = 0.05             # a pass comes no sooner than this after the one before (a nap
                            # between): the reports and answers of a burst are read in batches


class Wakeups:
    """The supervisor's sleep and what it passes over on waking (``sup``: the Supervisor)."""

    def __init__(self, sup):
        self.sup = sup
        self.passes = 0             # passes of the loop (its wake-ups), for the stats line
        self.last_pass = None       # (wall, monotonic) at the last pass: steps show in them
        self._tend_mark = None      # what tend_daemons last saw (see tend)
        self._tend_at = 0.0         # monotonic: a daemon's backoff or retry is due
        self._slept_at = None       # monotonic: when the loop last went to sleep

    def started(self):
        clock = self.sup.clock
        self.last_pass = (clock.time(), clock.monotonic())

    def sleep_time(self):
        """Seconds until the next second with work or the next deadline (MAX_SLEEP at most)."""
        sup = self.sup
        wall, mono = sup.clock.time(), sup.clock.monotonic()
        every_second = (int(wall) + 1 - wall) + 0.0005
        if sup.stopping:
            wait = every_second
            if sup.shutdown_deadline is not None:
                wait = min(wait, max(0.0, sup.shutdown_deadline - mono))
            return min(wait, 1.0)
        wait = self.next_second(wall) - wall + 0.0005
        if sup.table.prepared:
            wait = max(0.0, wait - 0.0005 - EARLY_WAKE)   # epoll rounds up to whole ms
        if sup.launchers and wall < sup.ahead.next_at:
            wait = min(wait, sup.ahead.next_at - wall)
        control = sup.control
        if sup.records.pending:     # written at flush_at (or each second, while held back)
            flush_in = sup.flush_at - mono
            wait = min(wait, flush_in if flush_in > 0 else every_second)
        if sup.table.followed or sup.filewatch.polling or (
                control is not None and (control.connections
                                         or control.accept_paused_until is not None)):
            wait = min(wait, every_second)
        deadlines = [sup.ledger.next_due(), sup.filewatch.next_look() or math.inf,
                     sup.services.next_wake() or math.inf]
        if sup.daemons:
            deadlines.append(self._tend_at)
        if len(sup.launchers) < sup.launchers.target:
            deadlines.append(sup.launchers.retry_at)
        wait = min(wait, min(deadlines) - mono)
        return max(0.0, min(wait, MAX_SLEEP))

    def nap(self, timeout):
        """Before sleeping ``timeout`` on the selector: the loop went to sleep less than
        COALESCE ago, so it is busy with events (a burst's reports and launchers' answers, one
        by one); those coming in the rest of COALESCE are read together by the next pass, a
        nap away, unless a signal or a control request comes first.  Never past ``timeout``:
        a second's work, a boundary and a reload (its stream, its slices) are not delayed.
        Returns what is left of ``timeout``."""
        sup = self.sup
        mono = sup.clock.monotonic()
        slept_at, self._slept_at = self._slept_at, mono
        if slept_at is None or sup.stopping or sup.reloader.current is not None:
            return timeout      # a reload's stream is read as it comes: no nap holds it up
        gap = slept_at + COALESCE - mono
        if gap <= 0 or timeout <= gap:
            return timeout
        slept = sup.system.nap(gap, sup.nap_fds())
        return max(0.0, timeout - slept)

    def next_second(self, wall):
        """The next second the planner has work for (with a retry waiting: the next second)."""
        planner = self.sup.planner
        if self.sup.starter.retry or planner.watermark is None:
            return int(wall) + 1
        busy = planner.next_busy(planner.watermark)
        return int(wall) + MAX_SLEEP if busy is None else busy

    def boundary(self):
        """The second prepared runs wait for: the next busy one."""
        planner = self.sup.planner
        return planner.next_busy(planner.watermark) or planner.watermark + 1

    def pass_quiet(self, now):
        """Pass the quiet seconds slept through in one step, up to the second before ``now``,
        or, when the wall clock was stepped meanwhile, up to the second the step came in: the
        tick then sees the step as before (stall, catch-up, correction and backward rules)."""
        clock = self.sup.clock
        wall, mono = clock.time(), clock.monotonic()
        last_wall, last_mono = self.last_pass or (wall, mono)
        self.last_pass = (wall, mono)
        expected = last_wall + (mono - last_mono)       # the wall time had it not been stepped
        upto = now - 1 if abs(wall - expected) <= STEP_TOLERANCE else int(expected)
        self.sup.planner.pass_quiet(upto)

    def tend(self):
        """tend_daemons when something changed since it last ran (a run started or ended, a
        reload) or a backoff or a retry is due; the daemons need nothing otherwise."""
        sup = self.sup
        if not sup.daemons:
            return
        mono = sup.clock.monotonic()
        if self._mark() == self._tend_mark and mono < self._tend_at:
            return
        sup.starter.tend_daemons()
        self._tend_mark = self._mark()
        self._tend_at = math.inf
        for name, slot in sup.daemons.items():      # only after a change: a run came or went
            task = sup.tasks.get(name)
            if task is not None and sup.table.count(name) < task.max:
                self._tend_at = min(self._tend_at, max(slot.next_try, mono + 1.0))

    def _mark(self):
        sup = self.sup
        return len(sup.table), sup.stats.started, id(sup.tasks)
