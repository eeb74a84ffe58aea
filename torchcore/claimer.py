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
starts not confirmed are confirmed first on reconnecting.

Fleet-wide ``max``: a won claim takes a free slot of its task SLOT_AHEAD before its second (none
free: the second is skipped, "fleet max N reached"); the start holds the slot for ``lease``,
renewed every third of it; the end frees it.  A node that cannot renew stops its runs before the
lease ends: once a renewal has failed, TERM ``kill_grace`` + 1 s before the end (at once if that
is past), KILL 0.5 s before it;
a renewal refused (the lease is gone: the node was stopped past it) is a KILL at once.  When the
supervisor is gone (end of file; even by SIGKILL) the runs go on in their executors: this process
holds their leases while their process groups live, frees each slot when its group is gone (or
stops them when it cannot renew), then exits.  SIGTERM: the messages already sent are handled,
then it exits.
"""

import logging
import os
import select
import signal
import socket
import sys
import time

from torchcore import claimadopt, claimloss, claims, holders, standby

log = logging.getLogger("torchcore")

CONNECT_TIMEOUT = 2         # seconds for a connection attempt (the process waits, not the loop)
STATEMENT_TIMEOUT_MS = 2000
RECONNECT_EVERY = 0.5       # seconds between connection attempts while down
LIVE_EVERY = 2.0            # the live nodes are read again this often
PRUNE_EVERY = 600.0
KEEP_SECONDS = 7 * 86400    # ended claims kept a week (``fleet tasks``: who ran the last one)
RENEW_RETRY = 1.0           # seconds between renewals while they fail
KILL_BEFORE = 0.5           # a run that cannot renew is killed this long before its lease ends
TERM_MARGIN = 1.0           # ... and sent TERM this long plus its kill_grace before


class Held:
    """A running once-run's lease, as this node knows it (local clock)."""

    __slots__ = ("name", "second", "fence", "pgid", "pid", "kill_grace", "lease_end", "termed",
                 "confirmed", "failing")

    def __init__(self, name, second, fence, pgid, kill_grace, lease_end, pid=None):
        self.name, self.second, self.fence = name, int(second), int(fence)   # second < 0: a
        self.pgid, self.pid = pgid, pid             # daemon's slot (-1 - slot); pgid: the
        self.kill_grace, self.lease_end = float(kill_grace or 0), lease_end  # command's group,
        self.termed = self.confirmed = False        # pid: its executor's (either may be None)
        self.failing = False        # its last confirmation or renewal could not be made

    def alive(self):
        """Is the run still under way (its command's group, else its executor)?"""
        if self.pgid is not None:
            return _alive(os.killpg, self.pgid)
        return self.pid is not None and _alive(os.kill, self.pid)

    @property
    def item(self):
        return [self.name, self.second, self.fence]


class Claimer:
    def __init__(self, sock, clock=time.time, connect=None):
        self.sock = sock
        self.clock = clock
        self._connect = connect or _connect
        self.url = self.node = None
        self.takeover, self.lease = 0.5, 15
        self.conn = None
        self.down = None                # the error, while the database cannot be used
        self.up_once = False            # connected once: the supervisor was told "db"
        self.next_connect = 0.0
        self.live = []                  # (name, hostname, addresses) of the live nodes
        self.live_at = -1e9
        self.waiting = {}               # (name, second) -> when to try (not preferred)
        self.rechecks = {}              # (name, second) -> (next look, give up after)
        self.unconfirmed = []           # Held whose start is not confirmed yet
        self.slots_due = {}             # (name, second) -> [fence, max, when]: a slot to take
        self.made = set()               # (task, max) whose slot rows exist (a raised max: more)
        self.held = {}                  # (name, second) -> Held: runs under a lease
        self.unreleased = []            # [name, fence] of ended runs whose slot is not freed yet
        self.maxes = {}                 # name -> max, from the claims asked
        self.renew_at = 0.0
        self.orphaned = False           # the supervisor is gone: watch the runs' groups
        self.daemons = {}               # name -> (ips, hosts, max, kill_grace): once daemons
        self.standby = standby.DaemonSlots(clock)   # when to look for a free daemon slot
        self.losses = claimloss.LossWatch(clock)    # lost runs of its `once` tasks
        self.adoptions = claimadopt.Adoptions(clock)    # runs a restarted node adopted
        self.pruned_at = clock()
        self.buffer = b""
        self.holders = holders.Reporter()   # read every few seconds for status (holders.py)
        self.stop = False
        self.wake = []                  # the signal wakeup pipe's read end (main sets it)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self):
        while True:
            listen = self.standby.fds(self) if self.daemons and not self.orphaned else []
            readable, _, _ = select.select(([] if self.orphaned else [self.sock]) + self.wake
                                           + listen, [], [], self.timeout())
            if self.sock in readable or self.stop:
                self.read()
            if self.stop:
                return
            self.due()
            if self.orphaned and not self.held:
                return

    def read(self):
        try:
            chunk = self.sock.recv(1 << 16) if not self.stop else self._drain()
        except OSError:
            chunk = b""
        if not chunk:
            if not self.stop:
                self.orphaned = True    # the supervisor is gone; its runs go on, nothing new
                self.waiting.clear()    # is claimed (a claim won now would never start)
                self.rechecks.clear()
                self.slots_due.clear()
                log.info("fleet claims: the supervisor is gone; holding the leases of %d "
                         "running run(s) until they end", len(self.held))
            return
        messages, self.buffer = claims.decode_lines(self.buffer, chunk)
        now_keys = []
        for message in _batched(messages):
            now_keys += self.handle(message)
        if now_keys:
            self.attempt(now_keys)

    def _drain(self):
        """What the supervisor sent before SIGTERM (the ends of its last runs)."""
        self.sock.setblocking(False)
        chunks = []
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks) or b"\n"

    def timeout(self):
        times = list(self.waiting.values()) + [at for at, _ in self.rechecks.values()]
        times += [due[2] for due in self.slots_due.values()]
        if self.daemons and not self.orphaned:
            times.append(self.standby.at)
        if self.losses.tasks and not self.orphaned:
            times.append(self.losses.at)
        if self.adoptions.pending:
            times.append(self.adoptions.at)
        if self.held:
            times.append(self.renew_at)
            for held in self.held.values():
                times.append(held.lease_end - KILL_BEFORE)
                if held.failing and not held.termed:
                    times.append(held.lease_end - held.kill_grace - TERM_MARGIN)
        if self.unconfirmed or self.unreleased or (self.down and (self.waiting or self.rechecks)):
            times.append(self.next_connect)
        nearest = min(times, default=self.clock() + 1.0)
        return min(1.0, max(0.0, nearest - self.clock()))

    def handle(self, message):
        """One message from the supervisor; returns the keys to try at once."""
        if "claim" in message:
            for task in message.get("tasks") or ():
                self.maxes[task[0]] = int(task[3]) if len(task) > 3 else 1
            return self.plan(int(message["claim"]), message.get("tasks") or [],
                             bool(message.get("now")))
        if "start" in message:
            for name, second, fence, pgid, kill_grace, *pid in message["start"]:
                held = Held(name, second, fence, pgid, kill_grace,
                            self.clock() + claims.EXPIRE_AFTER, *pid)  # until confirmed: the hold
                self.held[(name, int(second))] = held
                self.unconfirmed.append(held)
            self.confirm()
        elif "hold" in message:
            self.hold(message["hold"])
        elif "end" in message:
            for name, second, fence in message["end"]:
                self.held.pop((name, int(second)), None)
                self.unreleased.append([name, int(fence)])
            self.release()
        elif "daemons" in message:  # the node's `run: once` daemon tasks (after each load)
            self.daemons = {name: (ips, hosts, int(most), kill_grace)
                            for name, ips, hosts, most, kill_grace in message["daemons"]}
            self.standby.changed()
        elif "once" in message:     # the node's common `run: once` tasks (after each load)
            self.losses.use(message["once"])
            self.maxes.update((name, int(most)) for name, most, _ in message["once"])
        elif "hello" in message:
            self.hello(message["hello"])
        elif "adopt" in message:    # runs a killed supervisor left, adopted (claimadopt.py)
            self.adoptions.add(message["adopt"], self.lease)
        elif "watch" in message:    # the node's `run: once` tasks, whose holders status shows
            self.holders.watch = [str(name) for name in message["watch"]]
        return []

    def hello(self, hello):
        if self.url is not None and hello["url"] != self.url:
            self.lost(RuntimeError("the fleet database URL changed"))
        self.url, self.node = hello["url"], hello["node"]
        self.takeover, self.lease = float(hello["takeover"]), float(hello["lease"])

    def hold(self, items):
        """What runs are now (their group, their executor), or the runs started before this
        process (a restart): renewed."""
        helds = []
        for name, second, fence, pgid, kill_grace, *pid in items:
            known = self.held.get((name, int(second)))
            if known is not None and known.fence == int(fence):
                known.pgid, known.pid = pgid, (pid or [known.pid])[0]
                continue
            held = Held(name, second, fence, pgid, kill_grace, self.clock() + self.lease / 3, *pid)
            held.confirmed = True
            self.held[(name, int(second))] = held
            helds.append(held)
        self.renew(helds)

    def plan(self, second, tasks, now):
        """The keys of this node's preferred claims (all of them with ``now``); the others wait
        until ``takeover`` before the second."""
        live = self.live_nodes()
        at_once = []
        for name, ips, hosts, *_ in tasks:
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
        slots = [key for key, due in self.slots_due.items() if due[2] <= now]
        if slots:
            self.take_slots(slots)
        looks = [key for key, (at, _) in self.rechecks.items() if at <= now]
        if looks:
            self.recheck(looks)
        if (self.unconfirmed or self.unreleased) and self.conn is None and now >= self.next_connect:
            self.confirm()
            self.release()
        if self.adoptions.due(now) and not self.orphaned:
            self.adoptions.look(self)
        if not self.orphaned and self.losses.due(now):
            self.take_late(self.losses.look(self))
        if self.daemons and not self.orphaned:
            self.standby.drain(self)
            if self.clock() >= self.standby.at:
                self.standby.look(self)
        if self.held:
            self.tend_leases()
        self.holders.tend(self, now)
        if now - self.pruned_at > PRUNE_EVERY and self.conn is not None:
            self.pruned_at = now
            self.execute(claims.PRUNE, {"keep": KEEP_SECONDS})
        if self.daemons and not self.orphaned:
            self.standby.drain(self)    # a NOTIFY read with the answers above: no select sees it

    def tend_leases(self):
        """Renew every lease/3; stop what cannot be renewed before its lease ends."""
        if self.orphaned:
            for key, held in list(self.held.items()):
                if not held.alive():
                    del self.held[key]
                    self.unreleased.append([held.name, held.fence])
            self.release()
        now = self.clock()
        if now >= self.renew_at and any(h.confirmed for h in self.held.values()):
            done = self.renew([h for h in self.held.values() if h.confirmed])
            self.renew_at = now + (self.lease / 3 if done else RENEW_RETRY)
        now = self.clock()
        term, kill = [], []
        for key, held in list(self.held.items()):
            if now >= held.lease_end - KILL_BEFORE:
                kill.append(held)
                del self.held[key]
            elif held.failing and not held.termed and \
                    now >= held.lease_end - held.kill_grace - TERM_MARGIN:
                held.termed = True
                term.append(held)
        if term:
            log.warning("fleet claims: cannot renew the lease of %d run(s); stopping them before "
                        "it ends", len(term))
            self.stop_runs(term, kill=False)
        if kill:
            log.warning("fleet claims: the lease of %d run(s) ends unrenewed; killing them",
                        len(kill))
            self.stop_runs(kill, kill=True)

    def stop_runs(self, helds, kill):
        """TERM (or KILL) runs whose lease cannot be kept: through the supervisor, or, when it
        is gone, to their process groups here."""
        if not self.orphaned:
            self.send({"stop": [held.item for held in helds], "kill": kill})
            return
        for held in helds:
            signum = signal.SIGKILL if kill else signal.SIGTERM
            try:
                if held.pgid is not None:
                    os.killpg(held.pgid, signum)
                if held.pid is not None and (kill or held.pgid is None):
                    os.kill(held.pid, signum)
            except OSError:
                pass

    # ---- the statements ---------------------------------------------------------------------

    def attempt(self, keys):
        """Claim ``keys`` in one statement; answer won and lost.  A second already past its fire
        window is not tried (the supervisor has skipped it), unless this process has not been
        connected yet (the supervisor waits for its answer: a claim won late is run late)."""
        now = self.clock()
        keys = [key for key in keys if now < key[1] + (
            claims.FIRE_WINDOW if self.up_once else claims.RECHECK_FOR)]
        if not keys:
            return
        late = any(second <= now for _, second in keys)
        rows = self.execute(claims.CLAIM_LATE if late else claims.CLAIM,
                            {"node": self.node, **claims.columns(keys)})
        if rows is None:
            return          # unanswered: the supervisor fails them closed
        won = {(task, int(second)): int(fence) for task, second, fence in rows}
        self.send({"won": [[task, second, fence] for (task, second), fence in won.items()],
                   "lost": [[task, second] for task, second in keys if (task, second) not in won],
                   "late": False})
        for key in keys:
            self.rechecks[key] = (key[1] + claims.EXPIRE_AFTER + 0.1, key[1] + claims.RECHECK_FOR)
        now = self.clock()
        for key, fence in won.items():      # (a second already past: its slot at once)
            self.slots_due[key] = [fence, self.maxes.get(key[0], 1),
                                   key[1] - claims.SLOT_AHEAD if key[1] > now else 0]

    def take_slots(self, keys):
        """Take a free slot for each won claim in ``keys``, in one statement: answer slots and
        full (a full one is decided: skipped everywhere, never taken over)."""
        batch = []
        now = self.clock()
        for key in keys:
            fence, most, when = self.slots_due.pop(key)
            if when and now > key[1] + claims.FIRE_WINDOW:
                continue        # its tick is over (the database was away): not worth a slot
            batch.append((key[0], key[1], fence, most))
        if not batch:
            return
        new = {name: most for name, _, _, most in batch if (name, most) not in self.made}
        if new and self.execute(claims.MAKE_SLOTS_OF, {
                "tasks": list(new), "maxes": list(new.values())}) is None:
            return
        self.made.update(new.items())
        rows = self.execute(claims.TAKE_SLOTS, {
            "node": self.node, "tasks": [name for name, _, _, _ in batch],
            "seconds": [second for _, second, _, _ in batch],
            "fences": [fence for _, _, fence, _ in batch],
            "maxes": [most for _, _, _, most in batch]})
        if rows is None:
            return              # unanswered: the supervisor fails them closed
        taken = {(name, int(second), int(fence)): slot for name, second, fence, slot in rows}
        self.send({"slots": [[name, second, fence, taken[(name, second, fence)]]
                             for name, second, fence, _ in batch if (name, second, fence) in taken],
                   "full": [[name, second, fence] for name, second, fence, _ in batch
                            if (name, second, fence) not in taken]})

    def recheck(self, keys):
        """Take over the expired claims among ``keys``; look again in a second at those still
        open (until RECHECK_FOR after their second)."""
        rows = self.execute(claims.RECHECK, {"node": self.node, **claims.columns(keys)})
        if rows is None:
            return
        self.take_late([row for row in rows if row[2] is not None])
        if self.conn is None:
            return              # lost meanwhile: no look again (lost())
        still = {(task, int(second)) for task, second, fence in rows if fence is None}
        now = self.clock()
        for key in keys:
            _, give_up = self.rechecks.pop(key)
            if key in still and now + 1 < give_up:
                self.rechecks[key] = (now + 1.0, give_up)

    def take_late(self, rows):
        """Claims won after their second (taken over, or lost runs re-run): answered, and
        their slots taken at once."""
        if rows:
            self.send({"won": [[task, int(second), int(fence)] for task, second, fence in rows],
                       "lost": [], "late": True})
            for task, second, fence in rows:
                self.slots_due[(task, int(second))] = [int(fence), self.maxes.get(task, 1), 0]
            self.take_slots([(task, int(second)) for task, second, _ in rows])

    def confirm(self):
        """The starts not confirmed yet, then their leases; those whose claim is no longer this
        node's are revoked (taken over after it expired: the supervisor stops them)."""
        pending, self.unconfirmed = self.unconfirmed, []
        if not pending:
            return
        rows = self.execute(claims.START, {
            "node": self.node, **claims.columns([(h.name, h.second) for h in pending]),
            "fences": [h.fence for h in pending]})
        if rows is None:
            for held in pending:
                held.failing = True
            self.unconfirmed = pending + self.unconfirmed
            return
        confirmed = {(task, int(second)) for task, second in rows}
        revoked = [h for h in pending if (h.name, h.second) not in confirmed]
        for held in revoked:
            self.held.pop((held.name, held.second), None)
        if revoked:
            log.warning("fleet claims: %d run(s) started after their claim was taken over; "
                        "stopping them", len(revoked))
            self.send({"revoked": [held.item for held in revoked]})
        self.renew([h for h in pending if (h.name, h.second) in confirmed])

    def renew(self, helds):
        """Renew the leases of ``helds``; a lease refused (it had ended) is a KILL at once.
        False when the database could not be asked."""
        if not helds:
            return True
        sent = self.clock()
        rows = self.execute(claims.RENEW, {
            "node": self.node, "lease": self.lease, "tasks": [h.name for h in helds],
            "fences": [h.fence for h in helds]})
        if rows is None:
            for held in helds:
                held.failing = True
            return False
        renewed = {(task, int(fence)) for task, fence in rows}
        gone = []
        for held in helds:
            if (held.name, held.fence) in renewed:
                held.confirmed, held.termed, held.failing = True, False, False
                held.lease_end = sent + self.lease
            elif self.held.pop((held.name, held.second), None) is not None:
                gone.append(held)
        if gone:
            log.warning("fleet claims: the lease of %d run(s) ended before it was renewed "
                        "(this node was stopped or cut off); killing them", len(gone))
            self.stop_runs(gone, kill=True)
        return True

    def release(self):
        """Free the slots of ended runs (tried again while the database is away)."""
        pending, self.unreleased = self.unreleased, []
        if pending and self.execute(claims.RELEASE, {
                "node": self.node, "tasks": [name for name, _ in pending],
                "fences": [fence for _, fence in pending]}) is None:
            self.unreleased = pending + self.unreleased

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
        if self.down is not None or not self.up_once:
            if self.down is not None:
                log.info("fleet claims: the fleet database is reachable again")
            self.send({"db": "up"})
            self.down, self.up_once = None, True
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
        self.down, self.up_once = text, True

    def send(self, message):
        if self.orphaned:
            return
        try:
            self.sock.sendall(claims.encode(message))
        except OSError:
            self.orphaned = True


def _batched(messages):
    """``messages`` with each series of "start" (or "end") messages in a row made one: a burst
    of starts or ends is one statement, not one per run (in order, so a run's start still comes
    before its end)."""
    merged = []
    for message in messages:
        kind = next(iter(message)) if len(message) == 1 else None
        if kind in ("start", "end") and merged and list(merged[-1]) == [kind]:
            merged[-1] = {kind: merged[-1][kind] + message[kind]}
        else:
            merged.append(message)
    return merged


def _alive(kill, pid):
    try:
        kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _connect(url):
    from torchcore import fleetdb

    conn = fleetdb.connect(url, timeout=CONNECT_TIMEOUT, application_name="torchcore claims")
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    return conn


def main(argv=None):
    from torchcore import services

    services.set_title("fleet claims")
    args = sys.argv[1:] if argv is None else argv
    log_file = args[1] if len(args) == 2 and args[0] == "--log-file" else None
    # the daemon's log, in its line format: its file followed across logrotate's moves when the
    # daemon is in the background (as the services' lines are), else stderr
    services.log_to(log_file)
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the supervisor's terminal's ^C is its own
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sock = socket.socket(fileno=os.dup(0))
    os.close(0)
    claimer = Claimer(sock)

    def stop(*_):
        claimer.stop = True
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)     # SIGTERM ends the select at once
    claimer.wake = [wake_r]
    signal.signal(signal.SIGTERM, stop)
    claimer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
