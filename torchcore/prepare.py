"""Preparing ahead: which seconds to fork early, and how long a burst's executors hold back.

Ahead of each second the supervisor forks the executors of its runs, waiting for go (see
Starter.prepare_ahead): a second is prepared PREPARE_LEAD ahead, or earlier when its burst
is too big to fork in that time (seconds are prepared in order, so a big burst also brings the
ones before it).  More runs due in one second than there are cores start over a while; their
executors hold their wrap-up until the starts should be over (Executor._sit_out_burst), and
the supervisor holds its database writes as long.  This module decides those times (and spins
the loop's last moments to a boundary its prepared runs wait for); it forks nothing and knows
no run, only the planner's names due and the starts reported.
"""

import dataclasses

PREPARE_LEAD = 0.5          # seconds ahead of its second a run is prepared (forked, waiting for go)...
PREPARE_COST = 0.006        # ...or more for a big burst: about this much CPU per run, per launcher
LOOKAHEAD = 5               # seconds ahead the supervisor looks for bursts to prepare
MAX_PREPARED = 2000         # at most this many executors wait for their second at once
START_COST = 0.002          # CPU seconds a command's start takes, until measured (sh + date: 1.9 ms)
HOLD_MARGIN = 1.5           # a burst's executors hold their wrap-up this much longer than its starts
HOLD_MAX = 3.0              # ...and never longer than this after their second,
HOLD_SHARE = 0.3            # ...nor than this share of the time to the task's next run
EARLY_WAKE = 0.002          # with prepared runs waiting, the loop wakes this early and spins to
                            # the boundary (see await_boundary)


@dataclasses.dataclass
class Burst:
    """A second with more runs due than cores, while its hold lasts."""

    due: int                    # runs due in it
    held_until: float           # wall time its executors may wrap up (the latest hold given)
    latest: float = 0.0         # the latest start its runs reported


class Lookahead:
    """The seconds prepared so far, the names due in the next ones, and the bursts held."""

    def __init__(self, planner, clock, cores):
        self.planner = planner
        self.clock = clock
        self.cores = cores
        self.prepared_for = 0       # the last second prepared
        self.next_at = 0.0          # wall time to prepare the next second
        self._due_names = {}        # second -> names due then (planner.peek, in its order, as dict
                                    # keys: the look-ahead also asks whether a name is among them)
        self._next_gap = {}         # second -> name -> gap to its next run due (see _gaps)
        self._start_cost = START_COST   # measured on the bursts seen (see hold_until)
        self._bursts = {}           # second -> Burst
        self.once = ()              # names of `run: once` tasks: their seconds are claimed ...
        self.claim_lead = 0.0       # ... this long ahead at least (coordinator.py)
        self._quiet = None          # (wall, launchers, until) of a look that found nothing to
                                    # prepare before ``until``: another finds nothing either

    def seconds(self, launchers):
        """The seconds to prepare now, in order (each one counted prepared as it is yielded);
        sets ``next_at``.  ``launchers``: how many fork the runs."""
        wall = self.clock.time()
        if self._quiet is not None and self._quiet[0] <= wall < self._quiet[2] \
                and self._quiet[1] == launchers:
            return      # a pass woken by a report, an answer, a request: nothing new in sight
        first = max(self.prepared_for + 1, int(wall) + 1)
        upto = None
        self.next_at = float("inf")
        for second in range(first, int(wall) + LOOKAHEAD + 1):
            start_at = second - self._lead(second, launchers)
            if start_at <= wall:
                upto = second
            elif self.due_at(second):       # a second with nothing due needs no wake
                self.next_at = min(self.next_at, start_at)
        busy = self.planner.next_busy(int(wall) + LOOKAHEAD)
        comes_in = float("inf") if busy is None else busy - LOOKAHEAD   # a busy second enters
        if self.next_at == float("inf"):    # none due in sight: look again when one comes in
            self.next_at = comes_in
        self._quiet = None
        for second in range(first, (upto or 0) + 1):
            self.prepared_for = second
            self._learn_start_cost()
            yield second
        # Until a second due comes near or enters the window, whatever wakes the loop (a
        # report, an answer, a request), another look finds nothing to prepare.
        self._quiet = (wall, launchers, min(self.next_at, comes_in))
        for second in [s for s in self._due_names if s <= self.prepared_for]:
            del self._due_names[second]
        for second in [s for s in self._next_gap if s <= self.prepared_for]:
            del self._next_gap[second]

    def await_boundary(self, boundary):
        """Spin the last moments to the second ``boundary`` (prepared runs wait for it): the
        supervisor's loop, woken EARLY_WAKE before it, then gives the go at once."""
        if boundary - self.clock.time() > 2 * EARLY_WAKE:
            return          # woken by something else, well before the boundary
        give_up = self.clock.monotonic() + 2 * EARLY_WAKE
        while self.clock.time() < boundary and self.clock.monotonic() < give_up:
            pass

    def due_at(self, second):
        if second not in self._due_names:
            self._due_names[second] = dict.fromkeys(self.planner.peek(second))
        return self._due_names[second]

    def forget_due(self):
        """The schedule changed: the names due are asked again."""
        self._due_names.clear()
        self._next_gap.clear()
        self._quiet = None

    def hold_until(self, name, second):
        """When the executor of a run in a burst may wrap up (log, report, exit), or None.

        More runs due in one second than there are cores start over a while; executors
        waking meanwhile to wrap up after their command ended take CPU from the starts
        still to come (see Executor._sit_out_burst).  Their wrap-up waits until the starts
        should be over: runs x the CPU one start takes / cores, with a margin, at most
        HOLD_MAX and at most HOLD_SHARE of the time to the task's next run (its executor
        must be gone by then, or `max` skips the run).  The CPU per start is
        measured: the latest start seen in the last burst whose hold is over, spread over
        its runs and the cores (START_COST until then; see _learn_start_cost, called once
        for each second prepared).
        """
        due = len(self.due_at(second))
        if due <= self.cores:
            return None
        hold = min(HOLD_MAX, due * self._start_cost / self.cores * HOLD_MARGIN)
        gap = self._gaps(second).get(name)
        if gap is not None:
            hold = min(hold, gap * HOLD_SHARE)
        burst = self._bursts.get(second)
        if burst is None:
            burst = self._bursts[second] = Burst(due, second)
        burst.held_until = max(burst.held_until, second + hold)
        return second + hold

    def _gaps(self, second):
        """name -> seconds from ``second`` to its next run due within LOOKAHEAD (worked out
        once for each second of a burst, not for each of its runs)."""
        gaps = self._next_gap.get(second)
        if gaps is None:
            gaps = self._next_gap[second] = {}
            for gap in range(LOOKAHEAD, 0, -1):
                gaps.update(dict.fromkeys(self.due_at(second + gap), gap))
        return gaps

    def started(self, second, at):
        """A run of ``second`` reported that its command started at ``at``."""
        burst = self._bursts.get(second)
        if burst is not None and isinstance(at, (int, float)):
            burst.latest = max(burst.latest, at)

    def in_burst(self):
        """True while a burst's starts are under way (up to its hold): the database waits.

        Writing a burst's start records right after its tick took 150-230 ms of a 200-run
        burst (the supervisor's share of the CPU is small then) and took CPU from the
        starts; after the hold, one transaction writes them with most of the ends (a run's
        end replaces its start in the buffer, so most runs are written once)."""
        now = self.clock.time()
        return any(second <= now < burst.held_until for second, burst in self._bursts.items())

    def _learn_start_cost(self):
        """Fold the bursts whose hold is over (and whose reports are in) into the CPU per start."""
        now = self.clock.time()
        for second, burst in sorted(self._bursts.items()):
            if burst.held_until + 1 > now:
                break
            del self._bursts[second]
            if burst.latest > 0:     # up at once, down by a quarter a burst at most
                measured = (burst.latest - second) * self.cores / burst.due
                self._start_cost = min(max(measured, 0.75 * self._start_cost, 0.0002), 0.02)

    def _lead(self, second, launchers):
        due = self.due_at(second)
        lead = max(PREPARE_LEAD, len(due) * PREPARE_COST / launchers)
        if self.claim_lead and not self.once.isdisjoint(due):
            lead = max(lead, self.claim_lead)
        return lead
