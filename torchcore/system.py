"""What the supervisor asks of the operating system, behind one object tests can replace.

Forking an executor, signalling and reaping processes, starting launchers, telling a live
executor by its title (and finding one by its title and mark: procscan.py), the clocks and the core count: the supervisor makes these calls only
through a ``System``, so the tests give it one whose children are make-believe
(tests/supervisor_harness.py) and drive the real decisions on a fake clock.
"""

import logging
import os
import select
import time

import psutil
import setproctitle

from torchcore import executor, loadchild, procscan
from torchcore.clock import SystemClock
from torchcore.launcher import Launcher

log = logging.getLogger("torchcore")


class System:
    """The real calls."""

    def __init__(self, clock=None):
        self.clock = clock or SystemClock()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        self.launcher_count = max(1, min(4, os.cpu_count() or 1))  # one per core, four at most

    def nap(self, seconds, wake_fds):
        """Sleep ``seconds`` unless one of ``wake_fds`` becomes readable first (a signal, a
        control request); returns the seconds slept.  Only on the real clock: on another
        (a test's), time passes as that clock says, so a nap is none."""
        if type(self.clock) is not SystemClock or seconds <= 0:
            return 0.0
        began = time.monotonic()
        try:
            select.select(wake_fds, [], [], seconds)
        except (OSError, ValueError):
            pass
        return time.monotonic() - began

    def fork_executor(self, job, report_w):
        """Fork ``job``'s executor here (no launcher takes it); returns its pid."""
        pid = os.fork()
        if pid == 0:
            executor.execute(job, report_w, mark_fd=self.mark_fd)
        return pid

    def kill(self, pid, signum):
        """os.kill that ignores a process already gone (a negative pid is a process group)."""
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def waitpid(self):
        """One exited child as (pid, status); (0, 0) when none has exited (or there is none)."""
        try:
            return os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0, 0

    loads_in_child = True       # reloads parse the file in a child (see reloading.py)

    def spawn_loader(self, path, node, stderr, spare=False):
        """Start a process loading the task file (see loadchild.spawn)."""
        return loadchild.spawn(path, node, stderr, spare)

    def start_launcher(self, report_w, stderr):
        return Launcher(report_w, stderr=stderr, mark_fd=self.mark_fd)

    def set_title(self, title):
        setproctitle.setproctitle(title)

    def is_executor(self, pid, task, run_id):
        """Is ``pid`` a live executor of that run (its title says so)?"""
        try:
            proc = psutil.Process(pid)
            title = " ".join(part for part in proc.cmdline() if part)   # setproctitle pads
            return proc.status() != psutil.STATUS_ZOMBIE and \
                title == f"torchcore: {task} [run {run_id}]"
        except psutil.Error:
            return False

    mark_fd = None      # the state directory, open: every executor holds it (see procscan)

    def hold_mark(self, state_dir):
        """Open the daemon's mark, handed to every launcher and executor from now on."""
        self.release_mark()
        self.mark_fd = procscan.open_mark(state_dir)

    def release_mark(self):
        if self.mark_fd is not None:
            os.close(self.mark_fd)
            self.mark_fd = None

    def executors_of(self, records, strays=False):
        """({run id: pid} of the open runs' ``records`` whose executor still lives, found at
        their recorded pid or, failing that, by their title and this daemon's mark; {run id:
        procscan.Proc} of this daemon's executors of other runs, looked for with ``strays``)."""
        mark = procscan.mark_of(self.mark_fd) if self.mark_fd is not None else None
        if mark is not None:        # a killed supervisor's launcher may still fork an executor
            for pid in procscan.wait_for_old_launchers(mark):
                log.warning("a previous supervisor's launcher (pid %d) still runs after %gs: an "
                            "executor it forks from now on is not adopted", pid,
                            procscan.LAUNCHERS_WAIT)
        return procscan.find(records, mark, strays=strays)

    def command_group(self, executor_pid):
        """The process group of an executor's command (its child in a group of its own), or None."""
        try:
            for child in psutil.Process(executor_pid).children():
                group = os.getpgid(child.pid)
                if group == child.pid and group != os.getpgrp():
                    return group
        except (psutil.Error, OSError):
            pass
        return None
