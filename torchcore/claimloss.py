"""`run: once` runs whose node died: recorded lost, and re-run once with ``on_node_loss: rerun``.

A started `once` run holds its slot under a lease its node renews (claims.py).  A node that
cannot renew stops its run before the lease ends; so a claim started, never ended, whose slot
lease has passed belongs to a run whose node died (kill -9, a power cut) or was cut off, and
whose end nobody will confirm.  Every live node's claims process with `once` tasks looks for
such claims of its tasks every third of the lease (the earliest lease end it learns in the same
statement brings the next look forward), and records them lost with one statement only one node
can win (the rows are locked, skipped by a concurrent look, and no longer match once recorded):

- the claim: ``lost`` (when), ``lost_node`` and ``lost_fence`` (whose run, which token);
- the fleet history's row of that run (``torchcore.runs``, keyed on (node, run_id), found by
  node, task and scheduled second) is closed as the node itself closes a run it finds lost when
  it restarts (adopt.py): ended now, ``error`` "lost: ...".  The fleet agent's upsert never
  replaces a final row by an earlier state, so a start shipped later by the restarted node
  cannot make it "running" again; the restarted node's own final record replaces it (it is
  lost there too, or says how the run really ended).

``on_node_loss: rerun`` (a common `once` task): in the same statement, a lost run is handed to
the node that found it, if that is within ``misfire_grace`` after its scheduled second and the
second was never re-run, and the node is not the one that lost it (a node stopped past its lease,
``SIGSTOP``, finds its own run lost on resuming while that run may still be going: it kills it,
and leaves the loss and the rerun to another node, or records it itself once the grace is over): the claim gets the next fencing token (``takeovers`` + 1), the node,
``reruns`` + 1 and no start; the node runs it at once, as a claim taken over late, with the
same ``TORCHCORE_SCHEDULED_AT``.  At most once per (task, second) in the whole fleet: a rerun
that is lost in turn (or never started: its claim expires unstarted) is recorded lost, never
re-run.

A `run: once` *daemon*'s instance has no claim: its slot is what its node renews.  A node that
takes over a daemon slot whose lease ended without its holder freeing it (claims.TAKE_DAEMON_SLOT,
standby.py) closes the holder's instance rows of the task in the fleet history in the same
statement, as above (ended then, "lost: ..."): the rows of that node with no scheduled second,
not manual, not final, unless the node still holds another slot of the task under a live lease
(which of its instances is which cannot be told from the rows: they are closed when its last
slot is taken), and never by the node itself.  Only one node can lock the slot, so one records
it; a row is closed once.  A slot freed by a clean stop has no lease: nothing is recorded.  The
same upsert rule keeps the row closed; the node's own final record replaces it when it comes back
(lost, or, stopped past its lease, ``SIGSTOP``, killed as its lease could not be kept).

``is_lost``, ``may_rerun`` and ``instance_lost`` are the rules in Python, the statements' twins
(the tests hold them equal on generated rows).
"""

import logging
import math

from torchcore import claims

log = logging.getLogger("torchcore")

S = claims.SCHEMA
NEVER = None        # on_node_loss: none (the default): a lost run is recorded, not re-run

# The claims of ``tasks`` lost now (see the module docstring), recorded by this node, and its
# reruns taken; a last row (task NULL) gives the seconds until the earliest lease of a started,
# unended claim of ``tasks`` ends (NULL: none), when the next look is worth making.
_LOST_WHERE = f"""c.ended IS NULL AND c.lost_fence IS DISTINCT FROM c.fence
        AND (c.started IS NOT NULL OR c.reruns > 0) AND (     -- (the index claims_open)
            (c.started IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {S}.slots AS s
                WHERE s.task = c.task AND s.fence = c.fence AND s.node = c.node
                  AND s.lease_until >= now()))
            OR (c.started IS NULL AND c.reruns > 0 AND c.expires < now()))"""

FIND_LOST = f"""WITH found AS (
        SELECT c.task, c.second, c.slot,
               k.grace IS NOT NULL AND c.reruns = 0 AND c.started IS NOT NULL
               AND now() <= to_timestamp(c.second) + make_interval(secs => k.grace) AS rerun
        FROM {S}.claims AS c
        JOIN unnest(%(tasks)s::text[], %(graces)s::float8[]) AS k(task, grace) ON c.task = k.task
        WHERE {_LOST_WHERE}
          AND NOT (c.node = %(node)s AND k.grace IS NOT NULL AND c.reruns = 0  -- its own,
                   AND c.started IS NOT NULL                                 -- left to another
                   AND now() <= to_timestamp(c.second) + make_interval(secs => k.grace))
        FOR UPDATE OF c SKIP LOCKED),
    lost AS (
        UPDATE {S}.claims AS c SET lost = now(), lost_node = c.node, lost_fence = c.fence,
            node = CASE WHEN f.rerun THEN %(node)s ELSE c.node END,
            fence = c.fence + f.rerun::int, takeovers = c.takeovers + f.rerun::int,
            reruns = c.reruns + f.rerun::int,
            started = CASE WHEN f.rerun THEN NULL ELSE c.started END,
            claimed = CASE WHEN f.rerun THEN now() ELSE c.claimed END,
            expires = CASE WHEN f.rerun THEN now() + interval '{claims.EXPIRE_AFTER:g} second'
                      ELSE c.expires END
        FROM found AS f
        WHERE c.task = f.task AND c.second = f.second AND c.slot = f.slot
        RETURNING c.task, c.second, c.fence, c.lost_node, c.lost_fence, f.rerun),
    closed AS (
        UPDATE {S}.runs AS r SET ended = now(), failed = true,
            error = 'lost: node ' || l.lost_node || ' stopped renewing its fleet lease '
                    '(recorded by ' || %(node)s || ')'
        FROM lost AS l
        WHERE r.node = l.lost_node AND r.task = l.task AND r.scheduled = to_timestamp(l.second)
          AND r.ended IS NULL AND r.skipped IS NULL AND NOT r.missed
        RETURNING r.run_id)
    SELECT task, second, fence, lost_node, lost_fence, rerun, NULL::float8 FROM lost
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL,
           extract(epoch FROM min(s.lease_until) - now())::float8
    FROM {S}.slots AS s JOIN {S}.claims AS c
      ON c.task = s.task AND c.second = s.second AND c.slot = {claims.SLOT} AND c.fence = s.fence
    WHERE s.task = ANY(%(tasks)s::text[]) AND s.lease_until >= now()
      AND c.started IS NOT NULL AND c.ended IS NULL"""

# ---- the rules in Python (the statement's twins) ---------------------------------------------

def is_lost(claim, leases, now):
    """Is ``claim`` (a dict of its columns: ended, started, fence, lost_fence, reruns, expires,
    node, task) lost at ``now``?  ``leases``: {(task, fence, node): lease_until} of the slots."""
    if claim["ended"] is not None or claim["lost_fence"] == claim["fence"]:
        return False
    if claim["started"] is not None:
        lease = leases.get((claim["task"], claim["fence"], claim["node"]))
        return lease is None or lease < now
    return claim["reruns"] > 0 and claim["expires"] < now


def left_to_others(claim, grace, now, finder):
    """Is a lost ``claim`` left alone by ``finder`` (its own run, still to be re-run elsewhere)?"""
    return claim["node"] == finder and may_rerun(claim, grace, now)


def may_rerun(claim, grace, now):
    """Is a lost ``claim`` re-run (``grace``: the task's misfire_grace with ``on_node_loss:
    rerun``, else None)?"""
    return grace is not None and claim["reruns"] == 0 and claim["started"] is not None \
        and now <= claim["second"] + grace


def instance_lost(run, taken, slots, taker, now):
    """Is the fleet history row ``run`` (a dict of its columns: node, task, scheduled, manual,
    ended, skipped, missed) closed as lost when ``taker`` takes a daemon's slot ``taken`` (its
    columns before: task, slot, node, second, lease_until)?  ``slots``: the task's slot rows."""
    was = taken["node"]
    if taken["lease_until"] is None or taken["second"] is not None or was is None or was == taker:
        return False        # freed (a clean stop), a scheduled run's, or its own
    if run["node"] != was or run["task"] != taken["task"] or run["scheduled"] is not None \
            or run["manual"] or run["ended"] is not None or run["skipped"] is not None \
            or run["missed"]:
        return False
    return not any(s["node"] == was and s["slot"] != taken["slot"]
                   and s["lease_until"] is not None and s["lease_until"] >= now for s in slots)


# ---- the claims process's side ---------------------------------------------------------------

class LossWatch:
    """What the claims process (claimer.py) keeps to look for lost runs: its node's common
    `once` tasks, their re-run grace, and when to look next (its own clock)."""

    def __init__(self, clock):
        self.clock = clock
        self.tasks = {}         # name -> misfire_grace with on_node_loss: rerun, else None
        self.at = 0.0

    def use(self, items):
        """``[[name, max, grace], ...]`` from the supervisor (after each load)."""
        self.tasks = {name: grace for name, _, grace in items}

    def due(self, now):
        return bool(self.tasks) and now >= self.at

    def look(self, claimer):
        """Record the lost runs of this node's tasks; take the reruns won (as late claims).
        Returns [(task, second, fence)] of the reruns."""
        lease = claimer.lease
        self.at = self.clock() + lease / 3
        names = sorted(self.tasks)
        rows = claimer.execute(FIND_LOST, {"node": claimer.node, "tasks": names,
                                           "graces": [self.tasks[name] for name in names]})
        if rows is None:
            self.at = self.clock() + 1.0
            return []
        reruns = []
        for task, second, fence, lost_node, lost_fence, rerun, until in rows:
            if task is None:
                if until is not None and math.isfinite(until):    # a lease ending sooner
                    self.at = min(self.at, self.clock() + max(0.2, until + 0.1))
                continue
            log.warning("fleet claims: the run of %s for %d on node %s (token %d) is lost: its "
                        "lease ended unrenewed%s", task, second, lost_node, lost_fence,
                        "; re-running it here" if rerun else "")
            if rerun:
                reruns.append((task, int(second), int(fence)))
        return reruns
