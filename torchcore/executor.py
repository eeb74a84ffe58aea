"""What a forked child does for one run.

The supervisor forks; the child calls ``execute(job, report_fd)`` and never
returns into the supervisor's code.  It renames itself for `ps`, drops the
supervisor's signal handlers and descriptors, starts the command in its own
process group, copies the output into the task's log, enforces the timeout and
the memory limit, and reports the result as JSON lines on the shared report
pipe (writes below PIPE_BUF are atomic, so every executor shares one pipe).  If
the supervisor is gone, it writes its own record.
"""

import dataclasses
import errno
import json
import os
import pwd
import resource
import selectors
import signal
import subprocess
import sys
import time

import psutil
import setproctitle

from torchcore import tasklog

MEMORY_SAMPLE_EVERY = 0.5   # seconds between RSS samples of a task with a memory limit
DRAIN_AFTER_EXIT = 2.0      # seconds to keep reading output left by background children
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                    signal.SIGCHLD, signal.SIGPIPE, signal.SIGQUIT)


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a child needs for one run, fixed at fork time."""

    run_id: int
    task: object            # config.Task
    scheduled: int | None
    manual: bool
    shell: str
    log_dir: str
    log_max_bytes: int
    log_backups: int
    db_path: str
    node: str


def execute(job, report_fd):
    """The child's whole life: run ``job`` and ``os._exit``.  Never returns."""
    code = 70
    try:
        _become_executor(job, report_fd)
        code = Executor(job, report_fd).run()
    except BaseException as exc:   # the child must never unwind into the supervisor's code
        try:
            os.write(2, f"torchcore: executor for {job.task.name} failed: {exc!r}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def _become_executor(job, report_fd):
    for signum in _HANDLED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)   # a dead supervisor shows as EPIPE, not death
    # TERM and INT only ask the executor to stop its command; Python-level handlers (not SIG_IGN)
    # so the command itself starts with the default dispositions.
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    signal.set_wakeup_fd(-1)
    os.closerange(3, report_fd)
    os.closerange(report_fd + 1, _max_fd())
    setproctitle.setproctitle(f"torchcore: {job.task.name} [run {job.run_id}]")


_stop_requested = []


def _request_stop(signum, frame):
    _stop_requested.append(signum)


def _ignore(signum, frame):
    pass


def _max_fd():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 65536


def task_environment(task, user_entry=None):
    """The command's environment: the daemon's, minus torchcore's own, plus the task's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHCORE_")}
    if user_entry is not None:
        env.update(HOME=user_entry.pw_dir, USER=user_entry.pw_name, LOGNAME=user_entry.pw_name,
                   SHELL=user_entry.pw_shell or "/bin/sh")
    env.update(dict(task.env))
    return env


def credentials(task):
    """(pwd entry, uid, gid, extra groups) to switch to, or None to stay who we are."""
    if not task.user or os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(task.user)
    gid = entry.pw_gid
    if task.group:
        import grp
        gid = grp.getgrnam(task.group).gr_gid
    return entry, entry.pw_uid, gid, os.getgrouplist(entry.pw_name, gid)


def limit_setter(limits):
    """A preexec function applying the rlimits that fit (cpu seconds, open files)."""
    wanted = []
    if limits.cpu:
        wanted.append((resource.RLIMIT_CPU, limits.cpu))
    if limits.nofile:
        wanted.append((resource.RLIMIT_NOFILE, limits.nofile))
    if not wanted:
        return None

    def apply():
        for which, value in wanted:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, hard if hard != resource.RLIM_INFINITY else value))
    return apply


class Executor:
    """One run: start the command, pump its output, watch its limits, report."""

    def __init__(self, job, report_fd, clock=time):
        self.job = job
        self.task = job.task
        self.report_fd = report_fd
        self.clock = clock
        self.proc = None
        self.result = {"exit_code": None, "signal": None, "timed_out": False, "peak_rss": None,
                       "error": None}
        self.term_sent_at = None
        self.killed = False

    def run(self):
        started = time.time()
        log = tasklog.TaskLog(self.job.log_dir, self.task.name, self.job.run_id,
                              self.job.log_max_bytes, self.job.log_backups)
        try:
            if self._spawn(log):
                self._report({"e": "start", "pid": self.proc.pid, "started": started})
                self._pump(log)
                self._collect()
        finally:
            self._note_end(log, started)
            log.close()
        self._report_end(started, time.time())
        return 0

    def _spawn(self, log):
        cred = None
        try:
            cred = credentials(self.task)
            kwargs = {}
            if cred:
                _, uid, gid, groups = cred
                kwargs.update(user=uid, group=gid, extra_groups=groups)
            self.proc = subprocess.Popen(
                self.task.argv(self.job.shell), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=self.task.cwd or None,
                env=task_environment(self.task, cred[0] if cred else None),
                start_new_session=True,
                preexec_fn=limit_setter(self.task.limits),  # noqa: PLW1509 (no threads here)
                **kwargs)
            return True
        except (OSError, KeyError, subprocess.SubprocessError) as exc:
            message = f"cannot start: {exc}"
            log.write("err", (message + "\n").encode())
            self.result.update(exit_code=127 if isinstance(exc, FileNotFoundError) else 126,
                               error=message)
            return False

    def _pump(self, log):
        """Copy output until the command ends and its pipes close, enforcing the limits."""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        sel.register(self.proc.stderr, selectors.EVENT_READ, "err")
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, _ignore)   # the wakeup fd turns the command's exit into an event
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        mono = time.monotonic
        deadline = mono() + self.task.timeout if self.task.timeout else None
        next_sample = mono()
        exited_at = None
        while sel.get_map() and len(sel.get_map()) > 1:
            now = mono()
            if exited_at is None and self.proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > DRAIN_AFTER_EXIT:
                break
            if deadline is not None and now >= deadline and not self.result["timed_out"]:
                self.result["timed_out"] = True
                log.write("err", f"timeout {self.task.timeout}s reached: stopping\n".encode())
                self._terminate(now)
            if _stop_requested and self.term_sent_at is None:
                self._terminate(now)
            if self.term_sent_at is not None and not self.killed and \
                    now - self.term_sent_at >= self.task.kill_grace:
                self._kill_group(signal.SIGKILL)
                self.killed = True
            if self.task.limits.memory and now >= next_sample:
                next_sample = now + MEMORY_SAMPLE_EVERY
                self._check_memory(log, now)
            for key, _ in sel.select(self._wait_time(now, deadline, next_sample, exited_at)):
                self._read(sel, key, log)
        sel.close()
        signal.set_wakeup_fd(-1)

    def _wait_time(self, now, deadline, next_sample, exited_at):
        waits = [1.0]
        if deadline is not None and not self.result["timed_out"]:
            waits.append(deadline - now)
        if self.term_sent_at is not None and not self.killed:
            waits.append(self.term_sent_at + self.task.kill_grace - now)
        if self.task.limits.memory:
            waits.append(next_sample - now)
        if exited_at is not None:
            waits.append(exited_at + DRAIN_AFTER_EXIT - now)
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

    def _terminate(self, now):
        self._kill_group(signal.SIGTERM)
        self.term_sent_at = now

    def _kill_group(self, signum):
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            pass

    def _check_memory(self, log, now):
        rss = tree_rss(self.proc.pid)
        if rss is None:
            return
        self.result["peak_rss"] = max(self.result["peak_rss"] or 0, rss)
        if rss > self.task.limits.memory and self.term_sent_at is None:
            self.result["error"] = f"memory limit {self.task.limits.memory} bytes exceeded ({rss})"
            log.write("err", (self.result["error"] + ": stopping\n").encode())
            self._terminate(now)

    def _collect(self):
        status = self.proc.wait()
        if status < 0:
            self.result["signal"] = -status
        else:
            self.result["exit_code"] = status
        if self.term_sent_at is not None:
            self._kill_group(signal.SIGKILL)   # nothing of a stopped run may stay behind
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.result["peak_rss"] = max(self.result["peak_rss"] or 0, usage.ru_maxrss * 1024)

    def _note_end(self, log, started):
        r = self.result
        how = f"signal {r['signal']}" if r["signal"] is not None else f"exit {r['exit_code']}"
        if r["timed_out"]:
            how += " (timed out)"
        log.write("tc", f"run ended: {how} after {time.time() - started:.3f}s\n".encode())

    def _report(self, message):
        message.update(run=self.job.run_id)
        line = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self.report_fd, line)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                print(f"torchcore: cannot report run {self.job.run_id}: {exc}", file=sys.stderr)
            return False

    def _report_end(self, started, ended):
        r = self.result
        error = (r["error"] or "")[:1000] or None
        message = {"e": "end", "ended": ended, "started": started, "exit_code": r["exit_code"],
                   "signal": r["signal"], "timed_out": r["timed_out"], "peak_rss": r["peak_rss"],
                   "error": error}
        if not self._report(message):
            self._write_own_record(started, ended)

    def _write_own_record(self, started, ended):
        """The supervisor is gone: nobody else will record this run.

        The write happens in a fresh interpreter: this process inherited the
        supervisor's SQLite state through fork(), which SQLite does not survive.
        """
        r = self.result
        fields = dict(
            run_id=self.job.run_id, task=self.task.name, node=self.job.node,
            scheduled=self.job.scheduled, started=started, ended=ended,
            exit_code=r["exit_code"], signal=r["signal"], timed_out=r["timed_out"],
            manual=self.job.manual, pid=self.proc.pid if self.proc else None,
            peak_rss=r["peak_rss"])
        subprocess.run([sys.executable, "-m", "torchcore.records", self.job.db_path,
                        json.dumps(fields)], stdin=subprocess.DEVNULL, timeout=60, check=False)


def tree_rss(pid):
    """Resident memory of a process and all its descendants, in bytes (None if it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total
