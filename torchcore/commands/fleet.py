"""``torchcore fleet ...``: the fleet database's schema, nodes and tasks (docs/fleet.md).

Every fleet command reads the database alone, so it works from any node or from a laptop with
the task file (``-c``) and the URL: ``--database``, else ``$TORCHCORE_DATABASE_URL``, else the
file's ``settings.fleet.database``.  psycopg is imported by fleetdb on first use.
"""

import datetime

from torchcore import config, fleetdb, fleetspec
from torchcore.commands import common
from torchcore.errors import TorchcoreError
from torchcore.textfmt import format_table, printable
from torchcore.units import format_duration

SHOWN_NAMES = 3         # node names listed in a cell before "+N more"


def register(subparsers):
    fleet = subparsers.add_parser(
        "fleet", help="the fleet database: its schema, the nodes, the tasks across nodes",
        description="The fleet database (settings.fleet): create or upgrade its schema, and see "
                    "the nodes and the tasks across the fleet.")
    sub = fleet.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    init = sub.add_parser("init", help="create or upgrade the fleet database's schema",
                          description="Create the schema in the fleet database, or apply the "
                                      "migrations it lacks; safe to run on many nodes at once.")
    add_database_options(init)
    init.set_defaults(func=cmd_init)
    status = sub.add_parser(
        "status", help="every node: state, task-file version and drift, runs, clock",
        description="One row per registered node: its addresses, torchcore version, task-file "
                    "version (drifted: not the file most up nodes run), state (up, late, down, "
                    "stopped) and since when, running tasks, failed runs in 24 h and clock "
                    "offset. Exit 1 when a node is down or drifted.")
    add_database_options(status)
    status.set_defaults(func=cmd_status)
    tasks = sub.add_parser(
        "tasks", help="every task of the file across the fleet, and what is wrong",
        description="Per task of the task file: the registered nodes it should run on, the "
                    "nodes that ran it in the last day with their last result, for a `run: "
                    "once` task the node that ran its last second and the holder of each of its "
                    "slots, and problems: "
                    "targets that select no registered node (orphan), a task failing on some "
                    "nodes only, a node running tasks the file no longer has (drift). Exit 1 "
                    "when there are problems.")
    add_database_options(tasks)
    tasks.set_defaults(func=cmd_tasks)
    fleet.set_defaults(func=lambda args: _usage(fleet))


def _usage(parser):
    parser.print_help()
    return common.EXIT_USAGE


def add_database_options(parser):
    common.add_config_option(parser)
    common.add_database_option(parser)
    common.add_json_option(parser)


database_url = common.fleet_database_url


def cmd_init(args):
    url = database_url(args)
    try:
        conn = fleetdb.connect(url)
    except fleetdb.FleetError as exc:
        raise TorchcoreError(str(exc)) from None
    with conn:
        before, after = fleetdb.migrate(conn, url)
    applied = [what for number, what, _ in fleetdb.MIGRATIONS if before < number <= after]
    if args.json:
        common.print_json({"database": fleetspec.redact(url), "before": before, "after": after,
                           "applied": applied})
    elif applied:
        print(f"fleet database {fleetspec.redact(url)}: schema version {before} -> {after} "
              f"({', '.join(applied)})")
    else:
        print(f"fleet database {fleetspec.redact(url)}: schema version {after}, up to date")
    return common.EXIT_OK


# -- fleet status -----------------------------------------------------------------------------

def zone(args):
    """The task file's timezone (None: this machine's) when the file is there to say it."""
    name = config.peek_settings(common.task_file_path(args)).timezone
    if not name:
        return None
    from zoneinfo import ZoneInfo
    return ZoneInfo(name)


def cmd_status(args):
    from torchcore import fleetquery

    tz = zone(args)
    url = database_url(args)
    with common.fleet_database(args) as conn:
        nodes = fleetquery.nodes(conn, tz)
    counts = {state: sum(1 for n in nodes if n["state"] == state) for state in fleetquery.STATES}
    counts["drifted"] = sum(1 for n in nodes if n["drifted"])
    counts["clock_flagged"] = sum(1 for n in nodes if n["clock_flagged"])
    bad = counts["down"] or counts["drifted"]
    if args.json:
        common.print_json({"database": fleetspec.redact(url), "nodes": nodes, "counts": counts,
                           "ok": not bad})
    elif not nodes:
        print(f"no node has registered in the fleet database {fleetspec.redact(url)} yet")
    else:
        now = _epoch(nodes[0]["now"])
        print(format_table(["NODE", "ADDRESSES", "VERSION", "FILE", "STATE", "RUNNING",
                            "FAILED 24H", "CLOCK"], [_node_row(n, now, tz) for n in nodes]))
        print(_summary(nodes, counts))
    return common.EXIT_ERROR if bad else common.EXIT_OK


def _epoch(text):
    return datetime.datetime.fromisoformat(text).timestamp()


def _node_row(node, now, tz):
    version = (node["file_commit"] or node["file_digest"] or "-")[:12]
    if node["drifted"]:
        version += f" (drifted {format_duration(max(0, now - _epoch(node['drifted_since'])))})"
    offset = node["clock_offset"]
    if offset is not None:
        offset = round(offset, 3) + 0.0     # -0.0002 is +0.000s, not -0.000s
    clock = "-" if offset is None else f"{offset:+.3f}s" + (" (off)" if node["clock_flagged"] else "")
    return [node["name"], ", ".join(node["addresses"]) or "-", node["version"], version,
            _state_text(node, now, tz), node["running"], node["failed_24h"], clock]


def _state_text(node, now, tz):
    since = node["since"]
    if since is None:
        return node["state"]
    when = datetime.datetime.fromisoformat(since)
    same_day = when.date() == datetime.datetime.fromtimestamp(now, when.tzinfo).date()
    shown = when.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M")
    return f"{node['state']} since {shown} ({format_duration(max(0, now - when.timestamp()))})"


def _summary(nodes, counts):
    text = f"{len(nodes)} node(s): " + ", ".join(
        f"{counts[state]} {state}" for state in ("up", "late", "down", "stopped") if counts[state])
    if counts["drifted"]:
        text += f"; {counts['drifted']} drifted from the file most up nodes run"
    if counts["clock_flagged"]:
        text += f"; {counts['clock_flagged']} with a clock more than 1s off"
    return text


# -- fleet tasks ------------------------------------------------------------------------------

def cmd_tasks(args):
    from torchcore import fleetquery

    taskfile = config.load(common.task_file_path(args))
    tz = zone(args)
    url = database_url(args)
    with common.fleet_database(args) as conn:
        view = fleetquery.task_view(conn, taskfile, tz)
    if args.json:
        common.print_json(dict(view, database=fleetspec.redact(url)))
    else:
        now = _epoch(view["now"])
        print(format_table(["TASK", "SHOULD RUN ON", "RAN (1 DAY)", "LAST RESULT", "PROBLEMS"],
                           [_task_row(task, now) for task in view["tasks"]])
              if view["tasks"] else f"{taskfile.path}: no tasks")
        print(f"{view['nodes']} node(s) registered, {len(view['nodes_on_file'])} running this "
              f"file ({taskfile.digest[:12]})")
        once = [task for task in view["tasks"] if task["once"] is not None]
        if once:
            from torchcore import holders

            today = datetime.datetime.fromisoformat(view["now"]).date()
            print("run: once:")
            for task in once:
                for line in holders.lines(task["name"], task["once"], today=today):
                    print(f"  {printable(line)}")
        if view["problems"]:
            print("problems:")
            for problem in view["problems"]:
                print(f"  {problem['kind']}: {printable(problem['text'])}")
    return common.EXIT_ERROR if view["problems"] else common.EXIT_OK


def _names(names):
    if not names:
        return "-"
    more = len(names) - SHOWN_NAMES
    return ", ".join(names[:SHOWN_NAMES]) + (f" +{more} more" if more > 0 else "")


def _task_row(task, now):
    name = task["name"] if task["enabled"] else f"{task['name']} (disabled)"
    ran = task["ran"]
    return [name, _names(task["should"]), _names([r["node"] for r in ran]),
            _last_result(ran, now), ", ".join(task["problems"]) or "-"]


def _last_result(ran, now):
    if not ran:
        return "-"
    failing = [r["node"] for r in ran if r["failed"] is True]
    ok = [r for r in ran if r["failed"] is False]
    newest = max(ran, key=lambda r: _epoch(r["last_at"]))
    ago = format_duration(max(0, now - _epoch(newest["last_at"])))
    if failing:
        text = f"failing on {_names(failing)}"
        return text + (f"; ok on {len(ok)}" if ok else "") + f" (last {ago} ago)"
    if ok and len(ok) == len(ran):
        return f"ok on {len(ok)} (last {ago} ago)"
    return f"{newest['last_result']} on {newest['node']} ({ago} ago)"
