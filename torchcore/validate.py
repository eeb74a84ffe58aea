"""Validating a task file's YAML document into ``TaskFile``, ``Task`` and ``Settings`` specs.

Every problem in the file is reported at once, each naming the file, the line, the task and
the field:

    tasks.yaml:14: task 'backup-db': schedule: minute: value 61 is out of range 0-59

Nothing here loops over the tasks more than once or does per-task work that could be shared
(regexes are compiled once, schedules, zones and networks are cached per load), so a
100,000-task file loads in about twice the time the C parser alone takes.  What a run hands
to exec and to a launcher is bounded here too.
"""

import ipaddress
import json
import os
import re
import zoneinfo

import yaml

from torchcore import fleetspec, notifyspec, paths
from torchcore.errors import ConfigError
from torchcore.taskspec import NAME_RE, RESERVED_NAMES, NODE_LOSS, RUN_MODES, Limits, Settings, Task, TaskFile, default_settings
from torchcore.units import shown
from torchcore.web import settings as http_settings
from torchcore.yamlread import (
    INT, MAX_ARG_BYTES, MAX_WORD_BYTES, MERGE, NULL, Bad, got, kind_of, line_of, suggest,
    want_bool, want_duration, want_int, want_list, want_size, want_str, want_text, want_word)

# The job's command and env together, as JSON, at most 512 KiB (non-ASCII characters take 6
# bytes there): a launcher's frame is 1 MiB.
MAX_JOB_TEXT = 512 << 10
LOG_BACKUPS_MAX = 1000              # rotation renames every backup, under the log's lock
HISTORY_DAYS_MAX = 36500
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HOST_GLOB_RE = re.compile(r"[A-Za-z0-9.*?\[\]!_-]+")
TASK_TYPES = ("common", "daemon")


class Loader:
    """One load of one file: collects every problem, caches what tasks share (zones, schedules, nets)."""

    def __init__(self, path):
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.problems = []
        self.zones = {}
        self.schedules = {}
        self.networks = {}

    def problem(self, node, where, message):
        self.problems.append((line_of(node), f"{self.path}:{line_of(node)}: {where}{message}"))

    def mapping(self, node, where, known, seen=(), fail=None, noun="key", listing=""):
        """``{key: (key_node, value_node)}`` of a mapping node, with merge keys (``<<: *defaults``)
        applied; duplicate, non-scalar and unknown keys are reported and left out.  ``fail(node,
        message)``, when given, is called instead of reporting (a field whose parser raises Bad
        at its first problem passes one that raises)."""
        report = fail or (lambda at, message: self.problem(at, where, message))
        pairs = {}
        merged = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE:
                merged.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                report(key_node, f"expected a key name, got {kind_of(key_node)}")
                continue
            key = key_node.value
            if key in pairs:
                first = line_of(pairs[key][0])
                report(key_node, f"{key}: duplicate key (first at line {first})")
            elif key not in known:
                report(key_node, f"{shown(key, 40)}: unknown {noun}{suggest(key[:100], known)}{listing}")
            else:
                pairs[key] = (key_node, value_node)
        for value_node in merged:
            self.merge(value_node, pairs, where, known, seen + (id(node),), fail, noun, listing)
        return pairs

    def merge(self, node, pairs, where, known, seen, fail=None, noun="key", listing=""):
        """Add the keys of a ``<<`` value (a mapping or a list of them) that ``pairs`` lacks;
        ``seen`` holds the mappings being merged into, so an alias to one of them is an error."""
        report = fail or (lambda at, message: self.problem(at, where, message))
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                report(source, f"<<: expected a mapping to merge, {got(source)}")
                continue
            if id(source) in seen:
                report(source, "<<: a mapping cannot merge itself")
                continue
            for key, value in self.mapping(source, where, known, seen, fail, noun, listing).items():
                pairs.setdefault(key, value)

    def taskfile(self, root, digest):
        """Validate the document; ConfigError if anything at all was wrong."""
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == NULL):
            raise ConfigError(f"{self.path}:1: the file is empty; it needs a 'tasks:' list "
                              "(write 'tasks: []' for a node with no tasks)")
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{self.path}:{line_of(root)}: expected a mapping with 'settings' and "
                              f"'tasks' at the top, {got(root)}")
        top = self.mapping(root, "", ("settings", "tasks"))
        settings = self.settings(top.get("settings", (None, None))[1])
        tasks = self.tasks(root, top.get("tasks"), settings)
        if self.problems:
            self.problems.sort(key=lambda problem: problem[0])  # stable: file order, then field order
            raise ConfigError([message for _, message in self.problems])
        return TaskFile(path=self.path, settings=settings, tasks=tasks, digest=digest)

    def tasks(self, root, pair, settings):
        """Every valid task of the ``tasks`` list; problems (including duplicate names) recorded."""
        if pair is None:
            self.problem(root, "", "tasks: missing; the file needs a 'tasks:' list "
                                   "(write 'tasks: []' for a node with no tasks)")
            return ()
        node = pair[1]
        if not isinstance(node, yaml.SequenceNode):
            hint = " (write 'tasks: []' for no tasks)" if node.tag == NULL else ""
            self.problem(node, "", f"tasks: expected a list of tasks, {got(node)}{hint}")
            return ()
        tasks, first_line = [], {}
        for number, item in enumerate(node.value, 1):
            name, task = self.task(item, number, settings)
            if name in first_line:
                self.problem(item, f"task '{name}': ",
                             f"name: duplicate task name (first defined at line {first_line[name]})")
            elif name:
                first_line[name] = line_of(item)
            if task is not None:
                tasks.append(task)
        return tuple(tasks)

    def settings_only(self, root):
        """The Settings of a document whose tasks are not looked at (invalid settings keep
        their defaults)."""
        if not isinstance(root, yaml.MappingNode):
            return default_settings(self.path)
        top = self.mapping(root, "", ("settings", "tasks"))
        return self.settings(top.get("settings", (None, None))[1])

    # -- settings -----------------------------------------------------------------------------

    def settings(self, node):
        """The Settings from the ``settings`` mapping (None: all defaults)."""
        defaults = default_settings(self.path)
        if node is None or node.tag == NULL:
            return defaults
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "", f"settings: expected a mapping, {got(node)}")
            return defaults
        values = {}
        for key, (_, value_node) in self.mapping(node, "settings: ", SETTINGS_FIELDS).items():
            if value_node.tag == NULL:
                continue
            try:
                values[key] = SETTINGS_FIELDS[key](self, value_node)
            except Bad as bad:
                self.problem(bad.node or value_node, "settings: ", f"{key}: {bad}")
        state_dir = values.get("state_dir", defaults.state_dir)
        values.setdefault("log_dir", paths.default_log_dir(state_dir))
        values.setdefault("pidfile", paths.default_pidfile(state_dir))
        values["path"] = defaults.path
        values["state_dir"] = state_dir
        return Settings(**values)

    def abspath(self, node):
        """A path string; relative paths are taken from the task file's directory."""
        text = want_word(node, "a path")
        return os.path.normpath(os.path.join(self.base, os.path.expanduser(text)))

    def zone(self, node):
        """A validated IANA zone name (``Europe/Berlin``, ``UTC``)."""
        name = want_word(node, "an IANA time zone name like Europe/Berlin or UTC")
        if name not in self.zones:
            self.zones[name] = _check_zone(name)
        if self.zones[name] is None:
            raise Bad(f"unknown time zone {name!r}{suggest_zone(name)}", node)
        return name

    # -- tasks --------------------------------------------------------------------------------

    def task(self, node, number, settings):
        """``(name, Task)`` from a task's mapping node; the Task is None if it had problems."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"task #{number}: ",
                         f"expected a mapping with name, command and schedule, {got(node)}")
            return None, None
        count = len(self.problems)
        name = self.task_name(node, number)
        where = f"task '{name}': " if name else f"task #{number}: "
        pairs = self.mapping(node, where, TASK_FIELDS)
        values = {"name": name, "line": line_of(node)}
        for key, (_, value_node) in pairs.items():
            if key == "name" or value_node.tag == NULL:
                continue
            try:
                values[key] = TASK_FIELDS[key](self, value_node)
            except Bad as bad:
                self.problem(bad.node or value_node, where, f"{key}: {bad}")
        self.task_rules(node, pairs, values, settings, where)
        if count != len(self.problems) or not name:
            return name, None
        return name, Task(**values)

    def task_name(self, node, number):
        """The task's valid name (looked up first, to label its other problems), or None."""
        name_node = None
        for key_node, value_node in node.value:
            if key_node.value == "name":
                name_node = value_node
                break
        if name_node is None or name_node.tag == NULL:
            self.problem(node, f"task #{number}: ", "name: missing; every task needs a unique name")
            return None
        try:
            name = want_str(name_node)
        except Bad as bad:
            self.problem(name_node, f"task #{number}: ", f"name: {bad}")
            return None
        if not NAME_RE.fullmatch(name):
            self.problem(name_node, f"task #{number}: ",
                         f"name: {shown(name, 70)!r} is not a valid name: use 1-64 of A-Z a-z 0-9 . _ -, "
                         "starting with a letter, a digit or _")
            return None
        if name.lower() in RESERVED_NAMES:
            self.problem(name_node, f"task #{number}: ",
                         f"name: {name!r} is reserved: {name}.log in log_dir is the daemon's own log")
            return None
        return name

    def task_rules(self, node, pairs, values, settings, where):
        """Rules across fields: command required, the job fits, schedule by type, the schedule
        in the task's zone."""
        command = pairs.get("command")
        if command is None or command[1].tag == NULL:
            self.problem(node, where, "command: missing; give a string (run by the shell) or a list (argv)")
        elif "command" in values:
            self.job_size(command[1], values, settings, where)
        kind = values.get("type", "common")
        if values.get("run") == "once":
            self.run_once(pairs["run"][1], kind, values, settings, where)
        if values.get("on_node_loss", "none") != "none":
            self.node_loss(pairs["on_node_loss"][1], kind, values, where)
        text = values.pop("schedule", None)
        tz = values.setdefault("timezone", settings.timezone)
        if "type" in pairs and "type" not in values and pairs["type"][1].tag != NULL:
            return  # the type is wrong (already reported): which schedule rule applies is unknown
        if kind == "daemon":
            if text is not None:
                self.problem(pairs["schedule"][1], where,
                             "schedule: a daemon task is kept running and takes no schedule "
                             "(remove it, or use type: common)")
            return
        if text is None:
            if "schedule" not in pairs or pairs["schedule"][1].tag == NULL:
                self.problem(node, where, "schedule: missing; a common task needs one "
                                          "(e.g. '0 30 2 * * *'), or set type: daemon")
            return
        values["schedule_text"] = text
        from torchcore.schedule import ScheduleError    # the C core: not for settings_only
        try:
            values["schedule"] = self.schedule(text, tz)
        except ScheduleError as exc:
            message = str(exc).removeprefix("schedule: ")
            self.problem(pairs["schedule"][1], where, f"schedule: {message}")

    def run_once(self, node, kind, values, settings, where):
        """``run: once`` needs the fleet database, a schedule, and not @reboot."""
        if settings.fleet is None:
            self.problem(node, where, "run: once needs settings.fleet (the fleet database in which "
                                      "the nodes claim each run): add settings: fleet: database: "
                                      "postgresql://..., or use run: each")
        elif str(values.get("schedule", "")).strip().lower() == "@reboot":
            self.problem(node, where, "run: once cannot be used with @reboot (each node boots on "
                                      "its own); use run: each")

    def node_loss(self, node, kind, values, where):
        """``on_node_loss: rerun`` is for a common ``run: once`` task (a daemon moves anyway)."""
        if kind == "daemon":
            self.problem(node, where, "on_node_loss: a daemon task moves to another node when "
                                      "its node dies; on_node_loss is for common run: once tasks")
        elif values.get("run") != "once":
            self.problem(node, where, "on_node_loss: only a run: once task can be re-run on "
                                      "another node (add run: once, or remove on_node_loss)")

    def job_size(self, node, values, settings, where):
        """The command and env, as the launcher is sent them, within MAX_JOB_TEXT."""
        command = values["command"]
        argv = [settings.shell, "-c", command] if isinstance(command, str) else list(command)
        env = values.get("env", ())
        words = argv + [word for pair in env for word in pair]
        if 12 * sum(map(len, words)) + 8 * len(words) + 16 <= MAX_JOB_TEXT:
            return      # a character takes at most 12 bytes as JSON (a surrogate pair's two
                        # escapes), a word its quotes and separators: it fits, unmeasured
        size = len(json.dumps([argv, env]))
        if size > MAX_JOB_TEXT:
            self.problem(node, where, f"command: the command and env take {size:,} bytes as sent "
                                      f"to a run (non-ASCII characters count 6); at most {MAX_JOB_TEXT:,}")

    def schedule(self, text, tz):
        """A Schedule, shared between tasks with the same text and zone (it is immutable)."""
        key = (text, tz)
        schedule = self.schedules.get(key)
        if schedule is None:
            from torchcore.schedule import Schedule
            zone = self.zones.get(tz) if tz else None
            schedule = self.schedules[key] = Schedule(text, zone or tz)
        return schedule

    def network(self, node):
        """An ip_network from ``10.0.0.5``, ``10.0.1.0/24`` or ``2001:db8::/32``."""
        if not isinstance(node, yaml.ScalarNode) or node.tag == NULL:
            raise Bad(f"expected an IPv4/IPv6 address or CIDR network, {got(node)}", node)
        text = node.value
        network = self.networks.get(text)
        if network is None:
            network = self.networks[text] = parse_network(text, node)
        return network


def parse_network(text, node=None):
    """``ip_network`` with messages a user can act on (host bits set: the network meant)."""
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError:
        pass
    try:
        meant = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise Bad(f"{shown(text, 60)!r} is not an IPv4/IPv6 address or CIDR network "
                  "(expected e.g. 10.0.0.5, 10.0.1.0/24 or 2001:db8::/32)", node) from None
    raise Bad(f"{text!r} has host bits set; did you mean {meant}?", node)


def suggest_zone(name):
    try:
        return suggest(name, sorted(zoneinfo.available_timezones()))
    except OSError:
        return ""


# -- field parsers: (loader, value node) -> value, or raise Bad ----------------------------------


def _command(loader, node):
    if isinstance(node, yaml.SequenceNode):
        if not node.value:
            raise Bad("expected a non-empty list (argv), got an empty list", node)
        return tuple(want_text(item, "a string (an argv item)") for item in node.value)
    return want_text(node, "a string (run by the shell) or a list (argv)")


def _type(loader, node):
    value = want_str(node, "common or daemon")
    if value not in TASK_TYPES:
        raise Bad(f"expected common or daemon, got {value!r}{suggest(value, TASK_TYPES)}", node)
    return value


def _run(loader, node):
    value = want_str(node, "each or once")
    if value not in RUN_MODES:
        raise Bad(f"expected each or once, got {value!r}{suggest(value, RUN_MODES)}", node)
    return value


def _on_node_loss(loader, node):
    value = want_str(node, "none or rerun")
    if value not in NODE_LOSS:
        raise Bad(f"expected none or rerun, got {value!r}{suggest(value, NODE_LOSS)}", node)
    return value


def _ips(loader, node):
    items = want_list(node, "IP addresses or CIDR networks, e.g. [10.0.0.5, 10.0.1.0/24]")
    return tuple(loader.network(item) for item in items)


def _hosts(loader, node):
    globs = []
    for item in want_list(node, "hostname globs, e.g. [web-*, db1]"):
        glob = want_str(item, "a hostname glob", MAX_WORD_BYTES)
        if not HOST_GLOB_RE.fullmatch(glob):
            raise Bad(f"{glob!r} is not a hostname glob (letters, digits, . - _ and * ? [ ])", item)
        globs.append(glob)
    return tuple(globs)


class _AnyKey:
    """``known`` for a mapping whose keys are checked by its field (``env``'s names)."""

    def __contains__(self, key):
        return True

    def __iter__(self):
        return iter(())


def _env(loader, node):
    if not isinstance(node, yaml.MappingNode):
        raise Bad(f"expected a mapping of NAME: value, {got(node)}", node)
    items = node.value
    if any(key_node.tag == MERGE for key_node, _ in items):     # env: {<<: *common, X: 1}
        items = list(loader.mapping(node, "", _AnyKey(), fail=raise_bad).values())
    pairs = {}
    for key_node, value_node in items:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str) or not ENV_NAME_RE.fullmatch(key):
            raise Bad(f"{shown(key, 40)!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                      key_node)
        if key in pairs:
            raise Bad(f"{key}: duplicate variable", key_node)
        if value_node.tag == NULL:
            pairs[key] = ""
            continue
        try:
            pairs[key] = want_text(value_node) if value_node.tag == INT else want_str(value_node)
        except Bad as bad:
            raise Bad(f"{key}: {bad}", value_node) from None
        if len(key) + 1 + len(pairs[key].encode("utf-8", "surrogatepass")) > MAX_ARG_BYTES:
            raise Bad(f"{key}: {key}=value is longer than {MAX_ARG_BYTES:,} bytes, "
                      "the most one variable can hold", value_node)
    return tuple(sorted(pairs.items()))


def raise_bad(node, message):
    """A ``fail`` for Loader.mapping: the first problem raised as Bad."""
    raise Bad(message, node)


def _limits(loader, node):
    if not isinstance(node, yaml.MappingNode):
        raise Bad(f"expected a mapping with memory, cpu and/or nofile, {got(node)}", node)
    values = {}
    for key, (_, value_node) in loader.mapping(node, "", LIMITS_FIELDS, fail=raise_bad, noun="limit",
                                               listing=" (known: memory, cpu, nofile)").items():
        if value_node.tag != NULL:
            try:
                values[key] = LIMITS_FIELDS[key](value_node)
            except Bad as bad:
                raise Bad(f"{key}: {bad}", bad.node) from None
    return Limits(**values)


def _user(loader, node):
    value = want_word(node, "a user name")
    if value.isascii() and value.isdigit():
        raise Bad(f"expected a user name, got the number {value}; quote it if it is a name", node)
    return value


LIMITS_FIELDS = {
    "memory": want_size,
    "cpu": lambda node: want_duration(node, 1),
    "nofile": lambda node: want_int(node, 1),
}

TASK_FIELDS = {
    "name": None,  # handled first, to label the task's other problems
    "description": lambda loader, node: want_str(node),
    "command": _command,
    "type": _type,
    "run": _run,
    "on_node_loss": _on_node_loss,
    "schedule": lambda loader, node: want_str(node, "a schedule like '0 30 2 * * *' or '@every 10s'"),
    "max": lambda loader, node: want_int(node, 1),
    "ips": _ips,
    "hosts": _hosts,
    "timeout": lambda loader, node: want_duration(node, 1),
    "kill_grace": lambda loader, node: want_duration(node, 0),
    "env": _env,
    "cwd": Loader.abspath,
    "user": _user,
    "group": lambda loader, node: want_word(node, "a group name"),
    "inherit_env": lambda loader, node: want_bool(node),
    "enabled": lambda loader, node: want_bool(node),
    "timezone": Loader.zone,
    "limits": _limits,
    "notify": notifyspec.notify_list,
    "ping": notifyspec.ping,
}

SETTINGS_FIELDS = {
    "log_dir": Loader.abspath,
    "state_dir": Loader.abspath,
    "pidfile": Loader.abspath,
    "timezone": Loader.zone,
    "shell": lambda loader, node: want_word(node, "a shell path like /bin/sh"),
    "max_running": lambda loader, node: want_int(node, 1),
    "shutdown_grace": lambda loader, node: want_duration(node, 0),
    "misfire_grace": lambda loader, node: want_duration(node, 0),
    "watch": lambda loader, node: want_bool(node),
    "log_max_bytes": lambda loader, node: want_size(node),
    "log_backups": lambda loader, node: want_int(node, 0, LOG_BACKUPS_MAX),
    "history_days": lambda loader, node: want_int(node, 1, HISTORY_DAYS_MAX),
    "notify": notifyspec.notify_list,
    "http": http_settings.parse,
    "fleet": fleetspec.parse,
}


def _check_zone(name):
    """schedule.check_zone, without loading the schedule's C core: reading the settings alone (the
    fleet agent, `stop`, `status`) needs no schedule."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None
