"""Starting runs, and stopping them: the supervisor's hands.

The supervisor's loop decides when (a tick, the daemon tasks to tend, a control request, a
shutdown); a ``Starter`` does it.  Starting a run: the limits and the coordinator asked, a run
id and a Job, a launcher (or the supervisor's own process) to fork it, the run put in the run
table and its start in the ledger.  Ahead of each second it prepares the runs due then
(forked, waiting for go; see prepare.py), and at the tick fires them.  It reads what the
launchers answer (forked, exited, fork failed), takes over the runs of a launcher that died,
tries a second whose fork failed once more, and signals runs to stop.

It is given what it works with (the run table, the ledger, the launcher pool, the system, the
coordinator, the look-ahead, the daemon slots) and two ways to hand back what it cannot decide
alone: an executor that has ended (``on_exit``: the supervisor reads its last report and
records it) and a daemon task's start refused (``on_daemon_exit``: its backoff).  ``use``
gives it the tasks and settings in force, at the start and after each accepted reload.
"""

import logging
import signal
import threading

from torchcore import jobspec, prepare, records, wire
from torchcore.claims import CLAIM_LEAD
from torchcore.errors import TorchcoreError
from torchcore.launcher import JobTooLarge
from torchcore.runs import Run
from torchcore.states import RunState

log = logging.getLogger("torchcore")

MAKERS_KEPT = 4096          # tasks whose job part is kept (those starting often); then made anew


class Starter:
    """Starts, prepares, fires, cancels and signals the runs of one supervisor."""

    def __init__(self, table, ledger, launchers, system, coordinator, ahead, daemons, *,
                 db_path, node_name, contain, on_exit, on_daemon_exit):
        self.table = table
        self.ledger = ledger
        self.stats = ledger.stats
        self.skipped_last = ledger.skipped_last
        self.launchers = launchers
        self.system = system
        self.clock = system.clock
        self.coordinator = coordinator
        self.ahead = ahead
        self.daemons = daemons
        self.db_path = db_path
        self.node_name = node_name
        self._contain = contain                 # contain(what, exc): counted, logged once
        self._executor_exited = on_exit         # on_exit(run_id, wait status): it has ended
        self._daemon_exited = on_daemon_exit    # on_daemon_exit(run, result): a failed start
        self.tasks = {}             # name -> Task on this node (see use)
        self.settings = None
        self.report_w = None        # the report pipe, for an executor forked here (set at start)
        self.retry = []             # (name, second) whose fork failed: tried again next tick
        self.stopping_now = False   # a shutdown began: claims won now start nothing
        self._makers = {}           # name -> jobspec.JobMaker of its Task under these settings

    def use(self, tasks, settings):
        """The tasks and settings runs start with from now on."""
        self.tasks = tasks
        self.settings = settings
        once = getattr(tasks, "once", ())
        self.coordinator.use(settings, tasks)
        self.ahead.claim_lead = settings.fleet.takeover + CLAIM_LEAD if once and settings.fleet \
            else 0.0
        self.ahead.once = once
        self._makers.clear()

    def _job(self, task, run_id, scheduled, manual=False, prepared=False, hold_until=None):
        """The Job of one run of ``task``: its task's part made once for all of its runs (as
        long as the Task and the settings are the same objects), the run's own added; a run
        the coordinator adds variables to (a ``run: once`` run's fence) is made whole."""
        extra_env = self.coordinator.env(task, scheduled)
        if extra_env:
            return jobspec.Job.for_task(task, self.settings, run_id=run_id, scheduled=scheduled,
                                        manual=manual, db_path=self.db_path, node=self.node_name,
                                        prepared=prepared, hold_until=hold_until,
                                        extra_env=extra_env)
        maker = self._makers.get(task.name)
        if maker is None or maker.task is not task or maker.settings is not self.settings:
            if len(self._makers) >= MAKERS_KEPT:
                self._makers.clear()
            maker = self._makers[task.name] = jobspec.JobMaker(
                task, self.settings, db_path=self.db_path, node=self.node_name)
        return maker.job(run_id, scheduled, manual, prepared, hold_until)

    @property
    def records(self):
        return self.ledger.records

    def _contained(self, what, action, *args):
        """``action(*args)``, its failure contained (see _contain); returns its result or None."""
        try:
            return action(*args)
        except Exception as exc:
            self._contain(what, exc)
            return None

    # ---- what is due: the tick's runs, @reboot tasks, daemon instances ---------------------

    def start_due(self, now, due):
        """Start the runs ``due`` at ``now`` (the planner's (name, second) pairs) and the
        seconds whose fork failed that may still run: the prepared ones fired first, one go
        message per launcher, then the rest forked; what was prepared but is not due is
        cancelled."""
        go = {}         # launcher -> run ids of prepared runs to start now
        fired = []
        rest = []       # due, not prepared: forked after the prepared ones got their go
        for name, second in self._due_retries(now, due) + due:
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

    def start_reboot_tasks(self):
        for name in [name for name in self.tasks if name in self.tasks.reboot]:   # file order
            self.launch(self.tasks[name], int(self.clock.time()))

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

    # ---- launching ------------------------------------------------------------------------

    def launch(self, task, second, manual=False):
        """Start one run of ``task`` unless the coordinator or a limit forbids it; returns the
        Run or None."""
        reason = self._refusal(task, second)
        if reason is not None:
            if reason:
                self.ledger.skipped(task, second, reason, manual)
            return None
        try:
            run_id = self.records.allocate_run_id()
        except records.RecordsError as exc:
            log.error("cannot number a run of %s: %s; retrying next second", task.name, exc)
            self._retry_later(task, second, manual)
            return None
        job = self._job(task, run_id, second, manual)
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
        self.coordinator.started(run)
        self.skipped_last.pop(task.name, None)
        self.stats.started += 1
        self.ledger.started(run)
        if pid is not None:
            self._forked(run, pid)
        return run

    def _refusal(self, task, second):
        """None if a run of ``task`` for ``second`` may start now; else why not: a text to
        record as a skip, or "" (another node runs it: nothing to record).  The coordinator is
        asked first: a `run: once` second is the business of the node that won its claim (and
        its ``max`` counts across the fleet, not here)."""
        verdict = self.coordinator.claim(task, second)
        if verdict is not True:
            return verdict or ""
        return self.table.limit_reason(task, self.settings.max_running, task.run != "once")

    def _refuse(self, task, second, manual, run_id, reason):
        """A run that cannot be handed to a launcher: recorded at once as failed (exit 126, as
        a command that cannot start), with the reason in the log; not retried."""
        result = self.ledger.refused(task, second, manual, run_id, reason)
        if task.type == "daemon":       # a failed start: the daemon backs off
            self._daemon_exited(Run(run_id, task, second, manual, None, result.ended), result)

    def _forked(self, run, pid):
        """The executor of ``run`` exists now (STARTING or PREPARED, pid known)."""
        if not self.table.forked(run, pid):
            return
        self.coordinator.started(run)       # its executor's pid (for a `run: once` lease)
        if run.launcher is not None:
            self.ledger.started(run)         # again, now with the pid: written with the records
        if run.pending_signal is not None:
            self.signal_run(run, run.pending_signal)

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
        once = getattr(self.tasks, "once", ())     # `run: once` tasks: claimed first (coordinator.py)
        if not self.launchers and not once:
            return
        for second in self.ahead.seconds(max(1, len(self.launchers))):
            names = self.ahead.due_at(second)
            if once and not once.isdisjoint(names):
                self.coordinator.ahead(second, [self.tasks[n] for n in names if n in once])
            if not self.launchers:
                continue
            for name in names:
                task = self.tasks.get(name)
                if len(self.table.prepared) >= prepare.MAX_PREPARED or task is None:
                    break
                if name not in once and (name, second) not in self.table.prepared:
                    self._prepare(task, second)

    def prepare_claimed(self, name, second):
        """The coordinator won the claim of a `run: once` second still ahead: prepare its run."""
        task = self.tasks.get(name)
        if task is not None and self.launchers and (name, second) not in self.table.prepared \
                and len(self.table.prepared) < prepare.MAX_PREPARED:
            self._contained(f"preparing {name}", self._prepare, task, second)

    def start_claimed(self, name, second):
        """The coordinator won a claim after its second (an expired one taken over, or one asked
        at the tick): start it now, unless misfire_grace is over."""
        task = self.tasks.get(name)
        if task is not None and not self.stopping_now and \
                self.clock.time() - second <= self.settings.misfire_grace:
            self._contained(f"starting {name}", self.launch, task, second)

    def skip_claimed(self, name, second, reason):
        """A `run: once` second the coordinator could not decide by its tick (the claims
        process's first connection failed after it): recorded as skipped with ``reason``,
        whatever misfire_grace (it records, it starts nothing)."""
        task = self.tasks.get(name)
        if task is not None:
            self.ledger.skipped(task, second, reason, False)

    def missed_claimed(self, name, second):
        """A `run: once` second won too late to start (beyond misfire_grace): recorded missed."""
        if name in self.tasks:
            self.ledger.missed(name, second, 1, self.settings.misfire_grace)

    def stop_claimed(self, name, second, signum):
        """A `run: once` run whose lease cannot be kept (or whose claim was taken over before
        its start was confirmed): TERM, or KILL when its lease is about to end."""
        for run in self.table.of_task(name):
            if run.scheduled == second:
                self.signal_run(run, signum, "its fleet lease could not be kept")

    def _prepare(self, task, second):
        try:
            run_id = self.records.allocate_run_id()
            job = self._job(task, run_id, second, prepared=True,
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
        reason = self._refusal(task, run.scheduled)
        if reason is not None:
            self._cancel(run)
            if reason:
                self.ledger.skipped(task, run.scheduled, reason, False)
            return False
        # Waiting at the gate (its group known), the command is starting right now.
        self.table.fire(run, self.clock.time())     # PREPARED -> RUNNING or STARTING
        self.coordinator.started(run)
        self.skipped_last.pop(task.name, None)
        self.stats.started += 1
        return True

    def _cancel(self, run):
        self.table.cancelled(run)                   # known until its executor's exit is seen
        self.launchers.cancel(run.launcher, [run.run_id])

    def cancel_prepared(self):
        """Cancel every prepared run (a shutdown, or a reload: they were forked with the old
        specs)."""
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

    # ---- what the launchers answer, and a launcher's death ---------------------------------

    def launcher_answers(self, launcher, answers):
        """The pool's ``on_answers``: each answer handled, its failure contained."""
        for answer in answers:
            self._contained("an answer of a launcher", self._launcher_answer, launcher, answer)

    def _launcher_answer(self, launcher, answer):
        """One wire.Forked, Exited or ForkFailed."""
        run_id = answer.run
        prepared = self.table.prepared_ids.get(run_id)
        if isinstance(answer, wire.Forked):
            run = self.table.get(run_id) or prepared
            if run is not None:
                self._forked(run, answer.pid)
            return
        launcher.runs -= 1
        if prepared is not None:        # a prepared run that never fired: nothing to record
            self.table.prepared_gone(run_id)
        elif isinstance(answer, wire.Exited):
            self._executor_exited(run_id, answer.status)
        else:
            self._fork_failed(run_id, answer.error)

    def _fork_failed(self, run_id, error):
        run = self.table.forget(run_id)
        if run is None:
            return
        self.coordinator.ended(run)
        self.ledger.fork_failed(run, error)
        self._retry_later(run.task, run.scheduled, run.manual)

    def launcher_died(self, launcher):
        """Take a launcher that died out of the pool; follow its runs by pid until they end.
        False if it was out already (the supervisor starts another when it was not).

        Its runs not forked yet are recorded as failed forks and tried again; prepared ones
        are started the ordinary way by their tick; forked ones report as before."""
        if not self.launchers.remove(launcher):
            return False
        log.error("a launcher (pid %d) died; starting another", launcher.pid)
        for run in self.table.prepared_by(launcher):
            self.table.prepared_gone(run.run_id)
        for run in self.table.started_by(launcher):
            if run.executor_pid is None:
                self._fork_failed(run.run_id, "its launcher died")
            else:
                self.table.follow(run)
        return True

    def follow_runs_by_pid(self):
        """Runs whose executor is not our child (its launcher died, or it was adopted) end
        when their executor is gone."""
        for run_id in list(self.table.followed):
            run = self.table.get(run_id)
            if run is None:
                self.table.followed.discard(run_id)
            elif not self.system.is_executor(run.executor_pid, run.task.name, run.run_id):
                self._executor_exited(run_id, 0)

    # ---- the executors' reports -------------------------------------------------------------

    def report(self, line, stopping):
        """One line of the report pipe: a run's gate, start or end (``stopping``: the daemon
        stops, so a run that starts now is asked to stop at once)."""
        try:
            report = wire.decode_report(line)       # Gate, Start, End; None: another kind
            run = None if report is None else self.table.get(report.run)
        except (ValueError, TypeError):
            log.warning("ignored a malformed executor report: %r", line[:200])
            return
        if run is None:
            prepared = None if report is None else self.table.prepared_ids.get(report.run)
            if prepared is not None and isinstance(report, wire.Gate):
                prepared.pgid = report.pid      # its command's group, before it runs
            return
        if isinstance(report, (wire.Start, wire.Gate)):    # gate: read only after it was fired
            known, run.pgid = run.pgid, report.pid
            if run.pgid != known:
                self.ledger.started(run)         # history shows the command's pid, as status
            self.table.running(run)     # STARTING -> RUNNING
            if stopping:
                self.signal_run(run, signal.SIGTERM, "shutdown")
        elif isinstance(report, wire.End):
            run.report = report
            self.ahead.started(run.scheduled, report.started)

    # ---- stopping ---------------------------------------------------------------------------

    def signal_run(self, run, signum, reason=None):
        """TERM goes to the executor (it stops its command's group); KILL to both at once.

        ``reason`` makes it a planned stop (shutdown, reload): recorded as stopped, not failed."""
        run.stop_reason = run.stop_reason or reason
        if run.adopted and not self.system.is_executor(run.executor_pid, run.task.name, run.run_id):
            return      # ended already (its pid may be another process's now)
        if signum == signal.SIGKILL and run.pgid:
            run.killed = True       # its executor may see the command killed before it dies
            self.system.kill(-run.pgid, signal.SIGKILL)
        if run.executor_pid is None:
            run.pending_signal = signum     # sent as soon as the launcher has forked it
            return
        self.system.kill(run.executor_pid, signum)
        self.table.stopping(run)        # RUNNING -> STOPPING

    def signal_all(self, signum, reason):
        """Signal every started run (a shutdown: TERM, then KILL for what is left)."""
        for run in self.table:
            self.signal_run(run, signum, reason)
