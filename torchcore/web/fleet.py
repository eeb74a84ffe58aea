"""The fleet pages' side of the HTTP service: the fleet database, read for ``/api/v1/fleet/``.

Only a task file with ``settings.fleet`` connects (the URL as fleetspec.database_url says:
``$TORCHCORE_DATABASE_URL``, else ``settings.fleet.database``); psycopg is imported on the first
fleet request.  One connection is kept for the process, used by one request at a time, and
opened again after an error.  The fleet database never slows the local pages (they do not
touch it), and a fleet request waits a bounded time whatever the database does:

- connecting: at most CONNECT_TIMEOUT seconds (libpq's connect_timeout, unless the URL sets one);
- a statement: at most STATEMENT_TIMEOUT seconds (the server's statement_timeout), and a server
  that vanished mid-answer is noticed by TCP within TCP_TIMEOUT (tcp_user_timeout, keepalives);
- waiting for the connection another request uses: at most BUSY_WAIT seconds;
- after a failed connect, requests for the next RETRY_AFTER seconds are answered at once with
  the same error (a database that is down costs one attempt per RETRY_AFTER, not one per page);
- whatever the server does, a request's reads end within READ_DEADLINE seconds: past it a
  watchdog shuts the connection's socket down.  The server's own bounds cannot end a read whose
  server process stopped (SIGSTOP, a hung disk) while its kernel still acknowledges, nor one
  held by a pooler waiting for a server (where ``SET statement_timeout`` does not stay).

Every failure is a FleetError whose message names the database by ``fleetspec.redact`` (the
password, if any, never shows); the service logs the database going away and coming back,
once each, never per request.
"""

import logging
import os
import socket
import threading
import time

from torchcore import fleetdb, fleetquery, fleetspec

log = logging.getLogger("torchcore.web")

CONNECT_TIMEOUT = 2         # seconds (libpq counts at least 2)
STATEMENT_TIMEOUT = 5       # seconds
TCP_TIMEOUT = 5             # seconds: unacknowledged data, or a silent peer (keepalives)
BUSY_WAIT = 3.0             # seconds a request waits for the connection another one uses
RETRY_AFTER = 2.0           # seconds between connection attempts while the database is down
READ_DEADLINE = 10.0        # seconds a request's reads may take, whatever the server does
VIEW_TTL = 2.0              # seconds a task file's view across the fleet is reused
EXAMPLE_URL = "postgresql://torchcore@db.internal/torchcore"


def not_set_up(path):
    """The 404 of every fleet route when the task file has no settings.fleet."""
    return (f"the fleet is not set up: add settings.fleet.database (the fleet's PostgreSQL URL, "
            f"like {EXAMPLE_URL}) to {path}, run `torchcore fleet init` once, then "
            "`torchcore reload` (docs/fleet.md)")


def reader_for(taskfile, current=None, environ=None):
    """The FleetReader for this task file: ``current`` when the URL is the same, None without
    settings.fleet; a reader no longer used is closed."""
    fleet = getattr(taskfile.settings, "fleet", None)
    url = fleetspec.database_url(fleet, os.environ if environ is None else environ) \
        if fleet is not None else None
    if current is not None and current.url == url:
        return current
    if current is not None:
        current.close()
    return FleetReader(url) if url else None


def _bounds(given):
    """The connection's options: autocommit, its name, and the bounded waits the URL does not
    set itself (libpq's parameters, as the URL could hold them)."""
    options = {"autocommit": True, "application_name": "torchcore: http"}
    for key, value in (("connect_timeout", CONNECT_TIMEOUT),
                       ("tcp_user_timeout", TCP_TIMEOUT * 1000), ("keepalives", 1),
                       ("keepalives_idle", TCP_TIMEOUT), ("keepalives_interval", 1),
                       ("keepalives_count", 3)):
        if key not in given:
            options[key] = value
    return options


class FleetReader:
    """One fleet database, read by the service's request threads one at a time."""

    def __init__(self, url):
        self.url = url
        self.shown = fleetspec.redact(url)
        self._lock = threading.Lock()       # the connection: one request at a time
        self._conn = None
        self._retry_at = 0.0                # monotonic: no new attempt before it
        self._failure = None                # the last failure's text, while failing
        self._views = {}                    # (digest, tz) -> (monotonic, view)

    # -- the questions of the routes (fleetquery's; QueryError passes: 400/404) -----------------

    def nodes(self, tz=None):
        return self.query(lambda conn: fleetquery.nodes(conn, tz))

    def history(self, tz=None, **filters):
        return self.query(lambda conn: fleetquery.history(conn, tz=tz, **filters))

    def run(self, node, run_id, tz=None):
        return self.query(lambda conn: fleetquery.run(conn, node, run_id, tz=tz))

    def task_view(self, taskfile, tz=None, task=None):
        """fleetquery.task_view of the file (``task``: of that task only, as a task's page asks),
        reused for VIEW_TTL seconds (every open task page asks for it again)."""
        key = (taskfile.digest, str(tz), task)
        hit = self._views.get(key)
        if hit is not None and time.monotonic() - hit[0] < VIEW_TTL:
            return hit[1]
        view = self.query(lambda conn: fleetquery.task_view(conn, taskfile, tz, task))
        self._views = {key: (time.monotonic(), view)}
        return view

    # -- the connection -------------------------------------------------------------------------

    def query(self, read):
        """``read(conn)``'s value; FleetError (one line, the URL redacted) when the database
        cannot answer, after at most the bounded waits above."""
        if not self._lock.acquire(timeout=BUSY_WAIT):
            raise fleetdb.FleetUnreachable(
                f"the fleet database {self.shown} did not answer within {BUSY_WAIT:g}s "
                "(another request is waiting on it); try again")
        try:
            return self._query(read)
        finally:
            self._lock.release()

    def _query(self, read):
        pg = fleetdb.psycopg()
        for attempt in (1, 2):
            kept = self._conn is not None
            conn = self._connection()
            watchdog = _Watchdog(conn, READ_DEADLINE)
            try:
                try:
                    value = read(conn)
                finally:
                    watchdog.done()     # before the connection may be closed below
            except fleetquery.QueryError:
                self._answered()        # a question it answered no to: it is there
                raise
            except pg.Error as exc:
                if watchdog.fired:
                    self._drop()
                    error = fleetdb.FleetUnreachable(
                        f"the fleet database {self.shown} did not answer within "
                        f"{READ_DEADLINE:g}s; its connection was cut")
                    self._failed(error)
                    raise error from None
                if conn.closed or conn.broken:
                    self._drop()
                    if kept and attempt == 1:
                        continue        # a connection that broke while kept (a restart): anew
                error = fleetdb.classify(exc, self.url, "read")
                self._failed(error)
                raise error from None
            self._answered()
            return value

    def _connection(self):
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._retry_at and self._failure is not None:
            raise fleetdb.FleetUnreachable(self._failure)
        try:
            self._conn = self._open()
        except fleetdb.FleetError as exc:
            self._retry_at = time.monotonic() + RETRY_AFTER
            self._failed(exc)
            raise
        return self._conn

    def _open(self):
        pg = fleetdb.psycopg()
        url = str(self.url)
        try:
            given = pg.conninfo.conninfo_to_dict(url)
            conn = pg.connect(url, **_bounds(given))
        except pg.Error as exc:
            raise fleetdb.classify(exc, url) from None
        except (OSError, ValueError) as exc:
            raise fleetdb.FleetUnreachable(f"cannot connect to the fleet database {self.shown}: "
                                           f"{fleetdb.describe(exc, url)}") from None
        try:
            conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT * 1000}")
            fleetdb.check_schema(conn, url)
        except pg.Error as exc:
            conn.close()
            raise fleetdb.classify(exc, url, "read") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _drop(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _failed(self, error):
        """Note a failure; logged when the database was answering before (or never tried)."""
        if self._failure is None:
            log.warning("http: fleet pages: %s", error)
        self._failure = str(error)

    def _answered(self):
        if self._failure is not None:
            log.info("http: fleet pages: the fleet database %s answers again", self.shown)
        self._failure = None
        self._retry_at = 0.0

    def close(self):
        if self._lock.acquire(timeout=BUSY_WAIT):
            try:
                self._drop()
            finally:
                self._lock.release()


class _Watchdog:
    """Past ``seconds``, the connection's socket shut down (from the timer's thread), so that
    the read waiting on it fails at once; ``fired`` says it did.  ``done()`` ends the watch, and
    once it returns the socket is never touched (its descriptor may be another's after a close)."""

    def __init__(self, conn, seconds):
        self.conn, self.fired = conn, False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def done(self):
        with self._lock:
            self._timer.cancel()
            self.conn = None

    def _cut(self):
        with self._lock:
            if self.conn is None:
                return
            self.fired = True
            try:
                sock = socket.socket(fileno=os.dup(self.conn.fileno()))
            except Exception:       # closed already
                return
            with sock:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
