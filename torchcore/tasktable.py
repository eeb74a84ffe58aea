"""The supervisor's tasks in compact form: one bytes record per task, decoded on demand.

A loaded task file costs the supervisor no per-task objects beyond a name and one record:
``record(task)`` packs a validated Task (all its compared fields, its compiled schedule's bit
masks, its kind) into a few hundred bytes with ``marshal`` (version 2: no back-references, so
equal tasks give equal bytes).  The record is the task's digest: a reload recognises an
unchanged task by comparing two records, without decoding either.  ``TaskTable[name]``
decodes a Task when one is needed (a start, a status); ``schedule_of`` gives the planner a
Schedule built from the masks, without parsing the text again.

``Loaded`` is what the supervisor keeps of the whole file: path, settings, digest, the node's
TaskTable, and for the file's other tasks only why they do not run here (for ``run``).
"""

import functools
import ipaddress
import marshal
from collections.abc import Mapping
from types import SimpleNamespace
from zoneinfo import ZoneInfo

from torchcore import textfmt
from torchcore.config import Limits, Task
from torchcore.schedule import Schedule

TIMED, REBOOT, DAEMON = 0, 1, 2     # a record's kind: on the planner's table, @reboot, daemon
MARSHAL_VERSION = 2                 # no references: the bytes depend on the values alone
_RUN_ONCE = marshal.dumps("once", MARSHAL_VERSION)[1:]     # how a record ends for `run: once`
_RECORD_HEAD = marshal.dumps((0, None, None), MARSHAL_VERSION)[:6]     # a tuple of 3, an int


def record(task):
    """The compact record of a validated Task (its ``line`` and ``enabled`` left out: a task
    moved in the file, or the node's tasks, which are all enabled, are the same task)."""
    schedule = task.schedule
    if task.type == "daemon" or schedule is None:
        kind, spec = DAEMON, None
    elif schedule.is_reboot:
        kind, spec = REBOOT, None
    else:
        kind, spec = TIMED, tuple(schedule._spec)
    limits = task.limits
    fields = (task.description, task.command, task.type, task.schedule_text, task.max,
              tuple(str(network) for network in task.ips), task.hosts, task.timeout,
              task.kill_grace, task.env, task.cwd, task.user, task.group, task.inherit_env,
              task.timezone, (limits.memory, limits.cpu, limits.nofile), task.on_node_loss,
              task.run)                 # run last: see _RUN_ONCE
    return marshal.dumps((kind, spec, fields), MARSHAL_VERSION)


def kind_of(data):
    """The kind of a record (TIMED, REBOOT or DAEMON) without decoding the rest: a record
    starts with its tuple of three, then the kind as a 4-byte int (marshal's layout)."""
    if data[:6] == _RECORD_HEAD and data[7:10] == b"\0\0\0":
        return data[6]
    return marshal.loads(data)[0]


def decode(name, data):
    """The Task of a record (``line`` 0: the supervisor never reports lines)."""
    _, spec, f = marshal.loads(data)
    schedule = None
    if f[3] is not None:
        schedule = _schedule(f[3], f[14], spec)
    return Task(name=name, description=f[0], command=f[1], type=f[2], schedule_text=f[3],
                schedule=schedule, max=f[4], ips=tuple(_network(text) for text in f[5]),
                hosts=f[6], timeout=f[7], kill_grace=f[8], env=f[9], cwd=f[10], user=f[11],
                group=f[12], inherit_env=f[13], timezone=f[14], limits=Limits(*f[15]),
                on_node_loss=f[16], run=f[17])


def schedule_of(data):
    """The Schedule of a record on the planner's table, or None (a daemon, @reboot)."""
    kind, spec, f = marshal.loads(data)
    if kind != TIMED:
        return None
    return _schedule(f[3], f[14], spec)


def _schedule(text, zone, spec):
    """The Schedule of a record's fields; one object for the records that share them (a
    Schedule is immutable, and a fleet's files repeat their schedules)."""
    key = (text, zone, spec)
    schedule = _SCHEDULES.get(key)
    if schedule is None:
        tz = _zone(zone) if zone else None
        schedule = Schedule(text, tz) if spec is None else Schedule(text, tz, compiled=spec)
        if len(_SCHEDULES) >= SCHEDULES_KEPT:
            _SCHEDULES.clear()
        _SCHEDULES[key] = schedule
    return schedule


SCHEDULES_KEPT = 256            # distinct schedules kept built (a dict, emptied when full)
_SCHEDULES = {}


@functools.cache
def _zone(name):
    return ZoneInfo(name)


@functools.lru_cache(maxsize=4096)
def _network(text):
    return ipaddress.ip_network(text)


class TaskTable(Mapping):
    """name -> Task of the node's tasks, kept as records (see the module docstring).

    ``reboot`` and ``daemons`` hold the names of those kinds, so nothing walks every record
    to find them."""

    CACHED = 1024           # decoded Tasks kept (the tasks starting often): then forgotten

    def __init__(self, records=None):
        self.records = {}
        self._decoded = {}
        self.reboot = set()
        self.daemons = set()
        self.once = set()       # `run: once` tasks: claimed in the fleet database (claims.py)
        for name, data in (records or {}).items():
            self.put(name, data)

    @classmethod
    def of_tasks(cls, tasks):
        table = cls()
        for task in tasks:
            table.put(task.name, record(task))
        return table

    def put(self, name, data, kind=None):
        self.records[name] = data
        self._decoded.pop(name, None)
        kind = kind_of(data) if kind is None else kind
        if kind == REBOOT:
            self.reboot.add(name)
        elif kind == DAEMON:
            self.daemons.add(name)
        if data.endswith(_RUN_ONCE):    # the record's last field, read without decoding it
            self.once.add(name)
        else:
            self.once.discard(name)

    def __getitem__(self, name):
        task = self._decoded.get(name)
        if task is None:
            task = decode(name, self.records[name])
            if len(self._decoded) >= self.CACHED:
                self._decoded.clear()
            self._decoded[name] = task
        return task

    def __contains__(self, name):
        return name in self.records

    def __iter__(self):
        return iter(self.records)

    def __len__(self):
        return len(self.records)

    def schedule_of(self, name):
        return schedule_of(self.records[name])

    def brief(self, name):
        """(type, schedule text, time zone) of a task, for status, without building it."""
        _, _, f = marshal.loads(self.records[name])
        return f[2], f[3], f[14]

    def entry(self, name):
        """What the planner's reschedule reads of a task: name, type and schedule."""
        data = self.records.get(name)
        if data is None:
            return None
        kind, spec, f = marshal.loads(data)
        schedule = _schedule(f[3], f[14], spec) if kind == TIMED else None
        return Entry(name, "daemon" if kind == DAEMON else f[2], schedule, kind == REBOOT)


class Entry:
    """A task as Planner.reschedule sees it (a daemon or @reboot task has no seconds)."""

    __slots__ = ("name", "schedule", "type")

    def __init__(self, name, type_, schedule, reboot=False):
        self.name, self.type = name, type_
        self.schedule = schedule if schedule is not None else _NO_SECONDS if reboot else None


class _Reboot:
    is_reboot = True


_NO_SECONDS = _Reboot()


class Entries(Mapping):
    """A TaskTable seen as name -> Entry (the ``old_tasks`` of Planner.reschedule)."""

    def __init__(self, table):
        self.table = table

    def __getitem__(self, name):
        entry = self.table.entry(name)
        if entry is None:
            raise KeyError(name)
        return entry

    def __iter__(self):
        return iter(self.table)

    def __len__(self):
        return len(self.table)


class Loaded:
    """The running task file as the supervisor keeps it (see the module docstring)."""

    def __init__(self, path, settings, digest, table, others=None, notifier=False):
        self.path = path
        self.settings = settings
        self.digest = digest
        self.table = table
        self.others = others or {}      # name -> why it does not run here
        self.notifier = notifier        # a task of the node names a notify target or a ping
        self.cached = False             # streamed from the load cache (loadcache.py), not parsed

    @classmethod
    def of_taskfile(cls, taskfile, node):
        """The compact form of a TaskFile loaded in this process, for ``node``."""
        local = taskfile.local_tasks(node)
        here = {task.name for task in local}
        others = {task.name: not_here(task) for task in taskfile.tasks if task.name not in here}
        return cls(taskfile.path, taskfile.settings, taskfile.digest,
                   TaskTable.of_tasks(local), others, asks_for_notifier(taskfile, node))

    def local_tasks(self, node):
        """What the services ask of the node's tasks (notifyspec.asks_for_notifier: whether one
        names a notify target or a ping), which the loading child answered: a stand-in for such
        a task, or none.  The tasks themselves are the records (``table``)."""
        return (_ASKS_FOR_NOTIFIER,) if self.notifier else ()

    @property
    def tasks(self):
        return self.local_tasks(None)

    def names(self):
        """Every task name of the file, this node's and the others."""
        return set(self.table) | set(self.others)

    def not_here(self, name):
        return self.others[name]


def asks_for_notifier(taskfile, node):
    """notifyspec.asks_for_notifier of a whole TaskFile, for Loaded (False without it)."""
    try:
        from torchcore import notifyspec
    except ImportError:
        return False
    return bool(notifyspec.asks_for_notifier(taskfile, node))


_ASKS_FOR_NOTIFIER = SimpleNamespace(name="", enabled=True, notify=("a target",), ping=None)


def not_here(task):
    """Why a task of the file does not run on this node (``run`` says so)."""
    if not task.enabled:
        return "is disabled"
    return f"does not run on this node (it runs on {textfmt.targets_text(task)})"
