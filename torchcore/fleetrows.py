"""What the fleet agent writes to the fleet database and how it gets there: the statements of the
runs' upsert and the node's heartbeat, a run record as its row, the agent's connection, and what
the agent asks of git and of the daemon's control socket for the heartbeat (fleetagent.py).

The upsert keys a run on (node, run_id): shipped twice, it is one row.  A final row (ended,
skipped, missed) is never replaced by an earlier state of the run, and an empty output never
replaces one already stored.  The heartbeat keeps ``file_since`` unless the digest changed.
"""

import logging
import os
import subprocess
import time

from torchcore import fleetspec, fleetstore, paths

CONNECT_TIMEOUT = 3         # seconds (libpq's connect_timeout unless the URL sets one)
CONTROL_TIMEOUT = 2.0       # seconds the daemon's control socket gets to answer a heartbeat's ask

_RUN_COLUMNS = ("node", "run_id", "task", "scheduled", "started", "ended", "exit_code", "signal",
                "timed_out", "skipped", "missed", "manual", "pid", "peak_rss", "error", "stopped",
                "failed", "at", "output")
_TIMES = ("scheduled", "started", "ended", "at")
_FINAL = "({0}.ended IS NOT NULL OR {0}.skipped IS NOT NULL OR {0}.missed)"
UPSERT_RUNS = (
    "INSERT INTO torchcore.runs ({}) VALUES ({}) ON CONFLICT (node, run_id) DO UPDATE SET {},"
    " output = coalesce(nullif(EXCLUDED.output, ''), torchcore.runs.output), shipped = now()"
    " WHERE NOT ({} AND NOT {})"     # a final row is never replaced by an earlier state
).format(", ".join(_RUN_COLUMNS),
         ", ".join("to_timestamp(%s::float8)" if c in _TIMES else "%s" for c in _RUN_COLUMNS),
         ", ".join(f"{c} = EXCLUDED.{c}" for c in _RUN_COLUMNS[2:-1]),
         _FINAL.format("torchcore.runs"), _FINAL.format("EXCLUDED"))
_NODE_COLUMNS = ("name", "hostname", "addresses", "version", "pid", "started", "heartbeat",
                 "clock_offset", "file_path", "file_digest", "file_commit", "running",
                 "started_runs", "failed_runs", "skipped_runs", "missed_runs", "waiting")
HEARTBEAT = (
    "INSERT INTO torchcore.nodes ({}, last_seen, file_since, stopped) VALUES ({}, now(), now(),"
    " CASE WHEN %s THEN now() END) ON CONFLICT (name) DO UPDATE SET {}, last_seen = now(),"
    " file_since = CASE WHEN torchcore.nodes.file_digest IS DISTINCT FROM EXCLUDED.file_digest"
    " THEN now() ELSE torchcore.nodes.file_since END, stopped = EXCLUDED.stopped"
).format(", ".join(_NODE_COLUMNS),
         ", ".join({"addresses": "%s::text[]", "started": "to_timestamp(%s::float8)"}.get(c, "%s")
                   for c in _NODE_COLUMNS),
         ", ".join(f"{c} = EXCLUDED.{c}" for c in _NODE_COLUMNS[1:]))
# the database's clock, and the node's row as it is (hostname, pid, heartbeating and not stopped)
CLOCK_AND_ROW = ("SELECT extract(epoch FROM clock_timestamp())::float8, n.hostname, n.pid,"
                  " n.stopped IS NULL AND n.last_seen > now() - make_interval(secs => %s)"
                  " FROM (SELECT 1) one LEFT JOIN torchcore.nodes n ON n.name = %s")


def run_row(node, record, output):
    """The parameters of UPSERT_RUNS for ``record`` (output: of an ended run, else None)."""
    clean = fleetstore.clean
    at = next((t for t in (record.started, record.scheduled, record.ended) if t is not None),
              time.time())
    return (node, record.run_id, clean(record.task), record.scheduled, record.started,
            record.ended, record.exit_code, record.signal, bool(record.timed_out),
            clean(record.skipped), bool(record.missed), bool(record.manual), record.pid,
            record.peak_rss, clean(record.error), clean(record.stopped), bool(record.failed), at,
            output)


def connect(url):
    """A connection for the agent: autocommit, TCP keepalives and a user timeout, so that a
    database gone silent is noticed in seconds; FleetRefused or FleetUnreachable on failure."""
    from torchcore import fleetdb

    pg = fleetdb.psycopg()
    # psycopg's own warning when a failed batch aborts its pipeline: the agent says each failure
    # once itself (its log is the daemon's), not once per try
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    kwargs = {"autocommit": True, "application_name": "torchcore fleet agent", "keepalives": 1,
              "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
    if pg.pq.version() >= 120000:           # libpq 12 has it; an older one refuses the option
        kwargs["tcp_user_timeout"] = 10_000
    if "connect_timeout" not in str(url):
        kwargs["connect_timeout"] = CONNECT_TIMEOUT
    try:
        return pg.connect(url, **kwargs)
    except pg.Error as exc:
        raise fleetdb.classify(exc, url) from None
    except (OSError, ValueError) as exc:
        raise fleetdb.FleetUnreachable(f"cannot connect to the fleet database "
                                       f"{fleetspec.redact(url)}: {fleetdb.describe(exc, url)}") from None


def git_commit(path):
    """The commit of the file's version in HEAD when it is in a git work tree (``<commit>-dirty``
    when the file differs from it, as ``git describe --dirty`` says), else None."""
    directory, name = os.path.split(os.path.abspath(path))

    def git(*argv):
        return subprocess.run(["git", "-C", directory, *argv, "--", name], check=False,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=5,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0",
                                   "GIT_TERMINAL_PROMPT": "0"})
    try:
        done = git("log", "-1", "--format=%H")
        commit = done.stdout.strip()
        if done.returncode != 0 or len(commit) < 40:
            return None
        return commit + ("-dirty" if git("diff", "--quiet", "HEAD").returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return None


def ask_daemon(state_dir):
    """The daemon's live state (its control socket's ``status``, active tasks only), or None."""
    from torchcore.control import ControlClient

    try:
        return ControlClient(paths.control_socket(state_dir), timeout=CONTROL_TIMEOUT).request(
            "status", active=True)
    except Exception:
        return None
