"""Reading the fleet database: the nodes and their states, the fleet history, a run's stored
output, and the tasks of a file across the nodes (``fleet status``, ``fleet tasks``,
``history --fleet``, ``logs --fleet`` and the web pages).

Pure reads over a psycopg connection (fleetdb.connect): nothing is printed or written.  Every
"now" is the database's ``now()``, the fleet's one clock, never this machine's: a laptop with a
wrong clock sees the same states as any node.  Times come back as ISO 8601 strings with their
offset, in ``tz`` (a tzinfo; None: this machine's zone), as ``history --json`` writes them.

A node's state, from its last heartbeat (``last_seen``) and its heartbeat interval:

- ``stopped``: it stopped cleanly after its last heartbeat (``stopped >= last_seen``);
- ``up``: heard within LATE_AFTER heartbeats; ``late``: within DOWN_AFTER; ``down``: beyond.

``since`` is when that state began, as well as the registry knows it: up since the daemon
started, late or down since the heartbeat that did not come, stopped since the stop.
A node is ``drifted`` when its task file's digest differs from the one most up nodes run (on a
tie, the newer file); a stopped node is never drifted (it runs nothing).
"""

import datetime
import ipaddress
import math

from torchcore import fleetdb, fleetsummary, holders
from torchcore.fleetspec import CLOCK_TOLERANCE, DOWN_AFTER, LATE_AFTER
from torchcore.node import Node
from torchcore.runrecord import RunRecord
from torchcore.textfmt import printable

S = fleetdb.SCHEMA
RECENT = "1 day"            # the window of failed_24h and task_view
MAX_LIMIT = 1_000_000       # the largest history limit asked for at once (0: all)
STATES = ("up", "late", "down", "stopped")


class QueryError(fleetdb.FleetError):
    """A question the fleet database cannot answer as asked (unknown node, bad limit)."""


# ---- times ---------------------------------------------------------------------------------

# The epoch seconds Python's datetime holds in any zone (years 1-9999, a day from each end):
# PostgreSQL holds years up to 294276 and 'infinity', which a node whose clock is far off (or a
# row written by hand) may put in the fleet database
_EARLIEST = datetime.datetime(1, 1, 2, tzinfo=datetime.timezone.utc).timestamp()
_LATEST = datetime.datetime(9999, 12, 30, tzinfo=datetime.timezone.utc).timestamp()


def bounded(epoch):
    """``epoch`` (seconds, None passes) within the years Python can show, at the nearest bound."""
    return None if epoch is None else min(max(float(epoch), _EARLIEST), _LATEST)


def iso(epoch, tz=None, timespec="milliseconds"):
    """Epoch seconds as ISO 8601 with the offset of ``tz`` (None: local), or None; a time
    beyond the years 1-9999 is shown at the nearest of them."""
    if epoch is None:
        return None
    epoch = bounded(epoch)
    when = datetime.datetime.fromtimestamp(epoch, tz) if tz else \
        datetime.datetime.fromtimestamp(epoch).astimezone()
    return when.isoformat(timespec=timespec)


def _epoch(column):
    return f"extract(epoch FROM {column})::float8"


# ---- nodes ---------------------------------------------------------------------------------

def state_sql(age, heartbeat, stopped, last_seen):
    """The SQL CASE of a node's state (the one rule; ``classify`` is it in Python)."""
    return (f"CASE WHEN {stopped} IS NOT NULL AND {stopped} >= {last_seen} THEN 'stopped' "
            f"WHEN {age} <= {heartbeat} * {LATE_AFTER} THEN 'up' "
            f"WHEN {age} <= {heartbeat} * {DOWN_AFTER} THEN 'late' ELSE 'down' END")


def classify(heartbeat, age, stopped=False):
    """A node's state: ``age`` seconds since its last heartbeat, ``stopped`` when it stopped
    cleanly after it.  The same rule as state_sql.

    >>> classify(5, 10), classify(5, 10.5), classify(5, 30.5), classify(5, 99, stopped=True)
    ('up', 'late', 'down', 'stopped')
    """
    if stopped:
        return "stopped"
    if age <= heartbeat * LATE_AFTER:
        return "up"
    if age <= heartbeat * DOWN_AFTER:
        return "late"
    return "down"


_NODES_SQL = f"""
WITH n AS (
    SELECT *, extract(epoch FROM now() - last_seen)::float8 AS age FROM {S}.nodes
), c AS (
    SELECT n.*, {state_sql("age", "heartbeat", "stopped", "last_seen")} AS state FROM n
), majority AS (
    SELECT file_digest, min(file_since) AS since FROM c
    WHERE state = 'up' AND file_digest IS NOT NULL
    GROUP BY file_digest ORDER BY count(*) DESC, max(file_since) DESC NULLS LAST, file_digest
    LIMIT 1
), failed AS (        -- runs_node_failed: per node, the failures of the last day, read from the index
    SELECT node, count(*) AS failed FROM {S}.runs
    WHERE failed AND at > now() - interval '{RECENT}' GROUP BY node
)
SELECT c.name, c.hostname, c.addresses, c.version, c.pid, {_epoch("c.started")},
       {_epoch("c.last_seen")}, c.heartbeat, c.age, c.state,
       CASE c.state
           WHEN 'stopped' THEN {_epoch("c.stopped")}
           WHEN 'up' THEN {_epoch("coalesce(c.started, c.registered)")}
           WHEN 'late' THEN {_epoch(f"c.last_seen + c.heartbeat * {LATE_AFTER} * interval '1 second'")}
           ELSE {_epoch(f"c.last_seen + c.heartbeat * {DOWN_AFTER} * interval '1 second'")}
       END,
       c.clock_offset, c.file_path, c.file_digest, c.file_commit, {_epoch("c.file_since")},
       c.state <> 'stopped' AND c.file_digest IS DISTINCT FROM m.file_digest
           AND m.file_digest IS NOT NULL,
       {_epoch("greatest(c.file_since, m.since)")},
       c.running, coalesce(f.failed, 0), c.waiting, c.started_runs, c.failed_runs,
       c.skipped_runs, c.missed_runs, {_epoch("now()")}
FROM c LEFT JOIN majority m ON true LEFT JOIN failed f ON f.node = c.name
ORDER BY c.name
"""

_NODE_FIELDS = ("name", "hostname", "addresses", "version", "pid", "started", "last_seen",
                "heartbeat", "age", "state", "since", "clock_offset", "file_path", "file_digest",
                "file_commit", "file_since", "drifted", "drifted_since", "running", "failed_24h",
                "waiting", "started_runs", "failed_runs", "skipped_runs", "missed_runs", "now")
_NODE_TIMES = ("started", "last_seen", "since", "file_since", "drifted_since", "now")


def nodes(conn, tz=None):
    """Every registered node as a dict, by name (one statement, whatever the fleet's size).

    Fields: name, hostname, addresses (list of str), version, pid, started, last_seen,
    heartbeat (s), age (s since last_seen), state (STATES), since, clock_offset (s, the node's
    clock minus the database's), clock_flagged, file_path, file_digest, file_commit,
    file_since, drifted, drifted_since (None unless drifted), running, failed_24h (failed runs
    in the fleet history of the last day), waiting (records not yet shipped), the node's
    counts since its start (started_runs, failed_runs, skipped_runs, missed_runs), and now
    (the database's, at which the states hold).  Times are ISO 8601 strings.
    """
    with conn.cursor() as cur:
        cur.execute(_NODES_SQL)
        rows = cur.fetchall()
    result = []
    for row in rows:
        node = dict(zip(_NODE_FIELDS, row))
        node["addresses"] = list(node["addresses"] or [])
        node["heartbeat"] = _number(node["heartbeat"])
        node["age"] = round(node["age"], 3)
        offset = node["clock_offset"]
        if offset is not None and not math.isfinite(offset):
            offset = None       # a real column holds NaN and Infinity, which JSON cannot
        node["clock_offset"] = None if offset is None else round(float(offset), 3)
        node["clock_flagged"] = offset is not None and abs(offset) > CLOCK_TOLERANCE
        if not node["drifted"]:
            node["drifted_since"] = None
        for key in _NODE_TIMES:
            node[key] = iso(node[key], tz, "seconds")
        result.append(node)
    return result


def _number(value):
    value = float(value)
    if not math.isfinite(value):
        return None         # NaN or Infinity in a real column: no number JSON can carry
    return int(value) if value.is_integer() else round(value, 3)


def db_now(conn):
    """The database's now(), in epoch seconds: the clock relative times are shown against."""
    with conn.cursor() as cur:
        cur.execute("SELECT extract(epoch FROM now())::float8")
        return cur.fetchone()[0]


def node_names(conn):
    with conn.cursor() as cur:
        cur.execute(f"SELECT name FROM {S}.nodes ORDER BY name")
        return [row[0] for row in cur.fetchall()]


# ---- history -------------------------------------------------------------------------------

_RUN_COLUMNS = ("node", "run_id", "task", "scheduled", "started", "ended", "exit_code", "signal",
                "timed_out", "skipped", "missed", "manual", "pid", "peak_rss", "error", "stopped")
_RUN_SELECT = ", ".join(f"{_epoch(c)} AS {c}" if c in ("scheduled", "started", "ended") else c
                        for c in _RUN_COLUMNS)


def _record(row):
    """(node, RunRecord) of a selected row (RunRecord.node: the fleet node's name)."""
    fields = dict(zip(_RUN_COLUMNS, row))
    for key in ("scheduled", "started", "ended"):
        fields[key] = bounded(fields[key])
    if fields["scheduled"] is not None:
        fields["scheduled"] = int(fields["scheduled"])
    return RunRecord(**fields)


def run_fields(record, tz=None):
    """A run as the JSON object of ``history --json`` (the same fields; node: the fleet's)."""
    return record.as_json(lambda epoch, timespec: iso(epoch, tz, timespec))


def result_text(run):
    """A run dict's (run_fields) outcome in a few words, as ``history`` says it."""
    record = RunRecord(run["run_id"], run["task"], run["node"], None,
                       ended=0.0 if run["ended"] is not None else None,
                       exit_code=run["exit_code"], signal=run["signal"],
                       timed_out=run["timed_out"], skipped=run["skip_reason"],
                       missed=run["missed"], manual=run["manual"], pid=run["pid"],
                       error=run["error"], stopped=run["stopped"])
    return record.describe() + (" (manual)" if record.manual else "")


def _when(since):
    """``since`` (epoch seconds, or an aware datetime) as an aware datetime."""
    if isinstance(since, datetime.datetime):
        return since
    return datetime.datetime.fromtimestamp(float(since), datetime.timezone.utc)


def check_limit(limit):
    """The LIMIT for ``limit`` (None or 0: all); QueryError beyond MAX_LIMIT or below 0."""
    if limit is None or limit == 0:
        return None
    if not isinstance(limit, int) or limit < 0 or limit > MAX_LIMIT:
        raise QueryError(f"--limit: expected 0 (all) to {MAX_LIMIT:,} runs, got {limit}")
    return limit


def history(conn, task=None, node=None, since=None, failed=False, limit=50, tz=None):
    """Runs of the fleet history newest first, as dicts with ``history --json``'s fields.

    ``since``: epoch seconds or an aware datetime; ``limit`` None or 0: all.  QueryError for a
    ``node`` that is neither registered nor in the history, or a limit out of range.
    """
    limit = check_limit(limit)
    where, params = [], []
    if task is not None:
        where.append("task = %s")
        params.append(task)
    if node is not None:
        where.append("node = %s")
        params.append(node)
    if since is not None:
        where.append("at >= %s")
        params.append(_when(since))
    if failed:
        where.append("failed")
    sql = f"SELECT {_RUN_SELECT} FROM {S}.runs"
    sql += (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY at DESC, node, run_id DESC"
    if limit is not None:
        sql += " LIMIT %s"
        params.append(limit)
    with conn.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall()
    if not rows and node is not None:
        check_node(conn, node)
    return [run_fields(_record(row), tz) for row in rows]


def check_node(conn, node):
    """QueryError unless ``node`` is registered or has runs in the fleet history."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT EXISTS (SELECT 1 FROM {S}.nodes WHERE name = %s) "
                    f"OR EXISTS (SELECT 1 FROM {S}.runs WHERE node = %s)", (node, node))
        if cur.fetchone()[0]:
            return
    names = [printable(name) for name in node_names(conn)]
    import difflib
    close = difflib.get_close_matches(node, names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else \
        (f"; the nodes are {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"
         if names else "; no node has registered yet")
    raise QueryError(f"no node {node!r} in the fleet database{hint}")


def run(conn, node, run_id, task=None, tz=None):
    """One run with its stored output tail (``output``: text, or None when none was stored),
    or None when there is no such run.  ``node`` None: the one run ``run_id`` of ``task``
    across the fleet (QueryError naming the nodes when several have one)."""
    where, params = ["run_id = %s"], [run_id]
    if node is not None:
        where.append("node = %s")
        params.append(node)
    if task is not None:
        where.append("task = %s")
        params.append(task)
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_RUN_SELECT}, output FROM {S}.runs WHERE {' AND '.join(where)} "
                    "ORDER BY node LIMIT 21", params)
        rows = cur.fetchall()
    if not rows:
        if node is not None:
            check_node(conn, node)
        return None
    if len(rows) > 1:
        names = [printable(row[0]) for row in rows]
        raise QueryError(f"run {run_id}{f' of {task!r}' if task else ''} is on several nodes "
                         f"({', '.join(names[:20])}{' ...' if len(names) > 20 else ''}): "
                         "name one with --node")
    result = run_fields(_record(rows[0][:-1]), tz)
    result["output"] = rows[0][-1]
    return result


def last_run_with_output(conn, task, node=None, tz=None):
    """The newest run of ``task`` (on ``node``) with output stored, as ``run`` returns it."""
    sql = f"SELECT node, run_id FROM {S}.runs WHERE task = %s AND output IS NOT NULL"
    params = [task]
    if node is not None:
        sql += " AND node = %s"
        params.append(node)
    with conn.cursor() as cur:
        cur.execute(sql + " ORDER BY at DESC, run_id DESC LIMIT 1", params)
        row = cur.fetchone()
    if row is None:
        if node is not None:
            check_node(conn, node)
        return None
    return run(conn, row[0], row[1], tz=tz)


# ---- the tasks of a file across the fleet --------------------------------------------------

# What ``fleet tasks`` shows of the last day's runs is read from torchcore.task_hours, which
# triggers on torchcore.runs keep as rows arrive (fleetsummary.py), never from the runs themselves
_RECENT_SQL = fleetsummary.READ_SQL


def _ran_entry(row, tz):
    """A node's entry in a task's ``ran`` from a row of _RECENT_SQL."""
    fields = dict(zip(fleetsummary.LAST_FIELDS, row))
    run = {"run_id": fields["run_id"], "task": fields["task"], "node": fields["node"],
           "ended": "" if fields["ended"] else None, "skip_reason": fields["skipped"],
           **{key: fields[key] for key in ("exit_code", "signal", "timed_out", "missed",
                                           "manual", "pid", "error", "stopped")}}
    return {"node": fields["node"], "last_at": iso(fields["at"], tz),
            "last_run": fields["run_id"], "last_result": result_text(run),
            "failed": fields["last_failed"], "runs": fields["runs"],
            "failures": fields["failures"]}


def _node_of(row):
    """The node.Node a registered node's row matches ``ips``/``hosts`` as (its hostname)."""
    addresses = []
    for text in row["addresses"]:
        try:
            address = ipaddress.ip_interface(str(text).split("%", 1)[0]).ip
        except ValueError:
            continue
        if address not in addresses:
            addresses.append(address)
    return Node(addresses=tuple(addresses), hostname=row["hostname"] or row["name"])


def should_run(task, machines):
    """The names of ``machines`` ((name, its Node, a Node named by the name alone)) that
    ``task`` should run on, as ``Task.runs_on`` decides on every node: ``hosts`` matched
    against the node's hostname or its name (the hostname of a daemon started with
    ``--node-name``)."""
    return [name for name, machine, named in machines
            if task.runs_on(machine) or (task.hosts and task.runs_on(named))]


def _matcher(registered):
    """``should_run`` over the registered nodes, for a task: the tasks of a file share a few
    target sets (most have none: every node), so each distinct set (ips, hosts) is matched
    against the nodes once, not once per task (10,000 tasks x 1,000 nodes: seconds)."""
    machines = [(row["name"], _node_of(row), Node(addresses=(), hostname=row["name"]))
                for row in registered]
    everyone = [name for name, _, _ in machines]
    known = {}

    def should_of(task):
        if not task.ips and not task.hosts:
            return list(everyone)
        key = (task.ips, task.hosts)
        if key not in known:
            known[key] = should_run(task, machines)
        return list(known[key])
    return should_of


def task_view(conn, taskfile, tz=None, task=None):
    """The tasks of ``taskfile`` across the fleet, and what is wrong; ``task``: that task of the
    file only (its summary rows alone are read, through their key), without the drift
    problems, which are the whole file's.  The runs of the last day are read from their summary,
    torchcore.task_hours (fleetsummary.py): the hours from the one holding now - 1 day.

    ``{"file", "digest", "nodes_on_file" (the nodes that run this very file), "nodes" (how many
    are registered), "now", "tasks": [...], "problems": [...]}``; per task: name,
    enabled, targets, should (the registered nodes its ips/hosts select, as ``Task.runs_on``
    decides on every node: ``hosts`` matched against the node's hostname or its name, which
    stands for the hostname of a daemon started with ``--node-name``; tasks with the same
    targets matched once), ran (per node that ran it in the last day: node, last_at, last_run,
    last_result (of its latest run, as its row is now), failed (whether its last finished run
    failed; None: none finished), runs (that started), failures), run (``each`` or ``once``),
    once (for a `run: once` task, who runs it: holders.as_json; else None) and problems.  A
    problem: ``{"kind": "orphan"|"failing"|"drift", "task"?, "node"?, "text", ...}``: orphan,
    an enabled task whose targets select no registered node; failing, a task whose last run
    failed on some nodes and not on others (``failing``, ``ok``); drift, a node that ran tasks
    in the last day that the file no longer has (``tasks``).
    """
    from torchcore import textfmt

    only = task
    registered = nodes(conn, tz)
    with conn.cursor() as cur:
        if only is None:
            cur.execute(_RECENT_SQL.format(task=""))
        else:
            cur.execute(_RECENT_SQL.format(task="AND task = %s"), (only,))
        recent = cur.fetchall()
    should_of = _matcher(registered)
    chosen = taskfile.tasks if only is None else [taskfile.index[only]]
    once = holders_of(conn, [task.name for task in chosen if task.run == "once"])
    ran_by_task = {}
    for row in recent:
        ran_by_task.setdefault(row[1], []).append(_ran_entry(row, tz))
    tasks, problems = [], []
    for task in chosen:
        should = should_of(task)
        ran = ran_by_task.get(task.name, [])
        found = []
        if task.enabled and not should:
            found.append({"kind": "orphan", "task": task.name,
                          "text": f"{task.name}: its targets ({textfmt.targets_text(task)}) "
                                  "select no registered node"})
        failing = sorted(r["node"] for r in ran if r["failed"] is True)
        ok = sorted(r["node"] for r in ran if r["failed"] is False)
        if failing and ok:
            found.append({"kind": "failing", "task": task.name, "failing": failing, "ok": ok,
                          "text": f"{task.name}: fails on {', '.join(failing)}, "
                                  f"not on {', '.join(ok)}"})
        problems.extend(found)
        tasks.append({"name": task.name, "enabled": task.enabled,
                      "targets": textfmt.targets_text(task), "should": should, "ran": ran,
                      "run": task.run, "once": holders.as_json(
                          once.get(task.name), lambda epoch, spec: iso(epoch, tz, spec))
                      if task.run == "once" else None,
                      "problems": [p["kind"] for p in found]})
    known = set(taskfile.index)
    gone = {}
    for name, entries in ran_by_task.items():
        if name not in known:
            for entry in entries:
                gone.setdefault(entry["node"], []).append(name)
    for node in sorted(gone):
        names = sorted(gone[node])
        problems.append({"kind": "drift", "node": node, "tasks": names,
                         "text": f"{node} ran {', '.join(names)} in the last day; "
                                 f"{taskfile.path} no longer has {'it' if len(names) == 1 else 'them'}"})
    on_file = [n["name"] for n in registered if n["file_digest"] == taskfile.digest]
    return {"file": taskfile.path, "digest": taskfile.digest, "nodes_on_file": on_file,
            "nodes": len(registered), "now": iso(db_now(conn), tz, "seconds"), "tasks": tasks,
            "problems": problems}


def holders_of(conn, names):
    """holders.collect for the `run: once` tasks ``names`` (one statement; none: no query)."""
    if not names:
        return {}
    with conn.cursor() as cur:
        cur.execute(holders.HOLDERS, {"tasks": list(names)})
        return holders.collect(cur.fetchall())
