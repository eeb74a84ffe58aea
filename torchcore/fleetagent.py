"""The fleet agent (``torchcore: fleet agent``): the node in the fleet database's registry, its
heartbeat, and every run record of the node shipped to the fleet history.

The supervisor never talks to the network: it writes run records to SQLite, whose ``changes``
journal this process follows with its own cursor (fleetstore.py), shipping the runs' current rows
in batches of up to 500 per PostgreSQL transaction, keyed on (node, run_id), each ended run with
the last ``fleet.output_tail`` bytes of its output from its task log.  The cursor moves only after
PostgreSQL committed, so nothing is lost and, the key being unique, nothing doubled, whenever the
agent, the node or the database stops.

Every ``fleet.heartbeat`` it upserts the node's row of ``torchcore.nodes``: hostname, addresses,
torchcore's version, the supervisor's pid and start, ``last_seen`` (the database's ``now()``),
the clock offset (this node's clock minus the database's, measured around a round trip), the
task file's version (its sha256, and the git commit of the file when it is in a git work tree,
asked of ``git`` here), the daemon's counts (asked on the control socket, as ``status --active``
does) and the runs still waiting.  A clean stop sets ``stopped``.  What is written, and the
connection, are fleetrows.py's.

With the database down, unreachable or refusing, the node schedules and runs as before: the
agent tries again after 1 s, doubling; a database that cannot be reached is tried at least every
RETRY_UNREACHABLE seconds (a try that fails costs one refused or timed-out connect, and the backlog
ships within seconds of the database's return), one that answers but refuses the node or lacks
the schema up to every RETRY_MAX seconds (each try costs the server a backend and a login, and
someone has to act); each wait is shortened by up to a fifth at random, so that a fleet that lost
its database at one moment does not come back in one burst.  It logs once per change of state
(never per try, the URL only through fleetspec.redact), keeps its state (with the clock offset,
to 0.1 s) in the records database for ``status``, and ships the backlog in order once the
database is back.  A schema dropped or older than the code is a state like the others: logged
once, tried again.

It runs as ``python -m torchcore.fleetagent`` with the services' arguments (services.py) and
``--node-name NAME`` when ``start`` had it: SIGTERM ships what is left for up to
``min(shutdown_grace, STOP_GRACE) - 1`` seconds, then a last heartbeat with ``stopped``; SIGHUP
re-reads the task file's settings (and heartbeats at once when the file changed); end of file on
the parent pipe (the supervisor is gone, even killed) ends it at once.
"""

import logging
import os
import select
import signal
import socket
import sys
import time

from torchcore import __version__, fleetrows, fleetspec, fleetstore, paths

log = logging.getLogger("torchcore")

POLL = 0.5                  # seconds between looks at the journal
RETRY_FIRST, RETRY_MAX = 1.0, 30.0      # the backoff between tries of a database that failed
RETRY_UNREACHABLE = 4.0     # its cap while the database cannot be reached at all
RETRY_JITTER = 0.2          # each wait is shortened by up to this fraction, at random
GIT_EVERY = 60.0            # seconds between asks of git for the task file's commit
BATCHES_PER_PASS = 20       # then the loop looks at its signals and its parent again
LOAD_RETRY = 30.0

STARTING, UP, UNREACHABLE, REFUSED, SCHEMA, STOPPED = (
    "starting", "up", "unreachable", "refused", "schema", "stopped")
_SCHEMA_STATES = ("42P01", "3F000", "42703", "42883")   # no such table, schema, column, function

def wanted(taskfile, node=None, options=None):
    """The supervisor runs the agent when the task file has ``settings.fleet``."""
    return getattr(taskfile.settings, "fleet", None) is not None


class Agent:
    """Registers, heartbeats and ships (see the module's docstring).  ``settings``: the task
    file's Settings; ``control()``: the daemon's live status or None; ``clock``: epoch seconds."""

    def __init__(self, store, settings, node, url, *, control=lambda: None,
                 connect=fleetrows.connect, clock=time.time, monotonic=time.monotonic,
                 stopping=lambda: False, jitter=None):
        self.store = store
        self.control = control
        self.connect = connect
        self.clock, self.monotonic = clock, monotonic
        self.stopping = stopping
        self.jitter = jitter if jitter is not None else _jitter
        self.conn = None
        self.state, self.since, self.error = STARTING, clock(), None
        self.backoff = RETRY_FIRST
        self.next_try = self.next_beat = self.next_save = 0.0
        self.saved_waiting = None
        self.saved = None           # the state last kept for status
        self.offset = None          # this clock minus the database's, at the last heartbeat
        self.live = {}
        self.digest = self.commit = None
        self.git_asked = (None, float("-inf"))     # (digest, monotonic) of the last ask
        self.shipped = 0
        self.caught_up = False      # the last look at the journal found nothing left
        self.configure(settings, node, url)

    def configure(self, settings, node, url):
        """(Re)read settings: a new URL or node name reconnects at once."""
        changed = (node, url) != (getattr(self, "node", None), getattr(self, "url", None))
        self.settings, self.fleet = settings, settings.fleet
        self.node, self.url, self.shown = node, url, fleetspec.redact(url)
        if changed and self.conn is not None:
            self.close()
            self.next_try = 0.0
        return changed

    # -- one pass -------------------------------------------------------------------------------

    def step(self):
        """Connect when due, heartbeat when due, ship what waits; returns the seconds to sleep."""
        if self.conn is None and self.monotonic() >= self.next_try:
            self._open()
        more = False
        if self.conn is not None:
            from torchcore import fleetdb

            pg = _pg()
            try:
                if self.monotonic() >= self.next_beat:
                    self.heartbeat()
                if self.state == UP:
                    more = self.ship(BATCHES_PER_PASS)
                else:       # up once the database took a batch, not on the heartbeat alone: a
                    more = self.ship(1, written=self._up)  # revoked INSERT or a dropped runs
                    self._up()                              # table is one state, said once
            except pg.Error as exc:
                self._failed(self._runtime_error(exc))
            except fleetdb.FleetRefused as exc:     # another daemon as this node (_check_twin)
                self._failed(exc)
        if self.monotonic() >= self.next_save:
            self.save()
        if more:
            return 0.0
        now = self.monotonic()
        wakes = [self.next_save] + ([self.next_beat] if self.conn is not None else [self.next_try])
        return max(0.0, min(POLL, min(wakes) - now))

    def _open(self):
        from torchcore import fleetdb

        pg = _pg()
        try:
            self.conn = self.connect(self.url)
            fleetdb.check_schema(self.conn, self.url)
            self.heartbeat()        # the registration; up once a batch is shipped (step)
        except fleetdb.FleetError as exc:
            self._failed(exc)
        except pg.Error as exc:
            self._failed(self._runtime_error(exc))

    def _up(self):
        if self.state != UP:
            self.backoff = RETRY_FIRST
            self._set_state(UP, None)

    def _runtime_error(self, exc):
        from torchcore import fleetdb

        diag = getattr(exc, "diag", None)       # the server's words, without the statement
        said = fleetdb.describe(getattr(diag, "message_primary", None) or exc, self.url)
        if fleetdb._sqlstate(exc) in _SCHEMA_STATES:
            return fleetdb.SchemaError(f"the fleet database {self.shown} lacks torchcore's schema "
                                       f"({said}): run `{fleetdb.INIT_HINT}`")
        kind = type(fleetdb.classify(exc, self.url))
        return kind(f"cannot write to the fleet database {self.shown}: {said}")

    def _failed(self, error):
        """The database failed (a FleetError): try again after the backoff."""
        from torchcore import fleetdb

        self.close()
        self.caught_up = False
        kind = SCHEMA if isinstance(error, fleetdb.SchemaError) else \
            REFUSED if isinstance(error, fleetdb.FleetRefused) else UNREACHABLE
        cap = RETRY_UNREACHABLE if kind == UNREACHABLE else RETRY_MAX
        wait = min(cap, self.backoff)
        self.next_try = self.monotonic() + wait * (1.0 - RETRY_JITTER * self.jitter())
        self.backoff = min(cap, wait * 2)
        self._set_state(kind, str(error))

    def _set_state(self, kind, error):
        """Log a change of state once (never a try that fails as the one before)."""
        if kind != self.state:
            now = self.clock()
            if kind == UP:
                after = f" after {now - self.since:.0f}s" if self.state != STARTING else ""
                waiting = self.store.waiting()
                log.info("fleet agent: shipping to %s as %s%s%s", self.shown, self.node,
                         f" again{after}" if after else "",
                         f", {waiting} record{'s' if waiting != 1 else ''} waiting" if waiting else "")
            else:
                log.warning("fleet agent: %s (runs go on; trying again at least every %.0fs; the "
                            "records wait here)", error,
                            RETRY_UNREACHABLE if kind == UNREACHABLE else RETRY_MAX)
            self.state, self.since = kind, now
        self.error = error
        self.next_save = 0.0

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None

    # -- the registry ---------------------------------------------------------------------------

    def heartbeat(self, stopped=False):
        """Upsert the node's row (see the module's docstring)."""
        live = None if stopped else self.control()
        if live:
            self.live = live
        digest, commit = self.file_version()
        waiting = self.store.waiting()
        stats = self.live.get("stats", {})
        running = 0 if stopped else sum(len(t.get("running", ())) for t in
                                        self.live.get("tasks", {}).values())
        hostname, pid = socket.gethostname(), self.live.get("pid") or os.getppid()
        with self.conn.transaction():
            before = self.clock()
            row = self.conn.execute(fleetrows.CLOCK_AND_ROW,
                                    (2 * self.fleet.heartbeat, self.node)).fetchone()
            offset = self.offset = (before + self.clock()) / 2 - row[0]
            if row[1] is not None:
                self._check_twin(row[1:], hostname, pid)
            self.conn.execute(fleetrows.HEARTBEAT, (
                self.node, hostname, self.addresses(), __version__,
                pid, self.live.get("started") or _parent_started(),
                float(self.fleet.heartbeat), offset, self.settings.path, digest, commit, running,
                stats.get("started", 0), stats.get("failed", 0), stats.get("skipped", 0),
                stats.get("missed", 0), waiting, stopped))
        self.digest = digest
        self.next_beat = self.monotonic() + self.fleet.heartbeat

    def _check_twin(self, row, hostname, pid):
        """FleetRefused when another daemon, alive, reports as this node: two daemons with one
        name would overwrite each other's runs under the same (node, run_id), so the one that
        finds the other's row heartbeating writes nothing (its records wait, the state says why)
        until that one stops or goes quiet."""
        from torchcore import fleetdb

        their_host, their_pid, fresh = row
        if not fresh or (their_host, their_pid) == (hostname, pid):
            return
        if their_host == hostname and not _alive(their_pid):
            return      # this daemon's predecessor, killed: not another one
        raise fleetdb.FleetRefused(
            f"another daemon (pid {their_pid} on {their_host}) reports as node {self.node} too; "
            "their runs would overwrite each other's in the fleet history, so this one ships "
            "nothing: give each its own --node-name or fleet.node")

    def addresses(self):
        node = self.live.get("node")
        if node:
            return list(node.get("addresses", []))
        from torchcore.node import Node

        try:
            return [str(a) for a in Node.detect().addresses]
        except Exception:
            return []

    def file_version(self):
        """(sha256, git commit or None) of the task file the daemon runs."""
        digest = self.live.get("digest") or file_digest(self.settings.path)
        asked_digest, asked_at = self.git_asked
        if digest != asked_digest or self.monotonic() - asked_at >= GIT_EVERY:
            self.commit = fleetrows.git_commit(self.settings.path)
            self.git_asked = (digest, self.monotonic())
        return digest, self.commit

    def file_changed(self):
        """After SIGHUP: heartbeat at once if the file is another one than the last heartbeat's."""
        if file_digest(self.settings.path) != self.digest:
            self.live.pop("digest", None)
            self.next_beat = 0.0

    # -- the history ----------------------------------------------------------------------------

    def ship(self, batches, written=None):
        """Ship up to ``batches`` batches; True if more may wait.  ``written()``: called once the
        first batch is in PostgreSQL, before the cursor passes it (while it still counts as waiting)."""
        for _ in range(batches):
            if self.stopping():
                return True
            batch = self.store.next_batch()
            if not batch:
                self.caught_up = True
                if self.saved_waiting:
                    self.save()
                return False
            self.caught_up = False
            rows = self.rows(batch.records)
            if rows:
                self.write(rows)
            if written is not None:
                written()
                written = None
            self.store.commit(batch)
            self.shipped += len(rows)
        return True

    def rows(self, records):
        """The upsert's parameters (fleetrows.run_row), each ended run with its output's tail."""
        ended = {}
        for record in records:
            if record.finished:
                ended.setdefault(record.task, {})[record.run_id] = (
                    record.started or record.ended, record.ended)
        outputs = {}
        for task, runs in ended.items():
            outputs.update(fleetstore.outputs(self.settings.log_dir, task, runs,
                                              self.fleet.output_tail))
        return [fleetrows.run_row(self.node, record, outputs.get(record.run_id))
                for record in records]

    def write(self, rows):
        """One transaction; a row the database will not take (a value out of its range) is
        left out with an error, the others written one by one, rather than stopping the history."""
        pg = _pg()
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.executemany(fleetrows.UPSERT_RUNS, rows)
        except (pg.DataError, pg.IntegrityError):
            for row in rows:
                try:
                    with self.conn.transaction(), self.conn.cursor() as cur:
                        cur.execute(fleetrows.UPSERT_RUNS, row)
                except (pg.DataError, pg.IntegrityError) as exc:
                    log.error("fleet agent: run %s of %s cannot be stored in the fleet database "
                              "(left out): %s", row[1], row[2], " ".join(str(exc).split()))

    def save(self):
        """Keep the state, and how many records wait, for ``status`` (none while the agent
        keeps up: what the supervisor wrote since its last look ships at the next, POLL later)."""
        waiting = 0 if self.state == UP and self.caught_up else self.store.waiting()
        state = {"state": self.state, "since": self.since, "waiting": waiting, "error": self.error,
                 "database": self.shown, "node": self.node,      # the offset to 0.1 s, written
                 "clock_offset": None if self.offset is None       # seldom (+ 0.0: -0.02 is 0.0,
                 else round(self.offset, 1) + 0.0}                  # not -0.0)
        if state != self.saved:         # an idle node writes nothing
            self.store.save_state({**state, "at": self.clock()})
            self.saved = state
        self.saved_waiting = waiting
        self.next_save = self.monotonic() + self.fleet.heartbeat

    # -- stopping -------------------------------------------------------------------------------

    def finish(self, budget):
        """SIGTERM: ship what is left for up to ``budget`` seconds, then the last heartbeat
        (``stopped``); a database not connected now is not waited for."""
        from torchcore import fleetdb

        pg = _pg() if self.conn is not None else None
        deadline = self.monotonic() + budget
        self.stopping = lambda: False       # stopping is what this does now
        if self.conn is not None:
            previous = signal.signal(signal.SIGALRM, _expired)
            signal.setitimer(signal.ITIMER_REAL, max(0.1, budget))
            try:
                while self.monotonic() < deadline - 1.0 and self.ship(1):
                    pass
                self.heartbeat(stopped=True)
                self.state, self.since, self.error = STOPPED, self.clock(), None
            except _Expired:
                log.warning("fleet agent: out of time to ship all before stopping; the rest "
                            "ships at the next start")
            except pg.Error as exc:     # the database went away meanwhile: said as always
                self._failed(self._runtime_error(exc))
            except fleetdb.FleetRefused as exc:     # another daemon as this node
                self._failed(exc)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        self.close()
        try:
            self.save()
        except Exception as exc:
            log.warning("fleet agent: cannot keep its state: %s", exc)


class _Expired(BaseException):
    """The stop's budget is over (SIGALRM): whatever waits on the network is abandoned."""


def _expired(signum, frame):
    raise _Expired()


def file_digest(path):
    """taskset.digest (the sha256 of at most the loader's limit of the file, None if unreadable),
    without taskset's imports: the agent needs neither the task loader nor the file watch."""
    import hashlib

    from torchcore.yamlread import MAX_FILE_BYTES

    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read(MAX_FILE_BYTES + 1)).hexdigest()
    except OSError:
        return None


def _jitter():
    """A number in [0, 1): how much of RETRY_JITTER a wait loses."""
    import random
    return random.random()


def _pg():
    from torchcore import fleetdb
    return fleetdb.psycopg()


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _parent_started():
    try:
        import psutil
        return psutil.Process(os.getppid()).create_time()
    except Exception:
        return None


def stop_budget(settings):
    """Seconds a SIGTERM gives the agent to ship: within the daemon's shutdown_grace and the
    supervisor's wait for its services."""
    from torchcore import services

    return max(1.0, min(float(settings.shutdown_grace), services.STOP_GRACE) - 1.0)


# -- the process --------------------------------------------------------------------------------


class _Flags:
    stop = False
    reload = False


def _handle(signum, frame):
    if signum == signal.SIGHUP:
        _Flags.reload = True
    else:
        _Flags.stop = True


def main(argv=None):
    _without_python_ssl()
    from torchcore import services

    args = services.child_args(argv, "torchcore's fleet agent", extra=lambda parser: parser.add_argument(
        "--node-name", default=None, help="this node's name in the fleet (start's --node-name)"))
    services.set_title("fleet agent")
    services.setup_logging(args)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _handle)
    settings = _first_load(args, services, wake_r)
    if settings is None:
        return 0
    try:
        node = fleetspec.node_name(settings.fleet, args.node, override=args.node_name)
        store = fleetstore.Store(paths.records_db(args.state_dir))
    except Exception as exc:        # a bad name, RecordsError: said once, then the restart backoff
        log.error("fleet agent: cannot start: %s", exc)
        return 1
    agent = Agent(store, settings, node, fleetspec.database_url(settings.fleet, os.environ),
                  control=lambda: fleetrows.ask_daemon(args.state_dir),
                  stopping=lambda: _Flags.stop or _Flags.reload)
    log.info("fleet agent: started as node %s, fleet database %s", node, agent.shown)
    try:
        _loop(agent, args, services, wake_r)
    finally:
        agent.close()
        agent.store.close()
    return 0


def _without_python_ssl():
    """Keep Python's OpenSSL bindings (and the system's libssl and libcrypto with them, ~5 MB
    resident) out of this process: psycopg imports asyncio, which imports ssl when it can, though
    the agent's connection is synchronous and its TLS is libpq's own (sslmode and the certificates
    in the URL work as written); hashlib uses OpenSSL when it can, for the file's sha256 that its
    built-in implementation computes the same.  A None in sys.modules makes the import fail,
    which asyncio and hashlib expect and handle."""
    for name in ("ssl", "_hashlib"):
        if name not in sys.modules:
            sys.modules[name] = None


def _load(path):
    """The task file's settings when they have ``fleet`` (its tasks may not validate: the daemon
    runs its last valid version); else the problem as a string."""
    from torchcore import config

    try:
        settings = config.load_settings(path)
    except Exception as exc:
        return None, str(exc)
    if settings.fleet is None:
        return None, f"{path}: settings: fleet: not set (or not valid)"
    return settings, None


def _first_load(args, services, wake_r):
    """The settings, once the file has a valid ``fleet``: tried again on SIGHUP and every
    LOAD_RETRY seconds, the problem said once; None if told to stop meanwhile."""
    said = None
    while not _Flags.stop:
        settings, problem = _load(args.taskfile)
        if settings is not None:
            return settings
        if problem != said:
            said = problem
            log.error("fleet agent: waiting for a task file with settings.fleet (the records wait "
                      "too): %s", problem)
        _Flags.reload = False
        readable, _, _ = select.select([args.parent_fd, wake_r], [], [], LOAD_RETRY)
        if wake_r in readable:
            services.drain(wake_r)
        if args.parent_fd in readable and services.parent_gone(args.parent_fd):
            return None
    return None


def _loop(agent, args, services, wake_r):
    said = (None, 0.0)
    while True:
        if _Flags.stop:
            agent.finish(stop_budget(agent.settings))
            return
        if _Flags.reload:
            _Flags.reload = False
            _reload(agent, args)
        wait = POLL
        try:
            if agent.store.replaced():
                log.warning("fleet agent: %s was removed or replaced; opening it again",
                            agent.store.path)
                agent.store.close()
                agent.store = fleetstore.Store(agent.store.path)
                agent.saved = None
            wait = agent.step()
        except Exception as exc:    # the records database locked, a full disk: tried again
            said = services.warn_once_a_minute("fleet agent", f"{type(exc).__name__}: {exc}", said)
        readable, _, _ = select.select([args.parent_fd, wake_r], [], [], wait)
        if wake_r in readable:
            services.drain(wake_r)
        if args.parent_fd in readable and services.parent_gone(args.parent_fd):
            log.info("fleet agent: the supervisor is gone; exiting")
            return


def _reload(agent, args):
    settings, problem = _load(args.taskfile)
    if settings is None:
        log.error("fleet agent: cannot re-read the task file's settings (keeping the ones "
                  "before): %s", problem)
        return
    try:
        node = fleetspec.node_name(settings.fleet, args.node, override=args.node_name)
    except fleetspec.FleetSpecError as exc:
        log.error("fleet agent: %s (keeping node name %s)", exc, agent.node)
        node = agent.node
    if agent.configure(settings, node, fleetspec.database_url(settings.fleet, os.environ)):
        log.info("fleet agent: now node %s, fleet database %s", node, agent.shown)
    agent.file_changed()






if __name__ == "__main__":
    sys.exit(main())
