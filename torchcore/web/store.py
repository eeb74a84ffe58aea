"""What the HTTP service reads: the task file, the records (read-only), the daemon's live state.

One ``Backend`` per ``torchcore: http`` process, shared by its worker threads:

- the task file, loaded at start and again on SIGHUP (``reload``); a file that no longer
  validates keeps the last good one, as the supervisor does;
- the records database, opened read-only (``mode=ro``), one connection per worker thread; the
  service never writes to it;
- the supervisor's ``status`` reply over the control socket, kept for a second, so that
  any number of scrapes and page loads cost the supervisor at most one request a second;
- the aggregates behind ``/metrics``, from the records, kept for a few seconds;
- with ``settings.fleet``, the fleet database for the fleet pages (fleet.py's FleetReader).

The JSON shapes are the commands' own: ``history --json`` (commands/history.py, run_json) and
``status --json`` (commands/status.py, status_json), so a script moves between the two freely.
"""

import logging
import os
import sqlite3
import threading
import time
from datetime import datetime
from types import SimpleNamespace
from urllib.parse import quote

from torchcore import config, records, tasklog
from torchcore.commands import history as history_cmd
from torchcore.commands import status as status_cmd
from torchcore.control import ControlClient, socket_path
from torchcore.describe import describe_schedule
from torchcore.errors import ConfigError, DaemonError
from torchcore.node import Node
from torchcore.web import fleet
from torchcore.web.settings import TokenError, read_token

log = logging.getLogger("torchcore.web")

LIVE_TTL = 1.0          # seconds a status reply of the supervisor is reused
ROWS_TTL = 1.0          # seconds the task rows (status of every task) are reused
METRICS_TTL = 2.0       # seconds the records' aggregates are reused
CONTROL_TIMEOUT = 5.0
FOLLOW_POLL = 0.5       # seconds between looks at a followed log (with a ``sleep``)
NEXT_RUNS = 5           # next run times shown for one task
COST_FACTOR = 10        # a cached value is kept at least this many times as long as it took

# Skip reasons as metric labels: a fixed set, whatever the reason's text (records.py, runs.py).
_SKIP_CLASS = ("CASE WHEN skipped LIKE 'max_running %' THEN 'max_running' "
               "WHEN skipped LIKE 'max %' THEN 'max' "
               "WHEN skipped LIKE 'fork failed%' THEN 'fork_failed' ELSE 'other' END")
_AGGREGATE = f"""
    SELECT task,
        CASE WHEN missed != 0 THEN 'missed'
             WHEN skipped IS NOT NULL THEN 'skipped:' || {_SKIP_CLASS}
             WHEN ended IS NULL THEN 'running'
             WHEN {records._FAILED} THEN 'failure'
             WHEN stopped IS NOT NULL THEN 'stopped'
             ELSE 'success' END AS kind,
        count(*), max(ended)
    FROM runs GROUP BY task, kind"""
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENESS = ("SELECT {} count(*), total(started - scheduled) FROM runs WHERE manual = 0 AND "
             "scheduled IS NOT NULL AND started IS NOT NULL AND skipped IS NULL").format(
    "".join(f"total(started - scheduled <= {b}), " for b in LATENESS_BUCKETS))


class _Reader(records.Records):
    """records.Records's queries over a read-only connection of this thread (never writes)."""

    def __init__(self, conn, path):     # no super(): Records.__init__ opens for writing
        self._conn, self.path, self._pid = conn, path, os.getpid()


class Backend:
    """The data of one node's HTTP service (thread-safe: caches under a lock)."""

    def __init__(self, taskfile_path, state_dir=None, node_name=None, clock=time.time):
        self.path = os.path.abspath(taskfile_path)
        self.clock = clock
        self.node_name = node_name
        self._lock = threading.Lock()
        self._local = threading.local()
        self._cache = {}            # key -> (monotonic time made, value, seconds it took)
        self._refreshing = set()    # keys a background thread is making again
        self.taskfile = config.load(self.path)
        self.state_dir = state_dir or self.taskfile.settings.state_dir
        self.log_dir = self.taskfile.settings.log_dir
        self._apply(self.taskfile)

    # -- the task file and the token ------------------------------------------------------------

    def reload(self):
        """Read the task file again (SIGHUP); a file that does not validate keeps the last one."""
        try:
            taskfile = config.load(self.path)
        except (ConfigError, OSError) as exc:
            log.warning("http: the task file does not validate; serving the last good one: %s",
                        exc)
            return False
        self._apply(taskfile)
        return True

    def _apply(self, taskfile):
        http = taskfile.settings.http
        with self._lock:
            self.taskfile = taskfile
            self.tasks = {task.name: task for task in taskfile.tasks}
            self.tz = history_cmd._zone(taskfile.settings.timezone)
            self.base_path = http.base_path if http else "/"
            self.token_file = http.token_file if http else None
            self._cache.clear()
        # settings.fleet: the fleet pages' database (connected on the first fleet request)
        self.fleet = fleet.reader_for(taskfile, getattr(self, "fleet", None))
        auth = http.auth if http else "changes"
        refused = "every request is refused" if auth == "all" else "state-changing calls are off"
        self.token, self.token_error = None, None
        if self.token_file is None:
            self.auth = auth
            self.token_error = f"{refused}: settings.http.token_file is not set"
            return
        try:
            self.token = read_token(self.token_file)
        except TokenError as exc:
            self.token_error = f"{refused}: token_file: {exc}"
            log.error("http: %s", self.token_error)
        self.auth = auth        # last: a reader sees "all" only with its token (or its error)

    # -- the records ----------------------------------------------------------------------------

    @property
    def db_path(self):
        return records.db_path(self.state_dir)

    def reader(self):
        """This thread's read-only records, or None while there is no database yet."""
        reader = getattr(self._local, "reader", None)
        if reader is not None:
            return reader
        if not os.path.exists(self.db_path):
            return None
        try:
            conn = sqlite3.connect(f"file:{quote(self.db_path)}?mode=ro", uri=True, timeout=2.0,
                                   check_same_thread=True)
            conn.execute("PRAGMA query_only = 1")
        except sqlite3.Error as exc:
            raise records.RecordsError(f"cannot open the records database {self.db_path}: "
                                       f"{exc}") from None
        self._local.reader = _Reader(conn, self.db_path)
        return self._local.reader

    def history(self, task=None, limit=50, since=None, failed=False):
        """Runs newest first as ``history --json`` prints them."""
        reader = self.reader()
        if reader is None:
            return []
        runs = reader.query(task=task, limit=limit, since=since, failed=failed)
        return [history_cmd.run_json(run, self.tz) for run in runs]

    def run(self, run_id):
        """One run as ``history --json`` prints it, or None."""
        reader = self.reader()
        if reader is None:
            return None
        rows = reader._read(records._SELECT + " WHERE run_id = ?", (run_id,))
        return history_cmd.run_json(records.record_of(rows[0]), self.tz) if rows else None

    def log_lines(self, task, lines, run_id=None):
        return [history_cmd.shown(line) for line in
                tasklog.read_log(self.log_dir, task, lines=lines, run_id=run_id)]

    def follow(self, task, lines, run_id, sleep=None):
        """The task's log lines, then new ones as they come, as ``tasklog.follow_log`` reads
        them.  When there is nothing new it calls ``sleep(FOLLOW_POLL)`` (which paces it and may
        raise) or, without a ``sleep``, yields None: its caller waits as it likes and asks
        again (the server waits on its event loop, so a quiet follow holds no thread)."""
        follower = tasklog._Follower(tasklog.log_path(self.log_dir, task), run_id)
        if follower.f is None:
            first = tasklog.read_log(self.log_dir, task, lines, run_id)
        else:
            first = follower.initial(self.log_dir, task, lines)
        for line in first:
            yield history_cmd.shown(line)
        while True:
            got = follower.poll()
            for line in got:
                yield history_cmd.shown(line)
            if got:
                continue
            if sleep is None:
                yield None
            else:
                sleep(FOLLOW_POLL)

    # -- the daemon -----------------------------------------------------------------------------

    @property
    def socket(self):
        return socket_path(self.state_dir)

    def live(self):
        """The supervisor's ``status`` reply, tasks with something live only (at most a second
        old), or None when it does not answer."""
        def fetch():
            try:
                return ControlClient(self.socket, timeout=CONTROL_TIMEOUT).request("status",
                                                                                   active=True)
            except DaemonError as exc:
                log.debug("http: the daemon does not answer: %s", exc)
                return None
        return self._cached("live", LIVE_TTL, fetch)

    def control(self, cmd, **fields):
        """A control request to the supervisor (run, reload, enable, disable); DaemonError.
        What the daemon does next shows at once: the cached states are dropped."""
        reply = ControlClient(self.socket, timeout=CONTROL_TIMEOUT).request(cmd, **fields)
        with self._lock:
            self._cache.clear()
        return reply

    # -- status and tasks -----------------------------------------------------------------------

    def status(self):
        """The ``status --json`` document: {daemon, file_errors, tasks}."""
        return self._cached("rows", ROWS_TTL, self._status)

    def _status(self):
        live = self.live()
        taskfile = self.taskfile
        node = Node.detect(live["node"]["addresses"], hostname=live["node"]["hostname"]) \
            if live else Node.detect(None, hostname=self.node_name)
        reader = self.reader()
        last = reader.last_results() if reader is not None else {}
        now = self.clock()
        rows = [status_cmd.task_status(task, node, live, last.get(task.name), now)
                for task in taskfile.tasks]
        found = SimpleNamespace(pid=live["pid"] if live else None, socket=self.socket,
                                pidfile=live["pidfile"] if live else taskfile.settings.pidfile)
        document = status_cmd.status_json(found, live, taskfile.digest, [], rows)
        paused = set((live or {}).get("disabled", ()))
        for task in document["tasks"]:
            task["description"] = describe_schedule(task["schedule"] or "")
            if task["name"] in paused:
                task["state"] = "disabled"
                task["disabled_until_reload"] = True
        return document

    def task(self, name):
        """One task: its status row, what it runs, and its next run times; None if unknown."""
        task = self.tasks.get(name)
        if task is None:
            return None
        row = next(t for t in self.status()["tasks"] if t["name"] == name)
        return {**row, "timezone": task.timezone, "enabled": task.enabled,
                "command": task.command if isinstance(task.command, str) else list(task.command),
                "timeout": task.timeout, "max": task.max,
                "next_runs": self.next_runs(task, NEXT_RUNS)}

    def next_runs(self, task, count):
        schedule = task.schedule
        if schedule is None or schedule.is_reboot or not task.enabled:
            return []
        when = datetime.fromtimestamp(self.clock(), schedule.tz or status_cmd._local_zone())
        out = []
        for _ in range(count):
            when = schedule.next_after(when)
            if when is None:
                break
            out.append(status_cmd.iso(when.timestamp()))
        return out

    # -- metrics --------------------------------------------------------------------------------

    def aggregates(self):
        """{task: {kind: (count, last ended)}} and the lateness histogram, from the records."""
        return self._cached("aggregates", METRICS_TTL, self._aggregates)

    def _aggregates(self):
        reader = self.reader()
        counts, lateness = {}, None
        if reader is None:
            return counts, lateness
        for task, kind, count, last in reader._read(_AGGREGATE, ()):
            counts.setdefault(task, {})[kind] = (count, last)
        row = reader._read(_LATENESS, ())[0]
        lateness = (list(zip(LATENESS_BUCKETS, row[:-2])), row[-2], row[-1])
        return counts, lateness

    def _cached(self, key, ttl, make):
        """``make()``'s value, reused for ``ttl`` seconds, or for COST_FACTOR times as long as it
        took to make, whichever is longer (so making figures takes at most a tenth of the
        service's time).  Once stale it is still served, for as long again, while one
        background thread makes the next: at 10,000 tasks a status takes half a second, and
        under steady traffic no request waits for it.  Older than that (nobody asked for a
        while: a scrape every 15 s or more), it is made again before answering, so an answer
        is never older than twice its reuse time, however seldom the service is asked."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            fresh_for = None if hit is None else max(ttl, hit[2] * COST_FACTOR)
            if hit is not None and now - hit[0] < 2 * fresh_for:
                if now - hit[0] >= fresh_for and key not in self._refreshing:
                    self._refreshing.add(key)
                    threading.Thread(target=self._refresh, args=(key, make), daemon=True,
                                     name=f"refresh {key}").start()
                return hit[1]
        return self._make(key, make)

    def _make(self, key, make):
        started = time.monotonic()
        value = make()
        with self._lock:
            self._cache[key] = (time.monotonic(), value, time.monotonic() - started)
        return value

    def _refresh(self, key, make):
        try:
            self._make(key, make)
        except Exception as exc:
            log.warning("http: cannot refresh %s: %s", key, exc)
            with self._lock:
                self._cache.pop(key, None)      # the next request makes it (and reports why)
        finally:
            with self._lock:
                self._refreshing.discard(key)
