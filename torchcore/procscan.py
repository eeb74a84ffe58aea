"""Finding the executors a killed supervisor left running, with or without their pid on record.

A run's record gets its executor's pid only once its launcher has answered (forked): a
supervisor killed before that leaves an open record without a pid while the executor lives
on, and a recorded pid may be another process's by the time a new supervisor looks.  So every
executor carries two signs of its own:

- its title, ``torchcore: TASK [run ID]`` (executor.py): its task and its run id;
- its daemon's mark: the state directory, held open as a descriptor for the executor's whole
  life (inherited from its launcher, or from the supervisor that forked it; never by its
  command).  Another daemon's executors hold their own state directory; another user's
  descriptors cannot be read, so their processes are passed over.

A new supervisor looks for the executor of each open run (``find``): at the recorded pid
first (the executor's own, or the command's whose parent is the executor), then, for the runs
not found there, by one pass over /proc.  That pass reads each process's command line only,
and looks further (owner, descriptors, start time) at the few titled as one of those runs; it
is made only when some open run was not found at its pid, or when the supervisor asks for its
executors of runs with no record at all (``strays``: run ids were not given back, adopt.py).  A process is an open run's
executor when its title names that run, it belongs to this user, it holds this daemon's mark,
and, found by the scan, it started no earlier than EARLIEST before its record's start (a
prepared run's executor is forked ahead of its start; process start times are coarse).  At
the recorded pid its start time is not compared: a wall clock set back since the run's start
would make its executor look older than its record.  At the recorded pid, an
executor with no mark at all (one started by a torchcore before marks) is taken as before, by
its title; one with another daemon's mark never is.  ``match`` decides, on what was read.
"""

import dataclasses
import os
import re
import stat
import time

import psutil

LAUNCHER = "torchcore: launcher"        # a launcher's title (launcher.py)
LAUNCHERS_WAIT = 5.0        # seconds a new supervisor waits for a killed one's launchers to end
EARLIEST = 60.0             # seconds an executor may have started before its run's recorded start
PREFIX = b"torchcore: "
_TITLE = re.compile(r"torchcore: (.*) \[run (\d+)\]\Z", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Proc:
    """What was read of one process titled as an executor."""

    pid: int
    ppid: int
    uid: int                    # effective
    title: str
    marks: frozenset            # (st_dev, st_ino) of each directory it holds open
    created: float              # epoch seconds


def executor_title(task, run_id):
    """The title an executor of run ``run_id`` of ``task`` sets (executor.py)."""
    return f"torchcore: {task} [run {run_id}]"


def parse_title(title):
    """(task, run id) of an executor's title, or None."""
    found = _TITLE.match(title)
    return (found.group(1), int(found.group(2))) if found else None


def mark_of(fd):
    """The mark of the state directory open as ``fd``: its (st_dev, st_ino)."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def open_mark(state_dir):
    """The state directory opened as a daemon's mark (close-on-exec); returns the descriptor."""
    return os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def match(wanted, procs, mark, uid, unmarked=False):
    """{run id: pid} for the runs of ``wanted`` ({run id: (task, recorded start)}) whose executor
    is among ``procs``: titled as that run, of user ``uid``, holding ``mark`` (or, with
    ``unmarked``, holding none), started no earlier than EARLIEST before its recorded start.
    Of several (a command forked by the executor has its title until it execs), one holding
    the mark, then one whose parent is not among them, then the oldest."""
    found = {}
    for proc in procs:
        named = parse_title(proc.title)
        if named is None or named[1] not in wanted:
            continue
        task, started = wanted[named[1]]
        if named[0] != task or proc.uid != uid:
            continue
        if not (mark is not None and mark in proc.marks or unmarked and not proc.marks):
            continue
        if started is not None and proc.created < started - EARLIEST:
            continue
        found.setdefault(named[1], []).append(proc)
    chosen = {}
    for run_id, procs in found.items():
        pids = {proc.pid for proc in procs}
        best = min(procs, key=lambda p: (mark not in p.marks, p.ppid in pids, p.created, p.pid))
        chosen[run_id] = best.pid
    return chosen


def find(records, mark, uid=None, strays=False):
    """({run id: executor pid} for the open ``records`` (RunRecords) whose executor lives,
    {run id: Proc} of this daemon's other live executors): the second looked for only with
    ``strays`` (runs whose start may not have reached the records), in the same pass."""
    uid = os.geteuid() if uid is None else uid
    wanted = {r.run_id: (r.task, r.started) for r in records}
    found = {}
    for record in records:
        if isinstance(record.pid, int) and record.pid > 0:    # else (damaged records) by the scan
            # No start time check here: the pid and the title (its run id) name the run, and
            # the wall clock may have been set back since its start was recorded.
            procs = [p for p in map(read, _self_and_parent(record.pid)) if p is not None]
            found.update(match({record.run_id: (record.task, None)}, procs, mark, uid,
                               unmarked=True))
    rest = {run_id: item for run_id, item in wanted.items() if run_id not in found}
    others = {}
    if rest or strays:
        procs = scan(None if strays else rest)
        found.update(match(rest, procs, mark, uid))
        if strays:
            ours = [proc for proc in procs if proc.uid == uid and mark in proc.marks]
            unknown = {run_id: (task, None) for task, run_id in
                       (parse_title(proc.title) for proc in ours) if run_id not in wanted}
            by_pid = {proc.pid: proc for proc in ours}
            others = {run_id: by_pid[pid] for run_id, pid in match(unknown, ours, mark, uid).items()}
    return found, others


def old_launchers(mark, uid=None):
    """The pids of a killed supervisor's launchers still alive: titled as a launcher, of this
    user, holding this daemon's mark, and not this process's own.  A launcher forks the jobs
    it has read before it sees its supervisor gone: held up (a machine short of memory when
    the OOM killer strikes), it may fork an executor after the next supervisor has looked."""
    uid = os.geteuid() if uid is None else uid
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or not _is_launcher(int(name)):
            continue
        try:
            proc = psutil.Process(int(name))
            with proc.oneshot():
                ppid, owner = proc.ppid(), proc.uids().effective
            marks = _marks(int(name))
        except (psutil.Error, OSError):
            continue
        if owner == uid and mark in marks and ppid != os.getpid():
            found.append(int(name))
    return found


def wait_for_old_launchers(mark, timeout=LAUNCHERS_WAIT, sleep=time.sleep, clock=time.monotonic):
    """Wait (``timeout`` at most) until no launcher of a killed supervisor is left, so every
    executor it forks is there to be found; returns the pids of those still left."""
    deadline = clock() + timeout
    while True:
        left = old_launchers(mark)
        if not left or clock() >= deadline:
            return left
        sleep(0.05)


def scan(wanted):
    """The processes titled as an executor of one of ``wanted``'s run ids (None: of any run),
    read (one pass over /proc; another user's, or one that ends meanwhile, passed over)."""
    procs = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return procs
    for name in names:
        if not name.isdigit():
            continue
        title = _title(int(name))
        if title is None:
            continue
        named = parse_title(title)
        if named is not None and (wanted is None or named[1] in wanted):
            proc = read(int(name), title)
            if proc is not None:
                procs.append(proc)
    return procs


def read(pid, title=None):
    """A Proc of ``pid`` if it is titled as an executor and can be read whole, else None."""
    title = title if title is not None else _title(pid)
    if title is None:
        return None
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            ppid, uid, created = proc.ppid(), proc.uids().effective, proc.create_time()
        marks = _marks(pid)
    except (psutil.Error, OSError):
        return None         # gone meanwhile, or another user's (its descriptors are not ours to read)
    return Proc(pid, ppid, uid, title, marks, created)


def _title(pid):
    """The process title (its command line, setproctitle's padding dropped) if it begins as an
    executor's, else None."""
    try:
        fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC)   # a third of open()'s cost
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not data.startswith(PREFIX):
        return None
    return " ".join(part for part in data.decode("utf-8", "replace").split("\0") if part)


def _is_launcher(pid):
    """Is ``pid`` titled as a launcher, or one that has not set its title yet (it has read no
    job then, but will)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            parts = [part for part in handle.read(4096).split(b"\0") if part]
    except OSError:
        return False
    return parts == [LAUNCHER.encode()] or parts[1:3] == [b"-m", b"torchcore.launcher"]


def _marks(pid):
    """The (st_dev, st_ino) of each directory ``pid`` holds open (PermissionError: not ours)."""
    marks = set()
    folder = f"/proc/{pid}/fd"
    for fd in os.listdir(folder):
        try:
            st = os.stat(f"{folder}/{fd}")
        except OSError:
            continue        # closed meanwhile, or a descriptor of no file (a socket's is one)
        if stat.S_ISDIR(st.st_mode):
            marks.add((st.st_dev, st.st_ino))
    return frozenset(marks)


def _self_and_parent(pid):
    """A recorded pid: the executor's own, or its command's (the executor is its parent)."""
    try:
        return [pid, psutil.Process(pid).ppid()]
    except psutil.Error:
        return [pid]
