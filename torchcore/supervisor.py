"""The supervisor: one process, one thread, one select loop.

Each pass sleeps on a selector until the next second that has work (a task due, a run to
prepare, a retry, a daemon's backoff over, housekeeping due; MAX_SLEEP at most) or until
something wakes it: a signal, a report from an executor, a launcher's answer, a control
request, the task file changing (inotify), the wall clock being set (timerfd; see watch.py).
It then reaps every child that exited, passes the quiet seconds it slept through in one step
and hands the current second to the planner, launching what is due.
Signal handlers only record: the wakeup fd turns each signal into a byte the
loop reads, and ``handle_<signal>`` changes what the loop does next.  The pieces
it owns do the rest: starting and stopping runs (starting.py), the run table
(runs.py), the records and counts (ledger.py); see docs/architecture.md.
"""

import gc
import logging
import os
import selectors
import signal

from torchcore import adopt, loadchild, paths, prepare, records, reloading, safepaths, taskset, wire
from torchcore.control import ControlServer
from torchcore.coordinator import FleetCoordinator
from torchcore.daemons import Daemons
from torchcore.launcher import LauncherPool
from torchcore.ledger import Ledger
from torchcore.outcome import RunResult
from torchcore.planner import Planner
from torchcore.proctitle import SupervisorTitle
from torchcore.replies import Replies
from torchcore.runs import RunTable
from torchcore.services import Services
from torchcore.starting import Starter
from torchcore.system import System
from torchcore.tasktable import Entries, Loaded, TaskTable
from torchcore.wakeups import Wakeups
from torchcore.watch import ClockWatch, FileWatch

log = logging.getLogger("torchcore")

FLUSH_EVERY = 1.0           # seconds between two writes of the records (each is a transaction)
REPORT_READ = 65536         # bytes asked of the report pipe at once

SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup",
           signal.SIGUSR2: "usr2", signal.SIGCHLD: "chld"}


class Supervisor:
    """Runs this node's share of a task file until told to stop."""

    def __init__(self, taskfile, node, clock=None, coordinator=None, on_ready=None,
                 helper_stderr=None, pidfile=None, system=None, service_options=None,
                 service_stderr=None):
        if not isinstance(taskfile, Loaded):       # loaded here (tests, the API)
            taskfile = Loaded.of_taskfile(taskfile, node)
        self.taskfile = taskfile    # the running file, compact (see tasktable.py)
        self.settings = taskfile.settings
        self.pidfile = pidfile or self.settings.pidfile     # the one it holds: told to commands
        self.node = node
        self.node_name = node.hostname
        self.system = system or System(clock)     # fork, kill, waitpid, launchers, clocks
        self.clock = self.system.clock
        self.coordinator = coordinator or FleetCoordinator(   # `run: once` claims (coordinator.py)
            self.clock, _fleet_name(self.settings, node, service_options),
            service_stderr or helper_stderr)
        self.on_ready = on_ready
        self.ready = False
        self.planner = Planner(self.settings.misfire_grace)
        self.tasks = TaskTable()  # name -> Task running on this node (as records)
        self.daemons = Daemons()    # the daemon tasks' slots: restarts, backoff (see daemons.py)
        self.table = RunTable()     # the runs, started and prepared (see runs.py)
        self.ledger = Ledger(self.node_name, self.clock)  # records and counts (see ledger.py)
        self.launchers = LauncherPool(  # the processes that fork executors (see launcher.py)
            self.system, helper_stderr, self.clock, self.ledger.contain,   # stderr: a path or None
            self._launcher_answers, self._launcher_died)
        self.ahead = prepare.Lookahead(self.planner, self.clock, self.system.cores)  # prepare.py
        self.starter = Starter(     # starts, prepares, fires and signals runs (see starting.py)
            self.table, self.ledger, self.launchers, self.system, self.coordinator, self.ahead,
            self.daemons, db_path=self.db_path, node_name=self.node_name, contain=self.ledger.contain,
            on_exit=self._executor_exited, on_daemon_exit=self._daemon_exited)
        self.services = Services(       # the children that talk to the network (services.py)
            self.clock, self.settings.state_dir, service_stderr or helper_stderr, self.ledger.contain,
            options=service_options)
        self.stats = self.ledger.stats
        self.started_at = self.clock.time()
        self.stopping = False
        self.shutdown_deadline = None
        self.killed_all = False
        self.stop_noted = False         # the seconds not planned while stopping are recorded
        self.reload_requested = None     # the reason, when a reload waits for the loop
        self.last_reload = None          # (epoch, ok, message)
        self.last_applied = None         # the last accepted reload: at, reason, digest, counts
        self.applied_before = None       # ...and the one before it (reload's "already")
        self.changes = {}                # what the last _apply added, changed, removed (counts)
        self.reload_error = None
        self.file_signature = None
        self.skipped_last = self.ledger.skipped_last   # name -> reason, while skipped
        self._report_buffer = b""
        self._reports_read = False       # the report pipe was read after the answers at hand came
        self.flush_at = 0.0              # monotonic: the records are written no earlier (FLUSH_EVERY)
        self.title = SupervisorTitle(self.system.set_title)    # what ps shows (proctitle.py)
        self.wakeups = Wakeups(self)     # when the loop wakes, what it passes (see wakeups.py)
        self.filewatch = FileWatch(self.settings.path, self.clock)
        self.clockwatch = ClockWatch()
        self.records = None
        self.selector = None
        self.control = None
        self.replies = Replies(self)     # what the control socket answers (see replies.py)
        self.reloader = reloading.Reloader(self, helper_stderr)    # reloads in a child

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
                    self.ledger.contain("a pass of the loop", exc)
            self.note_stopped()
        finally:
            self.close()
        log.info("torchcore stopped")
        return 0

    def start(self):
        """Open and start all that ``run`` does before its loop (tests then drive the passes)."""
        self._open()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self):
        self.ledger.records = self.records
        self.starter.report_w = self.report_w
        self.launchers.start(self.selector, self.report_w, self.system.launcher_count)
        self.coordinator.attach(self.selector, self.starter)
        self._apply(self.taskfile, None, first=True)
        self.services.apply(self.taskfile, self.node)
        self.adopt_previous_executors()
        now = int(self.clock.time())
        self.ledger.resumed(self.planner, now, self._once())    # the seconds it was down
        self.planner.start(now)
        self.wakeups.started()
        self.starter.start_reboot_tasks()
        self.starter.prepare_ahead()        # the first seconds too, not from the first tick on
        self._set_title()           # before `start` returns: ps never shows the command line
        self.ready = True
        if self.system.loads_in_child and not loadchild.small(self.settings.path):
            self.reloader.prepare_spare()   # the first reload starts at once
        if self.on_ready is not None:
            self.on_ready()
        log.info("torchcore started: %s, %d tasks on this node (%s), pid %d%s",
                 self.settings.path, len(self.tasks), self.node_name, os.getpid(),
                 "; the file was read from the load cache" if self.taskfile.cached else "")

    def adopt_previous_executors(self):
        """Take over the runs a killed supervisor left behind (see adopt.py)."""
        adopt.take_over(self.records, self.system, self.tasks, self.clock, self.table,
                        self.starter.signal_run, self.node_name)
        self.coordinator.adopted([run for run in self.table if run.adopted])  # fleet leases

    def _open(self):
        safepaths.secure_dir(self.settings.state_dir, safepaths.STATE_DIR_MODE,
                             what="state directory", private=True)
        self.system.hold_mark(self.settings.state_dir)   # every executor holds it (procscan.py)
        self.selector = selectors.DefaultSelector()
        self.control = ControlServer(   # first: refused if another daemon serves this state_dir
            paths.control_socket(self.settings.state_dir), self.replies)
        self.control.register(self.selector)
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
        self.file_signature = taskset.signature(self.settings.path)
        self.clockwatch.open(self.selector)

    def close(self):
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        self.reloader.cancel("torchcore stopped before the reload was done")
        if self.control is not None:
            self.control.close()
        if self.records is not None:
            self.records.flush()    # the last ends, for the fleet agent to ship as it stops
        self.services.stop()
        self.launchers.stop()
        self.coordinator.close()        # after the launchers: its wait holds nothing unread
        self.system.release_mark()
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
        return paths.records_db(self.settings.state_dir)

    def finished(self):
        return self.stopping and not self.table

    # ---- the loop -------------------------------------------------------------------------

    def loop_once(self):
        """One pass: wait, read events, reap, then act on the current second."""
        for key, mask in self.selector.select(self.wakeups.nap(self._sleep_time())):
            key.data(key, mask)
        self.wakeups.passes += 1
        self.reap()
        if self.reload_requested:
            reason, self.reload_requested = self.reload_requested, None
            self.reloader.request(reason)
        if self.stopping:
            self.drive_shutdown()
        else:
            self.watch_file()
            if self.table.prepared:
                self.ahead.await_boundary(self.wakeups.boundary())
            now = int(self.clock.time())
            self.wakeups.pass_quiet(now)
            if now != self.planner.watermark:
                self.ledger.timed_tick(self.tick, now)
            self.wakeups.tend()
            self.starter.prepare_ahead()
            self.reloader.work()        # a slice of a reload under way (reloading.py)
        self.housekeeping()

    def _sleep_time(self):
        wait, reload = self.wakeups.sleep_time(), self.reloader.wait(self.clock.time())
        return wait if reload is None else min(wait, reload)    # a reload's slices to do

    def nap_fds(self):
        """What ends a nap between two busy passes (see Wakeups.nap): a signal, a request."""
        return [self._wake_r] + ([self.control.fileno()] if self.control is not None else [])

    def tick(self, now):
        """Launch what the planner says is due at ``now`` (and log what the clock did)."""
        plan = self.planner.advance(now)
        for message in plan.events:
            log.warning("%s", message)
        for name, second, count in plan.missed:
            self.ledger.missed(name, second, count, self.settings.misfire_grace)
        self.starter.start_due(now, plan.due)

    # ---- reports and reaping --------------------------------------------------------------

    def read_reports(self, key=None, mask=None):
        while True:
            try:
                chunk = os.read(self.report_r, REPORT_READ)
            except BlockingIOError:
                break
            self._report_buffer += chunk
            if len(chunk) < REPORT_READ:    # the pipe is empty (or closed): what comes later
                break                       # wakes the loop again
        *lines, self._report_buffer = self._report_buffer.split(b"\n")
        for line in lines:
            self.starter.report(line, self.stopping)

    def reap(self):
        """Collect every exited child (signals coalesce: never rely on one SIGCHLD each)."""
        while True:
            pid, status = self.system.waitpid()
            if pid == 0:
                return
            if self.services.exited(pid, status) or self.coordinator.exited(pid, status):
                continue
            launcher = self.launchers.find(pid)
            if launcher is not None:
                launcher.proc.returncode = os.waitstatus_to_exitcode(status)
                self._launcher_died(launcher)
            elif (run_id := self.table.run_of_pid(pid)) is not None:
                self._executor_exited(run_id, status)
            elif self.reloader.owns(pid):
                self.reloader.exited(pid, status)
            # else: an orphan adopted while we run as PID 1, or a launcher already replaced

    def _launcher_died(self, launcher):
        """Replace a launcher that died (its runs: see Starter.launcher_died)."""
        if self.starter.launcher_died(launcher) and not self.stopping:
            self.launchers.start_missing()

    def _launcher_answers(self, launcher, answers):
        """A launcher's answers: the report pipe read once for all the exits among them (an
        executor's last report is in the pipe before its launcher sees it exit)."""
        if any(type(answer) is wire.Exited for answer in answers):
            self.read_reports()
            self._reports_read = True
        try:
            self.starter.launcher_answers(launcher, answers)
        finally:
            self._reports_read = False

    def _executor_exited(self, run_id, status):
        if not self._reports_read:
            self.read_reports()    # its last report may still sit in the pipe
        run = self.table.forget(run_id)
        if run is not None:
            self.coordinator.ended(run)     # a `run: once` run's slot is free (coordinator.py)
        if run is not None and run.adopted:
            result = adopt.close(self.records, run, self.clock.time())
            if run.task.type == "daemon":
                self._daemon_exited(run, result)
        elif run is not None:
            self._finish(run, status)

    def _finish(self, run, status):
        """Record a run whose executor has exited (RUNNING -> EXITED)."""
        self.table.exited(run)      # RUNNING -> EXITED
        report = run.report         # the executor's wire.End, if it sent one
        if report is not None:
            result = RunResult.from_report(report, run.stop_reason, run.killed)
        else:
            how = RunResult.from_returncode(os.waitstatus_to_exitcode(status)).ending(raw=True)
            result = RunResult(error=f"executor ended without a report ({how})",
                               stopped=run.stop_reason, started=run.started,
                               ended=self.clock.time())
            log.error("run %d of %s: %s", run.run_id, run.task.name, result.error)
            if run.pgid:
                self.system.kill(-run.pgid, signal.SIGKILL)   # no command may outlive its executor
        self.ledger.ended(run, result, report.log_problem if report is not None else None)
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

    def handle_term(self, name="SIGTERM"):
        if self.stopping:
            self.kill_all("second stop signal")
        else:
            self.begin_shutdown(name)

    def handle_int(self):
        self.handle_term("SIGINT")

    def handle_hup(self):
        self.reload_requested = "SIGHUP"

    def handle_usr2(self):
        self.reload_requested = "SIGUSR2"

    def handle_chld(self):
        pass    # reaping happens on every pass

    # ---- shutdown -------------------------------------------------------------------------

    def begin_shutdown(self, reason):
        """No new runs; ask every run to stop; KILL what is left after shutdown_grace."""
        self.stopping = self.starter.stopping_now = True
        self.reloader.cancel("torchcore is stopping; the reload was not applied")
        self.starter.cancel_prepared()
        self.shutdown_deadline = self.clock.monotonic() + self.settings.shutdown_grace
        log.info("stopping (%s): %d runs to stop, grace %ds", reason, len(self.table),
                 self.settings.shutdown_grace)
        self.starter.signal_all(signal.SIGTERM, "shutdown")

    def kill_all(self, reason):
        if not self.killed_all:
            log.warning("killing %d runs now (%s)", len(self.table), reason)
        self.killed_all = True
        self.starter.signal_all(signal.SIGKILL, "shutdown")

    def drive_shutdown(self):
        if self.table and self.clock.monotonic() >= self.shutdown_deadline and not self.killed_all:
            self.kill_all(f"shutdown_grace {self.settings.shutdown_grace}s is over")
        if not self.table:
            self.note_stopped()

    def note_stopped(self):
        """Stopped: the seconds none planned since the last tick are missed (see ledger.py)."""
        if not self.stop_noted:
            self.stop_noted = True
            self.ledger.stopped(self.planner, int(self.clock.time()), self._once())

    def _once(self):
        """The `run: once` tasks, which a node down or stopping does not miss (ledger.py)."""
        return getattr(self.coordinator, "once", ())

    # ---- reload ---------------------------------------------------------------------------

    def reload(self, reason):
        """Load the file again here, at once (tests, small files; the loop has a big file
        loaded in a child: Reloader.request); apply it if valid, keep all as it is if not."""
        return self.finish_reload(reloading.in_process(
            reason, self.settings.path, self.node, self.tasks, self.clock))

    def finish_reload(self, reload):
        """Apply a loaded and compared file (a reloading.Reload) or reject it.  All or nothing:
        any failure while loading or applying the file (whatever slipped past validation) is
        a rejected reload, logged once; the old tasks stay untouched.  (accepted, problems)."""
        if not reload.ready:
            return self._reject(reload.reason, reload.problems)
        try:
            summary = self._apply(reload.loaded(), reload)
        except Exception as exc:
            return self._reject(reload.reason,
                                [f"{reload.path}: cannot apply: {type(exc).__name__}: {exc}"])
        self.reload_error = None
        self.services.apply(self.taskfile, self.node, reloaded=True)
        self.replies.after_reload()     # a `disable` lasts until the next reload
        self.last_reload = self.ledger.reloaded(True, summary)
        self.applied_before, self.last_applied = self.last_applied, {
            "at": self.clock.time(), "reason": reload.reason, "digest": reload.digest, **self.changes}
        log.info("reloaded (%s): %s%s", reload.reason, summary, reload.timing(self.clock))
        return True, []

    def _reject(self, reason, problems):
        message = "\n".join(problems)
        self.reload_error = message
        self.last_reload = self.ledger.reloaded(False, message)
        log.error("reload (%s) rejected, the running tasks stay as they were:\n%s", reason, message)
        return False, problems

    def _apply(self, new, change, first=False):
        """Swap in a validated task file (a Loaded) between two ticks; ``change``:
        the Reload that compared it with the running one (None at the start: all added).
        Returns a summary.  All or nothing: what can fail (the schedule table) is done
        first, the table put back as it was (or a big change, set aside, dropped) if it
        fails; only then are prepared runs cancelled and retired daemons stopped.
        """
        old, table = self.tasks, new.table
        added, changed, removed = (list(table), [], []) if change is None else \
            (change.added, change.changed, change.removed)
        self.changes = {"added": len(added), "changed": len(changed), "removed": len(removed)}
        if change is not None and change.aside is not None:     # a big change, set aside
            self.planner.take(change.aside)
        else:
            self.planner.reschedule(Entries(old), removed + changed,
                                    (table.entry(name) for name in changed + added))
        # Nothing below fails: the new state is in place.
        self.starter.cancel_prepared()     # they were forked with the old specs
        self.ahead.forget_due()
        for name in removed + changed:
            if name in old.daemons:        # stopped gracefully; if changed, started again
                self.daemons.retire(name)
                how = "removed" if name in removed else "changed"
                for run in self.table.of_task(name):
                    self.starter.signal_run(run, signal.SIGTERM, f"task {how} by reload")
        for name in changed + added:
            if name in table.daemons:      # a new or changed daemon: a fresh slot
                self.daemons.admit(name)
        if not first:
            taskset.warn_fixed_settings(self.settings, new.settings)
        self.taskfile, self.settings, self.tasks = new, taskset.running_settings(
            new.settings, self.settings), table
        self.planner.misfire_grace = self.settings.misfire_grace
        self.starter.use(self.tasks, self.settings)
        self.file_signature = taskset.signature(new.path)
        gc.freeze()     # what is loaded now stays shared with the children
        return (f"{len(table)} tasks on this node: {len(added)} added, {len(changed)} changed, "
                f"{len(removed)} removed")

    def watch_file(self):
        """Reload when the file on disk changes (edits, atomic renames, symlink swaps): looked
        at when inotify says so, else polled on every pass (see watch.py)."""
        if not self.settings.watch:
            self.filewatch.stop()
            return
        self.filewatch.start(self.selector)
        if not self.filewatch.due():
            return
        signature = taskset.signature(self.settings.path)
        if signature is None or signature == self.file_signature:
            return
        self.file_signature = signature
        digest = taskset.digest(self.settings.path)
        if digest is None:
            return
        if digest != self.taskfile.digest:
            self.reloader.request("file changed")
        elif self.reload_error is not None:     # put back as it runs: the rejection is history
            self.reload_error = None
            log.info("the task file on disk is the running version again; the rejected "
                     "reload no longer applies")

    # ---- housekeeping, title, stats --------------------------------------------------------

    def housekeeping(self):
        if self.table.followed:
            self.starter.follow_runs_by_pid()
        if not self.stopping and self.launchers.missing():
            self.launchers.start_missing()
        if not self.stopping:
            self.services.tend()
            self.ledger.planned(self.planner.watermark)     # written with the records
        if self.records.pending and not self.ahead.in_burst() and \
                self.clock.monotonic() >= self.flush_at:
            if self.records.flush():    # one transaction for what came since the last
                self.flush_at = self.clock.monotonic() + FLUSH_EVERY
        self._set_title()
        if self.control is not None:
            self.control.reap_idle(self.clock.monotonic())
        self.ledger.now_and_then(self.settings.history_days, len(self.tasks), len(self.table),
                                 self.wakeups.passes)


    def _set_title(self):
        self.title.show(self.settings.path, len(self.tasks), len(self.table), self.stopping)


def _fleet_name(settings, node, options):
    """This node's name in the fleet: ``--node-name`` (a start option), ``fleet.node``, or the
    short hostname."""
    from torchcore import fleetspec

    override = (options or {}).get("fleet") or [None, None]
    return fleetspec.node_name(settings.fleet, node.hostname, override[-1])


def _record_signal(signum, frame):
    """Handlers only record: the wakeup fd carries the signal number to the loop."""


