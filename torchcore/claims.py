"""Claims of `run: once` tasks: which node runs a (task, scheduled second), decided in PostgreSQL.

Every node that may run a `once` task (its ``ips``/``hosts`` select the node) tries to claim each
of its scheduled seconds in the table ``torchcore.claims``, keyed on (task, second, slot): one
``INSERT ... ON CONFLICT DO NOTHING RETURNING fence`` that only one node can win.  The key is
the *scheduled* second, not the node's clock: clock skew changes when a node tries, never what
it claims.  The winner runs the second; the others do nothing (and record nothing).

- **Who tries first.**  Over the live nodes the task may run on (the registry, ``nodes``: not
  stopped, seen within two heartbeats), rendezvous hashing picks a preferred node per (task,
  second): it claims as soon as its supervisor asks (``fleet.takeover`` + 1 s before the second,
  or earlier); the others wait until ``fleet.takeover`` (0.5 s) before the second and try only
  then, so the work spreads over the pool and a dead preferred node costs no miss.
- **Started, or taken over.**  The winner confirms the claim when its run starts (``started``).
  A claim not confirmed within 1 s of its second (its node died, or stalled, between claiming
  and starting) expires: any eligible node may take it over, with a new fencing token, and run
  that second late.
- **Fencing tokens.**  ``fence`` = second x 1000 + the number of takeovers: strictly increasing
  over a task's seconds and takeovers.  A run gets it as ``TORCHCORE_FENCE`` with
  ``TORCHCORE_SCHEDULED_AT``; a command that must not act twice checks that
  ``SELECT fence FROM torchcore.claims WHERE task = ... AND second = $TORCHCORE_SCHEDULED_AT``
  is still its own, or hands the token to a store that refuses any token lower than the
  highest it has seen.

A `run: once` *daemon* has no seconds: its ``max`` slots (``torchcore.slots``) are taken by
the nodes, each at most its share, each instance running in a slot held under the lease; a
node that dies loses its slots when their leases end, and another node takes them.

This module is the pure part (the choice of the preferred node, eligibility, the statements, the
messages between the supervisor and its claimer); claimer.py is the process that talks to the
database, coordinator.py the supervisor's side.  It imports neither psycopg nor the supervisor.
"""

import hashlib
import ipaddress
import json

from torchcore.taskspec import host_matches

FENCE_STEP = 1000       # fence = second * FENCE_STEP + takeovers
EXPIRE_AFTER = 1.0      # a claim not started this long after its second may be taken over
FIRE_WINDOW = 0.8       # the winner starts a claimed run no later than this after its second
CLAIM_LEAD = 1.0        # the preferred node claims at least takeover + this before the second
RECHECK_FOR = 10        # seconds after its second a node still looks for an expired claim
SLOT = 0                # the slot of a scheduled run (fleet-wide max: slots 0 .. max-1)
UNREACHABLE = "fleet database unreachable"


# ---- who may run it, and who tries first ----------------------------------------------------

def eligible(ips, hosts, addresses, hostname):
    """Does a node with ``addresses`` and ``hostname`` match a task's ``ips``/``hosts`` (both
    as written in the file, strings)?  As Task.runs_on and ``check --by-node`` decide."""
    if not ips and not hosts:
        return True
    for text in ips:
        network = _network(text)
        for address in addresses:
            if address.version == network.version and address in network:
                return True
    return bool(hosts) and host_matches(hostname or "", hosts)


def _network(text):
    return ipaddress.ip_network(text, strict=False)


def node_addresses(texts):
    """The addresses of a registry row (text[]), the unparsable ones left out."""
    found = []
    for text in texts or ():
        try:
            found.append(ipaddress.ip_address(str(text).split("/")[0]))
        except ValueError:
            pass
    return tuple(found)


def weight(task, second, node):
    """Rendezvous (highest random weight) hashing: the node with the highest weight for a
    (task, second) is its preferred node.  Adding or removing a node moves only its share."""
    digest = hashlib.blake2b(f"{task}\0{second}\0{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preferred(task, second, nodes):
    """The preferred node's name among ``nodes`` (names), or None for none."""
    return max(nodes, key=lambda node: (weight(task, second, node), node), default=None)


def pool(ips, hosts, live):
    """The names of the ``live`` nodes ((name, hostname, addresses) rows) a task may run on."""
    return sorted(name for name, hostname, addresses in live
                  if eligible(ips, hosts, addresses, hostname))


def first_fence(second):
    return int(second) * FENCE_STEP


def fence_second(fence):
    """The scheduled second a fencing token belongs to."""
    return int(fence) // FENCE_STEP


# ---- the statements -------------------------------------------------------------------------

SCHEMA = "torchcore"
# One statement for a batch of claims; a row comes back for each one this node won.
CLAIM = f"""INSERT INTO {SCHEMA}.claims (task, second, slot, fence, node, expires)
    SELECT k.task, k.second, {SLOT}, k.second * {FENCE_STEP}, %(node)s,
           to_timestamp(k.second) + interval '{EXPIRE_AFTER:g} second'
    FROM unnest(%(tasks)s::text[], %(seconds)s::bigint[]) AS k(task, second)
    ON CONFLICT (task, second, slot) DO NOTHING
    RETURNING task, second, fence"""

# The same for a batch with a second already past (a node starting, a claim asked at its tick):
# a claim made late expires 1 s after it was made, so no node takes it over while it starts.
CLAIM_LATE = CLAIM.replace("to_timestamp(k.second) + interval",
                           "greatest(to_timestamp(k.second), now()) + interval")
assert CLAIM_LATE != CLAIM

# Claims not started in time, taken over (a new token); the row lock makes one node win each.
TAKE_OVER = f"""UPDATE {SCHEMA}.claims AS c
    SET node = %(node)s, fence = c.fence + 1, takeovers = c.takeovers + 1, claimed = now(),
        expires = now() + interval '{EXPIRE_AFTER:g} second'
    FROM unnest(%(tasks)s::text[], %(seconds)s::bigint[]) AS k(task, second)
    WHERE c.task = k.task AND c.second = k.second AND c.slot = {SLOT}
      AND c.started IS NULL AND c.expires < now()
    RETURNING c.task, c.second, c.fence"""

# Of a batch, the claims still open (not started): those worth looking at again.
OPEN = f"""SELECT c.task, c.second FROM {SCHEMA}.claims AS c
    JOIN unnest(%(tasks)s::text[], %(seconds)s::bigint[]) AS k(task, second)
      ON c.task = k.task AND c.second = k.second AND c.slot = {SLOT}
    WHERE c.started IS NULL"""

# Both in one statement (a look at a batch): the claims taken over (fence), then those open
# (fence NULL; the open ones are read as they were before the takeovers, which leave `started`).
RECHECK = f"""WITH taken AS ({TAKE_OVER})
    SELECT task, second, fence FROM taken
    UNION ALL
    {OPEN.replace("SELECT c.task, c.second FROM", "SELECT c.task, c.second, NULL::bigint FROM")}"""
assert "NULL::bigint" in RECHECK

# The winner's runs started: a row back for each claim still its own (else it was taken over).
START = f"""UPDATE {SCHEMA}.claims AS c SET started = now()
    FROM unnest(%(tasks)s::text[], %(seconds)s::bigint[], %(fences)s::bigint[])
      AS k(task, second, fence)
    WHERE c.task = k.task AND c.second = k.second AND c.slot = {SLOT} AND c.fence = k.fence
      AND c.node = %(node)s AND c.started IS NULL
    RETURNING c.task, c.second"""

# ---- fleet-wide max: slots 0 .. max-1 per task, each held by one run under a lease -------------
#
# A won claim takes a free slot SLOT_AHEAD before its second, held until FIRE_WINDOW after it
# (or freed at once when its node does not start it); the start holds it for ``lease``, renewed
# every third of it; the end frees it.  A slot whose lease has passed is free, whoever held it.
# No free slot: the second is skipped, "fleet max N reached".

SLOT_AHEAD = 0.25       # seconds before its second a won claim takes its slot

MAKE_SLOTS = f"""INSERT INTO {SCHEMA}.slots (task, slot)
    SELECT %(task)s, n FROM generate_series(0, %(max)s - 1) AS n ON CONFLICT DO NOTHING"""

# (the same for several tasks at once: their names and maxes)
MAKE_SLOTS_OF = f"""INSERT INTO {SCHEMA}.slots (task, slot)
    SELECT t.task, n FROM unnest(%(tasks)s::text[], %(maxes)s::int[]) AS t(task, most)
    CROSS JOIN LATERAL generate_series(0, t.most - 1) AS n ON CONFLICT DO NOTHING"""

# The slots of a batch of won claims (task, second, fence, max), in one statement: each task's
# free slots are locked once, the lowest first, as many as the batch has claims of that task
# (ranked in the batch's order: the first claim of a task gets its lowest free slot, the second
# the next one); a claim left without one (its task's fleet max reached) is decided at once,
# never taken over.  A row back for each slot taken.
TAKE_SLOTS = f"""WITH k AS (
        SELECT task, second, fence, most,
               row_number() OVER (PARTITION BY task ORDER BY i) AS n
        FROM unnest(%(tasks)s::text[], %(seconds)s::bigint[], %(fences)s::bigint[],
                    %(maxes)s::int[]) WITH ORDINALITY AS k(task, second, fence, most, i)),
    free AS (
        SELECT t.task, f.slot, row_number() OVER (PARTITION BY t.task ORDER BY f.slot) AS n
        FROM (SELECT task, max(most) AS most, count(*) AS wanted FROM k GROUP BY task) AS t
        CROSS JOIN LATERAL (
            SELECT slot FROM {SCHEMA}.slots AS s WHERE s.task = t.task AND s.slot < t.most
              AND (s.lease_until IS NULL OR s.lease_until < now())
            ORDER BY s.slot LIMIT t.wanted FOR UPDATE SKIP LOCKED) AS f),
    taken AS (
        UPDATE {SCHEMA}.slots AS s SET second = k.second, fence = k.fence, node = %(node)s,
            lease_until = greatest(to_timestamp(k.second), now())
                          + interval '{FIRE_WINDOW:g} second'
        FROM free JOIN k ON k.task = free.task AND k.n = free.n
        WHERE s.task = free.task AND s.slot = free.slot
        RETURNING k.task, k.second, k.fence, s.slot),
    decided AS (
        UPDATE {SCHEMA}.claims AS c SET started = now(), ended = now()
        FROM k WHERE c.task = k.task AND c.second = k.second AND c.slot = {SLOT}
          AND c.fence = k.fence
          AND NOT EXISTS (SELECT 1 FROM taken WHERE taken.task = k.task
                          AND taken.second = k.second AND taken.fence = k.fence))
    SELECT task, second, fence, slot FROM taken"""

# (the lost instances of a daemon slot ``taken`` over, see TAKE_DAEMON_SLOT): ``gone`` is the
# node whose instance was lost, if any; the UPDATE reads it through uncorrelated subqueries, so
# the planner makes its EXISTS a one-time filter and ``runs`` is not read at all when no slot
# was taken (every look of a standby), whatever order it would have joined them in.
GONE = f"""SELECT t.was FROM taken AS t
        WHERE t.was_until IS NOT NULL AND t.was_second IS NULL AND t.was <> %(node)s
          AND NOT EXISTS (SELECT 1 FROM {SCHEMA}.slots AS o WHERE o.task = %(task)s
                          AND o.node = t.was AND o.slot <> t.slot AND o.lease_until >= now())"""
CLOSE_LOST_INSTANCES = f"""UPDATE {SCHEMA}.runs AS r SET ended = now(), failed = true,
            error = 'lost: node ' || r.node || ' stopped renewing its fleet lease '
                    '(recorded by ' || %(node)s || ')'
        WHERE EXISTS (SELECT 1 FROM gone)
          AND r.node = (SELECT was FROM gone) AND r.task = %(task)s AND r.scheduled IS NULL
          AND NOT r.manual AND r.ended IS NULL AND r.skipped IS NULL AND NOT r.missed
        RETURNING r.node AS was"""

# A `run: once` daemon's slot: taken for ``lease`` at once (its instance starts now); the
# fencing token is the database's clock in milliseconds, so it grows with each holder.  None
# taken: one row (NULL, NULL, seconds, NULL) says when the earliest slot of another node can be
# taken (its lease end + wait; standby.py looks again then).
#
# A slot taken whose lease had ended without its holder freeing it (a clean stop frees it: no
# lease) held an instance whose node died or was cut off: in the same statement, that node's
# open instance rows of the task in the fleet history (``runs``: no scheduled second, not
# manual, not final) are closed as lost, ended now (claimloss.instance_lost is the rule in
# Python).  Not while that node still holds another slot of the task under a live lease (its
# rows cannot be told apart: they are closed when its last slot is taken), nor by the node
# itself (taking back its own slot: it records its own instance's end).  A slot row is locked
# by one taker, a run row closed once (a concurrent close finds it ended): one node records it.
# The taken row's fourth column is the node whose instance was recorded lost (NULL: none).
TAKE_DAEMON_SLOT = f"""WITH free AS (
        SELECT slot, node, second, lease_until FROM {SCHEMA}.slots
        WHERE task = %(task)s AND slot < %(max)s
          AND (lease_until IS NULL OR lease_until < now() - make_interval(secs => %(wait)s))
        ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED),
    taken AS (
        UPDATE {SCHEMA}.slots AS s SET second = NULL, node = %(node)s,
            fence = (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
            lease_until = now() + make_interval(secs => %(lease)s)
        FROM free WHERE s.task = %(task)s AND s.slot = free.slot
        RETURNING s.slot, s.fence, free.node AS was, free.second AS was_second,
                  free.lease_until AS was_until),
    gone AS (
        {GONE}),
    lost AS (
        {CLOSE_LOST_INSTANCES})
    SELECT slot, fence, NULL::float8, (SELECT min(was) FROM lost) FROM taken
    UNION ALL
    SELECT NULL, NULL, extract(epoch FROM min(coalesce(lease_until, now())
                                              + make_interval(secs => %(wait)s)) - now())::float8,
           NULL
    FROM {SCHEMA}.slots WHERE task = %(task)s AND slot < %(max)s
      AND (node IS DISTINCT FROM %(node)s OR lease_until IS NULL OR lease_until < now())
      AND NOT EXISTS (SELECT 1 FROM taken)"""

# Leases renewed (at a start, then every lease/3): a row back for each one still held.
RENEW = f"""UPDATE {SCHEMA}.slots AS s SET lease_until = now() + make_interval(secs => %(lease)s)
    FROM unnest(%(tasks)s::text[], %(fences)s::bigint[]) AS k(task, fence)
    WHERE s.task = k.task AND s.fence = k.fence AND s.node = %(node)s AND s.lease_until > now()
    RETURNING s.task, s.fence"""

# (a daemon's slot freed, by a clean stop: the standbys are told at once, standby.py)
RELEASE = f"""WITH freed AS (
        UPDATE {SCHEMA}.slots AS s SET lease_until = NULL
        FROM unnest(%(tasks)s::text[], %(fences)s::bigint[]) AS k(task, fence)
        WHERE s.task = k.task AND s.fence = k.fence AND s.node = %(node)s
        RETURNING s.task, s.second),
    ended AS (
        UPDATE {SCHEMA}.claims AS c SET ended = now()
        FROM unnest(%(tasks)s::text[], %(fences)s::bigint[]) AS k(task, fence)
        WHERE c.task = k.task AND c.second = k.fence / {FENCE_STEP} AND c.slot = {SLOT}
          AND c.fence = k.fence)
    SELECT pg_notify('torchcore_slots', task) FROM freed WHERE second IS NULL"""

LIVE_NODES = f"""SELECT name, hostname, addresses FROM {SCHEMA}.nodes
    WHERE stopped IS NULL AND last_seen > now() - make_interval(secs => 2 * heartbeat)"""

PRUNE = f"""DELETE FROM {SCHEMA}.claims
    WHERE second < extract(epoch FROM now())::bigint - %(keep)s AND (ended IS NOT NULL OR
          lease_until IS NULL OR lease_until < now())"""


def columns(keys):
    """``{"tasks": [...], "seconds": [...]}`` of (task, second) keys, for the unnest()s."""
    return {"tasks": [task for task, _ in keys], "seconds": [int(second) for _, second in keys]}


# ---- the messages between the supervisor and its claimer (JSON lines) ------------------------
#
# supervisor -> claimer: {"hello": {"url", "node", "takeover", "lease"}}
#                        {"claim": second, "tasks": [[name, ips, hosts, max], ...], "now": bool}
#                        {"start": [[name, second, fence, pgid, kill_grace, pid], ...]}
#                        {"hold": [[name, second, fence, pgid, kill_grace, pid], ...]}
#                                    (what a run is now, or the runs of a restart)
#                        {"daemons": [[name, ips, hosts, max, kill_grace], ...]}
#                                    (second < 0 in the others: a daemon's slot, -1 - slot)
#                        {"end": [[name, second, fence], ...]}
#                        {"watch": [name, ...]}     (the node's `once` tasks: their holders are
#                                    read every few seconds for status, holders.py)
#                        {"once": [[name, max, grace], ...]}     (common `once` tasks: their lost
#                                    runs are looked for; grace: on_node_loss: rerun's, or null)
#                        {"adopt": [[run_id, name, second | null, pgid, kill_grace, pid], ...]}
#                                    (runs a killed supervisor left: their leases, claimadopt.py)
# claimer -> supervisor: {"won": [[name, second, fence], ...], "lost": [[name, second], ...],
#                         "late": bool}              (late: taken over after its second)
#                        {"slots": [[name, second, fence, slot], ...],
#                         "full": [[name, second, fence], ...]}    (fleet max reached)
#                        {"revoked": [[name, second, fence], ...]}  (taken over before its start)
#                        {"stop": [[name, second, fence], ...], "kill": bool}  (its lease ends)
#                        {"daemon": [[name, -1 - slot, fence], ...]}   (a daemon slot taken)
#                        {"adopted": [[run_id, name, second | -1 - slot, fence], ...]}
#                        {"unheld": [run_id, ...]}  (adopted runs whose lease is gone: killed)
#                        {"db": "up" | "down", "error": text}   (also at the first connection:
#                                    until then a second without an answer is not skipped)
#                        {"holding": {"at": epoch, "tasks": {name: {"last": [second, fence,
#                                    node, started] | null, "slots": [[slot, node, fence, second,
#                                    lease_until], ...]}}}}     (holders.collect)

def encode(message):
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def decode_lines(buffer, chunk):
    """(messages, rest) of a byte stream of JSON lines; a malformed line is dropped."""
    *lines, rest = (buffer + chunk).split(b"\n")
    messages = []
    for line in lines:
        if line.strip():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                messages.append(message)
    return messages, rest
