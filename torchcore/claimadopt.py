"""The leases of the `run: once` runs a restarted node adopts (adopt.py).

A supervisor killed with its claims process (kill -9, the OOM killer) leaves its runs going in
their executors; the new supervisor adopts them, but its new claims process knows neither their
tokens nor their slots.  Unrenewed, their leases would end under runs still going, and another
node (or this one) would record them lost and, with ``on_node_loss: rerun``, run them a second
time while they run here.  So the supervisor hands them over (``adopt``: run id, task, scheduled
second or None for a daemon's instance, process group, kill_grace, executor pid), and this
process finds each one's slot among those its node still holds under a live lease (a scheduled
run's by its second, its claim started, not ended, not recorded lost; a daemon's instance, a
slot of its task with no second), and renews it like any other lease (RENEW).  It answers
``adopted`` (run id, task, the held key, the token): from then on the run is an ordinary held
run.  A run whose lease is gone (it may be recorded lost, and re-run elsewhere) is ``unheld``:
the supervisor kills it at once.  With the database away the adoption is tried again every
second, and given up (unheld) before the earliest its old lease could end: a third of the lease
after it was handed over, as for a restart's ``hold`` (claimer.py).
"""

import logging

from torchcore import claims

log = logging.getLogger("torchcore")

S = claims.SCHEMA

# The slots this node still holds, of ``tasks``, that an adopted run may be running in.
ADOPTABLE = f"""SELECT s.task, s.slot, s.second, s.fence FROM {S}.slots AS s
    WHERE s.task = ANY(%(tasks)s::text[]) AND s.node = %(node)s AND s.lease_until > now()
      AND (s.second IS NULL OR EXISTS (SELECT 1 FROM {S}.claims AS c
          WHERE c.task = s.task AND c.second = s.second AND c.slot = {claims.SLOT}
            AND c.fence = s.fence AND c.node = s.node AND c.started IS NOT NULL
            AND c.ended IS NULL AND c.lost_fence IS DISTINCT FROM c.fence))
    ORDER BY s.task, s.slot"""


class Adoptions:
    """The adopted runs whose lease the claims process has not taken yet."""

    def __init__(self, clock):
        self.clock = clock
        self.pending = {}       # run id -> (item, give up at)
        self.at = 0.0

    def add(self, items, lease):
        give_up = self.clock() + lease / 3
        for item in items:
            self.pending.setdefault(int(item[0]), (item, give_up))
        self.at = 0.0

    def due(self, now):
        return bool(self.pending) and now >= self.at

    def look(self, claimer):
        """Take the leases of the pending runs; answer adopted and unheld."""
        from torchcore.claimer import KILL_BEFORE, RENEW_RETRY, Held

        now = self.clock()
        names = sorted({item[1] for item, _ in self.pending.values()})
        rows = claimer.execute(ADOPTABLE, {"tasks": names, "node": claimer.node})
        matched = {}
        if rows is not None:
            daemon_slots, scheduled = {}, {}
            for task, slot, second, fence in rows:
                if second is None:
                    daemon_slots.setdefault(task, []).append((-1 - int(slot), int(fence)))
                else:
                    scheduled[(task, int(second))] = int(fence)
            for run_id, (item, _) in sorted(self.pending.items()):
                _, name, second, pgid, kill_grace, pid = item
                if second is None and daemon_slots.get(name):
                    key, fence = daemon_slots[name].pop(0)
                elif second is not None and (name, int(second)) in scheduled:
                    key, fence = int(second), scheduled[(name, int(second))]
                else:
                    continue
                matched[run_id] = Held(name, key, fence, pgid, kill_grace, now, pid)
        sent = self.clock()
        renewed = None
        if matched:
            renewed = claimer.execute(claims.RENEW, {
                "node": claimer.node, "lease": claimer.lease,
                "tasks": [h.name for h in matched.values()],
                "fences": [h.fence for h in matched.values()]})
        if rows is None or (matched and renewed is None):      # the database away: again
            self.at = now + RENEW_RETRY
            unheld = [run_id for run_id, (_, give_up) in self.pending.items()
                      if now >= give_up - KILL_BEFORE]
        else:
            renewed = {(task, int(fence)) for task, fence in renewed or ()}
            adopted = []
            for run_id, held in matched.items():
                if (held.name, held.fence) in renewed:
                    held.confirmed, held.lease_end = True, sent + claimer.lease
                    claimer.held[(held.name, held.second)] = held
                    adopted.append([run_id, held.name, held.second, held.fence])
                    del self.pending[run_id]
            unheld = list(self.pending)
            if adopted:
                claimer.send({"adopted": adopted})
        for run_id in unheld:
            del self.pending[run_id]
        if unheld:
            log.warning("fleet claims: %d adopted run(s) no longer hold their fleet lease (it "
                        "ended while this node was restarting); killing them", len(unheld))
            claimer.send({"unheld": unheld})
