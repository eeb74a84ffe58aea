"""``torchcore history`` and ``torchcore logs``: what ran, how it ended, what it printed."""

import argparse
import datetime
import json
import os
import re
import sys
import time

from torchcore import config, records, tasklog
from torchcore.commands import common
from torchcore.errors import ConfigError, TorchcoreError
from torchcore.textfmt import format_relative, format_table, printable
from torchcore.units import format_duration

_TASK_NAME = re.compile(r"[A-Za-z0-9._-]+")


def register(subparsers):
    history = subparsers.add_parser(
        "history", help="recent runs, skips and misses, newest first",
        description="Show recorded runs (with skipped and missed due times), newest first.")
    history.add_argument("task", nargs="?", metavar="TASK", help="only this task")
    common.add_config_option(history)
    history.add_argument("--limit", "-l", type=_count, default=50, metavar="N",
                         help="show at most N runs (0 = all; default 50)")
    history.add_argument("--since", type=common.parse_since, metavar="WHEN",
                         help=f"only runs since WHEN: {common.SINCE_HELP}")
    history.add_argument("--failed", action="store_true",
                         help="only failed runs (any end but exit 0: an exit code, a signal, a timeout, "
                              "an executor that died; planned stops are not failures)")
    _add_fleet_options(history, "the runs of every node from the fleet database")
    common.add_json_option(history)
    history.set_defaults(func=cmd_history)

    logs = subparsers.add_parser(
        "logs", help="a task's output",
        description="Show the last lines a task printed (stdout and stderr, stamped).")
    logs.add_argument("task", metavar="TASK")
    common.add_config_option(logs)
    common.add_node_options(logs)
    logs.add_argument("-n", "--lines", type=_count, default=50, metavar="LINES",
                      help="how many of the last lines (0 = all; default 50)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new lines until Ctrl-C")
    logs.add_argument("--run", type=_count, metavar="ID", help="only the lines of this run")
    _add_fleet_options(logs, "the output tail the fleet database stored of a run (--run ID; "
                             "default: the newest)", json_option=True)
    logs.set_defaults(func=cmd_logs)


def _add_fleet_options(parser, what, json_option=False):
    parser.add_argument("--fleet", action="store_true", help=f"read {what}")
    parser.add_argument("--node", metavar="NAME", default=None,
                        help="with --fleet: only this node (its name in the fleet)")
    common.add_database_option(parser)
    if json_option:
        parser.add_argument("--json", action="store_true",
                            help="with --fleet: the run and its output as JSON")


def _count(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _load_taskfile(args):
    """The task file named by -c / $TORCHCORE_TASKS / ./tasks.yaml.

    An invalid file still says where the records and logs are (its settings, read as `stop`
    reads them: config.peek_settings): what ran stays readable while the file is being fixed.
    """
    path = common.task_file_path(args)
    try:
        return config.load(path)
    except ConfigError as exc:
        print(f"note: the task file does not validate ({exc.problems[0]}); records and logs "
              "are read from the directories its settings name", file=sys.stderr)
        return _SettingsOnly(path, config.peek_settings(path))


class _SettingsOnly:
    """An invalid task file: its settings (as far as they read), no tasks known."""

    partial = True

    def __init__(self, path, settings):
        self.path, self.settings, self.index = path, settings, {}

    def task(self, name):
        raise KeyError(name)


def _check_task_name(name):
    if not _TASK_NAME.fullmatch(name):
        raise TorchcoreError(f"{name!r} is not a task name (letters, digits, '.', '_', '-')")


# -- history ----------------------------------------------------------------------------------

def cmd_history(args):
    _check_fleet_options(args)
    if getattr(args, "fleet", False):
        return fleet_history(args)
    taskfile = _load_taskfile(args)
    if args.task is not None:
        _check_task_name(args.task)
    path = records.db_path(taskfile.settings.state_dir)
    runs = []
    if _exists(path, "the records database"):
        since = args.since
        with records.Records(path) as store:
            runs = store.query(task=args.task, limit=args.limit or None, since=since,
                               failed=args.failed)
    tz = _zone(taskfile.settings.timezone)
    if not runs and args.task is not None and args.task not in taskfile.index and \
            not getattr(taskfile, "partial", False):
        raise TorchcoreError(f"no task {args.task!r} in {taskfile.path} and no runs of it recorded"
                             f"{common.did_you_mean(args.task, taskfile.index)}")
    if args.json:
        print(json.dumps([run_json(run, tz) for run in runs], indent=2))
    elif not runs:
        print(_nothing_message(args, path))
    else:
        print(format_table(["RUN", "TASK", "WHEN", "DURATION", "RESULT", "NODE"],
                           [_run_row(run, time.time()) for run in runs]))
    return common.EXIT_OK


def _exists(path, what):
    """Whether ``path`` exists; TorchcoreError when that cannot be known or it cannot be read (a
    daemon of another user): "no runs" would be a wrong answer, not a cautious one."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise TorchcoreError(_unreadable(what, path, exc)) from None
    if not os.access(path, os.R_OK):
        raise TorchcoreError(_unreadable(what, path, PermissionError("Permission denied")))
    return True


def _unreadable(what, path, exc):
    reason = getattr(exc, "strerror", None) or str(exc)
    hint = ("; it belongs to the daemon's user: run this as that user or as root"
            if isinstance(exc, PermissionError) else "")
    return f"cannot read {what} {path}: {reason}{hint}"


def _nothing_message(args, path):
    if not os.path.exists(path):
        return f"no runs recorded yet (no records database at {path})"
    if args.task or args.since is not None or args.failed:
        return "no matching runs recorded"
    return "no runs recorded yet"


def _zone(name):
    if not name:
        return None
    from zoneinfo import ZoneInfo
    return ZoneInfo(name)


def _iso(epoch, tz, timespec="milliseconds"):
    """Epoch seconds as ISO-8601 with the offset of ``tz`` (None: local time)."""
    if epoch is None:
        return None
    when = datetime.datetime.fromtimestamp(epoch, tz) if tz else \
        datetime.datetime.fromtimestamp(epoch).astimezone()
    return when.isoformat(timespec=timespec)


def run_json(run, tz=None):
    """A run as the JSON object of ``history --json`` (times as ISO-8601 with offset)."""
    return run.as_json(lambda epoch, timespec: _iso(epoch, tz, timespec))


def _run_row(run, now):
    when = next(t for t in (run.started, run.scheduled, run.ended, now) if t is not None)
    return [run.run_id, run.task, format_relative(when, now), _format_seconds(run.duration),
            describe_result(run), run.node]


def _format_seconds(seconds):
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 10 else format_duration(seconds)


def describe_result(run):
    """A run's outcome in a few words (records.RunRecord.describe), "(manual)" added."""
    return run.describe() + (" (manual)" if run.manual else "")


# -- logs -------------------------------------------------------------------------------------

def cmd_logs(args):
    _check_fleet_options(args)
    if getattr(args, "fleet", False):
        return fleet_logs(args)
    taskfile = _load_taskfile(args)
    _check_task_name(args.task)
    log_dir = taskfile.settings.log_dir
    lines = args.lines or None
    try:
        if not args.follow:
            return _print_log(taskfile, args, log_dir, lines)
        if not tasklog.log_files(log_dir, args.task):
            _no_log(taskfile, args.task, log_dir, common.node_of(args))
        for line in tasklog.follow_log(log_dir, args.task, lines=lines, run_id=args.run):
            print(shown(line), flush=True)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise TorchcoreError(_unreadable("the task log of", f"{args.task!r} in {log_dir}", exc)) \
            from None
    return common.EXIT_OK


def _print_log(taskfile, args, log_dir, lines):
    if not tasklog.log_files(log_dir, args.task):
        _no_log(taskfile, args.task, log_dir, common.node_of(args))
        return common.EXIT_OK
    printed = 0
    for line in tasklog.read_log(log_dir, args.task, lines=lines, run_id=args.run):
        print(shown(line))
        printed += 1
    if not printed and args.run is not None:
        print(f"no output of run {args.run} of {args.task!r} in its log (it printed nothing, or "
              "its lines were rotated away)", file=sys.stderr)
        return common.EXIT_ERROR
    return common.EXIT_OK


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f] if c != 0x09}


def shown(line):
    """A log line as printed: control characters (a carriage return, escape sequences, a bell)
    escaped as ``\\xNN``, so a task's output can neither forge a line nor drive the terminal."""
    return line.translate(_CONTROL)


def _no_log(taskfile, task, log_dir, node):
    """Say why there is no output: an unknown task (an error), one of another node, or none yet."""
    if getattr(taskfile, "partial", False):
        print(f"no output recorded for task {task!r} ({tasklog.log_path(log_dir, task)})",
              file=sys.stderr)
        return
    if task not in taskfile.index:
        raise TorchcoreError(f"no task {task!r} in {taskfile.path}, and no log of it in {log_dir}"
                             f"{common.did_you_mean(task, taskfile.index)}")
    elsewhere = common.not_here_text(taskfile.task(task), node)
    if elsewhere:
        print(f"{elsewhere}: its output is in the logs of those nodes", file=sys.stderr)
    else:
        print(f"no output recorded yet for task {task!r} ({tasklog.log_path(log_dir, task)})",
              file=sys.stderr)


# -- history --fleet, logs --fleet: the fleet database (fleetquery) ---------------------------

def _check_fleet_options(args):
    if getattr(args, "fleet", False):
        if getattr(args, "follow", False):
            raise TorchcoreError("--follow reads this node's log as it grows; the fleet database "
                                 "holds each run's tail once it ended: leave out --follow or --fleet")
        if getattr(args, "node_name", None) or getattr(args, "node_ip", None):
            raise TorchcoreError("with --fleet, name the node with --node NAME "
                                 "(--node-name and --node-ip act as a node on this machine)")
        return
    for option, value in (("--node", getattr(args, "node", None)),
                          ("--database", getattr(args, "database", None)),
                          ("--json", getattr(args, "json", False) and hasattr(args, "follow"))):
        if value:
            raise TorchcoreError(f"{option} reads the fleet database: add --fleet")


def _fleet_file(args):
    """(the task file or None, its timezone): the fleet commands run from any machine, with a
    task file that may be absent, another version or invalid; it only names tasks and the zone."""
    path = common.task_file_path(args)
    try:
        taskfile = config.load(path)
    except ConfigError:
        taskfile = None
    return taskfile, _zone(config.peek_settings(path).timezone)


def fleet_history(args):
    from torchcore import fleetquery

    if args.task is not None:
        _check_task_name(args.task)
    taskfile, tz = _fleet_file(args)
    with common.fleet_database(args) as conn:
        runs = fleetquery.history(conn, task=args.task, node=args.node, since=args.since,
                                  failed=args.failed, limit=args.limit, tz=tz)
        now = fleetquery.db_now(conn)
    if not runs and args.task is not None and taskfile is not None and \
            args.task not in taskfile.index:
        raise TorchcoreError(f"no task {args.task!r} in {taskfile.path} and no runs of it in the "
                             f"fleet database{common.did_you_mean(args.task, taskfile.index)}")
    if args.json:
        print(json.dumps(runs, indent=2))
    elif not runs:
        filtered = args.task or args.node or args.since is not None or args.failed
        print("no matching runs in the fleet database" if filtered
              else "no runs in the fleet database yet")
    else:
        print(format_table(["RUN", "TASK", "WHEN", "DURATION", "RESULT", "NODE"],
                           [_fleet_row(run, now) for run in runs]))
    return common.EXIT_OK


def _fleet_row(run, now):
    from torchcore import fleetquery

    when = next((t for t in (run["started"], run["scheduled"], run["ended"]) if t), None)
    when = now if when is None else datetime.datetime.fromisoformat(when).timestamp()
    return [run["run_id"], run["task"], format_relative(when, now),
            _format_seconds(run["duration"]), fleetquery.result_text(run), run["node"]]


def fleet_logs(args):
    from torchcore import fleetquery

    _check_task_name(args.task)
    taskfile, tz = _fleet_file(args)
    with common.fleet_database(args) as conn:
        if args.run is not None:
            found = fleetquery.run(conn, args.node, args.run, task=args.task, tz=tz)
        else:
            found = fleetquery.last_run_with_output(conn, args.task, args.node, tz=tz)
    on = f" on {args.node}" if args.node else ""
    if found is None:
        what = f"run {args.run} of {args.task!r}" if args.run is not None else \
            f"stored output of {args.task!r}"
        unknown = taskfile is not None and args.task not in taskfile.index
        hint = (f"; {taskfile.path} has no task {args.task!r}"
                f"{common.did_you_mean(args.task, taskfile.index)}") if unknown else ""
        raise TorchcoreError(f"no {what}{on} in the fleet database{hint}")
    if args.json:
        print(json.dumps(found, indent=2))
        return common.EXIT_OK
    print(printable(f"run {found['run_id']} of {found['task']!r} on {found['node']}, "
                    f"{found['started'] or found['scheduled']}: {fleetquery.result_text(found)}"),
          file=sys.stderr)
    output = found["output"] or ""
    lines = output.split("\n")     # only a newline ends a line, as in a local log (not \r, \f ...)
    if lines[-1] == "":
        lines.pop()
    if args.lines:
        lines = lines[-args.lines:]
    for line in lines:
        print(shown(line))
    if not lines:
        print(f"run {found['run_id']} of {found['task']!r} on {printable(found['node'])} stored "
              "no output (it printed nothing)", file=sys.stderr)
        return common.EXIT_ERROR
    return common.EXIT_OK
