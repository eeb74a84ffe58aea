"""What a task file holds once validated: immutable ``Task``, ``Settings`` and ``TaskFile`` specs.

config.py reads and validates a file into these; everything after loading (the planner, the
supervisor, the commands, a job for the executor) works from them.  Equal specs compare equal
(a reload compares old and new tasks), so they carry no state.
"""

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torchcore import paths
from torchcore.paths import DEFAULT_SHELL

if TYPE_CHECKING:       # the schedule's C core is loaded by what builds tasks, not by reading settings
    from torchcore.schedule import Schedule

DEFAULT_STATE_DIR = ".torchcore"
# A name is a file name in log_dir and a word on command lines: no leading '.' or '-'.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = ("torchcore",)     # log_dir/torchcore.log is the daemon's own log
NODE_LOSS = ("none", "rerun")       # `on_node_loss:` what a lost `run: once` run gets (claimloss.py)
RUN_MODES = ("each", "once")        # `run:` every node the task targets, or one of them per second


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits applied to a run: bytes of memory, CPU seconds, open files (None = unlimited)."""

    memory: int | None = None
    cpu: int | None = None
    nofile: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """One validated task; equal specs compare equal (``schedule`` and ``line`` are left out)."""

    name: str
    description: str = ""
    command: str | tuple
    type: str = "common"
    schedule_text: str | None = None
    schedule: "Schedule | None" = field(default=None, compare=False)
    max: int = 1
    ips: tuple = ()
    hosts: tuple = ()
    timeout: int | None = None
    kill_grace: int = 10
    env: tuple = ()
    cwd: str | None = None
    user: str | None = None
    group: str | None = None
    inherit_env: bool = False       # a user: task gets the daemon's environment, not cron's minimal one
    enabled: bool = True
    timezone: str | None = None
    limits: Limits = Limits()
    run: str = "each"               # each: on every node it targets; once: on one of them (claims.py)
    on_node_loss: str = "none"      # run: once: a run lost with its node is re-run once ("rerun")
    # who is told of its runs (None: the settings' notify) and its dead-man ping: the notifier's
    # business, so changing them does not make the task a changed one (a daemon is not restarted)
    notify: tuple | None = field(default=None, compare=False)
    ping: object = field(default=None, compare=False)
    line: int = field(default=0, compare=False)

    def argv(self, shell):
        """The argv to exec: ``[shell, "-c", command]`` for a string, the list itself otherwise."""
        if isinstance(self.command, str):
            return [shell, "-c", self.command]
        return list(self.command)

    def runs_on(self, node):
        """True if the ``ips``/``hosts`` targeting selects ``node`` (``enabled`` is not considered).

        No targeting means every node; otherwise any address inside any listed
        network, or a hostname (or its first label) matching any glob, case-insensitively.
        """
        if not self.ips and not self.hosts:
            return True
        for network in self.ips:
            for address in node.addresses:
                if address.version == network.version and address in network:
                    return True
        return bool(self.hosts) and host_matches(node.hostname, self.hosts)


def host_matches(hostname, globs):
    """True if ``hostname`` or its short form matches one of ``globs`` (case-insensitive).

    >>> host_matches("Web-3.example.com", ("web-*",)), host_matches("db1.example.com", ("db1",))
    (True, True)
    """
    full = hostname.lower()
    short = full.split(".", 1)[0]
    for glob in globs:
        glob = glob.lower()
        if fnmatch.fnmatchcase(full, glob) or fnmatch.fnmatchcase(short, glob):
            return True
    return False


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """File-wide settings; paths are absolute (relative ones were taken from the file's directory)."""

    path: str
    log_dir: str
    state_dir: str
    pidfile: str
    timezone: str | None = None
    shell: str = DEFAULT_SHELL
    max_running: int | None = None
    shutdown_grace: int = 30
    misfire_grace: int = 60
    watch: bool = True
    log_max_bytes: int = 10 << 20
    log_backups: int = 5
    history_days: int = 30
    notify: tuple = ()          # notifyspec.Target: every task's, unless it names its own
    http: object = None     # settings.http: a web.settings.HttpSettings, or None (off)
    fleet: object = None    # settings.fleet: a fleetspec.FleetSettings, or None (no fleet)


def default_settings(path):
    """The settings of a file that has no ``settings`` section."""
    path = os.path.abspath(path)
    state_dir = os.path.join(os.path.dirname(path), DEFAULT_STATE_DIR)
    return Settings(path=path, state_dir=state_dir, log_dir=paths.default_log_dir(state_dir),
                    pidfile=paths.default_pidfile(state_dir))


@dataclass(frozen=True)
class TaskFile:
    """A whole validated task file: its settings, its tasks in file order, and the sha256 of its bytes."""

    path: str
    settings: Settings
    tasks: tuple
    digest: str
    index: dict = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "index", {task.name: task for task in self.tasks})

    def task(self, name):
        """The task called ``name``; KeyError if there is none."""
        return self.index[name]

    def local_tasks(self, node):
        """The enabled tasks that run on ``node``, in file order."""
        return tuple(t for t in self.tasks if t.enabled and t.runs_on(node))
