"""What every command shares: exit codes, options, names looked up, ``--since``, and finding and
asking the daemon.  Imports no command module."""

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import json
import os
import re
import sys
import time

from torchcore import config, paths, textfmt
from torchcore import pidfile as pidfiles
from torchcore.errors import DaemonError, TorchcoreError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h


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
    parser.add_argument(
        "--node-name", metavar="NAME", default=None,
        help="act as the node of this name: its hostname for `hosts`, and its name in the fleet "
             "database (replaces $TORCHCORE_NODE_HOSTNAME and settings.fleet.node)")


def node_of(args):
    """The Node the command acts as: --node-ip and --node-name, else what the machine says."""
    from torchcore.node import Node

    name = getattr(args, "node_name", None)
    if name is not None:
        from torchcore import fleetspec
        try:
            fleetspec.check_node_name(name)
        except fleetspec.FleetSpecError as exc:
            raise TorchcoreError(f"--node-name: {exc}") from None
    return Node.detect(getattr(args, "node_ip", None), hostname=name)


def add_json_option(parser):
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_daemon_options(parser):
    """-c and --pidfile: what the commands that steer or ask the daemon take."""
    add_config_option(parser)
    parser.add_argument("--pidfile", metavar="PATH", default=None,
                        help="pidfile (default: settings.pidfile of the task file); other "
                             "commands find a running daemon by its control socket")


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


# ---- finding and signalling the daemon ---------------------------------------------------
#
# Every command finds a running daemon the same way (find_daemon): the control socket in
# state_dir is authoritative, and the daemon's answer names its pid and pidfile, so
# `--pidfile` is needed only to start.  Only when nothing answers there is the pidfile
# (--pidfile, else the file's settings) asked.  Finding state_dir reads the task file's
# settings within the loading budget (config.peek_settings): stop and status work whatever
# the file on disk now holds (huge, invalid, hostile).

PING_TIMEOUT = 5.0


@dataclasses.dataclass
class Found:
    """Where the daemon of a task file is, and whether it runs (``pid`` None: not running)."""

    settings: config.Settings   # from the file's settings block as far as it reads (else defaults)
    socket: str
    pidfile: str                # the running daemon's own, else the configured one
    pid: int | None
    info: dict | None           # the daemon's answer to ping (None: no answer on the socket)


def find_daemon(args, settings=None):
    """The one way commands find the daemon: its control socket, then its pidfile.

    ``settings``: the validated file's, when the command has them (start).
    """
    settings = settings or config.peek_settings(task_file_path(args))
    sock = paths.control_socket(settings.state_dir)
    info, pid = _ping(sock)
    configured = os.path.abspath(getattr(args, "pidfile", None) or settings.pidfile)
    if info is not None:
        return Found(settings, sock, info.get("pidfile") or configured, pid, info)
    daemon = pidfiles.find_daemon(configured)   # refuses a pidfile not ours or not a daemon's
    if daemon is None:
        return Found(settings, sock, configured, None, None)
    with daemon:
        return Found(settings, sock, configured, daemon.pid, None)


def _ping(path):
    """(reply, pid of the process serving ``path``) or (None, None)."""
    from torchcore.control import ControlClient

    if not os.path.exists(path):
        return None, None
    client = ControlClient(path, timeout=PING_TIMEOUT)
    try:
        reply = client.request("ping")
    except DaemonError:
        return None, None
    return reply, client.peer_pid or reply.get("pid")


def verified_daemon(found):
    """The daemon ``found`` as a DaemonProcess to signal, verified first: it holds the lock of
    its pidfile, runs as our user and is a torchcore supervisor (pidfile.find_daemon, through
    a pidfd).  None when no process holds that lock; DaemonError when what holds it is not
    the daemon that answered on the control socket, or not ours."""
    daemon = pidfiles.find_daemon(found.pidfile)
    if daemon is not None and found.info is not None and daemon.pid != found.pid:
        daemon.close()
        raise DaemonError(f"pid {found.pid} answers on {found.socket} but pid {daemon.pid} holds "
                          f"{found.pidfile}; refusing to signal either")
    return daemon


def not_running(found):
    print(f"torchcore is not running (no daemon answers on {found.socket}; "
          f"pidfile {found.pidfile})", file=sys.stderr)
    return EXIT_NOT_RUNNING


def control_request(found, cmd, timeout=5.0, **fields):
    """A reply from the daemon's control socket, or None when it did not answer a ping."""
    from torchcore.control import ControlClient

    if found.info is None:
        return None
    return ControlClient(found.socket, timeout=timeout).request(cmd, **fields)


# ---- the fleet database (commands/fleet.py, history --fleet, logs --fleet) -----------------

def add_database_option(parser):
    parser.add_argument("--database", metavar="URL", default=None,
                        help="the fleet database's libpq URL (default: $TORCHCORE_DATABASE_URL, "
                             "then settings.fleet.database of the task file)")


def fleet_database_url(args):
    """The URL a fleet command uses: --database, $TORCHCORE_DATABASE_URL, the file's
    settings.fleet.database; ConfigError saying where to set one."""
    from torchcore import fleetspec
    from torchcore.errors import ConfigError

    if getattr(args, "database", None):
        return args.database
    url = (os.environ.get(fleetspec.ENV_DATABASE) or "").strip()
    if url:
        return url
    path = task_file_path(args)
    try:
        settings = config.load_settings(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}; name the fleet database with "
                          f"--database or ${fleetspec.ENV_DATABASE}") from None
    if settings.fleet is None:
        raise ConfigError(f"{settings.path}: settings: fleet: not set; add settings.fleet.database, "
                          f"or name the database with --database or ${fleetspec.ENV_DATABASE}")
    return settings.fleet.database


@contextlib.contextmanager
def fleet_database(args):
    """A connection to the fleet database with its schema checked; every failure (cannot
    connect, no schema: with the `fleet init` hint, a query refused) a one-line FleetError
    naming the database without its password."""
    from torchcore import fleetdb, fleetspec

    url = fleet_database_url(args)
    try:
        conn = fleetdb.open_checked(url)
    except fleetdb.SchemaError as exc:
        raise fleetdb.SchemaError(f"{fleetspec.redact(url)}: {exc}") from None
    try:
        yield conn
    except fleetdb.psycopg().Error as exc:
        raise fleetdb.classify(exc, url, "read") from None
    finally:
        conn.close()


def print_json(value):
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
