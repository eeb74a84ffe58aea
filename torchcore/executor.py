"""What a forked child does for one run: the executor loop.

A launcher (or, in tests, the supervisor) forks; the child calls ``execute(job, report_fd)``
and never returns into its parent's code.  It renames itself for `ps`, drops the parent's
signal handlers and descriptors, starts the command in its own process group (spawn.py), copies
the output into the task's log, enforces the timeout and the memory limit, and reports as wire
messages on the shared report pipe (writes below PIPE_BUF are atomic, so every executor shares
one pipe).  If the supervisor is gone, it writes its own record.  The job itself, its
environment, credentials and limits: jobspec.py.
"""

import errno
import os
import resource
import select
import selectors
import signal
import sys
import time

from torchcore import proctitle, tasklog, wire
from torchcore.jobspec import credentials, limit_setter, task_environment
from torchcore.outcome import RunResult, split_returncode
from torchcore.spawn import PopenCommand, SpawnedCommand, gate_usable

MEMORY_SAMPLE_EVERY = 0.5   # seconds between RSS samples of a task with a memory limit
DRAIN_AFTER_EXIT = 2.0      # seconds to keep reading output left by background children
GROUP_POLL = 0.2            # seconds between checks that a finished command's process group is empty
GIVE_UP_AFTER_KILL = 5.0    # seconds after a KILL to stop waiting for a group that does not empty
PR_SET_CHILD_SUBREAPER = 36
GO_WAIT = 60.0              # seconds past its second a prepared run waits for go at most (a backstop:
                            # a run is cancelled on purpose, or when its launcher or executor ends)
BOOKKEEPING_NICE = 10       # an executor's own priority once its command is on its way
AT_GATE = object()          # a prepared run's command waits at the gate for its go byte
STOP_REQUESTED = "stop requested"   # why a run ended that a TERM or INT to its executor stopped


def execute(job, report_fd, go_fd=None, mark_fd=None):
    """The child's whole life: run ``job`` and ``os._exit``.  Never returns.

    A prepared job comes with ``go_fd``, the read end of its go pipe: one byte means
    start, end of file (or nothing until its second plus GO_WAIT) means cancelled.
    ``mark_fd``: its daemon's state directory, held open to the end, so a supervisor
    started after its own was killed finds this executor (procscan.py).
    """
    code = 70
    executor = None
    try:
        _become_executor(job, report_fd, go_fd, mark_fd)
        executor = Executor(job, report_fd, go_fd=go_fd)
        code = executor.run()
    except BaseException as exc:   # the child must never unwind into the supervisor's code
        try:
            os.write(2, f"torchcore: executor for {job.name} failed: {exc!r}\n".encode())
        except OSError:
            pass
        if executor is not None:
            executor.crashed(exc)
    finally:
        os._exit(code)


def _become_executor(job, report_fd, go_fd=None, mark_fd=None):
    _default_signals()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)   # a dead supervisor shows as EPIPE (Popen and
                                                    # posix_spawn give the command the default)
    # TERM and INT only ask the executor to stop its command; Python-level handlers (not SIG_IGN)
    # so the command itself starts with the default dispositions.
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    signal.set_wakeup_fd(-1)
    low = 3
    for keep in sorted(fd for fd in (report_fd, go_fd, mark_fd) if fd is not None):
        os.closerange(low, keep)
        os.set_inheritable(keep, False)             # a command never holds these
        low = keep + 1
    os.closerange(low, _max_fd())
    proctitle.set_title(f"torchcore: {job.name} [run {job.run_id}]")


def _default_signals():
    """Every signal at its default disposition and none blocked, whatever the daemon was started
    with (nohup, a shell's background job, a service manager): an ignored signal survives fork and
    exec, and the Popen path of a command (user, cwd, rlimits) inherits the executor's."""
    for signum in _ALL_SIGNALS:
        try:
            if signal.getsignal(signum) != signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass                # a signal the C library keeps for itself
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


_ALL_SIGNALS = tuple(sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}))
_stop_requested = []


def _request_stop(signum, frame):
    _stop_requested.append(signum)


def _ignore(signum, frame):
    pass


def _step_aside():
    """Once its command is on its way, an executor's own work (copying output, watching
    limits, reporting) yields to the starts of other runs: it lowers its priority by
    BOOKKEEPING_NICE (once).  The command keeps the daemon's priority."""
    if _stepped_aside:
        return
    _stepped_aside.append(True)
    try:
        os.nice(BOOKKEEPING_NICE)
    except OSError:
        pass


_stepped_aside = []


def _max_fd():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 65536


class Executor:
    """One run: start the command, pump its output, watch its limits, report."""

    def __init__(self, job, report_fd, clock=time, go_fd=None):
        self.job = job
        self.report_fd = report_fd
        self.go_fd = go_fd
        self.clock = clock
        self.proc = None
        self.command = None
        self.result = RunResult()   # filled in as the run goes; stopped: "stop requested"
        self.term_sent_at = None
        self.killed = False
        self.killed_at = None
        self.ended = None           # when the command ended, if seen sitting out a burst
        self.started = None
        self.log = None
        self._timeout_noted = False

    def run(self):
        log = self.log = tasklog.TaskLog(self.job.log_dir, self.job.name, self.job.run_id,
                                         self.job.log_max_bytes, self.job.log_backups)
        if self.job.timeout or self.job.memory:
            _become_subreaper()     # the group's orphans stay ours: measured and reaped here
        command = self._prepare_command(log)    # all the work that can happen before the second
        if self.job.prepared:
            started = self._start_prepared(log, command)
        else:
            started = time.time()
            if command is not None:
                self._start(log, command)
        self.started = started
        try:
            if started is AT_GATE:
                started = self._follow_gate(log, command)
            elif self.proc is not None:
                self._report(wire.Start(self.job.run_id, self.proc.pid, started))
                self._pump(log)
                self._collect()
        finally:
            if started is not None:
                _step_aside()
                log.finish_lines()      # the command's last line before torchcore's "run ended"
                self._note_end(log, started)
            log.close()
        if started is None:
            return 0            # cancelled before its second: nothing ran, nothing to record
        self._report_end(started, self.ended or time.time())
        return 0

    def _follow_gate(self, log, command):
        """Watch a command that waits at the gate: the start time, or None if cancelled.

        The executor does not wake when the gate execs the command (the burst of starts
        at a second is left to the commands): it reports the gate's process group at
        once, watches output, limits and the end as for any run (a timeout counts from
        the scheduled second), and reads what the gate said once the command is over.
        A run of a burst first sits the burst out (_sit_out_burst).
        """
        self.proc, self.command = command.proc, command
        self._report(wire.Gate(self.job.run_id, self.proc.pid))
        try:
            if self.job.hold_until and not self.job.memory:
                self.ended = self._sit_out_burst()
            self._pump(log, since=self.job.scheduled)
            self._collect()
        finally:
            status = self.command.gate_status()
        if status.startswith(b"S"):
            started, _, failure = status[1:].partition(b"\n")
            if failure.startswith(b"E"):
                code = int(failure[1:].strip() or errno.ENOENT)
                exc_type = FileNotFoundError if code == errno.ENOENT else OSError
                self._cannot_start(log, exc_type(code, os.strerror(code), self.job.argv[0]))
            return float(started)
        if status.startswith(b"C"):
            return None         # cancelled: the gate left without starting anything
        return time.time()      # stopped before it could start (a TERM to its group)

    def _sit_out_burst(self):
        """A run of a burst: wait for the command's end, then for the burst's starts to be done.

        Hundreds of commands start in the same second; every executor that wakes to copy
        output, log, report and exit while they start takes CPU from the starts still to
        come.  So until ``hold_until`` (the supervisor's estimate of when this second's
        starts are over) the executor watches only for its command's end (SIGCHLD, one wake
        to note the time) and for a stop request; the output waits in its pipe (a command
        writing more than a pipe holds, 64 KiB, pauses until then).  A timeout shorter
        than the hold ends the wait at the timeout.  Returns when the command ended, or None
        if it is still running (or a stop was requested first).
        """
        until = self.job.hold_until
        if self.job.timeout:
            until = min(until, self.job.scheduled + self.job.timeout)
        watched = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        try:
            ended = None
            while (left := until - time.time()) > 0:
                caught = signal.sigtimedwait(watched, left)
                if caught is None:
                    break
                if caught.si_signo != signal.SIGCHLD:
                    _stop_requested.append(caught.si_signo)
                    break
                if ended is None and self.proc.poll() is not None:
                    ended = time.time()
                    if not self.command.gate_status().startswith(b"S"):
                        return None     # cancelled, or it could not start: nothing to hold for
            return ended
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)

    def _start_prepared(self, log, command):
        """Start a prepared run: AT_GATE, the start time, or None if it was cancelled.

        A plain command waits at the gate (csrc/tc_gate.c): spawned now, ahead of its
        second, it only has to exec the command when the go byte arrives (AT_GATE).  A
        command that needs Python between fork and exec (a user, a working directory,
        rlimits) waits for go here and starts after it.
        """
        wait = max(0.05, min(self.job.scheduled + GO_WAIT - time.time(), 2 * GO_WAIT))
        if isinstance(command, SpawnedCommand) and gate_usable():
            try:
                command.start_at_gate(self.go_fd, wait)
            except (OSError, ValueError):
                pass                # the gate cannot start: wait for go here instead
            else:
                _step_aside()
                return AT_GATE
        if not self._await_go(wait):
            if command is not None:
                command.discard()
            return None
        started = time.time()
        if command is not None:
            self._start(log, command)
        return started

    def _await_go(self, wait):
        """Wait for the go byte: True for go, False for cancelled (end of file, or too late)."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.go_fd], [], [], left)
            if ready:
                try:
                    return os.read(self.go_fd, 1) != b""
                except BlockingIOError:
                    continue

    def _prepare_command(self, log):
        """The command made ready to start (Spawned- or PopenCommand), or None if it cannot."""
        try:
            cred = credentials(self.job)
        except KeyError as exc:
            self._cannot_start(log, exc)
            return None
        env = task_environment(self.job, cred[0] if cred else None)
        preexec = limit_setter(self.job)
        if self.job.cwd or preexec or cred:
            options = {"cwd": self.job.cwd or None, "start_new_session": True, "env": env,
                       "preexec_fn": preexec}
            if cred:
                _, uid, gid, groups = cred
                options.update(user=uid, group=gid, extra_groups=groups)
            return PopenCommand(self.job.argv, options)
        try:
            return SpawnedCommand(self.job.argv, env)
        except (OSError, ValueError) as exc:
            self._cannot_start(log, exc)
            return None

    def _start(self, log, command):
        """Start the command, then step aside for the starts of other runs."""
        try:
            command.start()
        except (OSError, ValueError) as exc:      # ValueError: a NUL in the argv or environment
            command.discard()
            self._cannot_start(log, exc)
            return False
        _step_aside()
        self.proc = command.proc
        return True

    def _cannot_start(self, log, exc):
        message = f"cannot start: {exc}"
        log.write(tasklog.SYS, (message + "\n").encode())
        self.result.exit_code = 127 if isinstance(exc, FileNotFoundError) else 126
        self.result.error = message

    def _pump(self, log, since=None):
        """Copy output and enforce the limits until the run is over; the timeout counts from
        ``since`` (epoch seconds) when given, else from now.

        The run is over when the command has exited, not when its pipes close (it may close or
        redirect them and go on).  A run with a timeout or a memory limit, or one being stopped,
        is over only when its whole process group is empty: background processes it left stay
        under the limits until they end or are killed.  Without a limit, what it left behind
        keeps running (as cron does) and its output is read for DRAIN_AFTER_EXIT more seconds.
        """
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        sel.register(self.proc.stderr, selectors.EVENT_READ, "err")
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, _ignore)   # the wakeup fd turns the command's exit into an event
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        self._arm_timeout(since)
        mono = time.monotonic
        next_sample = mono()
        exited_at = None
        try:
            while True:
                now = mono()
                if exited_at is None and self.proc.poll() is not None:
                    exited_at = now
                    if self.term_sent_at is not None:
                        self._kill_group(signal.SIGKILL)   # nothing of a stopped run stays behind
                self._note_limits(log, now)
                if self.job.memory and now >= next_sample:
                    next_sample = now + MEMORY_SAMPLE_EVERY
                    self._check_memory(log, now)
                if exited_at is not None and self._over(sel, now - exited_at):
                    break
                wait = self._wait_time(now, next_sample, exited_at)
                for key, _ in sel.select(wait):
                    self._read(sel, key, log)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            sel.close()
            signal.set_wakeup_fd(-1)
            for fd in (wake_r, wake_w):
                os.close(fd)

    def _note_limits(self, log, now):
        """A stop request TERMs the group; a timeout the alarm caught is logged (once)."""
        if _stop_requested and self.term_sent_at is None and \
                (self.proc.returncode is None or self._watches_group()):
            if self.proc.returncode is None:                    # else its own end stands
                self.result.stopped = STOP_REQUESTED
            self._terminate(now)
        if self.result.timed_out and not self._timeout_noted:
            self._timeout_noted = True
            log.write(tasklog.SYS, f"timeout {self.job.timeout}s reached: stopping\n".encode())

    def _watches_group(self):
        return bool(self.job.timeout or self.job.memory or self.term_sent_at is not None)

    def _over(self, sel, since_exit):
        """Is a run whose command has exited over?  (Closes the pipes once they are drained.)"""
        pipes_open = len(sel.get_map()) > 1
        if not self._watches_group():
            return not pipes_open or since_exit > DRAIN_AFTER_EXIT
        if self.killed and time.monotonic() - self.killed_at > GIVE_UP_AFTER_KILL:
            return True         # what is left cannot die (a zombie nobody reaps, a stuck disk)
        if self._group_alive():
            self.ended = None       # a burst run's noted end was its command's, not the run's
            return False
        return not pipes_open or since_exit > DRAIN_AFTER_EXIT

    def _group_alive(self):
        """Is any process left in the command's process group?  (Reaps the group's orphans
        that came to this executor as their subreaper; called once the command is reaped.)"""
        while True:
            try:
                if os.waitid(os.P_PGID, self.proc.pid, os.WEXITED | os.WNOHANG) is None:
                    break
            except ChildProcessError:
                break
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def _wait_time(self, now, next_sample, exited_at):
        waits = [1.0]
        if self.job.memory:
            waits.append(next_sample - now)
        if exited_at is not None:
            waits.append(GROUP_POLL if self._watches_group() else exited_at + DRAIN_AFTER_EXIT - now)
        return max(0.0, min(waits))

    def _read(self, sel, key, log):
        if key.data == "signal":
            try:
                os.read(key.fd, 512)
            except OSError:
                pass
            return
        data = os.read(key.fd, 65536)
        if data:
            log.write(key.data, data)
        else:
            sel.unregister(key.fileobj)

    def _arm_timeout(self, since=None):
        """The timeout is an alarm, not a check in the copy loop: it fires on time however
        slow or stuck the writing of the log is (its handler TERMs the group, and a second
        alarm KILLs it after kill_grace)."""
        if not self.job.timeout:
            return
        signal.signal(signal.SIGALRM, self._on_alarm)
        left = self.job.timeout - (time.time() - since if since else 0.0)
        signal.setitimer(signal.ITIMER_REAL, max(0.001, left))

    def _on_alarm(self, signum, frame):
        if self.term_sent_at is None:
            self.result.timed_out = True
            self._terminate(time.monotonic())
        elif not self.killed:
            self._kill(signal.SIGKILL)

    def _terminate(self, now):
        """TERM the command's group; KILL it after kill_grace (an alarm)."""
        self._kill_group(signal.SIGTERM)
        self.term_sent_at = now
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.001, self.job.kill_grace))

    def _kill(self, signum):
        self._kill_group(signum)
        self.killed = True
        self.killed_at = time.monotonic()

    def _kill_group(self, signum):
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            pass

    def _check_memory(self, log, now):
        rss = tree_rss(os.getpid(), include_root=False)
        if rss is None:
            return
        self.result.peak_rss = max(self.result.peak_rss or 0, rss)
        if rss > self.job.memory and self.term_sent_at is None:
            self.result.error = f"memory limit {self.job.memory} bytes exceeded ({rss})"
            log.write(tasklog.SYS, (self.result.error + ": stopping\n").encode())
            self._terminate(now)

    def _collect(self):
        self.result.exit_code, self.result.signal = split_returncode(self.proc.wait())
        if self.term_sent_at is not None:
            self._kill_group(signal.SIGKILL)   # nothing of a stopped run may stay behind
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.result.peak_rss = max(self.result.peak_rss or 0, usage.ru_maxrss * 1024)
        if self.result.timed_out:
            self.result.stopped = None      # the timeout came first: a failure

    def _note_end(self, log, started):
        how = self.result.describe()
        log.write(tasklog.SYS, f"run ended: {how} after {(self.ended or time.time()) - started:.3f}s\n"
                  .encode())

    def _report(self, message):
        """Write one wire message on the report pipe; False if the supervisor is gone."""
        line = wire.encode(message)
        try:
            os.write(self.report_fd, line)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                print(f"torchcore: cannot report run {self.job.run_id}: {exc}", file=sys.stderr)
            return False

    def _report_end(self, started, ended):
        r = self.result
        r.started, r.ended = started, ended
        r.error = (r.error or "")[:1000] or None     # a report stays under PIPE_BUF
        problem = self.log.problem() if self.log is not None else None
        message = wire.End(run=self.job.run_id, started=started, ended=ended,
                           exit_code=r.exit_code, signal=r.signal, timed_out=r.timed_out,
                           peak_rss=r.peak_rss, error=r.error, stopped=r.stopped is not None,
                           log_problem=f"; {problem}" if problem else None)
        if not self._report(message):
            self._write_own_record()

    def crashed(self, exc):
        """The executor itself failed: stop what it started, and record the run as failed."""
        try:
            if self.proc is not None:
                self._kill_group(signal.SIGKILL)
            self.result.error = f"executor failed: {exc!r}"[:1000]
            now = time.time()
            self._report_end(self.started or now, now)
        except BaseException:
            pass

    def _write_own_record(self):
        """The supervisor is gone: nobody else will record this run.

        The write happens in a fresh interpreter: this process inherited the
        supervisor's SQLite state through fork(), which SQLite does not survive.
        """
        r, job = self.result, self.job
        record = wire.OwnRecord(
            run_id=job.run_id, task=job.name, node=job.node, scheduled=job.scheduled,
            started=r.started, ended=r.ended, exit_code=r.exit_code, signal=r.signal,
            timed_out=r.timed_out, manual=job.manual, pid=self.proc.pid if self.proc else None,
            peak_rss=r.peak_rss, error=r.error,
            stopped=f"{r.stopped} ({_stop_signal_name()})" if r.stopped is not None else None)
        import subprocess

        subprocess.run([sys.executable, "-m", "torchcore.records", job.db_path,
                        wire.encode_own_record(record)], stdin=subprocess.DEVNULL, timeout=60,
                       check=False)


def _stop_signal_name():
    return signal.Signals(_stop_requested[0]).name if _stop_requested else "SIGTERM"


def _become_subreaper():
    """Orphans of the command's group come to this executor instead of init (Linux), so a
    memory limit still sees what the command left running, and the end of the group is seen
    when its last process ends (reaped here), not when an init gets round to reaping it."""
    if _prctl is not None:
        _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _load_prctl():
    """libc's prctl, looked up once where the executors are forked from (ctypes takes ~4 ms
    to import: paid by the launcher once, not by every executor with a limit)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


_prctl = _load_prctl() if sys.platform.startswith("linux") else None


def tree_rss(pid, include_root=True):
    """Resident memory of a process and all its descendants, in bytes (None if it is gone).

    psutil is imported here, by the executors of tasks with a memory limit only: the
    launchers stay without it, which keeps every fork (and every executor's exit) cheaper.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = ([root] if include_root else []) + root.children(recursive=True)
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total
