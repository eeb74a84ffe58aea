"""Loading a big task file on two cores: its ``tasks:`` list parsed in two halves at once.

The loading child (loadchild.py) cuts the text of a big file at the start of a top-level item
of its ``tasks:`` list near the middle.  The first half (the settings, ``tasks:`` and the first
items) is parsed and validated here; a forked worker parses the second half at the same time,
as a document of its own whose lines are the file's (``tasks:`` on the line before the cut,
blank lines above it), and validates it with the first half's settings.  Each half gives its
``Part``: the node's task records and the rest a verdict, a stream and the load cache need.

This is only ever a faster way to the same accepted file: whenever anything is not plain
(a file whose shape the cut cannot vouch for, an alias, a problem of any kind, a name in
both halves, a worker that fails or has not answered by its deadline), ``load`` returns
None and the file is loaded in one piece as always, which gives every message exactly as
before.  A file is cut only where:

- its lines break with ``\\n`` alone and it has no directive or document marker;
- one line is ``tasks:`` at the margin (a comment may follow), the last top-level key:
  no other line after it starts at the margin, but for items of an unindented list;
- the cut is a line of ``-`` at the items' indentation; and both halves must then parse to
  what that promises (the list where it was expected, the second half's first item on
  the cut line).

A line of the first half cannot run on past the cut (a quoted or flow scalar left open there
does not parse as a document's end, and block text stops at a less indented line), and the
second half starts in the state its synthetic ``tasks:`` gives, the one the file had there.
"""

import os
import pickle
import re
import select
import signal
import time
from types import SimpleNamespace

import yaml

from torchcore import tasktable, yamlread
from torchcore.taskspec import TaskFile
from torchcore.validate import Loader

SPLIT_MIN_BYTES = 512 << 10     # smaller files parse in a fraction of a second: one piece
WORKER_GRACE = 10               # seconds the worker may take beyond 3x the first half's time
_TASKS_LINE = re.compile(r"\ntasks:[ \t]*(?:#[^\n]*)?(?=\n)")
_MARKERS = re.compile(r"\n(?:%|---|\.\.\.)")
_ODD_BREAKS = ("\r", "\x85", "\u2028", "\u2029")
_FIRST_ITEM = re.compile(r"(?:\n[ \t]*(?:#[^\n]*)?(?=\n))*\n( *)-(?=[ \n])")  # blanks, comments
_MARGIN = re.compile(r"\n[^ \n#]")
_MARGIN_UNINDENTED = re.compile(r"\n[^ \n#-]")


class Part:
    """What one half (or a whole file loaded in one piece) gives, in file order."""

    def __init__(self, local=(), others=(), switches=(), zones=(), notifier=False, names=()):
        self.local = list(local)        # (name, record) of the tasks that run on the node
        self.others = list(others)      # (name, why it does not run here)
        self.switches = list(switches)  # (line, name, user, group) of the local ones that switch
        self.zones = set(zones)         # every task's time zone
        self.notifier = notifier        # a local task asks for the notifier
        self.names = list(names)        # every task's name

    @classmethod
    def of_tasks(cls, path, settings, tasks, node):
        taskfile = TaskFile(path=path, settings=settings, tasks=tuple(tasks), digest="")
        local = taskfile.local_tasks(node)
        here = {task.name for task in local}
        return cls(local=[(task.name, tasktable.record(task)) for task in local],
                   others=[(task.name, tasktable.not_here(task)) for task in taskfile.tasks
                           if task.name not in here],
                   switches=[(task.line, task.name, task.user, task.group) for task in local
                             if task.user or task.group],
                   zones={task.timezone for task in taskfile.tasks if task.timezone},
                   notifier=tasktable.asks_for_notifier(    # the node's tasks, found above
                       SimpleNamespace(tasks=local, settings=settings), None),
                   names=[task.name for task in taskfile.tasks])

    def joined(self, other):
        return Part(self.local + other.local, self.others + other.others,
                    self.switches + other.switches, self.zones | other.zones,
                    self.notifier or other.notifier, self.names + other.names)

    def checks(self, settings):
        """What the load cache checks again on a hit (loadcache.still_valid): every zone
        named, and the node's tasks that switch user or group as (line, name, user, group)."""
        return {"zones": sorted(self.zones | {settings.timezone} - {None}),
                "switches": [tuple(item) for item in self.switches]}

    def dump(self):
        return pickle.dumps((self.local, self.others, self.switches, sorted(self.zones),
                             self.notifier, self.names), pickle.HIGHEST_PROTOCOL)

    @classmethod
    def load(cls, data):
        return cls(*pickle.loads(data))


def cut(text, min_bytes=SPLIT_MIN_BYTES):
    """(the ``tasks:`` line, the cut's offset, its line, the items' indentation), or None
    when the text is not cut (see the module docstring)."""
    if len(text) < min_bytes or any(ch in text for ch in _ODD_BREAKS):
        return None
    lines = "\n" + text        # every line starts after a \n: the searches below look for
    if _MARKERS.search(lines):  # one (a literal first: fast), offsets one past the text's
        return None
    found = list(_TASKS_LINE.finditer(lines))
    if len(found) != 1:
        return None
    body = found[0].end()       # the \n that ends the tasks: line
    first = _FIRST_ITEM.match(lines, body)
    if first is None:
        return None
    indent = len(first.group(1))
    if (_MARGIN_UNINDENTED if indent == 0 else _MARGIN).search(lines, body):
        return None             # another top-level line after the list: not cut
    item = re.compile(rf"\n {{{indent}}}-(?=[ \n])")
    at = item.search(lines, max(first.end() - 1, body + (len(lines) - body) // 2))
    if at is None:
        return None
    tasks_line = text.count("\n", 0, found[0].start())
    return tasks_line, at.start(), text.count("\n", 0, at.start()), indent


def load(path, node, text, min_bytes=SPLIT_MIN_BYTES):
    """(settings, Part) of an accepted file whose text ``text`` was loaded in two halves at
    once; None when it was not (the caller loads it in one piece)."""
    where = cut(text, min_bytes) if _cores() > 1 else None
    if where is None:
        return None
    tasks_line, offset, line, indent = where
    second = "\n" * (line - 1) + "tasks:\n" + text[offset:]
    fds = []
    try:
        fds.extend(os.pipe())
        fds.extend(os.pipe())
        pid = os.fork()
    except OSError:                                 # no worker (a process or descriptor
        for fd in fds:                              # limit): one piece, nothing left open
            os.close(fd)
        return None
    settings_r, settings_w, result_r, result_w = fds
    if pid == 0:                                    # the worker: the second half
        code = 1
        try:
            os.close(settings_w)
            os.close(result_r)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)                     # the stream is the first half's to write
            _die_with_parent()
            part = _second(path, node, second, line, indent, settings_r)
            _write_all(result_w, b"" if part is None else part.dump())
            code = 0
        finally:
            os._exit(code)
    os.close(settings_r)
    os.close(result_w)
    loaded = None
    try:
        loaded = _first(path, node, text[:offset], tasks_line, settings_w, result_r)
        return loaded
    finally:
        for fd in (settings_w, result_r):
            try:
                os.close(fd)
            except OSError:
                pass
        if loaded is None:
            os.kill(pid, signal.SIGKILL)            # its half is of no use now
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _first(path, node, text, tasks_line, settings_w, result_r):
    """The first half, validated here while the worker parses the second; both parts joined."""
    began = time.monotonic()
    root = _document(text, path)
    if root is None:
        return None
    loader = Loader(path)
    top = loader.mapping(root, "", ("settings", "tasks"))
    settings = loader.settings(top.get("settings", (None, None))[1])
    pair = top.get("tasks")
    if loader.problems or pair is None or root.value[-1][0] is not pair[0] or \
            not _plain_key(pair[0], tasks_line) or not _block_list(pair[1]):
        return None
    sent = pickle.dumps(settings, pickle.HIGHEST_PROTOCOL)
    now = time.monotonic()      # settings bigger than a pipe holds: not waited for forever
    try:
        if not _write_all(settings_w, len(sent).to_bytes(8, "big") + sent,
                          deadline=now + 3 * (now - began) + WORKER_GRACE):
            return None                             # the worker did not take them in time
    except OSError:
        return None                                 # the worker gave its half up
    tasks = _tasks(loader, root, pair, settings)
    if tasks is None:
        return None
    first = Part.of_tasks(path, settings, tasks, node)
    now = time.monotonic()      # a worker stopped or stuck is given up, not waited for
    data = _read_all(result_r, deadline=now + 3 * (now - began) + WORKER_GRACE)
    if not data:
        return None
    second = Part.load(data)
    if not set(first.names).isdisjoint(second.names):
        return None                                 # a name in both halves: the one-piece
    return settings, first.joined(second)           # load says where


def _second(path, node, text, line, indent, settings_r):
    """The worker's half: its Part, or None (anything not plain)."""
    root = _document(text, path)
    if root is None:
        return None
    data = _read_all(settings_r, 8)
    data = _read_all(settings_r, int.from_bytes(data, "big")) if len(data) == 8 else b""
    if not data:
        return None                                 # the first half is not plain
    settings = pickle.loads(data)
    if not isinstance(root, yaml.MappingNode) or len(root.value) != 1:
        return None
    key, value = root.value[0]
    if not _plain_key(key, line - 1) or not _block_list(value) or \
            (value.start_mark.line, value.start_mark.column) != (line, indent):
        return None
    loader = Loader(path)
    tasks = _tasks(loader, root, (key, value), settings)
    return None if tasks is None else Part.of_tasks(path, settings, tasks, node)


def _cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _die_with_parent():
    """The worker is killed when the loading child dies (a reload given up kills it): its
    half is of use to nobody else.  Best effort (Linux prctl; nothing elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (ImportError, OSError, AttributeError):
        pass


_PR_SET_PDEATHSIG = 1


def _document(text, path):
    """The node tree of one half, or None if it does not parse, is over the budget, or has
    an alias to a collection (a half's budget is not the whole file's then)."""
    try:
        root, shared = yamlread.compose_checked(text, path)
    except Exception:
        return None
    return root if isinstance(root, yaml.MappingNode) and not shared else None


def _tasks(loader, root, pair, settings):
    try:
        tasks = loader.tasks(root, pair, settings)
    except RecursionError:
        return None
    return None if loader.problems else tasks


def _plain_key(node, line):
    return isinstance(node, yaml.ScalarNode) and node.tag == yamlread.STR and \
        not node.style and node.value == "tasks" and \
        (node.start_mark.line, node.start_mark.column) == (line, 0)


def _block_list(node):
    return isinstance(node, yaml.SequenceNode) and not node.flow_style and bool(node.value)


def _write_all(fd, data, deadline=None):
    """Write all of ``data``; False if ``fd`` (blocking) cannot take it all by ``deadline``
    (monotonic), in which case what was written is of no use to the reader."""
    view = memoryview(data)
    poller = None
    while view:
        if deadline is not None:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
            if not poller.poll(max(0, deadline - time.monotonic()) * 1000):
                return False
            view = view[os.write(fd, view[:select.PIPE_BUF]):]  # a pipe taking PIPE_BUF
            continue                                             # does not block
        view = view[os.write(fd, view):]
    return True


def _read_all(fd, size=None, deadline=None):
    """What ``fd`` gives up to its end (or ``size`` bytes, or fewer if it ends first); None
    if it has not ended by ``deadline`` (monotonic)."""
    chunks, got = [], 0
    poller = None
    while size is None or got < size:
        if deadline is not None:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
            if not poller.poll(max(0, deadline - time.monotonic()) * 1000):
                return None
        chunk = os.read(fd, 1 << 20 if size is None else min(1 << 20, size - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
