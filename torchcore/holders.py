"""Who runs the `run: once` tasks: the node that ran each one's last second, and the node in each
slot of its fleet-wide ``max`` (a `once` daemon's instances, the runs under way), as
``torchcore.claims`` and ``torchcore.slots`` say (claims.py).

One statement, HOLDERS, for a list of tasks, reads at most a few index entries per task (the
newest started claims, never the week of them) and the task's slot rows, of each node name no
more than is shown (the report goes to the supervisor every EVERY seconds):

- ``fleet tasks`` and the web API's ``/api/v1/fleet/tasks`` read it as they read the rest
  (fleetquery.task_view);
- ``status`` never waits on the database: the claims process (claimer.py) reads it every EVERY
  seconds while its node has `once` tasks (the supervisor names them: ``{"watch": [...]}``) and
  sends it to the supervisor (``{"holding": ...}``), which keeps the last one (``Known``), adds
  its own starts and daemon slots since, and answers it on its control socket.

This module imports neither psycopg nor the supervisor.
"""

import datetime

from torchcore.claims import SCHEMA, SLOT
from torchcore.textfmt import cut, printable

EVERY = 5.0             # seconds between the claims process's reads of the holders
NODE_SHOWN = 64         # characters of a node name shown (a valid one has 63 at most)
NEWEST = 8              # started claims read per task (a claim decided "fleet max N reached"
#                         is started and ended at once: not a run; the slots cover the rest)

HOLDERS = f"""
SELECT k.task, c.second, c.fence, left(c.node, {NODE_SHOWN + 1}), extract(epoch FROM c.started)::float8,
       NULL::integer, NULL::float8, false
FROM unnest(%(tasks)s::text[]) AS k(task)
CROSS JOIN LATERAL (
    SELECT second, fence, node, started, ended FROM {SCHEMA}.claims
    WHERE task = k.task AND slot = {SLOT} AND started IS NOT NULL
    ORDER BY second DESC LIMIT {NEWEST}) AS c
WHERE c.ended IS NULL OR c.ended > c.started
UNION ALL
SELECT s.task, s.second, s.fence, left(s.node, {NODE_SHOWN + 1}),
       extract(epoch FROM c.started)::float8, s.slot,
       extract(epoch FROM s.lease_until)::float8,
       coalesce(s.lease_until > now() AND (s.second IS NULL OR c.started IS NOT NULL), false)
FROM {SCHEMA}.slots AS s
LEFT JOIN {SCHEMA}.claims AS c
  ON c.task = s.task AND c.second = s.second AND c.slot = {SLOT} AND c.fence = s.fence
WHERE s.task = ANY(%(tasks)s::text[]) AND s.node IS NOT NULL"""


def collect(rows):
    """``{task: {"last": [second, fence, node, started] | None, "slots": [[slot, node, fence,
    second, lease_until], ...]}}`` of HOLDERS' rows (times in epoch seconds; a daemon's slot
    has no second): the newest second that started, and the slots held now (a scheduled run's
    once it has started: not the slot a claim takes just before its second)."""
    found = {}
    for task, second, fence, node, started, slot, lease_until, held in rows:
        entry = found.setdefault(task, {"last": None, "slots": []})
        if started is not None and second is not None:
            last = entry["last"]
            if last is None or (second, fence) > (last[0], last[1]):
                entry["last"] = [int(second), int(fence), node, float(started)]
        if slot is not None and held:
            entry["slots"].append([int(slot), node, None if fence is None else int(fence),
                                   None if second is None else int(second), lease_until])
    for entry in found.values():
        entry["slots"].sort(key=lambda s: s[0])
    return found


def as_json(entry, iso):
    """A task's holders (an entry of ``collect``) as JSON: ``iso(epoch, timespec)`` writes times.

    ``{"last": {"second", "fence", "node", "started"} | null,
    "slots": [{"slot", "node", "fence", "second" (null for a daemon), "lease_until"}]}``
    """
    entry = entry or {"last": None, "slots": []}
    last = entry.get("last")
    return {
        "last": last and {"second": iso(last[0], "seconds"), "fence": last[1], "node": last[2],
                          "started": iso(last[3], "seconds")},
        "slots": [{"slot": slot, "node": node, "fence": fence,
                   "second": iso(second, "seconds"), "lease_until": iso(lease_until, "seconds")}
                  for slot, node, fence, second, lease_until in entry.get("slots") or ()]}


def lines(name, holders, me=None, today=None):
    """``status`` and ``fleet tasks``: a line per fact of a task's holders (``as_json``'s form);
    ``me``: this node's name, said as such; ``today``: the date whose times show without it.
    A node name is what a row of the fleet database says: cut, its control characters escaped."""
    def node(name):
        shown = printable(cut(str(name), NODE_SHOWN))
        return f"{shown} (this node)" if me is not None and name == me else shown
    name = printable(name)
    found = []
    last = holders.get("last")
    if last:
        found.append(f"{name}: last second {_clock(last['second'], today)} (fence "
                     f"{last['fence']}) ran on {node(last['node'])}")
    for slot in holders.get("slots") or ():
        running = f", running second {_clock(slot['second'], today)}" if slot["second"] else ""
        until = f", lease until {_clock(slot['lease_until'], today)}" if slot["lease_until"] else ""
        found.append(f"{name}: slot {slot['slot']} held by {node(slot['node'])}{running}{until}")
    return found or [f"{name}: no run and no slot held yet"]


def _clock(text, today):
    """An ISO 8601 time as HH:MM:SS, with its date when it is not ``today``."""
    if not text:
        return "-"
    when = datetime.datetime.fromisoformat(text)
    return when.strftime("%H:%M:%S" if when.date() == today else "%Y-%m-%d %H:%M:%S")


# ---- the claims process's side --------------------------------------------------------------

class Reporter:
    """In the claims process: the tasks to watch, read every EVERY seconds, sent when asked."""

    def __init__(self):
        self.watch = []         # the node's `run: once` tasks (the supervisor's "watch")
        self.at = 0.0           # the next read

    def tend(self, claimer, now):
        """Read the holders and send them, when due (not while the database is away: the
        reconnection is the claims' own business)."""
        if not self.watch or now < self.at or claimer.orphaned or claimer.down is not None:
            return
        self.at = now + EVERY
        rows = claimer.execute(HOLDERS, {"tasks": self.watch})
        if rows is not None:
            claimer.send({"holding": {"at": claimer.clock(), "tasks": collect(rows)}})


# ---- the supervisor's side ------------------------------------------------------------------

class Known:
    """In the supervisor: the claims process's last report, and this node's own starts since."""

    def __init__(self):
        self.tasks, self.at = {}, None
        self.own = {}           # name -> [second, fence, node, started]: this node's newest start

    def reported(self, holding):
        self.tasks, self.at = holding.get("tasks") or {}, holding.get("at")

    def ran(self, name, second, fence, node, at):
        self.own[name] = [int(second), int(fence), node, at]

    def of(self, name, node, own_slots):
        """A task's holders as ``collect`` has them, and the time of the report (None before
        the first); ``own_slots``: ``{slot: fence}`` this node holds now (the report may be
        older than their taking)."""
        entry = self.tasks.get(name) or {"last": None, "slots": []}
        last, mine = entry.get("last"), self.own.get(name)
        if mine is not None and (last is None or mine[:2] > last[:2]):
            last = mine
        # a slot this node holds now under another fence than the report's: taken since
        slots = [slot for slot in entry.get("slots") or ()
                 if own_slots.get(slot[0], slot[2]) == slot[2]]
        known = {slot[0] for slot in slots}
        slots += [[slot, node, fence, None, None] for slot, fence in sorted(own_slots.items())
                  if slot not in known]
        return {"last": last, "slots": sorted(slots, key=lambda s: s[0])}, self.at
