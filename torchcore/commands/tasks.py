"""``torchcore check`` and ``torchcore next``: validate a task file and show what runs where and when."""

import argparse
import json
import sys
from datetime import datetime, timezone

from torchcore import config
from torchcore.commands import common
from torchcore.describe import describe_schedule
from torchcore.errors import ConfigError
from torchcore.textfmt import format_relative, format_table
from torchcore.units import OutOfRange, parse_digits, shown

ALL_NODES = "every node"


def now():
    """The current time, aware; tests replace this function."""
    return datetime.now(timezone.utc)


def register(subparsers):
    check = subparsers.add_parser(
        "check", help="validate the task file and show its tasks",
        description="Validate the task file (exit 0 if valid, 1 with every error otherwise) and list "
                    "its tasks: schedule, a reading of it, the next run and whether it runs here.")
    common.add_config_option(check)
    common.add_node_options(check)
    common.add_json_option(check)
    check.add_argument("--by-node", action="store_true",
                       help="list, for every address, network and host glob in the file, "
                            "the tasks that run there")
    check.set_defaults(func=cmd_check)
    nxt = subparsers.add_parser(
        "next", help="show the next fire times of one or every task",
        description="Show the next N fire times of TASK (default: every task), in each task's zone.")
    common.add_config_option(nxt)
    common.add_node_options(nxt)
    common.add_json_option(nxt)
    nxt.add_argument("task", nargs="?", metavar="TASK", help="one task (default: every task)")
    nxt.add_argument("-n", type=positive_int, default=5, metavar="N",
                     help="how many fire times per task (default 5)")
    nxt.set_defaults(func=cmd_next)


MAX_NEXT = 10_000     # fire times `next -n` lists per task


def positive_int(text):
    """1..MAX_NEXT, from ASCII digits (a numeral of thousands of digits is out of range, not a crash)."""
    try:
        value = parse_digits(text, MAX_NEXT)
    except OutOfRange:
        raise argparse.ArgumentTypeError(f"expected a whole number in 1-{MAX_NEXT}, "
                                         f"got {shown(text)}") from None
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {shown(text)!r}")
    return value


# -- check --------------------------------------------------------------------------------------


def cmd_check(args):
    """Validate; print the task table (or the by-node inventory); 1 with the errors on stderr."""
    node = common.node_of(args)
    path = common.task_file_path(args)
    try:
        taskfile = config.load_for_node(path, node)
    except ConfigError as exc:
        return report_invalid(path, exc.problems, args.json)
    if args.by_node:
        targets = by_node(taskfile, node)
        print(json.dumps(by_node_json(taskfile, targets), indent=2) if args.json
              else by_node_text(targets))
        return common.EXIT_OK
    rows = [task_row(task, node, now()) for task in taskfile.tasks]
    if args.json:
        print(json.dumps(check_json(taskfile, node, rows), indent=2))
    else:
        print(check_text(taskfile, node, rows))
    return common.EXIT_OK


def report_invalid(path, problems, as_json):
    """Every problem on stderr (and a JSON verdict on stdout for machines); exit status 1."""
    for problem in problems:
        print(problem, file=sys.stderr)
    if as_json:
        print(json.dumps({"file": path, "valid": False, "errors": problems}, indent=2))
    count = len(problems)
    print(f"{path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
    return common.EXIT_ERROR


def task_row(task, node, when):
    """What check shows of one task: a dict, rendered as a table row or as JSON."""
    upcoming = next_times(task, when, 1)
    return {
        "name": task.name,
        "type": task.type,
        "schedule": task.schedule_text,
        "reading": reading(task),
        "timezone": task.timezone,
        "next": upcoming[0] if upcoming else None,
        "enabled": task.enabled,
        "runs_here": task.runs_on(node),
    }


def reading(task):
    if task.type == "daemon":
        return f"Kept running ({task.max} instance{'s' if task.max != 1 else ''})"
    return describe_schedule(task.schedule_text)


def next_times(task, when, count):
    """The next ``count`` fire times of ``task`` after the aware ``when``, in the task's zone."""
    times = []
    if task.schedule is None:
        return times
    for _ in range(count):
        when = task.schedule.next_after(when)
        if when is None:
            break
        times.append(when)
    return times


def check_text(taskfile, node, rows):
    current = now()
    table = format_table(
        ["NAME", "TYPE", "SCHEDULE", "READING", "NEXT RUN", "HERE"],
        [[r["name"], r["type"], r["schedule"] or "-", r["reading"], next_text(r, current),
          here_text(r)] for r in rows])
    here = sum(1 for r in rows if r["runs_here"] and r["enabled"])
    count = len(rows)
    summary = (f"{taskfile.path}: valid, {count} task{'s' if count != 1 else ''}; {here} run on "
               f"this node, {node.describe()}")
    return f"{table}\n\n{summary}" if rows else summary


def next_text(row, current):
    if row["type"] == "daemon":
        return "-"
    if row["next"] is None:
        return "at start" if row["schedule"].split()[0] == "@reboot" else "never"
    when = row["next"]
    return f"{when:%Y-%m-%d %H:%M:%S %Z} ({format_relative(when.timestamp(), current.timestamp())})"


def here_text(row):
    if not row["enabled"]:
        return "disabled"
    return "yes" if row["runs_here"] else "no"


def check_json(taskfile, node, rows):
    tasks = [dict(r, next=r["next"].isoformat() if r["next"] else None) for r in rows]
    return {"file": taskfile.path, "valid": True, "digest": taskfile.digest,
            "node": node_json(node), "tasks": tasks}


def node_json(node):
    return {"hostname": node.hostname, "addresses": [str(a) for a in node.addresses]}


# -- check --by-node ----------------------------------------------------------------------------


def by_node(taskfile, node):
    """``[(target, kind, here, [task, ...])]``: "every node", then each address/network and host
    glob in the order the file names them, with the tasks that run on every node it covers."""
    targets = {}
    for task in taskfile.tasks:
        if not task.ips and not task.hosts:
            targets.setdefault((ALL_NODES, "all"), [])
        for network in task.ips:
            targets.setdefault((network, "network"), [])
        for glob in task.hosts:
            targets.setdefault((glob, "hosts"), [])
    result = []
    for (target, kind) in targets:
        tasks = [t for t in taskfile.tasks if covers(t, target, kind)]
        result.append((target, kind, here(target, kind, node), tasks))
    return result


def covers(task, target, kind):
    """Does ``task`` run on every node that ``target`` stands for?"""
    if kind == "all":
        return not task.ips and not task.hosts
    if kind == "hosts":
        return target in task.hosts
    return any(target.version == n.version and target.subnet_of(n) for n in task.ips)


def here(target, kind, node):
    if kind == "all":
        return True
    if kind == "hosts":
        return config.host_matches(node.hostname, (target,))
    return any(a.version == target.version and a in target for a in node.addresses)


def target_text(target, kind):
    if kind == "hosts":
        return f"host {target}"
    if kind == "network" and target.num_addresses == 1:
        return str(target.network_address)
    return str(target)


def task_names(tasks):
    return ", ".join(t.name if t.enabled else f"{t.name} (disabled)" for t in tasks) or "-"


def by_node_text(targets):
    if not targets:
        return "no tasks"
    rows = [[target_text(target, kind) + (" (this node)" if is_here and kind != "all" else ""),
             len(tasks), task_names(tasks)] for target, kind, is_here, tasks in targets]
    return format_table(["WHERE", "TASKS", "NAMES"], rows)


def by_node_json(taskfile, targets):
    return {"file": taskfile.path, "valid": True, "targets": [
        {"target": target if kind == "hosts" else target_text(target, kind),
         "kind": "address" if kind == "network" and target.num_addresses == 1 else kind,
         "this_node": is_here, "tasks": [t.name for t in tasks]}
        for target, kind, is_here, tasks in targets]}


# -- next ---------------------------------------------------------------------------------------


def cmd_next(args):
    """The next N fire times of one task or of every task."""
    path = common.task_file_path(args)
    taskfile = config.load(path)
    if args.task is not None:
        tasks = [common.lookup_task(taskfile, args.task)]
        elsewhere = common.not_here_text(tasks[0], common.node_of(args))
        if elsewhere:
            print(f"{elsewhere}: these are its times there", file=sys.stderr)
    else:
        tasks = taskfile.tasks
    current = now()
    plans = [(task, next_times(task, current, args.n)) for task in tasks]
    if args.json:
        print(json.dumps(next_json(taskfile, plans), indent=2))
    else:
        print(next_text_table(plans, current) if plans else f"{path}: no tasks")
    return common.EXIT_OK


def next_text_table(plans, current):
    rows = []
    for task, times in plans:
        label = task.name if task.enabled else f"{task.name} (disabled)"
        if not times:
            rows.append([label, task.schedule_text or "-", no_times_text(task), ""])
        for number, when in enumerate(times):
            rows.append([label if number == 0 else "", task.schedule_text if number == 0 else "",
                         f"{when:%Y-%m-%d %H:%M:%S %Z}",
                         format_relative(when.timestamp(), current.timestamp())])
    return format_table(["TASK", "SCHEDULE", "NEXT RUN", "IN"], rows)


def no_times_text(task):
    if task.type == "daemon":
        return "kept running (daemon)"
    if task.schedule.is_reboot:
        return "when torchcore starts"
    return "never"


def next_json(taskfile, plans):
    return {"file": taskfile.path, "tasks": [
        {"name": task.name, "type": task.type, "schedule": task.schedule_text,
         "timezone": task.timezone, "enabled": task.enabled,
         "next": [when.isoformat() for when in times]} for task, times in plans]}

