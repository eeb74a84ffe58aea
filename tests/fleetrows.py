"""Rows written into torchcore.nodes and torchcore.runs as a fleet agent writes them, for the
tests of the read side (fleetquery, the fleet commands): times relative to the database's now()."""

from torchcore import fleetdb

S = fleetdb.SCHEMA


def init(url):
    """A connection to ``url`` with the schema applied."""
    conn = fleetdb.connect(url)
    fleetdb.migrate(conn, url)
    return conn


def add_node(conn, name, *, age=0.0, heartbeat=1.0, addresses=("10.0.0.1",), hostname=None,
             digest="d1", commit=None, file_age=3600.0, stopped=None, clock_offset=0.0,
             running=0, waiting=0, started_age=7200.0, version="1.0"):
    """A registered node last heard ``age`` seconds ago; ``stopped``: seconds after its last
    heartbeat at which it stopped cleanly (negative: before it)."""
    conn.execute(
        f"""INSERT INTO {S}.nodes (name, hostname, addresses, version, pid, started, heartbeat,
                last_seen, clock_offset, file_path, file_digest, file_commit, file_since, running,
                waiting, stopped)
            VALUES (%(name)s, %(hostname)s, %(addresses)s, %(version)s, 4242,
                now() - make_interval(secs => %(started_age)s), %(heartbeat)s,
                now() - make_interval(secs => %(age)s), %(offset)s, '/etc/tasks.yaml',
                %(digest)s, %(commit)s, now() - make_interval(secs => %(file_age)s), %(running)s,
                %(waiting)s,
                CASE WHEN %(stopped)s::float8 IS NULL THEN NULL
                     ELSE now() - make_interval(secs => %(age)s) + make_interval(secs => %(stopped)s::float8) END)
            ON CONFLICT (name) DO UPDATE SET hostname = excluded.hostname,
                addresses = excluded.addresses, heartbeat = excluded.heartbeat,
                last_seen = excluded.last_seen, clock_offset = excluded.clock_offset,
                file_digest = excluded.file_digest, file_commit = excluded.file_commit,
                file_since = excluded.file_since, running = excluded.running,
                waiting = excluded.waiting, stopped = excluded.stopped""",
        {"name": name, "hostname": hostname or name, "addresses": list(addresses),
         "version": version, "started_age": started_age, "heartbeat": heartbeat, "age": age,
         "offset": clock_offset, "digest": digest, "commit": commit, "file_age": file_age,
         "running": running, "waiting": waiting, "stopped": stopped})


def add_run(conn, node, run_id, task, *, age=60.0, exit_code=0, duration=1.0, skipped=None,
            missed=False, manual=False, signal=None, error=None, output=None, running=False):
    """A run record of ``node`` that started ``age`` seconds ago (a skip or miss: was due then)."""
    ended = not running and skipped is None and not missed
    failed = ended and (exit_code != 0 or signal is not None or error is not None)
    started = skipped is None and not missed
    conn.execute(
        f"""INSERT INTO {S}.runs (node, run_id, task, scheduled, started, ended, exit_code,
                signal, skipped, missed, manual, pid, error, failed, at, output)
            VALUES (%(node)s, %(run_id)s, %(task)s,
                date_trunc('second', now() - make_interval(secs => %(age)s)),
                CASE WHEN %(started)s THEN now() - make_interval(secs => %(age)s) END,
                CASE WHEN %(ended)s THEN now() - make_interval(secs => %(age)s)
                     + make_interval(secs => %(duration)s) END,
                %(exit_code)s, %(signal)s, %(skipped)s, %(missed)s, %(manual)s,
                CASE WHEN %(started)s THEN 1000 + %(run_id)s END, %(error)s, %(failed)s,
                now() - make_interval(secs => %(age)s), %(output)s)""",
        {"node": node, "run_id": run_id, "task": task, "age": age, "started": started,
         "ended": ended, "duration": duration, "exit_code": exit_code if ended else None,
         "signal": signal, "skipped": skipped, "missed": missed, "manual": manual,
         "error": error, "failed": failed, "output": output})
