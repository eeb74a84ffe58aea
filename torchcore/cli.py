"""The ``torchcore`` command: a thin dispatcher over one module per group of subcommands.

Each module in COMMAND_MODULES exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` on each: ``func(args) -> int`` (the exit status).
"""

import argparse
import importlib
import os
import sys

from torchcore import __version__
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
