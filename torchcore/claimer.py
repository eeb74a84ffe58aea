"""The fleet claims process, ``python -m torchcore.claimer`` (``torchcore: fleet claims``).

The supervisor never waits on the network, so the claims of its `run: once` tasks (claims.py)
are made here, in a child with its own PostgreSQL connection.  It talks to the supervisor over
one socket (its stdin), JSON lines both ways (claims.py names them): the supervisor sends the
claims of each second it is about to prepare, batched, and the starts of the runs it won; this
process answers which it won and lost, and which it won late (an expired claim taken over) or
lost after the start (taken over before its start was confirmed).

Timing, on this node's clock: a claim for second S where this node is the preferred one is tried
at once (the supervisor asks ``takeover`` + 1 s or more ahead); the others at S - ``takeover``.
From S + 1 s, the claims of its batches still not started are looked at again every second
(until S + 10 s) and taken over when expired.  With the database unreachable nothing is
answered: the supervisor skips those seconds ("fleet database unreachable").  After an outage
no second that passed during it is taken over (its winner may have run it unconfirmed); the
starts not confirmed are confirmed first on reconnecting.  End of file on the socket (the
supervisor gone, even by SIGKILL) ends the process; so does SIGTERM.
"""

import logging
import os
import select
import signal
import socket
import sys
import time

from torchcore import claims

log = logging.getLogger("torchcore")

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
CONNECT_TIMEOUT = 2         # seconds for a connection attempt (the process waits, not the loop)
STATEMENT_TIMEOUT_MS = 2000
RECONNECT_EVERY = 0.5       # seconds between connection attempts while down
LIVE_EVERY = 2.0            # the live nodes are read again this often
PRUNE_EVERY = 600.0
KEEP_SECONDS = 7 * 86400    # ended claims kept a week (``fleet tasks``: who ran the last one)


class Claimer:
    def __init__(self, sock, clock=time.time, connect=None):
        self.sock = sock
        self.clock = clock
        self._connect = connect or _connect
        self.url = self.node = None
        self.takeover, self.lease = 0.5, 15
        self.conn = None
        self.down = None                # the error, while the database cannot be used
        self.next_connect = 0.0
        self.live = []                  # (name, hostname, addresses) of the live nodes
        self.live_at = -1e9
        self.waiting = {}               # (name, second) -> when to try (not preferred)
        self.rechecks = {}              # (name, second) -> (next look, give up after)
        self.unconfirmed = []           # [name, second, fence] whose start is not confirmed
        self.pruned_at = clock()
        self.buffer = b""
        self.stop = False

    # ---- the loop ---------------------------------------------------------------------------

    def run(self):
        while not self.stop:
            readable, _, _ = select.select([self.sock], [], [], self.timeout())
            if readable:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return          # the supervisor is gone
                messages, self.buffer = claims.decode_lines(self.buffer, chunk)
                now_keys = []
                for message in messages:
                    now_keys += self.handle(message)
                if now_keys:
                    self.attempt(now_keys)
            self.due()

    def timeout(self):
        times = list(self.waiting.values()) + [at for at, _ in self.rechecks.values()]
        if self.unconfirmed or (self.down and (self.waiting or self.rechecks)):
            times.append(self.next_connect)
        nearest = min(times, default=self.clock() + 1.0)
        return min(1.0, max(0.0, nearest - self.clock()))

    def handle(self, message):
        """One message from the supervisor; returns the keys to try at once."""
        if "hello" in message:
            hello = message["hello"]
            self.url, self.node = hello["url"], hello["node"]
            self.takeover, self.lease = float(hello["takeover"]), float(hello["lease"])
            return []
        if "start" in message:
            self.unconfirmed += [list(item) for item in message["start"]]
            self.confirm()
            return []
        if "claim" in message:
            return self.plan(int(message["claim"]), message.get("tasks") or [],
                             bool(message.get("now")))
        return []

    def plan(self, second, tasks, now):
        """The keys of this node's preferred claims (all of them with ``now``); the others wait
        until ``takeover`` before the second."""
        live = self.live_nodes()
        at_once = []
        for name, ips, hosts in tasks:
            key = (name, second)
            names = claims.pool(ips, hosts, live)
            if self.node not in names:
                names.append(self.node)     # not in the registry (yet): it is alive all the same
            if now or claims.preferred(name, second, names) == self.node:
                at_once.append(key)
            else:
                self.waiting[key] = second - self.takeover
        return at_once

    def due(self):
        now = self.clock()
        ready = [key for key, at in self.waiting.items() if at <= now]
        for key in ready:
            del self.waiting[key]
        if ready:
            self.attempt(ready)
        looks = [key for key, (at, _) in self.rechecks.items() if at <= now]
        if looks:
            self.recheck(looks)
        if self.unconfirmed and self.conn is None and now >= self.next_connect:
            self.confirm()
        if now - self.pruned_at > PRUNE_EVERY and self.conn is not None:
            self.pruned_at = now
            self.execute(claims.PRUNE, {"keep": KEEP_SECONDS})

    # ---- the statements ---------------------------------------------------------------------

    def attempt(self, keys):
        """Claim ``keys`` in one statement; answer won and lost.  A second already past its fire
        window is not tried (the supervisor has skipped it)."""
        now = self.clock()
        keys = [key for key in keys if now < key[1] + claims.FIRE_WINDOW]
        if not keys:
            return
        rows = self.execute(claims.CLAIM, {"node": self.node, **claims.columns(keys)})
        if rows is None:
            return          # unanswered: the supervisor fails them closed
        won = {(task, int(second)): int(fence) for task, second, fence in rows}
        self.send({"won": [[task, second, fence] for (task, second), fence in won.items()],
                   "lost": [[task, second] for task, second in keys if (task, second) not in won],
                   "late": False})
        for key in keys:
            self.rechecks[key] = (key[1] + claims.EXPIRE_AFTER + 0.1, key[1] + claims.RECHECK_FOR)

    def recheck(self, keys):
        """Take over the expired claims among ``keys``; look again in a second at those still
        open (until RECHECK_FOR after their second)."""
        rows = self.execute(claims.TAKE_OVER, {"node": self.node, **claims.columns(keys)})
        if rows is None:
            return
        if rows:
            self.send({"won": [[task, int(second), int(fence)] for task, second, fence in rows],
                       "lost": [], "late": True})
        still = self.execute(claims.OPEN, claims.columns(keys))
        if still is None:
            return
        still = {(task, int(second)) for task, second in still}
        now = self.clock()
        for key in keys:
            _, give_up = self.rechecks.pop(key)
            if key in still and now + 1 < give_up:
                self.rechecks[key] = (now + 1.0, give_up)

    def confirm(self):
        """The starts not confirmed yet; those whose claim is no longer this node's are revoked
        (taken over after it expired: the supervisor stops them)."""
        pending, self.unconfirmed = self.unconfirmed, []
        if not pending:
            return
        rows = self.execute(claims.START, {
            "node": self.node, "lease": self.lease, **claims.columns([(t, s) for t, s, _ in pending]),
            "fences": [int(fence) for _, _, fence in pending]})
        if rows is None:
            self.unconfirmed = pending + self.unconfirmed
            return
        confirmed = {(task, int(second)) for task, second in rows}
        revoked = [item for item in pending if (item[0], int(item[1])) not in confirmed]
        if revoked:
            log.warning("fleet claims: %d run(s) started after their claim was taken over; "
                        "stopping them", len(revoked))
            self.send({"revoked": revoked})

    def live_nodes(self):
        if self.clock() - self.live_at >= LIVE_EVERY:
            rows = self.execute(claims.LIVE_NODES, {})
            if rows is not None:
                self.live_at = self.clock()
                self.live = [(name, hostname, claims.node_addresses(addresses))
                             for name, hostname, addresses in rows]
        return self.live

    def execute(self, sql, params):
        """The rows of ``sql`` (a list), or None with the database unusable (said once)."""
        if self.conn is None and not self.reconnect():
            return None
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        except Exception as exc:
            self.lost(exc)
            return None

    def reconnect(self):
        now = self.clock()
        if now < self.next_connect or self.url is None:
            return False
        try:
            self.conn = self._connect(self.url)
        except Exception as exc:
            self.next_connect = self.clock() + RECONNECT_EVERY
            self.lost(exc)
            return False
        if self.down is not None:
            log.info("fleet claims: the fleet database is reachable again")
            self.send({"db": "up"})
            self.down = None
            if self.unconfirmed:
                self.confirm()
        return True

    def lost(self, exc):
        """The database cannot be used: closed, said once; no second that passes now is taken
        over afterwards (see the module's docstring)."""
        from torchcore import fleetdb

        text = str(exc) if isinstance(exc, fleetdb.FleetError) else \
            f"the fleet database: {fleetdb.describe(exc, self.url)}"
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None
        self.rechecks.clear()
        self.next_connect = max(self.next_connect, self.clock() + RECONNECT_EVERY)
        if self.down is None:
            log.error("fleet claims: %s; `run: once` tasks are skipped until it is back", text)
            self.send({"db": "down", "error": text})
        self.down = text

    def send(self, message):
        try:
            self.sock.sendall(claims.encode(message))
        except OSError:
            self.stop = True


def _connect(url):
    from torchcore import fleetdb

    conn = fleetdb.connect(url, timeout=CONNECT_TIMEOUT, application_name="torchcore claims")
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    return conn


def main(argv=None):
    from torchcore import services

    services.set_title("fleet claims")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the supervisor's terminal's ^C is its own
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sock = socket.socket(fileno=os.dup(0))
    os.close(0)
    try:
        Claimer(sock).run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
