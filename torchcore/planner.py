"""The scheduling core as pure code: which (task, second) pairs start on each wake.

The supervisor keeps no other notion of time.  It hands the planner the current
epoch second; the planner walks the window (watermark, now] and answers which
tasks are due, which runs were missed, and what happened to the clock.  No
system calls, no wall clock: everything is a function of the seconds given, so
the rules below are tested exhaustively on a fake clock.

Rules (the README's "Semantics" section):
- Normal wake: the window is one second; the tasks matching it are due.
- Stall or forward step up to ``correction`` (3 h): each task with a scheduled
  second in the window is due once, for its latest such second, if that second
  is within ``misfire_grace`` of now; its other seconds are reported missed.
- Larger forward step: a clock correction; only ``now`` is matched.
- Backward step: the watermark follows the clock, but a *fixed-time* task (one
  that fires at most once an hour) never runs again for a wall time its zone
  has already passed; frequent tasks keep firing on the new wall time.  Past
  ``correction`` the wall memory is forgotten too.
- Daylight saving, per zone: wall times skipped by a spring gap are matched for
  fixed-time tasks at the first second after the gap; a repeated wall hour in
  autumn runs fixed-time tasks once (the backward-step rule again).

Quiet seconds: a second at which no task matches and no zone changes its UTC
offset ("busy" seconds are the others) changes nothing but the watermark and the
wall memory, so the planner passes a run of them in one step (``next_busy``
finds the next busy second in the C core; ``pass_quiet``, the catch-up and the
look-ahead skip to it): the rules above see every second, the cost follows the
seconds that have work, not the tasks loaded.
"""

import dataclasses
from datetime import datetime, timedelta

from torchcore.schedule import ScheduleTable

CLOCK_CORRECTION = 3 * 3600
HORIZON = 86400         # seconds next_busy searches ahead at most (it is asked again from there)
_ONE_SECOND = timedelta(seconds=1)


@dataclasses.dataclass
class Plan:
    """What one wake decided."""

    due: list = dataclasses.field(default_factory=list)      # (name, scheduled second)
    missed: list = dataclasses.field(default_factory=list)   # (name, latest missed second, count)
    events: list = dataclasses.field(default_factory=list)   # clock messages for the log


def wall_time(second, tz):
    """Naive wall time of an epoch second in ``tz`` (None: local), with ``fold`` kept."""
    if tz is None:
        return datetime.fromtimestamp(second)
    return datetime.fromtimestamp(second, tz).replace(tzinfo=None)


def _wall_key(wall):
    """Wall times compared as the clock on the wall shows them (fold ignored)."""
    return wall.replace(fold=0)


class _Zone:
    """One time zone in use: its table and the highest wall time it has passed."""

    def __init__(self, tz):
        self.tz = tz
        self.table = ScheduleTable(tz)
        self.wall_high = None

    def match(self, second, fixed):
        """Names due at ``second`` in this zone, applying the DST and backward-step rules."""
        wall = wall_time(second, self.tz)
        names = self.table.match(wall)
        key = _wall_key(wall)
        if self.wall_high is not None and key <= self.wall_high:
            names = [name for name in names if name not in fixed]   # a wall time seen before
        else:
            previous = _wall_key(wall_time(second - 1, self.tz))
            if key - previous > _ONE_SECOND and key - previous <= timedelta(hours=3):
                names = self._add_gap(names, previous, key, fixed)
            self.wall_high = key
        return names

    def passed(self, second):
        """``second`` was passed with nothing due: the wall memory as ``match`` leaves it."""
        key = _wall_key(wall_time(second, self.tz))
        if self.wall_high is None or key > self.wall_high:
            self.wall_high = key

    def next_busy(self, after, limit):
        """The first second in (after, after + limit] at which a task of this zone matches or
        its UTC offset changes, or None."""
        change = self.table.offset_change(after, after + limit)
        end = after + limit if change is None else change - 1
        found = None
        if end > after and len(self.table):
            ahead = self.table.first_match(wall_time(after + 1, self.tz), end - after)
            found = None if ahead is None else after + 1 + ahead
        return found if found is not None else change

    def _add_gap(self, names, previous, current, fixed):
        """Fixed-time tasks whose wall time was skipped (spring gap) run now, once."""
        found = dict.fromkeys(names)
        skipped = previous + _ONE_SECOND
        while skipped < current:
            for name in self.table.match(skipped):
                if name in fixed:
                    found[name] = None
            skipped += _ONE_SECOND
        return list(found)


class Planner:
    """Tracks the watermark and the per-zone tables; ``advance(now)`` plans one wake."""

    def __init__(self, misfire_grace=60, correction=CLOCK_CORRECTION):
        self.misfire_grace = misfire_grace
        self.correction = correction
        self.watermark = None
        self._zones = {}        # zone key -> _Zone
        self._zone_of = {}      # name -> zone key
        self._fixed = set()     # names of fixed-time tasks
        self._generation = 0    # bumped by every change of the tables
        self._quiet = None      # (generation, lo, hi, busy): (lo, hi) has no busy second

    def __len__(self):
        return len(self._zone_of)

    def __contains__(self, name):
        return name in self._zone_of

    def set(self, name, schedule):
        """Add or replace the schedule of ``name`` (its zone is the schedule's)."""
        if name in self._zone_of:
            self.remove(name)
        key = _zone_key(schedule.tz)
        zone = self._zones.get(key)
        if zone is None:
            zone = self._zones[key] = _Zone(schedule.tz)
        zone.table.set(name, schedule)
        self._generation += 1
        self._zone_of[name] = key
        if schedule.fixed_time:
            self._fixed.add(name)

    def remove(self, name):
        key = self._zone_of.pop(name)
        self._fixed.discard(name)
        self._generation += 1
        self._zones[key].table.remove(name)     # an empty zone stays: its wall memory must too

    def reschedule(self, old_tasks, out, into):
        """Take the names ``out`` off the table and put the tasks ``into`` on it (not daemons
        nor @reboot tasks: they have no seconds); ``old_tasks``: name -> Task before.

        If any step fails (a number the C core cannot hold, no memory), the table gets
        back every schedule it had and the error is raised: a reload is all or nothing.
        """
        touched = []
        try:
            for name in out:
                if name in self:
                    touched.append(name)
                    self.remove(name)
            for task in into:
                if task.type != "daemon" and not task.schedule.is_reboot:
                    touched.append(task.name)
                    self.set(task.name, task.schedule)
        except BaseException:
            for name in touched:
                if name in self:
                    self.remove(name)
                old = old_tasks.get(name)
                if old is not None and old.type != "daemon" and not old.schedule.is_reboot:
                    self.set(name, old.schedule)
            raise

    def aside(self):
        """An empty planner to fill away from the ticks (a big reload), see ``take``."""
        return Planner(self.misfire_grace, self.correction)

    def take(self, other):
        """Take the schedules of ``other`` (filled with ``aside``) all at once, keeping the
        watermark and each zone's wall memory (a zone left empty keeps it too)."""
        for key, zone in self._zones.items():
            if key not in other._zones:
                other._zones[key] = _Zone(zone.tz)
            other._zones[key].wall_high = zone.wall_high
        self._zones, self._zone_of, self._fixed = other._zones, other._zone_of, other._fixed
        self._generation += 1

    def peek(self, second):
        """Names a plain match of ``second`` gives, without changing anything.

        For preparing runs ahead of time only: ``advance`` stays the authority on what
        is due (clock steps, daylight saving and stalls can still change it).
        """
        if self.next_busy(second - 1) != second:
            return []
        names = []
        for zone in self._zones.values():
            names.extend(zone.table.match(wall_time(second, zone.tz)))
        return names

    def next_busy(self, after, limit=HORIZON):
        """The first second in (after, after + limit] at which any task matches or any zone
        changes its UTC offset, or None.  The answer is kept: asked again from a second of
        the same quiet stretch, it costs a comparison until the tables change."""
        known = self._quiet
        lo, start, span = after, after, max(limit, HORIZON)
        if known is not None and known[0] == self._generation and known[1] <= after < known[2]:
            _, lo, hi, busy = known
            if busy:
                return hi if hi <= after + limit else None
            if after + limit < hi:
                return None
            start = hi - 1          # quiet up to there: search on from it
        found = None
        for zone in self._zones.values():
            busy = zone.next_busy(start, span if found is None else found - 1 - start)
            if busy is not None and (found is None or busy < found):
                found = busy
        if found is None:
            self._quiet = (self._generation, lo, start + span + 1, False)
        else:
            self._quiet = (self._generation, lo, found, True)
        return found if found is not None and found <= after + limit else None

    def due_between(self, after, upto, max_busy):
        """What was due in (after, upto] when no tick planned it (the daemon stopping or down):
        ``({name: [first second, count]}, complete)``.  Busy seconds only (``next_busy``), so
        a long gap costs its busy seconds, not its seconds; at most ``max_busy`` of them are
        looked at (``complete`` False: the counts are lower bounds, tasks due only after that
        are left out).  Plain matches: the clock-step and daylight-saving rules are not applied,
        and nothing of the planner's state changes."""
        found, second, looked = {}, after, 0
        while (busy := self.next_busy(second, upto - second)) is not None:
            if looked == max_busy:
                return found, False
            looked, second = looked + 1, busy
            for zone in self._zones.values():
                for name in zone.table.match(wall_time(second, zone.tz)):
                    seen = found.setdefault(name, [second, 0])
                    seen[1] += 1
        return found, True

    def pass_quiet(self, upto):
        """Pass the seconds (watermark, upto] as ``advance`` would, one by one, finding nothing
        due; stops short of the first busy second (``advance`` plans that one).  Returns the
        watermark."""
        if self.watermark is None or upto <= self.watermark:
            return self.watermark
        busy = self.next_busy(self.watermark, upto - self.watermark)
        last = upto if busy is None else busy - 1
        if last > self.watermark:
            self._pass(last)
            self.watermark = last
        return self.watermark

    def _pass(self, second):
        for zone in self._zones.values():
            zone.passed(second)

    def start(self, now):
        """Begin at ``now``: the first wake that can start anything is the next second.

        The wall time of ``now`` counts as passed in every zone, so a backward step right
        after the start does not run fixed-time tasks for wall times before it.
        """
        self.watermark = now
        for zone in self._zones.values():
            zone.wall_high = _wall_key(wall_time(now, zone.tz))

    def advance(self, now):
        """Plan the window (watermark, now]; see the module docstring for the rules."""
        plan = Plan()
        if self.watermark is None:
            self.start(now - 1)
        if now == self.watermark:
            return plan
        if now < self.watermark:
            self._stepped_back(now, plan)
        elif now - self.watermark > self.correction:
            plan.events.append(
                f"clock jumped forward {now - self.watermark}s: treated as a clock correction, "
                "nothing caught up")
            self.watermark = now - 1
        if now - self.watermark > 1:
            self._catch_up(now, plan)
        elif self.next_busy(self.watermark) == now:
            plan.due = [(name, now) for name in self._match(now)]
        else:
            self._pass(now)
        self.watermark = now
        return plan

    def _stepped_back(self, now, plan):
        step = self.watermark - now
        if step > self.correction:
            plan.events.append(
                f"clock stepped back {step}s: treated as a clock correction, watermark reset")
            for zone in self._zones.values():
                zone.wall_high = None
        else:
            plan.events.append(
                f"clock stepped back {step}s: fixed-time tasks will not repeat wall times "
                "they already ran")
        self.watermark = now - 1

    def _catch_up(self, now, plan):
        """A window of several seconds (a stall or a forward step)."""
        plan.events.append(
            f"{now - self.watermark - 1}s were skipped (stall or clock step): catching up "
            f"within misfire_grace {self.misfire_grace}s")
        latest, earlier, counts = {}, {}, {}
        second = self.watermark
        while (busy := self.next_busy(second, now - second)) is not None:
            if busy > second + 1:
                self._pass(busy - 1)        # the quiet seconds between, in one step
            second = busy
            for name in self._match(second):
                if name in latest:
                    earlier[name] = latest[name]
                latest[name] = second
                counts[name] = counts.get(name, 0) + 1
        self._pass(now)
        for name, second in latest.items():
            if now - second <= self.misfire_grace:
                plan.due.append((name, second))
                if name in earlier:
                    plan.missed.append((name, earlier[name], counts[name] - 1))
            else:
                plan.missed.append((name, second, counts[name]))

    def _match(self, second):
        if len(self._zones) == 1:
            return next(iter(self._zones.values())).match(second, self._fixed)
        names = []
        for zone in self._zones.values():
            names.extend(zone.match(second, self._fixed))
        return names


def _zone_key(tz):
    return None if tz is None else getattr(tz, "key", None) or str(tz)
