"""What the supervisor writes down: run records, the stats line's counts, each task's last
result and last skip, and the failures of its own work it contained.

The supervisor decides (start, skip, refuse, retry, stop); the ledger turns each outcome into
its RunRecord, its counts and its log line, so a decision and its bookkeeping are not written
out together in many places.  Records are buffered by records.Records (see its flush).
"""

import bisect
import dataclasses
import logging
import os
import time

import psutil

from torchcore import daemonlog
from torchcore.outcome import RunResult
from torchcore.runrecord import RunRecord

log = logging.getLogger("torchcore")

STATS_EVERY = 60            # seconds between stats lines
PRUNE_EVERY = 6 * 3600      # seconds between prunes of records older than history_days
PLANNED = "planned_upto"     # meta key: the last second this node's planner has passed
UNPLANNED_BUSY = 20_000     # busy seconds looked at, at most, in seconds no tick planned


TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)   # seconds


@dataclasses.dataclass
class Stats:
    started: int = 0
    failed: int = 0
    skipped: int = 0
    missed: int = 0
    fork_failures: int = 0
    errors: int = 0             # failures of the supervisor's own work, contained (see contain)
    reloads_accepted: int = 0
    reloads_rejected: int = 0
    ticks: int = 0              # ticks, how long they took in all, and how many took up to
    tick_seconds: float = 0.0   # each of TICK_BUCKETS (the last count: longer) -- /metrics
    tick_buckets: list = dataclasses.field(default_factory=lambda: [0] * (len(TICK_BUCKETS) + 1))

    def tick_took(self, seconds):
        self.ticks += 1
        self.tick_seconds += seconds
        self.tick_buckets[bisect.bisect_left(TICK_BUCKETS, seconds)] += 1


class Ledger:
    """The records and counts of one supervisor's runs (``records`` set once it is open)."""

    def __init__(self, node_name, clock):
        self.node_name = node_name
        self.clock = clock
        self.records = None
        self.stats = Stats()
        self.last_result = {}       # name -> RunResult of its last finished run
        self.skipped_last = {}      # name -> reason, while its last due run was skipped
        self._refusals_logged = set()   # names whose refusal was logged once
        self._errors_seen = set()       # (where, exception type) already logged once
        self._next_stats = clock.monotonic() + STATS_EVERY
        self._next_prune = 0.0

    def timed_tick(self, tick, now):
        """``tick(now)``, with how long it took counted (/metrics' tick histogram)."""
        began = self.clock.monotonic()
        tick(now)
        self.stats.tick_took(self.clock.monotonic() - began)

    def reloaded(self, accepted, message):
        """A reload's verdict counted; returns what the supervisor keeps as its last_reload."""
        if accepted:
            self.stats.reloads_accepted += 1
        else:
            self.stats.reloads_rejected += 1
        return (self.clock.time(), accepted, message)

    def contain(self, what, exc):
        """One unit of work failed (a task's start, a launcher's answer, a pass): count it, log
        it once for each kind, and go on with the rest.  The supervisor outlives its bugs and
        whatever the system throws at it; the count shows in the stats line and in status."""
        self.stats.errors += 1
        kind = (what, type(exc).__name__)
        if kind in self._errors_seen:
            return
        self._errors_seen.add(kind)
        log.error("%s failed, carrying on (more of these are counted, not logged): %s: %s",
                  what, type(exc).__name__, exc)
        log.debug("the failure of %s", what, exc_info=exc)

    def next_due(self):
        """The monotonic time of the next prune or stats line (the loop wakes for it)."""
        return min(self._next_stats, self._next_prune)

    def now_and_then(self, history_days, tasks, running, wakes=0):
        """Prune the records older than ``history_days`` (at once, then every PRUNE_EVERY) and
        log the stats line (every STATS_EVERY), with ``tasks`` on this node and ``running``."""
        if self.clock.monotonic() >= self._next_prune:
            self._next_prune = self.clock.monotonic() + PRUNE_EVERY
            pruned = self.records.prune(self.clock.time() - history_days * 86400)
            if pruned:
                log.info("pruned %d records older than %d days", pruned, history_days)
        if self.clock.monotonic() >= self._next_stats:
            self._next_stats = self.clock.monotonic() + STATS_EVERY
            log.info("%s", self.stats_line(tasks, running, wakes))

    def stats_line(self, tasks, running, wakes=0):
        """The periodic stats line: the counts, with ``tasks`` on this node and ``running``."""
        load = os.getloadavg()
        rss = psutil.Process().memory_info().rss
        s = self.stats
        return (f"stats: tasks={tasks} running={running} started={s.started} "
                f"failed={s.failed} skipped={s.skipped} missed={s.missed} "
                f"fork_failures={s.fork_failures} errors={s.errors} wakes={wakes} "
                f"log_failures={daemonlog.failures()} "
                f"load={load[0]:.2f},{load[1]:.2f},{load[2]:.2f} "
                f"rss={rss // 1024}K mem_used={psutil.virtual_memory().percent}%")

    def started(self, run):
        self.records.add(RunRecord.of_start(
            run.run_id, run.task.name, self.node_name, run.scheduled, run.started, run.manual,
            pid=run.pgid or run.executor_pid))    # the command's pid once known (one pid per run)

    def refused(self, task, second, manual, run_id, reason):
        """A run that cannot be handed to a launcher: recorded at once as failed (exit 126, as
        a command that cannot start), with the reason in the log; returns its RunResult."""
        now = self.clock.time()
        self.stats.failed += 1
        if task.name not in self._refusals_logged:
            self._refusals_logged.add(task.name)
            log.error("%s: run %d refused: %s (further refusals of it are recorded, not logged)",
                      task.name, run_id, reason)
        result = RunResult(exit_code=126, started=now, ended=now, error=f"refused: {reason}")
        self.last_result[task.name] = result
        self.records.add(RunRecord.of_refusal(run_id, task.name, self.node_name, second, manual,
                                              now))
        return result

    def fork_failed(self, run, error):
        """A launcher could not fork the run's executor: not a start after all."""
        self.stats.fork_failures += 1
        self.stats.started -= 1
        log.error("cannot fork for %s (run %d): %s; retrying next second", run.task.name,
                  run.run_id, error)
        self.records.add(RunRecord.of_failed_fork(run.run_id, run.task.name, self.node_name,
                                                  run.scheduled, run.manual, error))

    def ended(self, run, result, log_problem=None):
        """A run whose executor has exited, with its RunResult (from the executor's report, or
        made up for an executor that ended without one); ``log_problem``: text for the log line."""
        record = RunRecord.of_end(run.run_id, run.task.name, self.node_name, run.scheduled,
                                  run.manual, run.pgid, result)
        self.stats.failed += record.failed
        self.last_result[run.task.name] = result
        self.records.add(record)
        log.info("%s run %d ended: %s after %.3fs%s", run.task.name, run.run_id, record.describe(),
                 record.duration or 0.0, log_problem or "")

    def skipped(self, task, second, reason, manual):
        if task.type == "daemon":   # a daemon waiting for a limit is not a skipped run: its
            if self.skipped_last.get(task.name) != reason:      # wait counts once, not each pass
                self.stats.skipped += 1
            self.skipped_last[task.name] = reason
            return
        self.stats.skipped += 1
        self.skipped_last[task.name] = reason
        log.warning("%s: run for %s skipped: %s", task.name, _fmt_second(second), reason)
        self.records.add(RunRecord.of_skip(self.records.allocate_run_id(), task.name,
                                           self.node_name, second, reason, manual))

    def missed(self, name, second, count, misfire_grace):
        self.stats.missed += count
        log.warning("%s: %d run(s) missed, the latest for %s (beyond misfire_grace %ds or "
                    "replaced by a later one)", name, count, _fmt_second(second), misfire_grace)
        self.records.add(RunRecord.of_miss(self.records.allocate_run_id(), name, self.node_name,
                                           second, count))

    def resumed(self, planner, now, once=()):
        """A start: the seconds since the last one a previous supervisor planned (kept in the
        records' meta table; none at a first start) are missed, and ``now`` is kept."""
        self.unplanned(planner, _second(self.records.recall(PLANNED)), now,
                       "while torchcore was not running", once)
        self.records.remember(PLANNED, now)

    def planned(self, second):
        """The last second planned, kept for the next start (written with the records)."""
        self.records.remember(PLANNED, second)

    def stopped(self, planner, now, once=()):
        """A stop: the seconds since the last tick, which none planned, are missed; the second
        it stopped is kept for the next start."""
        self.unplanned(planner, planner.watermark, now, "while torchcore was stopping", once)
        self.records.remember(PLANNED, max(now, planner.watermark or now))

    def unplanned(self, planner, after, upto, why, once=()):
        """The seconds (after, upto] that no tick planned (the daemon stopping, or down): each
        task due in them gets one miss record, for its first such second, with its count (a
        lower bound, said so, past UNPLANNED_BUSY busy seconds).  Not the ``once`` tasks (`run:
        once`): the other nodes claimed and ran their seconds, and this node was not to run
        them unless it won them (as when it runs, it records nothing of a second it did not)."""
        if after is None or upto <= after:
            return
        found, complete = planner.due_between(after, upto, UNPLANNED_BUSY)
        found = {name: seen for name, seen in found.items() if name not in once}
        bound = "" if complete else "at least "
        for name, (first, count) in sorted(found.items()):
            self.stats.missed += count
            self.records.add(RunRecord.of_miss(
                self.records.allocate_run_id(), name, self.node_name, first, count, why,
                at_least=not complete))
        if found:
            log.warning("%d task(s) missed %s%d run(s) due %s (%s to %s)%s", len(found), bound,
                        sum(count for _, count in found.values()), why, _fmt_second(after + 1),
                        _fmt_second(upto), "" if complete else
                        f"; only the first {UNPLANNED_BUSY} busy seconds were looked at")


def _second(value):
    """An epoch second kept in the meta table, or None."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _fmt_second(second):
    if second is None:
        return "now"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
