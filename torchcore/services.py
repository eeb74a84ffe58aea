"""The supervisor's long-lived helper children: the processes that talk to the network.

The supervisor never waits on a socket other than its own: whatever sends notifications,
serves HTTP or ships records to a fleet database runs as a *service*, a fresh interpreter
running ``python -m torchcore.<module>`` with

    --taskfile PATH --state-dir DIR --node NAME --parent-fd FD [the service's own arguments]

``FD`` is the read end of a pipe whose write end only the supervisor holds: when it reads
end-of-file the supervisor is gone (even killed with SIGKILL) and the service exits.  SIGTERM
asks a service to exit promptly; SIGHUP tells it that the task file was reloaded.

The supervisor side (``Services``) starts the services the task file asks for (each module's
``wanted(taskfile, node, options)``), stops those it no longer asks for, restarts one that exits with
a backoff (1 s doubling to 60 s, reset after 60 s of good running), and stops them all at
shutdown after the runs.  Nothing here blocks the loop but the final stop: a service no longer
asked for is sent SIGTERM and left to the supervisor's reaping (``exited``), and ``tend`` sends
SIGKILL once STOP_GRACE has passed, so a hung service never holds the loop.  The child side
(``child_args``, ``parent_gone``, ``set_title``) is what a service module needs to be one.
"""

import argparse
import dataclasses
import importlib
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("torchcore")

RESTART_FIRST = 1.0         # seconds before the first restart of a service that exited
RESTART_MAX = 60.0          # the backoff's cap
STABLE_AFTER = 60.0         # running this long resets the backoff
STOP_GRACE = 5.0            # SIGTERM, then SIGKILL after this long


@dataclasses.dataclass(frozen=True)
class Spec:
    """A kind of service: the module run as ``python -m module``; the module's ``wanted``
    decides from the task file (and the start options) whether it runs."""

    name: str
    module: str


# name -> Spec: every service torchcore knows, in the order they start.  A service module is
# listed here and nowhere else; its own ``wanted`` says when it runs.
REGISTRY = {spec.name: spec for spec in (
    Spec("notifier", "torchcore.notifier"),     # alerts, webhooks, pings (docs/notifications.md)
    Spec("http", "torchcore.web"),               # metrics, API, dashboard (docs/http.md)
    Spec("fleet", "torchcore.fleetagent"),       # registry, heartbeat, history (docs/fleet.md)
)}


def wanted_by(spec, taskfile, node, options):
    """Does the task file (or a start option) ask for this service?  A module that cannot
    be imported or decide is logged and not started (the daemon runs on without it)."""
    try:
        module = importlib.import_module(spec.module)
        return bool(module.wanted(taskfile, node, options))
    except Exception as exc:
        log.error("service %s: cannot tell whether it is wanted: %s: %s", spec.name,
                  type(exc).__name__, exc)
        return False


@dataclasses.dataclass
class Service:
    """One running (or waiting to restart) service child."""

    spec: Spec
    proc: subprocess.Popen | None = None
    parent_w: int | None = None     # the write end of its parent pipe
    started_at: float = 0.0         # monotonic
    restarts: int = 0               # since the daemon started
    backoff: float = RESTART_FIRST
    restart_at: float | None = None     # monotonic; None: running, or not to be restarted
    last_exit: str | None = None
    kill_at: float | None = None    # monotonic; a retiring service is killed then if still there

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    def state(self, now):
        if self.proc is not None:
            return "running"
        if self.restart_at is not None:
            return f"restarting in {max(0, round(self.restart_at - now))}s"
        return "stopped"


class Services:
    """The supervisor's handle on its services (see the module's docstring)."""

    def __init__(self, clock, state_dir, stderr=None, contain=None, registry=None, options=None):
        self.clock = clock
        self.state_dir = state_dir      # the daemon's (fixed until it restarts)
        self.stderr = stderr            # a path the children's stderr goes to (None: ours)
        self.contain = contain or _log_failure
        self.registry = REGISTRY if registry is None else registry
        self.options = options or {}    # start options a service may need (e.g. {"http": ADDR})
        self.running = {}               # name -> Service (running or waiting to restart)
        self.retiring = []              # services no longer wanted, sent SIGTERM, not yet reaped
        self.taskfile = None
        self.node_name = None
        self.stopping = False

    def __iter__(self):
        return iter(self.running.values())

    def describe(self):
        """Status rows: name, pid, state, restarts, last exit."""
        now = self.clock.monotonic()
        return [{"name": s.spec.name, "pid": s.pid, "state": s.state(now), "restarts": s.restarts,
                 "last_exit": s.last_exit, **self._detail(s.spec)} for s in self.running.values()]

    def _detail(self, spec):
        """What a service module's optional ``detail(taskfile, options)`` adds to its status row
        (the HTTP service: its address and auth mode)."""
        try:
            detail = getattr(importlib.import_module(spec.module), "detail", None)
            return dict(detail(self.taskfile, self.options)) if detail else {}
        except Exception:
            return {}

    def apply(self, taskfile, node, reloaded=False):
        """After a load: start the services the file asks for, stop the others, and tell the
        ones that go on running that the file was reloaded."""
        self.taskfile, self.node_name = taskfile, node.hostname
        for spec in self.registry.values():
            want = wanted_by(spec, taskfile, node, self.options)
            service = self.running.get(spec.name)
            if want and service is None:
                service = self.running[spec.name] = Service(spec)
                self._start(service)
            elif want and reloaded and service.proc is not None:
                _signal(service.proc.pid, signal.SIGHUP)
            elif not want and service is not None:
                log.info("service %s: no longer asked for by the task file; stopping it",
                         spec.name)
                del self.running[spec.name]
                self._retire(service)

    def _start(self, service):
        spec = service.spec
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        err = None
        try:
            if self.stderr is not None:
                err = os.open(self.stderr, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                              0o600)
            argv = [sys.executable, "-m", spec.module,
                    "--taskfile", task_file_path(self.taskfile), "--state-dir", self.state_dir,
                    "--node", self.node_name, "--parent-fd", str(read_end)]
            if self.stderr is not None and self.stderr != os.devnull:
                argv += ["--log-file", self.stderr]     # followed across logrotate's moves
            argv += _option_args(self.options.get(spec.name))
            service.proc = subprocess.Popen(argv, pass_fds=(read_end,), stdin=subprocess.DEVNULL,
                                            stdout=err, stderr=err, close_fds=True)
        except Exception as exc:        # no memory, no pids, no interpreter: try again later
            os.close(write_end)
            service.proc = None
            self._schedule_restart(service, f"cannot start: {type(exc).__name__}: {exc}")
            return
        finally:
            os.close(read_end)
            if err is not None:
                os.close(err)
        service.parent_w = write_end
        service.started_at = self.clock.monotonic()
        service.restart_at = None
        log.info("service %s started, pid %d", spec.name, service.proc.pid)

    def _retire(self, service):
        """SIGTERM without waiting: ``exited`` reaps it, ``tend`` kills it after STOP_GRACE."""
        service.restart_at = None
        if service.proc is None:
            self._close_pipe(service)
            return
        _signal(service.proc.pid, signal.SIGTERM)
        service.kill_at = self.clock.monotonic() + STOP_GRACE
        self.retiring.append(service)

    def exited(self, pid, status):
        """Reaping: True if ``pid`` was one of the services (then its restart is scheduled)."""
        for service in self.retiring:
            if service.proc.pid == pid:
                service.proc.returncode = os.waitstatus_to_exitcode(status)
                self._close_pipe(service)
                self.retiring.remove(service)
                return True
        for service in self.running.values():
            if service.proc is not None and service.proc.pid == pid:
                service.proc.returncode = os.waitstatus_to_exitcode(status)
                self._close_pipe(service)
                code = service.proc.returncode
                service.proc = None
                how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                if self.clock.monotonic() - service.started_at >= STABLE_AFTER:
                    service.backoff = RESTART_FIRST
                self._schedule_restart(service, how)
                return True
        return False

    def _schedule_restart(self, service, how):
        service.last_exit = how
        if self.stopping:
            return
        service.restart_at = self.clock.monotonic() + service.backoff
        log.error("service %s ended (%s); restarting it in %.0fs", service.spec.name, how,
                  service.backoff)
        service.backoff = min(RESTART_MAX, service.backoff * 2)

    def next_wake(self):
        """The monotonic time of the next restart due, or None."""
        times = [s.restart_at for s in self.running.values() if s.restart_at is not None]
        times += [s.kill_at for s in self.retiring if s.kill_at is not None]
        return min(times) if times else None

    def tend(self):
        """Restart the services whose backoff is over."""
        if self.stopping:
            return
        now = self.clock.monotonic()
        for service in self.retiring:
            if service.kill_at is not None and now >= service.kill_at:
                log.warning("service %s did not stop within %.0fs; killing it", service.spec.name,
                            STOP_GRACE)
                _signal(service.proc.pid, signal.SIGKILL)
                service.kill_at = None
        for service in self.running.values():
            if service.proc is None and service.restart_at is not None and now >= service.restart_at:
                service.restarts += 1
                try:
                    self._start(service)
                except Exception as exc:
                    self.contain(f"restarting service {service.spec.name}", exc)

    def stop(self, grace=STOP_GRACE):
        """At shutdown, after the runs: SIGTERM each service, SIGKILL what is left after
        ``grace``; reaps them (the only wait in this module)."""
        self.stopping = True
        services, self.running = list(self.running.values()) + self.retiring, {}
        self.retiring = []
        self._stop(services, grace)

    def _stop(self, services, grace=STOP_GRACE):
        live = [s for s in services if s.proc is not None]
        for service in live:
            _signal(service.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while live and time.monotonic() < deadline:
            live = [s for s in live if not _reaped(s)]
            if live:
                time.sleep(0.02)
        for service in live:
            log.warning("service %s did not stop within %.0fs; killing it", service.spec.name,
                        grace)
            _signal(service.proc.pid, signal.SIGKILL)
            try:
                os.waitpid(service.proc.pid, 0)
            except ChildProcessError:
                pass
        for service in services:
            self._close_pipe(service)
            service.proc = None

    def _close_pipe(self, service):
        if service.parent_w is not None:
            os.close(service.parent_w)
            service.parent_w = None


def _reaped(service):
    try:
        pid, status = os.waitpid(service.proc.pid, os.WNOHANG)
    except ChildProcessError:
        return True
    if pid == 0:
        return False
    service.proc.returncode = os.waitstatus_to_exitcode(status)
    return True


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _option_args(value):
    """A service's extra arguments from the start options: a list as is, a string as one
    ``--listen``-style value is the service's business (it gets ``--option VALUE``)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    raise TypeError(f"service options must be a list of arguments, not {type(value).__name__}")


def _log_failure(what, exc):
    log.error("%s failed: %s: %s", what, type(exc).__name__, exc)


# ---- the child side ----------------------------------------------------------------------

def task_file_path(taskfile):
    """The task file's absolute path (its settings hold it): the daemon runs from / after it
    detaches, so the path given on the command line (``-c tasks.yaml``) would name /tasks.yaml."""
    settings = getattr(taskfile, "settings", None)
    return getattr(settings, "path", None) or os.path.abspath(taskfile.path)


def child_args(argv=None, description=None, extra=None):
    """Parse a service's command line (the common arguments, plus ``extra(parser)``'s)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--taskfile", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--parent-fd", type=int, required=True)
    parser.add_argument("--log-file", default=None)
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def setup_logging(args):
    """A service's log: the daemon's log file (``--log-file``: the daemon is in the background),
    written through daemonlog's handler, which follows it when logrotate moves it, as the
    supervisor's own lines do; else stderr (the foreground's).  Lines in the daemon's format.
    Its stderr stays on the file the supervisor opened, for what Python itself prints there."""
    log_to(getattr(args, "log_file", None))


def log_to(log_file):
    """setup_logging's work for a child that takes no service arguments (the claims process)."""
    import logging

    from torchcore import daemonlog

    handler = None
    if log_file:
        try:
            from torchcore.safepaths import log_file_handler
            handler = log_file_handler(log_file)
        except Exception:
            handler = None
    if handler is None:
        daemonlog.log_to_stderr()
        return
    handler.setFormatter(daemonlog.Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def parent_gone(fd):
    """True once the supervisor is gone (EOF on the parent pipe).  Never blocks: call it when
    a select/poll says ``fd`` is readable, or every so often."""
    import select
    readable, _, _ = select.select([fd], [], [], 0)
    if not readable:
        return False
    try:
        return os.read(fd, 1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def drain(fd):
    """Empty a non-blocking wake-up pipe (the signal handlers' bytes)."""
    try:
        while os.read(fd, 512):
            pass
    except OSError:
        pass


def warn_once_a_minute(name, problem, said):
    """Log a service's ``problem`` unless it was logged less than a minute ago; ``said`` is what
    the last call returned ((None, 0.0) at first); returns what to pass next."""
    if problem != said[0] or time.monotonic() - said[1] >= 60:
        log.warning("%s: %s (will retry)", name, problem)
        return (problem, time.monotonic())
    return said


def set_title(name):
    """``torchcore: <name>`` in ps."""
    try:
        import setproctitle
        setproctitle.setproctitle(f"torchcore: {name}")
    except Exception:
        pass
