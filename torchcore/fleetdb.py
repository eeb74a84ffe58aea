"""The fleet database (PostgreSQL, through psycopg 3): connecting, the schema and its migrations.

Everything torchcore keeps there lives in the schema ``torchcore``:

- ``schema_version``: one row per migration applied (version, what it did, when, by which node);
- ``nodes``: the node registry, one row per node, written by each node's fleet agent at every
  heartbeat (fleetagent.py) and read by ``fleet status``;
- ``runs``: the fleet history, every run record of every node with the tail of its output, keyed
  on (node, run_id) so that shipping a record twice writes it once;
- ``task_hours``: per task, node and hour, what ``fleet tasks`` shows of the runs (their count,
  failures, the latest run), kept by triggers on ``runs`` as rows arrive (fleetsummary.py).
- ``claims``: who runs each second of a ``run: once`` task, keyed on (task, second, slot), with
  its fencing token (claims.py);
- ``slots``: a `run: once` task's fleet-wide ``max``, one row per slot, held under a lease;
  ``claims.lost``: a run whose node stopped renewing its lease, recorded lost (claimloss.py).

``torchcore fleet init`` applies the migrations a database lacks, in order, each in its own
transaction, under a session advisory lock: fifty nodes running it at once migrate once, the
others wait and find nothing left to do.  ``start`` (``check``) refuses a schema that is missing or
older than the code with the command to run, and a newer one naming both versions.

psycopg is imported on first use only (``pip install 'torchcore[fleet]'``): a task file without
``settings.fleet`` never loads it.  Every error is one line, with the URL shown by
``fleetspec.redact`` and any password scrubbed from what the server or libpq said.
"""

import re
import socket

from torchcore import __version__, fleetspec, fleetsummary
from torchcore.errors import TorchcoreError

SCHEMA = "torchcore"
LOCK_KEY = 0x746F7263686301     # pg_advisory_lock's key for migrations ("torchc" + 1)
CONNECT_TIMEOUT = 5             # seconds, libpq's connect_timeout unless the URL sets one
INIT_HINT = "torchcore fleet init"

# (version, what it does, statements).  Append only: a released migration is never edited.
MIGRATIONS = (
    (1, "node registry", (
        f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
        f"""CREATE TABLE {SCHEMA}.nodes (
            name text PRIMARY KEY,
            hostname text NOT NULL,
            addresses text[] NOT NULL DEFAULT '{{}}',
            version text NOT NULL,              -- torchcore's
            pid integer,
            started timestamptz,                -- the daemon's start
            registered timestamptz NOT NULL DEFAULT now(),
            heartbeat real NOT NULL,            -- seconds between heartbeats
            last_seen timestamptz NOT NULL,     -- the database's now() at the last heartbeat
            clock_offset real,                  -- the node's clock minus the database's, seconds
            file_path text,
            file_digest text,                   -- sha256 of the task file's bytes
            file_commit text,                   -- its git commit, when it is in a work tree
            file_since timestamptz,             -- since when the node runs this digest
            running integer NOT NULL DEFAULT 0,
            started_runs bigint NOT NULL DEFAULT 0,     -- since the daemon started
            failed_runs bigint NOT NULL DEFAULT 0,
            skipped_runs bigint NOT NULL DEFAULT 0,
            missed_runs bigint NOT NULL DEFAULT 0,
            waiting bigint NOT NULL DEFAULT 0,  -- records not yet shipped at the heartbeat
            stopped timestamptz                 -- a clean stop (then it is not "down")
        )""",
    )),
    (2, "fleet history", (
        f"""CREATE TABLE {SCHEMA}.runs (
            node text NOT NULL,
            run_id bigint NOT NULL,
            task text NOT NULL,
            scheduled timestamptz,
            started timestamptz,
            ended timestamptz,
            exit_code integer,
            signal integer,
            timed_out boolean NOT NULL DEFAULT false,
            skipped text,
            missed boolean NOT NULL DEFAULT false,
            manual boolean NOT NULL DEFAULT false,
            pid integer,
            peak_rss bigint,
            error text,
            stopped text,
            failed boolean NOT NULL DEFAULT false,  -- outcome.RunResult.failed, as the node saw it
            at timestamptz NOT NULL,                -- sort key: started, else scheduled
            output text,                            -- the output's last fleet.output_tail bytes
            shipped timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (node, run_id)
        )""",
        f"CREATE INDEX runs_at ON {SCHEMA}.runs (at)",
        f"CREATE INDEX runs_task_at ON {SCHEMA}.runs (task, at)",
        f"CREATE INDEX runs_failed ON {SCHEMA}.runs (at) WHERE failed",     # history --failed
        f"CREATE INDEX runs_node_failed ON {SCHEMA}.runs (node, at) WHERE failed",  # fleet status
        *fleetsummary.STATEMENTS,       # task_hours, kept by triggers on runs: fleet tasks
    )),
    (3, "run: once claims", (
        f"""CREATE TABLE {SCHEMA}.claims (
            task text NOT NULL,
            second bigint NOT NULL,             -- the scheduled second, epoch seconds
            slot integer NOT NULL DEFAULT 0,
            fence bigint NOT NULL,              -- second * 1000 + takeovers: the fencing token
            node text NOT NULL,                 -- who holds it
            claimed timestamptz NOT NULL DEFAULT now(),
            expires timestamptz NOT NULL,       -- not started by then: another node may take it
            started timestamptz,                -- its run started (or was decided) on ``node``
            lease_until timestamptz,
            ended timestamptz,
            takeovers integer NOT NULL DEFAULT 0,
            PRIMARY KEY (task, second, slot)
        )""",
        f"CREATE INDEX claims_unstarted ON {SCHEMA}.claims (expires) WHERE started IS NULL",
        f"CREATE INDEX claims_task_second ON {SCHEMA}.claims (task, second DESC)",
    )),
    (4, "run: once fleet-wide max", (
        f"""CREATE TABLE {SCHEMA}.slots (
            task text NOT NULL,
            slot integer NOT NULL,              -- 0 .. max-1
            second bigint,                      -- the run holding it: its second and token
            fence bigint,
            node text,
            lease_until timestamptz,            -- free when NULL or past
            PRIMARY KEY (task, slot)
        )""",
    )),
    (5, "run: once lost runs", (
        f"""ALTER TABLE {SCHEMA}.claims
            ADD COLUMN lost timestamptz,        -- its lease passed with the run not ended
            ADD COLUMN lost_node text,          -- the node and token of the run lost
            ADD COLUMN lost_fence bigint,
            ADD COLUMN reruns integer NOT NULL DEFAULT 0     -- on_node_loss: rerun
        """,
        f"""CREATE INDEX claims_open ON {SCHEMA}.claims (task) WHERE ended IS NULL
            AND (started IS NOT NULL OR reruns > 0) AND lost_fence IS DISTINCT FROM fence""",
    )),
    (6, "fleet tasks: a lost run's row replaced by its node's end", (
        fleetsummary.REPLACE_COUNT_FUNCTION,
    )),
)
CODE_VERSION = MIGRATIONS[-1][0]


class FleetError(TorchcoreError):
    """The fleet database cannot be used; the message is one line, without secrets."""


class FleetUnreachable(FleetError):
    """The server cannot be reached now (down, refused, timed out): worth trying again."""


class FleetRefused(FleetError):
    """The server answered no: wrong password, no such user or database, no permission."""


class SchemaError(FleetError):
    """The schema is missing, older or newer than this torchcore's."""


def psycopg():
    """The psycopg module, or FleetError saying how to get it."""
    try:
        import psycopg as module
    except ImportError:
        raise FleetError("the fleet database needs psycopg 3: pip install 'torchcore[fleet]'") from None
    return module


def describe(exc, url=None):
    """One line for a psycopg (or socket) error, without the password (nor an ``sslpassword``,
    nor a URL libpq could not parse, which it quotes whole)."""
    text = str(exc)
    if url is not None:
        for secret in fleetspec.secrets_in(url):
            text = text.replace(secret, "***")
    return " ".join(text.split()) or type(exc).__name__


def _sqlstate(exc):
    return getattr(exc, "sqlstate", None) or getattr(getattr(exc, "diag", None), "sqlstate", None)


# SQLSTATE classes where the server answered no: 28 (authentication), 3D (no such database),
# 42 (no permission, no such object).  Anything else on connecting is a reachability problem.
# A failed connection carries no SQLSTATE in psycopg 3, only the server's words: those of a no.
_REFUSED = ("28", "3D", "42")
_REFUSED_WORDS = ("authentication failed", "password", "no pg_hba.conf entry", "does not exist",
                  "permission denied", "not permitted to log in", "certificate")
# libpq cannot use the URL as written (psycopg's ProgrammingError: an unknown option, a broken URI;
# or a value libpq does not take): no try will ever connect, so it is a no, not an outage
_UNUSABLE = re.compile(r"\binvalid (?:[a-z_]+ value\b|integer value|connection option|URI)")


def classify(exc, url, doing="connect to"):
    """The FleetError for ``exc``: FleetRefused when the server said no, else FleetUnreachable."""
    where = fleetspec.redact(url)
    state = _sqlstate(exc) or ""
    said = str(exc).lower()
    refused = state[:2] in _REFUSED or (not state and (
        any(w in said for w in _REFUSED_WORDS) or isinstance(exc, psycopg().ProgrammingError)
        or _UNUSABLE.search(str(exc)) is not None))
    kind = FleetRefused if refused else FleetUnreachable
    return kind(f"cannot {doing} the fleet database {where}: {describe(exc, url)}")


def connect(url, *, timeout=CONNECT_TIMEOUT, autocommit=True, application_name="torchcore"):
    """A psycopg connection to ``url``; FleetRefused or FleetUnreachable, one line, on failure."""
    pg = psycopg()
    kwargs = {"autocommit": autocommit, "application_name": application_name}
    if "connect_timeout" not in str(url):
        kwargs["connect_timeout"] = max(1, int(timeout))
    try:
        return pg.connect(url, **kwargs)
    except pg.Error as exc:
        raise classify(exc, url) from None
    except (OSError, ValueError) as exc:     # a URL libpq cannot parse, a socket error
        raise FleetUnreachable(f"cannot connect to the fleet database {fleetspec.redact(url)}: "
                               f"{describe(exc, url)}") from None


def schema_version(conn):
    """The version of the schema in the database; 0 when there is none."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.schema_version",))
        if cur.fetchone()[0] is None:
            return 0
        cur.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_version")
        return int(cur.fetchone()[0])


def schema_problem(version):
    """What is wrong with a database at ``version`` for this code, or None."""
    if version == 0:
        return f"the fleet database has no torchcore schema yet: run `{INIT_HINT}` once"
    if version < CODE_VERSION:
        return (f"the fleet database's schema is version {version}, this torchcore needs "
                f"{CODE_VERSION}: run `{INIT_HINT}` to upgrade it")
    if version > CODE_VERSION:
        return (f"the fleet database's schema is version {version}, newer than this torchcore "
                f"{__version__} knows ({CODE_VERSION}): upgrade torchcore on this node")
    return None


def check_schema(conn, url):
    """SchemaError unless the database's schema is the one this code uses."""
    try:
        problem = schema_problem(schema_version(conn))
    except psycopg().Error as exc:
        raise classify(exc, url, "read the schema of") from None
    if problem:
        raise SchemaError(problem)


def migrate(conn, url, node=None, upto=None):
    """Apply the migrations the database lacks (up to ``upto``, default all), each in its own
    transaction, under the advisory lock.  Returns (version before, version after); SchemaError
    for a schema newer than the code."""
    pg = psycopg()
    target = CODE_VERSION if upto is None else upto
    node = node or socket.gethostname()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            before = version = schema_version(conn)
            if version > CODE_VERSION:
                raise SchemaError(schema_problem(version))
            for number, what, statements in MIGRATIONS:
                if number <= version or number > target:
                    continue
                with conn.transaction(), conn.cursor() as cur:
                    if number == 1:
                        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                        cur.execute(f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (
                            version integer PRIMARY KEY, what text NOT NULL,
                            applied timestamptz NOT NULL DEFAULT now(), by_node text)""")
                    for statement in statements:
                        cur.execute(statement)
                    cur.execute(f"INSERT INTO {SCHEMA}.schema_version (version, what, by_node) "
                                "VALUES (%s, %s, %s)", (number, what, node))
                version = number
            return before, version
        finally:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    except pg.Error as exc:
        raise classify(exc, url, "migrate") from None


def open_checked(url, **kwargs):
    """A connection whose schema is checked (FleetError otherwise); closed on failure."""
    conn = connect(url, **kwargs)
    try:
        check_schema(conn, url)
    except BaseException:
        conn.close()
        raise
    return conn
