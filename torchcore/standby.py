"""The slots of `run: once` daemons, as the claims process (claimer.py) takes them.

A node takes a free slot of a `once` daemon while it runs fewer than its share of it (``max``
over the live nodes it may run on, rounded up): the node preferred for the task (rendezvous
hashing) at once, the others when the slot has been free WAIT seconds.  The instance starts in
the slot, held under the lease (claims.py).

A standby node does not poll every second.  The statement that tries to take a slot also says
when the earliest slot held by another node can be taken (its lease end, + WAIT for a node not
preferred): the holder can only push that time later by renewing, so the standby looks again
then, and not before, unless told: a clean ``stop`` of the holder frees its slot with a
``NOTIFY`` on CHANNEL, which every standby LISTENs to on its connection (in the select of the
claims process), and looks at once.  So a dead holder's daemon moves within ``fleet.lease`` +
WAIT after its last renewal, a stopped one's at once, and a standby makes about one query per
two thirds of the lease instead of one and a half a second.  A node holding its share looks
again every third of the lease (its share grows when nodes die), or at once when it loses a
slot (its lease could not be kept) or the daemons change (a reload).
"""

import logging

from torchcore import claims

log = logging.getLogger("torchcore")

WAIT = 1.0              # seconds a slot stays free before a node not preferred takes it
CHANNEL = "torchcore_slots"
LISTEN = f"LISTEN {CHANNEL}"
SOON = 0.05             # the least wait before a look (a slot being taken by another node)


class DaemonSlots:
    """When to look for a free slot of the node's `once` daemons, and the look."""

    def __init__(self, clock):
        self.clock = clock
        self.at = 0.0           # the next look (this node's clock)
        self.listened = None    # the connection LISTENing on CHANNEL
        self.holding = 0        # daemon slots held after the last look

    def changed(self):
        """The daemons changed (a load): look at once."""
        self.at = 0.0

    def fds(self, claimer):
        """What the claims process's select watches for a NOTIFY."""
        conn = claimer.conn
        if conn is None or conn is not self.listened:
            return []
        try:
            return [conn.fileno()]
        except Exception:
            return []

    def drain(self, claimer):
        """Take the notifications received (a slot freed: look at once); a slot of this node
        lost since the last look: look at once too."""
        if sum(1 for key in claimer.held if key[1] < 0) < self.holding:
            self.at = 0.0
        conn = claimer.conn
        if conn is None or conn is not self.listened:
            return
        try:
            if any(True for _ in conn.notifies(timeout=0)):
                self.at = 0.0
        except Exception as exc:
            claimer.lost(exc)

    def look(self, claimer):
        """Take a free slot of each daemon this node runs fewer than its share of; answer the
        slots taken (``daemon``); set the next look."""
        from torchcore.claimer import Held

        now = self.clock()
        lease = claimer.lease
        self.at = now + 1.0                 # (the database away: tried again in a second)
        if claimer.conn is None or claimer.conn is not self.listened:
            if claimer.execute(LISTEN, None) is None:
                return
            self.listened = claimer.conn
        live = claimer.live_nodes()
        found, nexts = [], [now + lease]
        for name, (ips, hosts, most, kill_grace) in claimer.daemons.items():
            mine = sum(1 for key in claimer.held if key[0] == name and key[1] < 0)
            names = claims.pool(ips, hosts, live)
            if claimer.node not in names:
                names.append(claimer.node)
            share = min(most, -(-most // len(names)))
            if mine >= share:
                if most > 1:
                    nexts.append(now + lease / 3)      # the pool may shrink: a bigger share
                continue
            if (name, most) not in claimer.made:
                if claimer.execute(claims.MAKE_SLOTS, {"task": name, "max": most}) is None:
                    return
                claimer.made.add((name, most))
            sent = self.clock()
            wait = 0.0 if claims.preferred(name, 0, names) == claimer.node else WAIT
            rows = claimer.execute(claims.TAKE_DAEMON_SLOT, {
                "task": name, "max": most, "node": claimer.node, "lease": lease, "wait": wait})
            if rows is None:
                return
            for slot, fence, until, was in rows:
                if slot is None:
                    if until is not None:       # when the earliest slot of another can be taken
                        nexts.append(sent + max(SOON, until))
                    continue
                if was is not None:
                    log.warning("fleet claims: the instance of %s on node %s is lost: its lease "
                                "ended unrenewed; its slot %d is taken here", name, was, slot)
                held = Held(name, -1 - slot, fence, None, kill_grace, sent + lease)
                held.confirmed = True
                claimer.held[(name, held.second)] = held
                found.append(held.item)
                if mine + 1 < share:
                    nexts.append(sent + SOON)           # another one to take
        self.at = min(nexts)
        self.holding = sum(1 for key in claimer.held if key[1] < 0)
        if found:
            claimer.send({"daemon": found})
