"""The supervisor: one process, one thread, one select loop.

Each pass sleeps on a selector until the next second that has work (a task due, a run to
prepare, a retry, a daemon's backoff over, housekeeping due; MAX_SLEEP at most) or until
something wakes it: a signal, a report from an executor, a launcher's answer, a control
request, the task file changing (inotify), the wall clock being set (timerfd; see watch.py).
It then reaps every child that exited, passes the quiet seconds it slept through in one step
and hands the current second to the planner, launching what is due.
Signal handlers only record: the wakeup fd turns each signal into a byte the
loop reads, and ``handle_<signal>`` changes what the loop does next.
"""

import dataclasses
import gc
import hashlib
import json
import logging
import os
import selectors
import signal
import threading

import psutil

from torchcore import adopt, config, daemonlog, executor, prepare, records, safepaths
from torchcore.coordinator import LocalCoordinator
from torchcore.daemons import Daemons
from torchcore.errors import ConfigError, TorchcoreError
from torchcore.launcher import JobTooLarge, LauncherPool
from torchcore.ledger import Ledger
from torchcore.planner import Planner
from torchcore.replies import Replies
from torchcore.runs import Run, RunTable
from torchcore.states import RunState
from torchcore.system import System
from torchcore.wakeups import EARLY_WAKE, Wakeups
from torchcore.watch import ClockWatch, FileWatch, signature as _file_signature

log = logging.getLogger("torchcore")

STATS_EVERY = 60            # seconds between stats lines
PRUNE_EVERY = 6 * 3600      # seconds between prunes of records older than history_days
SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup",
           signal.SIGUSR2: "usr2", signal.SIGCHLD: "chld"}


class Supervisor:
    """Runs this node's share of a task file until told to stop."""

    def __init__(self, taskfile, node, clock=None, coordinator=None, on_ready=None,
                 helper_stderr=None, pidfile=None, system=None):
        self.taskfile = taskfile
        self.settings = taskfile.settings
        self.pidfile = pidfile or self.settings.pidfile     # the one it holds: told to commands
        self.node = node
        self.node_name = node.hostname
        self.system = system or System(clock)     # fork, kill, waitpid, launchers, clocks
        self.clock = self.system.clock
        self.coordinator = coordinator or LocalCoordinator()
        self.on_ready = on_ready
        self.helper_stderr = helper_stderr  # a path for the launchers' stderr (None: ours)
        self.ready = False
        self.planner = Planner(self.settings.misfire_grace)
        self.tasks = {}             # name -> Task running on this node
        self.daemons = Daemons()    # the daemon tasks' slots: restarts, backoff (see daemons.py)
        self.table = RunTable()     # the runs, started and prepared (see runs.py)
        self.launchers = LauncherPool(  # the processes that fork executors (see launcher.py)
            self.system, helper_stderr, self.clock, self._contain, self._launcher_answers,
            self._launcher_died)
        self.ahead = prepare.Lookahead(self.planner, self.clock, self.system.cores)  # prepare.py
        self.ledger = Ledger(self.node_name, self.clock)  # records and counts (see ledger.py)
        self.stats = self.ledger.stats
        self.started_at = self.clock.time()
        self.stopping = False
        self.shutdown_deadline = None
        self.killed_all = False
        self.reload_requested = None     # the reason, when a reload waits for the loop
        self.last_reload = None          # (epoch, ok, message)
        self.last_applied = None         # the last accepted reload: at, reason, digest, counts
        self.changes = {}                # what the last _apply added, changed, removed (counts)
        self.reload_error = None
        self.file_signature = None
        self.retry = []                  # (name, second) whose fork failed: tried again next tick
        self.last_result = self.ledger.last_result     # name -> last finished result (status)
        self.skipped_last = self.ledger.skipped_last   # name -> reason, while skipped
        self._errors_seen = set()        # (where, exception type) already logged once
        self._report_buffer = b""
        self._next_stats = self.clock.monotonic() + STATS_EVERY
        self._next_prune = 0.0
        self._title = None
        self._title_state = None
        self.wakeups = Wakeups(self)     # when the loop wakes, what it passes (see wakeups.py)
        self.filewatch = FileWatch(self.settings.path, self.clock)
        self.clockwatch = ClockWatch()
        self.records = None
        self.selector = None
        self.control = None
        self.replies = Replies(self)     # what the control socket answers (see replies.py)

    # ---- start and stop -------------------------------------------------------------------

    def run(self):
        """Run until a shutdown finishes; returns the exit status (0)."""
        self._open()
        try:
            self._start()
            while not self.finished():
                try:
                    self.loop_once()
                except Exception as exc:    # whatever one pass met, the next pass runs
                    self._contain("a pass of the loop", exc)
        finally:
            self._close()
        log.info("torchcore stopped")
        return 0

    def start(self):
        """Open and start all that ``run`` does before its loop (tests then drive the passes)."""
        self._open()
        try:
            self._start()
        except BaseException:
            self._close()
            raise

    def close(self):
        self._close()

    def _start(self):
        self.ledger.records = self.records
        self.launchers.start(self.selector, self.report_w, self.system.launcher_count)
        self._apply(self.taskfile, first=True)
        self.adopt_previous_executors()
        self.planner.start(int(self.clock.time()))
        self.wakeups.started()
        self._start_reboot_tasks()
        self.prepare_ahead()        # the first seconds too, not from the first tick on
        self._set_title()           # before `start` returns: ps never shows the command line
        self.ready = True
        if self.on_ready is not None:
            self.on_ready()
        log.info("torchcore started: %s, %d tasks on this node (%s), pid %d",
                 self.settings.path, len(self.tasks), self.node_name, os.getpid())

    def _open(self):
        safepaths.secure_dir(self.settings.state_dir, safepaths.STATE_DIR_MODE,
                             what="state directory", private=True)
        self.selector = selectors.DefaultSelector()
        self._open_control()        # first: refused if another daemon serves this state_dir
        safepaths.secure_dir(self.settings.log_dir, safepaths.LOG_DIR_MODE, what="log_dir")
        self.records = records.Records(self.db_path)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.report_r, self.report_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(self.report_w, True)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._read_signals)  # (key, mask)
        self.selector.register(self.report_r, selectors.EVENT_READ, self.read_reports)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in SIGNALS:
            signal.signal(signum, _record_signal)
        self.file_signature = _file_signature(self.settings.path)
        self.clockwatch.open(self.selector)

    def _open_control(self):
        """The control socket, when the plumbing for it is present (see control.py)."""
        try:
            from torchcore import control
        except ImportError:
            return
        self.control = control.ControlServer(self.control_path, self.replies)
        self.control.register(self.selector)

    def _close(self):
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        if self.control is not None:
            self.control.close()
        self.launchers.stop()
        if self.records is not None:
            self.records.close()
        self.filewatch.stop()
        self.clockwatch.close()
        self.selector.close()
        for name in ("_wake_r", "_wake_w", "report_r", "report_w"):
            if hasattr(self, name):
                os.close(getattr(self, name))

    @property
    def db_path(self):
        return os.path.join(self.settings.state_dir, "torchcore.db")

    @property
    def control_path(self):
        return os.path.join(self.settings.state_dir, "control.sock")

    def finished(self):
        return self.stopping and not self.table

    # ---- the loop -------------------------------------------------------------------------

    def loop_once(self):
        """One pass: wait, read events, reap, then act on the current second."""
        for key, mask in self.selector.select(self._sleep_time()):
            key.data(key, mask)
        self.wakeups.passes += 1
        self.reap()
        if self.reload_requested:
            reason, self.reload_requested = self.reload_requested, None
            self.reload(reason)
        if self.stopping:
            self.drive_shutdown()
        else:
            self.watch_file()
            self._await_boundary()
            now = int(self.clock.time())
            self.wakeups.pass_quiet(now)
            if now != self.planner.watermark:
                self.tick(now)
            self.wakeups.tend()
            self.prepare_ahead()
        self.housekeeping()

    def _contain(self, what, exc):
        """One unit of work failed (a task's start, a launcher's answer, a pass): count it, log
        it once for each kind, and go on with the rest.  The supervisor outlives its bugs and
        whatever the system throws at it; the count shows in the stats line and in status."""
        self.stats.errors += 1
        kind = (what, type(exc).__name__)
        if kind in self._errors_seen:
            return
        self._errors_seen.add(kind)
        log.error("%s failed, carrying on (more of these are counted, not logged): %s: %s",
                  what, type(exc).__name__, exc)
        log.debug("the failure of %s", what, exc_info=exc)

    def _sleep_time(self):
        return self.wakeups.sleep_time()

    def _await_boundary(self):
        """Spin the last moments to the second boundary when prepared runs wait for it."""
        if not self.table.prepared:
            return
        boundary = self.wakeups.boundary()
        if boundary - self.clock.time() > 2 * EARLY_WAKE:
            return          # woken by something else, well before the boundary
        give_up = self.clock.monotonic() + 2 * EARLY_WAKE
        while self.clock.time() < boundary and self.clock.monotonic() < give_up:
            pass

    def tick(self, now):
        """Launch what the planner says is due at ``now`` (and log what the clock did)."""
        plan = self.planner.advance(now)
        for message in plan.events:
            log.warning("%s", message)
        for name, second, count in plan.missed:
            self.ledger.missed(name, second, count, self.settings.misfire_grace)
        go = {}         # launcher -> run ids of prepared runs to start now
        fired = []
        rest = []       # due, not prepared: forked after the prepared ones got their go
        for name, second in self._due_retries(now, plan.due) + plan.due:
            run = self.table.take_prepared(name, second)
            if run is None:
                rest.append((name, second))
            elif self._contained(f"starting {name}", self._fire, run):
                go.setdefault(run.launcher, []).append(run.run_id)
                fired.append(run)
        for launcher, run_ids in go.items():
            self.launchers.go(launcher, run_ids)
        for name, second in rest:
            self._contained(f"starting {name}", self.launch, self.tasks[name], second)
        for run in fired:           # the starts first, the bookkeeping after
            self.ledger.started(run)
        for key in [key for key in self.table.prepared if key[1] <= now]:
            self._cancel(self.table.take_prepared(*key))    # prepared, but not due after all

    def _contained(self, what, action, *args):
        """``action(*args)``, its failure contained (see _contain); returns its result or None."""
        try:
            return action(*args)
        except Exception as exc:
            self._contain(what, exc)
            return None

    def _due_retries(self, now, due):
        """Seconds whose fork failed: each task tries once more, for its latest such second,
        unless a newer second of it is due now or misfire_grace is over.  The rest are
        recorded as missed: after a fork outage a task neither bursts nor silently drops runs."""
        retry, self.retry = self.retry, []
        seconds = {}
        for name, second in sorted(retry, key=lambda item: item[1]):
            seconds.setdefault(name, []).append(second)
        due_names = {name for name, _ in due}
        launch = []
        for name, found in seconds.items():
            if name not in self.tasks:
                continue
            latest = found[-1]
            if name not in due_names and now - latest <= self.settings.misfire_grace:
                launch.append((name, latest))
                found = found[:-1]
            if found:
                self.ledger.missed(name, found[-1], len(found), self.settings.misfire_grace)
        return launch

    # ---- launching ------------------------------------------------------------------------

    def launch(self, task, second, manual=False):
        """Start one run of ``task`` unless a limit forbids it; returns the Run or None."""
        reason = self.table.limit_reason(task, self.settings.max_running)
        if reason:
            self.ledger.skipped(task, second, reason, manual)
            return None
        if not self.coordinator.claim(task, second):
            return None
        try:
            run_id = self.records.allocate_run_id()
        except records.RecordsError as exc:
            log.error("cannot number a run of %s: %s; retrying next second", task.name, exc)
            self._retry_later(task, second, manual)
            return None
        job = executor.Job.for_task(task, self.settings, run_id=run_id, scheduled=second,
                                    manual=manual, db_path=self.db_path, node=self.node_name)
        try:
            pid = self.fork(job)
        except JobTooLarge as exc:
            self._refuse(task, second, manual, run_id, str(exc))
            return None
        except OSError as exc:
            self.stats.fork_failures += 1
            log.error("cannot fork for %s (run %d): %s; retrying next second", task.name, run_id, exc)
            self._retry_later(task, second, manual)
            return None
        run = Run(run_id, task, second, manual, None, self.clock.time(), launcher=self.launchers.handed_to)
        self.table.add(run)
        self.skipped_last.pop(task.name, None)
        self.stats.started += 1
        self.ledger.started(run)
        if pid is not None:
            self._forked(run, pid)
        return run

    def _refuse(self, task, second, manual, run_id, reason):
        """A run that cannot be handed to a launcher: recorded at once as failed (exit 126, as
        a command that cannot start), with the reason in the log; not retried."""
        result = self.ledger.refused(task, second, manual, run_id, reason)
        if task.type == "daemon":       # a failed start: the daemon backs off
            self._daemon_exited(Run(run_id, task, second, manual, None, result["ended"]), result)

    def _forked(self, run, pid):
        """The executor of ``run`` exists now (STARTING or PREPARED, pid known)."""
        if not self.table.forked(run, pid):
            return
        if run.launcher is not None:
            self.ledger.started(run)         # again, now with the pid a new supervisor looks for
        if run.pending_signal is not None:
            self._signal_run(run, run.pending_signal)

    def _retry_later(self, task, second, manual):
        if second is not None and not manual:
            self.retry.append((task.name, second))

    # ---- prepared runs: forked before their second, started by a go byte at the boundary ----

    def prepare_ahead(self):
        """Ahead of each second, fork the executors of its runs, waiting for go.

        At the boundary only the command's own exec is left to do: the tick tells each
        launcher which of its prepared runs go, and the launcher writes a byte to each
        one's go pipe, so a burst starts in parallel on every core.  What the tick does not
        find due is cancelled (its go pipe closed) and leaves no trace.  Which seconds,
        when, and how long a burst's executors hold back: see prepare.py.
        """
        if not self.launchers:
            return
        for second in self.ahead.seconds(len(self.launchers)):
            for name in self.ahead.due_at(second):
                task = self.tasks.get(name)
                if len(self.table.prepared) >= prepare.MAX_PREPARED or task is None:
                    break
                if (name, second) not in self.table.prepared:
                    self._prepare(task, second)

    def _prepare(self, task, second):
        try:
            run_id = self.records.allocate_run_id()
            job = executor.Job.for_task(task, self.settings, run_id=run_id, scheduled=second,
                                        db_path=self.db_path, node=self.node_name, prepared=True,
                                        hold_until=self.ahead.hold_until(task.name, second))
            self.fork(job)
        except (OSError, TorchcoreError):
            return          # the tick launches it the ordinary way (or refuses it)
        run = Run(run_id, task, second, False, None, 0.0, launcher=self.launchers.handed_to,
                  state=RunState.PREPARED)
        self.table.add_prepared(run)

    def _fire(self, run):
        """A prepared run is due: True if it starts now (PREPARED -> STARTING; its launcher is
        then told go, and its start recorded), False if a limit says no (it is cancelled)."""
        self.table.leave_prepared(run.run_id)
        task = run.task
        reason = self.table.limit_reason(task, self.settings.max_running)
        if reason or not self.coordinator.claim(task, run.scheduled):
            self._cancel(run)
            if reason:
                self.ledger.skipped(task, run.scheduled, reason, False)
            return False
        # Waiting at the gate (its group known), the command is starting right now.
        self.table.fire(run, self.clock.time())     # PREPARED -> RUNNING or STARTING
        self.skipped_last.pop(task.name, None)
        self.stats.started += 1
        return True

    def _cancel(self, run):
        self.table.cancelled(run)                   # known until its executor's exit is seen
        self.launchers.cancel(run.launcher, [run.run_id])

    def _cancel_prepared(self):
        while self.table.prepared:
            self._cancel(self.table.prepared.popitem()[1])

    def fork(self, job):
        """Have ``job``'s executor forked; returns its pid, or None when a launcher forks it.

        With launchers running (the daemon), the least busy one forks it and reports the
        pid later; without (tests, or launchers that cannot start) the supervisor forks.
        """
        if threading.active_count() != 1:
            # fork() copies only this thread; a lock held by another stays locked in the child.
            raise RuntimeError("the supervisor must stay single-threaded: refusing to fork with "
                               f"{threading.active_count()} threads")
        self.launchers.handed_to = None
        if self.launchers:
            return self.launchers.submit(job)
        return self.system.fork_executor(job, self.report_w)

    def _launcher_answers(self, launcher, answers):
        for answer in answers:
            self._contained("an answer of a launcher", self._launcher_answer, launcher, answer)

    def _launcher_answer(self, launcher, answer):
        run_id = answer.get("forked", answer.get("exited", answer.get("fork_failed")))
        prepared = self.table.prepared_ids.get(run_id)
        if "forked" in answer:
            run = self.table.get(run_id) or prepared
            if run is not None:
                self._forked(run, answer["pid"])
            return
        launcher.runs -= 1
        if prepared is not None:        # a prepared run that never fired: nothing to record
            self.table.prepared_gone(run_id)
        elif "exited" in answer:
            self._executor_exited(run_id, answer["status"])
        else:
            self._fork_failed(run_id, answer["error"])

    def _fork_failed(self, run_id, error):
        run = self.table.forget(run_id)
        if run is None:
            return
        self.ledger.fork_failed(run, error)
        self._retry_later(run.task, run.scheduled, run.manual)

    def _launcher_died(self, launcher):
        """Replace a launcher that died; follow its runs by pid until they end.

        Its runs not forked yet are recorded as failed forks and tried again; prepared ones
        are started the ordinary way by their tick; forked ones report as before."""
        if not self.launchers.remove(launcher):
            return
        log.error("a launcher (pid %d) died; starting another", launcher.pid)
        for run in self.table.prepared_by(launcher):
            self.table.prepared_gone(run.run_id)
        for run in self.table.started_by(launcher):
            if run.executor_pid is None:
                self._fork_failed(run.run_id, "its launcher died")
            else:
                self.table.follow(run)
        if not self.stopping:
            self.launchers.start_missing()

    def _follow_runs_by_pid(self):
        """Runs whose executor is not our child (its launcher died, or it was adopted) end
        when their executor is gone."""
        for run_id in list(self.table.followed):
            run = self.table.get(run_id)
            if run is None:
                self.table.followed.discard(run_id)
            elif not self.system.is_executor(run.executor_pid, run.task.name, run.run_id):
                self._executor_exited(run_id, 0)

    def adopt_previous_executors(self):
        """Take over the runs a killed supervisor left behind, so none runs twice at once.

        An adopted run is a run like any other, followed by its executor's pid: it counts
        against `max` and `max_running`, is stopped at shutdown and when a reload retires
        its daemon task, and its executor still enforces its timeout.  Its executor records
        its own end; runs whose executor is gone without a record are closed as lost.
        """
        for run in adopt.survivors(self.records, self.system, self.tasks, self.clock):
            self.table.adopt(run)
            log.warning("run %d of %s (pid %d) was started by a previous supervisor and still "
                        "runs: it counts against max (adopted, stopped like any other run)",
                        run.run_id, run.task.name, run.executor_pid)
            current = self.tasks.get(run.task.name)
            if adopt.is_daemon_instance(run) and (current is None or current.type != "daemon"):
                self._signal_run(run, signal.SIGTERM)       # its daemon task is gone

    def _close_adopted(self, run):
        """An adopted run ended: its executor wrote its record, or it is closed as lost here."""
        now = self.clock.time()
        adopt.close(self.records, run, now)
        if run.task.type == "daemon":
            self._daemon_exited(run, {"exit_code": None, "signal": None, "timed_out": False,
                                      "started": run.started, "ended": now})

    def _start_reboot_tasks(self):
        for task in self.tasks.values():
            if task.schedule is not None and task.schedule.is_reboot:
                self.launch(task, int(self.clock.time()))

    def tend_daemons(self):
        """Keep every daemon task at `max` instances, respecting its backoff."""
        if not self.daemons:
            return
        mono = self.clock.monotonic()
        for name, slot in self.daemons.items():
            task = self.tasks.get(name)
            if task is None or mono < slot.next_try:
                continue
            missing = task.max - self.table.count(name)
            for _ in range(missing):
                if self.launch(task, None) is None:
                    break

    # ---- reports and reaping --------------------------------------------------------------

    def read_reports(self, key=None, mask=None):
        while True:
            try:
                chunk = os.read(self.report_r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._report_buffer += chunk
        *lines, self._report_buffer = self._report_buffer.split(b"\n")
        for line in lines:
            self._handle_report(line)

    def _handle_report(self, line):
        try:
            message = json.loads(line)
            run = self.table.get(message["run"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed executor report: %r", line[:200])
            return
        if run is None:
            prepared = self.table.prepared_ids.get(message.get("run"))
            if prepared is not None and message.get("e") == "gate":
                prepared.pgid = message.get("pid")      # its command's group, before it runs
            return
        if message.get("e") in ("start", "gate"):     # gate: read only after it was fired
            known, run.pgid = run.pgid, message.get("pid")
            if run.pgid != known:
                self.ledger.started(run)         # history shows the command's pid, as status
            self.table.running(run)     # STARTING -> RUNNING
            if self.stopping:
                self._signal_run(run, signal.SIGTERM, "shutdown")
        elif message.get("e") == "end":
            run.result = message
            self.ahead.started(run.scheduled, message.get("started"))

    def reap(self):
        """Collect every exited child (signals coalesce: never rely on one SIGCHLD each)."""
        while True:
            pid, status = self.system.waitpid()
            if pid == 0:
                return
            launcher = self.launchers.find(pid)
            if launcher is not None:
                launcher.proc.returncode = os.waitstatus_to_exitcode(status)
                self._launcher_died(launcher)
            elif (run_id := self.table.run_of_pid(pid)) is not None:
                self._executor_exited(run_id, status)
            # else: an orphan adopted while we run as PID 1, or a launcher already replaced

    def _executor_exited(self, run_id, status):
        self.read_reports()    # its last report may still sit in the pipe
        run = self.table.forget(run_id)
        if run is not None and run.adopted:
            self._close_adopted(run)
        elif run is not None:
            self._finish(run, status)

    def _finish(self, run, status):
        """Record a run whose executor has exited (RUNNING -> EXITED)."""
        self.table.exited(run)      # RUNNING -> EXITED
        result = run.result
        if result is None:
            code = os.waitstatus_to_exitcode(status)
            result = {"exit_code": None, "signal": None, "timed_out": False, "peak_rss": None,
                      "ended": self.clock.time(), "started": run.started,
                      "error": f"executor ended without a report ({_describe_status(code)})"}
            log.error("run %d of %s: %s", run.run_id, run.task.name, result["error"])
            if run.pgid:
                self.system.kill(-run.pgid, signal.SIGKILL)   # no command may outlive its executor
        self.ledger.ended(run, result)
        if run.task.type == "daemon":
            self._daemon_exited(run, result)

    def _daemon_exited(self, run, result):
        slot = self.daemons.get(run.task.name)
        if slot is None or self.stopping:
            return
        slot.exited(run.task.name, result, run.started, self.clock.monotonic())

    # ---- signals --------------------------------------------------------------------------

    def _read_signals(self, key=None, mask=None):
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            return
        for signum in data:
            name = SIGNALS.get(signum)
            if name:
                getattr(self, f"handle_{name}")()

    def handle_term(self):
        if self.stopping:
            self.kill_all("second stop signal")
        else:
            self.begin_shutdown("SIGTERM")

    def handle_int(self):
        if self.stopping:
            self.kill_all("second stop signal")
        else:
            self.begin_shutdown("SIGINT")

    def handle_hup(self):
        self.reload_requested = "SIGHUP"

    def handle_usr2(self):
        self.reload_requested = "SIGUSR2"

    def handle_chld(self):
        pass    # reaping happens on every pass

    # ---- shutdown -------------------------------------------------------------------------

    def begin_shutdown(self, reason):
        """No new runs; ask every run to stop; KILL what is left after shutdown_grace."""
        self.stopping = True
        self._cancel_prepared()
        self.shutdown_deadline = self.clock.monotonic() + self.settings.shutdown_grace
        log.info("stopping (%s): %d runs to stop, grace %ds", reason, len(self.table),
                 self.settings.shutdown_grace)
        for run in self.table:
            self._signal_run(run, signal.SIGTERM, "shutdown")

    def kill_all(self, reason):
        if not self.killed_all:
            log.warning("killing %d runs now (%s)", len(self.table), reason)
        self.killed_all = True
        for run in self.table:
            self._signal_run(run, signal.SIGKILL, "shutdown")

    def drive_shutdown(self):
        if self.table and self.clock.monotonic() >= self.shutdown_deadline and not self.killed_all:
            self.kill_all(f"shutdown_grace {self.settings.shutdown_grace}s is over")

    def _signal_run(self, run, signum, reason=None):
        """TERM goes to the executor (it stops its command's group); KILL to both at once.

        ``reason`` makes it a planned stop (shutdown, reload): recorded as stopped, not failed."""
        run.stop_reason = run.stop_reason or reason
        if run.adopted and not self.system.is_executor(run.executor_pid, run.task.name, run.run_id):
            return      # ended already (its pid may be another process's now)
        if signum == signal.SIGKILL and run.pgid:
            self.system.kill(-run.pgid, signal.SIGKILL)
        if run.executor_pid is None:
            run.pending_signal = signum     # sent as soon as the launcher has forked it
            return
        self.system.kill(run.executor_pid, signum)
        self.table.stopping(run)        # RUNNING -> STOPPING

    # ---- reload ---------------------------------------------------------------------------

    def reload(self, reason):
        """Parse the file again; apply it if valid, keep everything as it is if not.

        All or nothing: any failure while loading or applying the file (whatever slipped
        past validation) is a rejected reload, logged once; the old tasks stay untouched.
        Returns (accepted, problems).
        """
        path = self.settings.path
        try:
            new = config.load(path)
            problems = config.node_problems(new, self.node)
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            return self._reject(reason, exc.problems)
        except OSError as exc:
            return self._reject(reason, [f"{path}: cannot read: {exc.strerror or exc}"])
        except Exception as exc:
            return self._reject(reason, [f"{path}: cannot load: {type(exc).__name__}: {exc}"])
        try:
            summary = self._apply(new)
        except Exception as exc:
            return self._reject(reason, [f"{path}: cannot apply: {type(exc).__name__}: {exc}"])
        self.reload_error = None
        self.last_reload = (self.clock.time(), True, summary)
        self.last_applied = {"at": self.clock.time(), "reason": reason,
                             "digest": new.digest, **self.changes}
        log.info("reloaded (%s): %s", reason, summary)
        return True, []

    def _reject(self, reason, problems):
        message = "\n".join(problems)
        self.reload_error = message
        self.last_reload = (self.clock.time(), False, message)
        log.error("reload (%s) rejected, the running tasks stay as they were:\n%s", reason, message)
        return False, problems

    def _apply(self, new, first=False):
        """Swap in a validated task file between two ticks; returns a summary.

        All or nothing: everything that can fail (the new task set, the settings, the
        schedule table) is done first, the table put back as it was if it fails; only then
        are prepared runs cancelled and retired daemons stopped.
        """
        old_tasks = self.tasks
        new_tasks = {task.name: task for task in new.local_tasks(self.node)}
        settings = dataclasses.replace(
            new.settings, state_dir=self.settings.state_dir, log_dir=self.settings.log_dir,
            pidfile=self.settings.pidfile)
        removed = [name for name in old_tasks if name not in new_tasks]
        changed = [name for name, task in new_tasks.items()
                   if name in old_tasks and old_tasks[name] != task]
        added = [name for name in new_tasks if name not in old_tasks]
        self.changes = {"added": len(added), "changed": len(changed), "removed": len(removed)}
        self.planner.reschedule(old_tasks, removed + changed,
                                [new_tasks[name] for name in changed + added])
        # Nothing below fails: the new state is in place.
        self._cancel_prepared()     # they were forked with the old specs
        self.ahead.forget_due()
        for name in removed + changed:
            self._retire(old_tasks[name], "removed" if name in removed else "changed")
        for name in changed + added:
            self._admit(new_tasks[name])
        if not first:
            self._warn_fixed_settings(new.settings)
        self.taskfile = new
        self.settings = settings
        self.planner.misfire_grace = self.settings.misfire_grace
        self.tasks = new_tasks
        self.file_signature = _file_signature(new.path)
        gc.freeze()     # what is loaded now stays shared with the children
        return (f"{len(new_tasks)} tasks on this node: {len(added)} added, {len(changed)} changed, "
                f"{len(removed)} removed")

    def _retire(self, task, how="removed"):
        """A removed or changed task (already off the schedule): stop a daemon's instances
        gracefully."""
        if task.type == "daemon":
            self.daemons.retire(task.name)
            for run in self.table.of_task(task.name):
                self._signal_run(run, signal.SIGTERM, f"task {how} by reload")

    def _admit(self, task):
        """A new or changed task (already on the schedule): a daemon gets its slot."""
        if task.type == "daemon":
            self.daemons.admit(task.name)

    def _warn_fixed_settings(self, new):
        for field in ("state_dir", "log_dir", "pidfile"):
            if getattr(new, field) != getattr(self.settings, field):
                problem = safepaths.problem_with(field, getattr(new, field))
                if problem:
                    log.warning("settings.%s changed to %s: refused, %s is kept: %s", field,
                                getattr(new, field), getattr(self.settings, field), problem)
                    continue
                log.warning("settings.%s changed to %s: it takes effect at the next restart",
                            field, getattr(new, field))

    def watch_file(self):
        """Reload when the file on disk changes (edits, atomic renames, symlink swaps): looked
        at when inotify says so, else polled on every pass (see watch.py)."""
        if not self.settings.watch:
            self.filewatch.stop()
            return
        self.filewatch.start(self.selector)
        if not self.filewatch.due():
            return
        signature = _file_signature(self.settings.path)
        if signature is None or signature == self.file_signature:
            return
        self.file_signature = signature
        try:        # at most the loader's limit: a bigger file is a change (and a rejected reload)
            with open(self.settings.path, "rb") as handle:
                digest = hashlib.sha256(handle.read(config.MAX_FILE_BYTES + 1)).hexdigest()
        except OSError:
            return
        if digest != self.taskfile.digest:
            self.reload("file changed")
        elif self.reload_error is not None:     # put back as it runs: the rejection is history
            self.reload_error = None
            log.info("the task file on disk is the running version again; the rejected "
                     "reload no longer applies")

    # ---- housekeeping, title, stats --------------------------------------------------------

    def housekeeping(self):
        if self.table.followed:
            self._follow_runs_by_pid()
        if not self.stopping and self.launchers.missing():
            self.launchers.start_missing()
        if not self.ahead.in_burst():
            self.records.flush()
        self._set_title()
        if self.control is not None:
            self.control.reap_idle(self.clock.monotonic())
        if self.clock.monotonic() >= self._next_prune:
            self._next_prune = self.clock.monotonic() + PRUNE_EVERY
            pruned = self.records.prune(self.clock.time() - self.settings.history_days * 86400)
            if pruned:
                log.info("pruned %d records older than %d days", pruned, self.settings.history_days)
        if self.clock.monotonic() >= self._next_stats:
            self._next_stats = self.clock.monotonic() + STATS_EVERY
            log.info("%s", self.stats_line())

    def _set_title(self):
        state = (len(self.tasks), len(self.table), self.stopping, self.settings.path)
        if state == self._title_state:
            return
        self._title_state = state
        name = os.path.basename(self.settings.path)
        title = f"torchcore: supervisor {name} ({len(self.tasks)} tasks, {len(self.table)} running)"
        if self.stopping:
            title += " stopping"
        if title != self._title:
            self.system.set_title(title)
            self._title = title

    def stats_line(self):
        load = os.getloadavg()
        rss = psutil.Process().memory_info().rss
        s = self.stats
        return (f"stats: tasks={len(self.tasks)} running={len(self.table)} started={s.started} "
                f"failed={s.failed} skipped={s.skipped} missed={s.missed} "
                f"fork_failures={s.fork_failures} errors={s.errors} wakes={self.wakeups.passes} "
                f"log_failures={daemonlog.failures()} "
                f"load={load[0]:.2f},{load[1]:.2f},{load[2]:.2f} "
                f"rss={rss // 1024}K mem_used={psutil.virtual_memory().percent}%")


def _record_signal(signum, frame):
    """Handlers only record: the wakeup fd carries the signal number to the loop."""


def _describe_status(code):
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
