"""The ``torchcore`` command: a thin dispatcher over one module per group of subcommands.

Each module in COMMAND_MODULES exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` on each: ``func(args) -> int`` (the exit status).
"""

import argparse
import datetime
import difflib
import importlib
import os
import re
import sys
import time

from torchcore import __version__, textfmt
from torchcore.errors import ConfigError, TorchcoreError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h

COMMAND_MODULES = [
    "torchcore.cmd_tasks",      # check, next
    "torchcore.cmd_daemon",     # start, stop, reload, restart
    "torchcore.cmd_status",     # status, run
    "torchcore.cmd_records",    # history, logs
    "torchcore.cmd_import",     # import
    "torchcore.cmd_help",       # help, completion, man
]


def default_task_file():
    """``$TORCHCORE_TASKS``, then ``./tasks.yaml``."""
    return os.environ.get("TORCHCORE_TASKS") or "tasks.yaml"


def add_config_option(parser):
    parser.add_argument(
        "-c", "--config", metavar="FILE", default=None,
        help="task file (default: $TORCHCORE_TASKS, then ./tasks.yaml)")


def add_node_options(parser):
    parser.add_argument(
        "--node-ip", metavar="ADDR", action="append", default=None,
        help="act as a node with this address (repeatable); replaces the detected addresses "
             "and $TORCHCORE_NODE_IP")


def add_json_option(parser):
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def task_file_path(args):
    return args.config or default_task_file()


# ---- shared by every command: names looked up, --since, where a task runs ------------------

def did_you_mean(name, known):
    """`` (did you mean 'backup'?)`` for a misspelt name, or nothing."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def lookup_task(taskfile, name):
    """The task called ``name``, or TorchcoreError naming the file and the closest name."""
    try:
        return taskfile.task(name)
    except KeyError:
        raise TorchcoreError(f"{taskfile.path}: no task named {name!r}"
                             f"{did_you_mean(name, taskfile.index)}") from None


def not_here_text(task, node):
    """One line saying that ``task`` does not run on ``node`` (None: it does run here)."""
    if task.runs_on(node):
        return None
    addresses = ", ".join(str(address) for address in node.addresses) or "no addresses"
    return (f"task {task.name!r} does not run on this node ({node.hostname}: {addresses}); "
            f"it runs on {textfmt.targets_text(task)}")


SINCE_HELP = ("a duration (90m, 2h, 1d, 1w), today, yesterday, or an ISO date or time "
              "(2026-11-24, 2026-11-24T15:30)")
_WEEKS = re.compile(r"(\d{1,6})w")


def parse_since(text, now=None):
    """The epoch second a ``--since`` value stands for (one parser for every --since).

    >>> parse_since("2h", now=10000)
    2800.0
    >>> parse_since("1w", now=700000)
    95200.0
    """
    from torchcore.units import parse_duration

    now = time.time() if now is None else now
    word = text.strip().lower()
    if word in ("today", "yesterday"):
        day = datetime.date.fromtimestamp(now) - datetime.timedelta(days=word == "yesterday")
        return datetime.datetime.combine(day, datetime.time()).astimezone().timestamp()
    weeks = _WEEKS.fullmatch(word)
    try:
        seconds = int(weeks.group(1)) * 7 * 86400 if weeks else parse_duration(word)
        return float(now - seconds)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {SINCE_HELP}; got {text!r}") from None
    return (when if when.tzinfo else when.astimezone()).timestamp()

def _command_names(parser):
    return next(action.choices for action in parser._actions
                if isinstance(action, argparse._SubParsersAction))


def _unknown_command(parser, argv):
    """The first word when it is not a command (argparse alone suggests nothing)."""
    if argv and not argv[0].startswith("-") and argv[0] not in _command_names(parser):
        return argv[0]
    return None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="torchcore",
        description="A cron replacement for a fleet: one task file in git, each node runs its share.")
    parser.add_argument("--version", action="version", version=f"torchcore {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    unknown = _unknown_command(parser, argv)
    if unknown:
        parser.print_usage(sys.stderr)
        print(f"torchcore: no command {unknown!r}{did_you_mean(unknown, _command_names(parser))}; "
              "`torchcore help` lists them", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except TorchcoreError as exc:
        message = str(exc)
        prefix = "" if message.startswith("torchcore") else "torchcore: "
        print(prefix + message, file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head`: not an error of ours; keep Python quiet on exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
