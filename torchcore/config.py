"""The task file: ``tasks.yaml`` -> validated, immutable Task specs.

The file is parsed with pyyaml's C composer into nodes (which keep their line
numbers) and validated node by node, so every problem in the file is reported
at once, each naming the file, the line, the task and the field:

    tasks.yaml:14: task 'backup-db': schedule: minute: value 61 is out of range 0-59

Nothing here loops over the tasks more than once or does per-task work that
could be shared (regexes are compiled once, schedules, zones and networks are
cached per load), so a 100,000-task file loads in about twice the time the C
parser alone takes.

Everything a file can hold is bounded before or while it is validated: its size,
its nesting depth and how far aliases and merge keys expand it (``_budget``, which
measures each node once, so a bomb is refused in time linear in the file), every
number (by kind, in ``units``), every string (no NUL; names and paths without
control characters) and what a run hands to exec and to a launcher.
"""

import difflib
import fnmatch
import functools
import grp
import hashlib
import ipaddress
import json
import os
import pwd
import re
import zoneinfo
from dataclasses import dataclass, field

import yaml

from torchcore.errors import ConfigError
from torchcore.schedule import Schedule, ScheduleError
from torchcore.units import MAX_COUNT, OutOfRange, parse_digits, parse_duration, parse_size, shown

try:
    _YAML_LOADER = yaml.CSafeLoader
except AttributeError:  # pyyaml built without libyaml: slower, same results
    _YAML_LOADER = yaml.SafeLoader

DEFAULT_SHELL = "/bin/sh"
DEFAULT_STATE_DIR = ".torchcore"
# A name is a file name in log_dir and a word on command lines: no leading '.' or '-'.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = ("torchcore",)     # log_dir/torchcore.log is the daemon's own log

# The loading budget: what a file may hold before it is validated (see _budget).
MAX_FILE_BYTES = 64 << 20
MAX_DEPTH = 64                      # nesting levels, counted through aliases and merge keys
ALIAS_GROWTH = 10                   # aliases may expand the document to 10x its own nodes ...
ALIAS_ALLOWANCE = 100_000           # ... plus this many
# What a task may hand to exec and the launcher (whose frame is 1 MiB): every word at most
# Linux's MAX_ARG_STRLEN (128 KiB with its NUL), the job's command and env together at most
# 512 KiB as JSON (non-ASCII characters take 6 bytes there), short fields at most a PATH_MAX.
MAX_ARG_BYTES = (128 << 10) - 1
MAX_JOB_TEXT = 512 << 10
MAX_WORD_BYTES = 4096
LOG_BACKUPS_MAX = 1000              # rotation renames every backup, under the log's lock
HISTORY_DAYS_MAX = 36500
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HOST_GLOB_RE = re.compile(r"[A-Za-z0-9.*?\[\]!_-]+")
TASK_TYPES = ("common", "daemon")

_TAG = "tag:yaml.org,2002:"
STR, INT, BOOL, NULL = _TAG + "str", _TAG + "int", _TAG + "bool", _TAG + "null"
MERGE = _TAG + "merge"
_KINDS = {STR: "a string", INT: "an integer", BOOL: "a boolean", NULL: "empty (null)",
          _TAG + "float": "a number", _TAG + "timestamp": "a date"}


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
    schedule: Schedule | None = field(default=None, compare=False)
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


def default_settings(path):
    """The settings of a file that has no ``settings`` section."""
    path = os.path.abspath(path)
    state_dir = os.path.join(os.path.dirname(path), DEFAULT_STATE_DIR)
    return Settings(path=path, state_dir=state_dir, log_dir=os.path.join(state_dir, "logs"),
                    pidfile=os.path.join(state_dir, "torchcore.pid"))


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


# ---------------------------------------------------------------------------------------------
# Loading


def load(path):
    """Read and validate the task file at ``path``; ConfigError lists every problem found."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such task file (give one with -c FILE or $TORCHCORE_TASKS)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a task file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the task file: {exc.strerror}") from None
    return loads(data, path)


def load_settings(path):
    """The settings of the task file at ``path`` even when its tasks (or some settings) do not
    validate: invalid settings keep their defaults.  Read within the same budget as ``load``
    (this is what ``stop`` and ``status`` find the daemon by); ConfigError (or OSError) when the
    file cannot be read as YAML at all."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: the file is larger than {MAX_FILE_BYTES >> 20} MiB")
    root = _compose(_decode(data, path), path)
    _budget(root, path)
    loader = _Loader(path)
    if not isinstance(root, yaml.MappingNode):
        return default_settings(path)
    try:
        top = loader.mapping(root, "", ("settings", "tasks"))
        return loader.settings(top.get("settings", (None, None))[1])
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None


def loads(text, path="tasks.yaml"):
    """Validate task file contents (str or bytes); ``path`` names the file in messages and anchors
    relative paths in ``settings``."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: the file is larger than {MAX_FILE_BYTES >> 20} MiB; "
                          "a task file is at most that")
    digest = hashlib.sha256(data).hexdigest()
    if not isinstance(text, str):
        text = _decode(data, path)
    root = _compose(text, path)
    _budget(root, path)
    try:
        return _Loader(path).taskfile(root, digest)
    except RecursionError:      # _budget bounds the depth; this is the net under it
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None


def _children(node):
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else ()


def _budget(root, path):
    """ConfigError unless the document, with every alias and merge key expanded, has at most
    MAX_DEPTH levels and ALIAS_GROWTH times its own nodes plus ALIAS_ALLOWANCE.

    Each node is measured once (its expanded size and height are memoized), so a file of
    nested aliases that would expand to billions of nodes is measured, and refused, in
    time linear in its own size.  An alias back into a node being measured counts once.
    """
    if root is None:
        return
    measured = {}           # id(node) -> (expanded size, height, node)
    active = set()
    own = 0                 # nodes as written: every collection and the scalars in it
    stack = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        key = id(node)
        if leaving:
            size, height = 1, 0
            for child in _children(node):
                own += isinstance(child, yaml.ScalarNode)
                child_size, child_height, _ = measured.get(id(child), (1, 1, None))
                size, height = min(size + child_size, 1 << 62), max(height, child_height)
            measured[key] = (size, height + 1, node)
            own += 1
            active.discard(key)
            if height + 1 > MAX_DEPTH:
                raise ConfigError(f"{path}:{_line(node)}: the YAML is nested more than {MAX_DEPTH} "
                                  "levels deep here (aliases and merge keys included)")
        elif key not in measured and key not in active and not isinstance(node, yaml.ScalarNode):
            active.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node)
                         if not isinstance(child, yaml.ScalarNode) and id(child) not in measured)
    limit = ALIAS_GROWTH * own + ALIAS_ALLOWANCE
    if id(root) in measured and measured[id(root)][0] > limit:
        culprit = min((m for m in measured.values() if m[0] > limit), key=lambda m: m[0])
        raise ConfigError(f"{path}:{_line(culprit[2])}: aliases and merge keys here expand the file "
                          f"to more than {limit:,} YAML nodes ({ALIAS_GROWTH} times its own plus "
                          f"{ALIAS_ALLOWANCE:,}); write the repeated parts out or share less")


def _decode(data, path):
    """UTF-8 text of ``data`` (a BOM is dropped); ConfigError naming the line of a bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the file is not valid UTF-8 (byte 0x{data[exc.start]:02x});"
                          " save it as UTF-8") from None


def _compose(text, path):
    """The YAML node tree of ``text``, or ConfigError describing the syntax error and its line."""
    try:
        return yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        lines = text.splitlines()
        if mark and mark.line < len(lines) and lines[mark.line][mark.column:mark.column + 1] == "\t":
            problem = "a tab character here; YAML indents with spaces only"
        else:
            problem = exc.problem or "invalid YAML"
            if exc.context:
                problem = f"{problem} ({exc.context})"
            if "alias" in problem:
                problem += ("; a value that starts with '*' is read as an alias: "
                            "quote it, as in schedule: '*/20 * * * * *'")
        raise ConfigError(f"{path}:{line}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as exc:
        line = text[:exc.position].count("\n") + 1 if isinstance(exc.position, int) else 1
        raise ConfigError(f"{path}:{line}: {exc.reason}: character #x{exc.character:04x}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None


class _Bad(Exception):
    """A problem with one field; ``node`` (if given) is where it is, for the line number."""

    def __init__(self, message, node=None):
        super().__init__(message)
        self.node = node


def _kind(node):
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _KINDS.get(node.tag, "a value")


def _got(node):
    """``got yes (YAML reads it as a boolean)``: what was found, in the user's own spelling."""
    if isinstance(node, yaml.ScalarNode):
        if node.tag == STR:
            return f"got {shown(node.value, 60)!r}"
        if node.tag == NULL:
            return "got nothing (empty)"
        return f"got {shown(node.value, 60)} (YAML reads it as {_kind(node)})"
    return f"got {_kind(node)}"


def want_str(node, what="a string", limit=MAX_ARG_BYTES):
    """The text of a string scalar; other types are an error suggesting quotes where that helps.

    Every string of a task file passes here: a NUL byte (which no exec, path or name can
    hold) and text over ``limit`` bytes of UTF-8 are refused.
    """
    if node.tag == STR and isinstance(node, yaml.ScalarNode):
        value = node.value
        if "\x00" in value:
            raise _Bad(f"a NUL byte (\\0) at character {value.index(chr(0)) + 1}; "
                       "no command, name or path can hold one", node)
        if len(value) > limit // 4 and len(value.encode("utf-8", "surrogatepass")) > limit:
            raise _Bad(f"{len(value.encode('utf-8', 'surrogatepass')):,} bytes long; "
                       f"at most {limit:,} bytes", node)
        return value
    quotable = isinstance(node, yaml.ScalarNode) and node.tag != NULL
    hint = f"; quote it: \"{shown(node.value, 60)}\"" if quotable else ""
    raise _Bad(f"expected {what}, {_got(node)}{hint}", node)


def want_text(node, what="a string"):
    """A non-empty string scalar; integers are taken as written (``[sleep, 10]``, ``PORT: 8080``)."""
    if node.tag == INT and isinstance(node, yaml.ScalarNode):
        return node.value
    value = want_str(node, what)
    if not value.strip():
        raise _Bad(f"expected {what}, got an empty string", node)
    return value


def want_word(node, what):
    """A one-line string (a user, a group, a path, a zone): no control characters, at most
    MAX_WORD_BYTES."""
    value = want_text(node, what) if node.tag == INT else want_str(node, what, MAX_WORD_BYTES)
    bad = _CONTROL.search(value)
    if bad:
        raise _Bad(f"expected {what}, got a control character ({bad.group()!r}) in {shown(value, 60)!r}",
                   node)
    if not value.strip():
        raise _Bad(f"expected {what}, got an empty string", node)
    return value


def want_int(node, minimum, maximum=MAX_COUNT, what="a whole number"):
    """A plain decimal integer in ``minimum``..``maximum`` (ASCII digits, an optional ``+``)."""
    if node.tag != INT or not isinstance(node, yaml.ScalarNode):
        raise _Bad(f"expected {what} >= {minimum}, {_got(node)}", node)
    try:
        value = parse_digits(node.value.removeprefix("+"), maximum)
    except OutOfRange:
        raise _Bad(f"{shown(node.value)} is out of range {minimum}-{maximum}", node) from None
    except ValueError:
        raise _Bad(f"expected {what} >= {minimum}, {_got(node)}", node) from None
    if value < minimum:
        raise _Bad(f"expected {what} >= {minimum}, got {value}", node)
    return value


def want_bool(node):
    if node.tag != BOOL:
        raise _Bad(f"expected true or false, {_got(node)}", node)
    return node.value.lower() in ("true", "yes", "on")


def want_duration(node, minimum=0):
    """Seconds from ``45``, ``45s``, ``15m``, ``2h``, ``1d``, ``1h30m``."""
    if not isinstance(node, yaml.ScalarNode) or node.tag not in (STR, INT):
        raise _Bad(f"expected a duration like 45s, 15m, 2h, 1d or 1h30m, {_got(node)}", node)
    try:
        value = _cached_duration(node.value)
    except ValueError as exc:
        raise _Bad(str(exc), node) from None
    if value < minimum:
        raise _Bad(f"expected a duration of at least {minimum}s, got {node.value}", node)
    return value


_cached_duration = functools.lru_cache(maxsize=1024)(parse_duration)  # tasks repeat their timeouts


def want_size(node):
    """Bytes from ``1048576``, ``512K``, ``512M``, ``2G``."""
    if not isinstance(node, yaml.ScalarNode) or node.tag not in (STR, INT):
        raise _Bad(f"expected a size like 512K, 512M or 2G, {_got(node)}", node)
    try:
        value = parse_size(node.value)
    except ValueError as exc:
        raise _Bad(str(exc), node) from None
    if value <= 0:
        raise _Bad(f"expected a size above 0, got {node.value}", node)
    return value


def want_list(node, what):
    if not isinstance(node, yaml.SequenceNode):
        raise _Bad(f"expected a list of {what}, {_got(node)}", node)
    return node.value


def suggest(key, known):
    """`` (did you mean 'max'?)`` for a misspelt key, or nothing."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _line(node):
    return node.start_mark.line + 1


class _Loader:
    """One load of one file: collects every problem, caches what tasks share (zones, schedules, nets)."""

    def __init__(self, path):
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.problems = []
        self.zones = {}
        self.schedules = {}
        self.networks = {}

    def problem(self, node, where, message):
        self.problems.append((_line(node), f"{self.path}:{_line(node)}: {where}{message}"))

    def mapping(self, node, where, known, seen=()):
        """``{key: (key_node, value_node)}`` of a mapping node, with merge keys (``<<: *defaults``)
        applied; duplicate, non-scalar and unknown keys are reported and left out."""
        pairs = {}
        merged = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE:
                merged.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, where, f"expected a key name, got {_kind(key_node)}")
                continue
            key = key_node.value
            if key in pairs:
                first = _line(pairs[key][0])
                self.problem(key_node, where, f"{key}: duplicate key (first at line {first})")
            elif key not in known:
                self.problem(key_node, where, f"{shown(key, 40)}: unknown key{suggest(key[:100], known)}")
            else:
                pairs[key] = (key_node, value_node)
        for value_node in merged:
            self.merge(value_node, pairs, where, known, seen + (id(node),))
        return pairs

    def merge(self, node, pairs, where, known, seen):
        """Add the keys of a ``<<`` value (a mapping or a list of them) that ``pairs`` lacks;
        ``seen`` holds the mappings being merged into, so an alias to one of them is an error."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                self.problem(source, where, f"<<: expected a mapping to merge, {_got(source)}")
                continue
            if id(source) in seen:
                self.problem(source, where, "<<: a mapping cannot merge itself")
                continue
            for key, value in self.mapping(source, where, known, seen).items():
                pairs.setdefault(key, value)

    def taskfile(self, root, digest):
        """Validate the document; ConfigError if anything at all was wrong."""
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == NULL):
            raise ConfigError(f"{self.path}:1: the file is empty; it needs a 'tasks:' list "
                              "(write 'tasks: []' for a node with no tasks)")
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{self.path}:{_line(root)}: expected a mapping with 'settings' and "
                              f"'tasks' at the top, {_got(root)}")
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
            self.problem(node, "", f"tasks: expected a list of tasks, {_got(node)}{hint}")
            return ()
        tasks, first_line = [], {}
        for number, item in enumerate(node.value, 1):
            name, task = self.task(item, number, settings)
            if name in first_line:
                self.problem(item, f"task '{name}': ",
                             f"name: duplicate task name (first defined at line {first_line[name]})")
            elif name:
                first_line[name] = _line(item)
            if task is not None:
                tasks.append(task)
        return tuple(tasks)

    # -- settings -----------------------------------------------------------------------------

    def settings(self, node):
        """The Settings from the ``settings`` mapping (None: all defaults)."""
        defaults = default_settings(self.path)
        if node is None or node.tag == NULL:
            return defaults
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "", f"settings: expected a mapping, {_got(node)}")
            return defaults
        values = {}
        for key, (_, value_node) in self.mapping(node, "settings: ", SETTINGS_FIELDS).items():
            if value_node.tag == NULL:
                continue
            try:
                values[key] = SETTINGS_FIELDS[key](self, value_node)
            except _Bad as bad:
                self.problem(bad.node or value_node, "settings: ", f"{key}: {bad}")
        state_dir = values.get("state_dir", defaults.state_dir)
        values.setdefault("log_dir", os.path.join(state_dir, "logs"))
        values.setdefault("pidfile", os.path.join(state_dir, "torchcore.pid"))
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
            self.zones[name] = check_zone(name)
        if self.zones[name] is None:
            raise _Bad(f"unknown time zone {name!r}{suggest_zone(name)}", node)
        return name

    # -- tasks --------------------------------------------------------------------------------

    def task(self, node, number, settings):
        """``(name, Task)`` from a task's mapping node; the Task is None if it had problems."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"task #{number}: ",
                         f"expected a mapping with name, command and schedule, {_got(node)}")
            return None, None
        count = len(self.problems)
        name = self.task_name(node, number)
        where = f"task '{name}': " if name else f"task #{number}: "
        pairs = self.mapping(node, where, TASK_FIELDS)
        values = {"name": name, "line": _line(node)}
        for key, (_, value_node) in pairs.items():
            if key == "name" or value_node.tag == NULL:
                continue
            try:
                values[key] = TASK_FIELDS[key](self, value_node)
            except _Bad as bad:
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
        except _Bad as bad:
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
        try:
            values["schedule"] = self.schedule(text, tz)
        except ScheduleError as exc:
            message = str(exc).removeprefix("schedule: ")
            self.problem(pairs["schedule"][1], where, f"schedule: {message}")

    def job_size(self, node, values, settings, where):
        """The command and env, as the launcher is sent them, within MAX_JOB_TEXT."""
        command = values["command"]
        argv = [settings.shell, "-c", command] if isinstance(command, str) else list(command)
        size = len(json.dumps([argv, values.get("env", ())]))
        if size > MAX_JOB_TEXT:
            self.problem(node, where, f"command: the command and env take {size:,} bytes as sent "
                                      f"to a run (non-ASCII characters count 6); at most {MAX_JOB_TEXT:,}")

    def schedule(self, text, tz):
        """A Schedule, shared between tasks with the same text and zone (it is immutable)."""
        key = (text, tz)
        schedule = self.schedules.get(key)
        if schedule is None:
            zone = self.zones.get(tz) if tz else None
            schedule = self.schedules[key] = Schedule(text, zone or tz)
        return schedule

    def network(self, node):
        """An ip_network from ``10.0.0.5``, ``10.0.1.0/24`` or ``2001:db8::/32``."""
        if not isinstance(node, yaml.ScalarNode) or node.tag == NULL:
            raise _Bad(f"expected an IPv4/IPv6 address or CIDR network, {_got(node)}", node)
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
        raise _Bad(f"{shown(text, 60)!r} is not an IPv4/IPv6 address or CIDR network "
                   "(expected e.g. 10.0.0.5, 10.0.1.0/24 or 2001:db8::/32)", node) from None
    raise _Bad(f"{text!r} has host bits set; did you mean {meant}?", node)


def check_zone(name):
    """The ZoneInfo for ``name``, or None if no such zone exists."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None


def suggest_zone(name):
    try:
        return suggest(name, sorted(zoneinfo.available_timezones()))
    except OSError:
        return ""


# -- field parsers: (loader, value node) -> value, or raise _Bad ---------------------------------


def _command(loader, node):
    if isinstance(node, yaml.SequenceNode):
        if not node.value:
            raise _Bad("expected a non-empty list (argv), got an empty list", node)
        return tuple(want_text(item, "a string (an argv item)") for item in node.value)
    return want_text(node, "a string (run by the shell) or a list (argv)")


def _type(loader, node):
    value = want_str(node, "common or daemon")
    if value not in TASK_TYPES:
        raise _Bad(f"expected common or daemon, got {value!r}{suggest(value, TASK_TYPES)}", node)
    return value


def _ips(loader, node):
    items = want_list(node, "IP addresses or CIDR networks, e.g. [10.0.0.5, 10.0.1.0/24]")
    return tuple(loader.network(item) for item in items)


def _hosts(loader, node):
    globs = []
    for item in want_list(node, "hostname globs, e.g. [web-*, db1]"):
        glob = want_str(item, "a hostname glob", MAX_WORD_BYTES)
        if not HOST_GLOB_RE.fullmatch(glob):
            raise _Bad(f"{glob!r} is not a hostname glob (letters, digits, . - _ and * ? [ ])", item)
        globs.append(glob)
    return tuple(globs)


def _env(loader, node):
    if not isinstance(node, yaml.MappingNode):
        raise _Bad(f"expected a mapping of NAME: value, {_got(node)}", node)
    pairs = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str) or not ENV_NAME_RE.fullmatch(key):
            raise _Bad(f"{shown(key, 40)!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                       key_node)
        if key in pairs:
            raise _Bad(f"{key}: duplicate variable", key_node)
        if value_node.tag == NULL:
            pairs[key] = ""
            continue
        try:
            pairs[key] = want_text(value_node) if value_node.tag == INT else want_str(value_node)
        except _Bad as bad:
            raise _Bad(f"{key}: {bad}", value_node) from None
        if len(key) + 1 + len(pairs[key].encode("utf-8", "surrogatepass")) > MAX_ARG_BYTES:
            raise _Bad(f"{key}: {key}=value is longer than {MAX_ARG_BYTES:,} bytes, "
                       "the most one variable can hold", value_node)
    return tuple(sorted(pairs.items()))


def _limits(loader, node):
    if not isinstance(node, yaml.MappingNode):
        raise _Bad(f"expected a mapping with memory, cpu and/or nofile, {_got(node)}", node)
    values = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key not in LIMITS_FIELDS:
            raise _Bad(f"{key}: unknown limit{suggest(str(key), LIMITS_FIELDS)}"
                       " (known: memory, cpu, nofile)", key_node)
        if key in values:
            raise _Bad(f"{key}: duplicate key", key_node)
        if value_node.tag != NULL:
            try:
                values[key] = LIMITS_FIELDS[key](value_node)
            except _Bad as bad:
                raise _Bad(f"{key}: {bad}", bad.node) from None
    return Limits(**values)


def _user(loader, node):
    value = want_word(node, "a user name")
    if value.isascii() and value.isdigit():
        raise _Bad(f"expected a user name, got the number {value}; quote it if it is a name", node)
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
    "schedule": lambda loader, node: want_str(node, "a schedule like '0 30 2 * * *' or '@every 10s'"),
    "max": lambda loader, node: want_int(node, 1),
    "ips": _ips,
    "hosts": _hosts,
    "timeout": lambda loader, node: want_duration(node, 1),
    "kill_grace": lambda loader, node: want_duration(node, 0),
    "env": _env,
    "cwd": _Loader.abspath,
    "user": _user,
    "group": lambda loader, node: want_word(node, "a group name"),
    "inherit_env": lambda loader, node: want_bool(node),
    "enabled": lambda loader, node: want_bool(node),
    "timezone": _Loader.zone,
    "limits": _limits,
}

SETTINGS_FIELDS = {
    "log_dir": _Loader.abspath,
    "state_dir": _Loader.abspath,
    "pidfile": _Loader.abspath,
    "timezone": _Loader.zone,
    "shell": lambda loader, node: want_word(node, "a shell path like /bin/sh"),
    "max_running": lambda loader, node: want_int(node, 1),
    "shutdown_grace": lambda loader, node: want_duration(node, 0),
    "misfire_grace": lambda loader, node: want_duration(node, 0),
    "watch": lambda loader, node: want_bool(node),
    "log_max_bytes": lambda loader, node: want_size(node),
    "log_backups": lambda loader, node: want_int(node, 0, LOG_BACKUPS_MAX),
    "history_days": lambda loader, node: want_int(node, 1, HISTORY_DAYS_MAX),
}


# ---------------------------------------------------------------------------------------------
# Checks that depend on the node


def node_problems(taskfile, node, euid=None):
    """Problems that only show on ``node``: for each enabled task that runs here, an unknown user or
    group, or a user/group switch that needs root while torchcore does not run as root."""
    euid = os.geteuid() if euid is None else euid
    me = _user_name(euid)
    problems = []
    for task in taskfile.local_tasks(node):
        where = f"{taskfile.path}:{task.line}: task '{task.name}': "
        if task.user:
            problem = _user_problem(task.user, euid, me, node)
            if problem:
                problems.append(f"{where}user: {problem}")
        if task.group:
            problem = _group_problem(task.group, euid, node)
            if problem:
                problems.append(f"{where}group: {problem}")
    return problems


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user_problem(user, euid, me, node):
    try:
        pwd.getpwnam(user)
    except KeyError:
        return f"no user {user!r} on this node ({node.hostname})"
    if euid != 0 and user != me:
        return f"running as {user!r} needs root, and torchcore runs as {me!r} here"
    return None


def _group_problem(group, euid, node):
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return f"no group {group!r} on this node ({node.hostname})"
    if euid != 0 and gid != os.getegid():
        return f"switching to group {group!r} needs root, and torchcore does not run as root here"
    return None
