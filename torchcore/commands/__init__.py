"""The ``torchcore`` command: a thin dispatcher over one module per group of subcommands.

Each module in COMMAND_MODULES exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` on each: ``func(args) -> int`` (the exit status).
What they share (exit codes, options, finding the daemon) is in common.py; no command
module imports another.
"""

import argparse
import importlib
import os
import sys

from torchcore import __version__
from torchcore.commands.common import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_USAGE, did_you_mean
from torchcore.errors import ConfigError, TorchcoreError

COMMAND_MODULES = [
    "torchcore.commands.tasks",       # check, next
    "torchcore.commands.daemon",      # start, stop, reload, restart
    "torchcore.commands.status",      # status, run
    "torchcore.commands.history",     # history, logs
    "torchcore.commands.importer",    # import
    "torchcore.commands.notify",      # notify test, alerts
    "torchcore.commands.fleet",       # fleet init, status, tasks
    "torchcore.commands.manual",      # help, completion, man
]


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
