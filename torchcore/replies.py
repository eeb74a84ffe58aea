"""What the daemon answers on its control socket: control.py calls ``control_<cmd>(request)``.

Each reply is read from the supervisor's state (the run table, the daemon slots, the last
reload) or asks it to act (a manual run, a reload); the replies return the payload, or raise
TorchcoreError for a refusal the client shows.
"""

import dataclasses
import os
import signal

from torchcore import config, daemonlog
from torchcore.control import Later
from torchcore.errors import TorchcoreError


class Replies:
    """The control handler of one supervisor."""

    def __init__(self, supervisor):
        self.sup = supervisor
        self.disabled = set()       # tasks taken off the schedule by `disable`, until a reload

    def control_status(self, request):
        """The daemon's live state; the CLI adds next runs and history from the file and db.

        ``{"cmd": "status", "active": true}`` (the HTTP service, every second or so) lists only
        the tasks with something live (runs, a skip, a daemon slot, a disable, `run: once`
        holders): a task missing there is idle.  At 10,000 tasks the full answer takes the loop
        about 40 ms to make; this one, a few runs' worth.
        """
        sup = self.sup
        names = sup.tasks
        if request.get("active"):
            names = ({run.task.name for run in sup.table} | set(sup.skipped_last) | set(sup.daemons)
                     | self.disabled | sup.coordinator.once) & sup.tasks.keys()
        when, ok, message = sup.last_reload or (None, None, None)
        return {
            "pid": os.getpid(), "pidfile": sup.pidfile,
            "started": sup.started_at, "now": sup.clock.time(),
            "file": sup.settings.path, "digest": sup.taskfile.digest,
            "node": {"hostname": sup.node.hostname,
                     "addresses": [str(a) for a in sup.node.addresses]},
            "last_reload": {"at": when, "accepted": ok, "message": message} if when else None,
            "reload_error": sup.reload_error, "stopping": sup.stopping,
            "stats": dataclasses.asdict(sup.stats), "log_failures": daemonlog.failures(),
            "tasks": {name: self._task_status(name) for name in names},
            "services": sup.services.describe(),
            "disabled": sorted(self.disabled),
        }

    def _task_status(self, name):
        sup = self.sup
        runs = sup.table.of_task(name)
        kind, schedule, timezone = sup.tasks.brief(name)
        entry = {"type": kind, "schedule": schedule, "timezone": timezone,
                 "running": [{"run_id": r.run_id, "pid": r.pgid, "executor_pid": r.executor_pid,
                              "started": r.started, "scheduled": r.scheduled,
                              "state": "adopted" if r.adopted else r.state} for r in runs],
                 "skipped": sup.skipped_last.get(name)}
        if name in self.disabled:
            entry["disabled"] = True
        slot = sup.daemons.get(name)
        if slot is not None:
            entry["daemon"] = slot.status(sup.clock.monotonic())
        holders = sup.coordinator.holders(name)     # `run: once`: who runs it (holders.py)
        if holders is not None:
            entry["once"] = holders
        return entry

    def control_run(self, request):
        """Start a run now (counts against the limits, recorded as manual)."""
        sup = self.sup
        name = request.get("task")
        task = sup.tasks.get(name)
        if task is None:
            names = sup.taskfile.names()
            where = f"is not in the task file{config.suggest(str(name), names)}" \
                if name not in names else sup.taskfile.not_here(name)
            raise TorchcoreError(f"task {name!r} {where}")
        if sup.stopping:
            raise TorchcoreError("torchcore is stopping")
        run = sup.starter.launch(task, None, manual=True)
        if run is None:
            reason = sup.skipped_last.get(name) or "the coordinator refused it"
            raise TorchcoreError(f"task {name!r} not started: {reason}")
        return {"run_id": run.run_id, "executor_pid": run.executor_pid}

    def control_reload(self, request):
        """Reload; the reply waits (without holding the loop) for the file's verdict, and
        says whether the file watch had applied this very file already."""
        later = Later()
        self.sup.reloader.request("control request", lambda *result: later.send(
            self._reload_reply(*result)))
        return later.reply or later

    def _reload_reply(self, accepted, problems):
        sup = self.sup
        before = sup.applied_before         # what was applied before this reload
        reply = {"accepted": accepted, "problems": problems}
        if accepted:
            reply["summary"] = sup.last_reload[2]
            if before and before["reason"] == "file changed" and \
                    before["digest"] == sup.taskfile.digest and not any(sup.changes.values()):
                reply["already"] = before       # the file watch applied this very file
                sup.last_applied = before
        return reply

    def control_disable(self, request):
        """Take a task off the schedule until the next reload (its running runs go on; a
        daemon task's instances are stopped).  A manual run still starts."""
        sup, name = self.sup, self._local_task(request)
        if name in self.disabled:
            return {"disabled": True, "changed": False}
        task = sup.tasks[name]
        if name in sup.planner:
            sup.planner.remove(name)
            sup.ahead.forget_due()      # prepared runs of it are cancelled at their second
        if task.type == "daemon":       # off its slot, its instances told to stop
            sup.daemons.retire(name)
            for run in sup.table.of_task(name):
                sup.starter.signal_run(run, signal.SIGTERM, "task disabled")
        self.disabled.add(name)
        return {"disabled": True, "changed": True}

    def control_enable(self, request):
        """Put a task disabled by ``disable`` back on the schedule."""
        sup, name = self.sup, self._local_task(request)
        if name not in self.disabled:
            return {"disabled": False, "changed": False}
        self._reschedule(sup.tasks[name])
        self.disabled.discard(name)
        return {"disabled": False, "changed": True}

    def after_reload(self):
        """An accepted reload ends every ``disable``: its tasks are scheduled as the file says."""
        for name in self.disabled:
            task = self.sup.tasks.get(name)
            if task is not None:
                self._reschedule(task)
        self.disabled.clear()

    def _reschedule(self, task):
        sup = self.sup
        if task.type == "daemon":
            if sup.daemons.get(task.name) is None:
                sup.daemons.admit(task.name)
        elif not task.schedule.is_reboot and task.name not in sup.planner:
            sup.planner.set(task.name, task.schedule)
            sup.ahead.forget_due()

    def _local_task(self, request):
        name = request.get("task")
        if not isinstance(name, str) or name not in self.sup.tasks:
            self.control_run(request)   # raises the error `run` gives for that name
        return name

    def control_ping(self, request):
        """Who serves this socket: the CLI finds the daemon (and its pidfile) by this."""
        sup = self.sup
        return {"pid": os.getpid(), "pidfile": sup.pidfile,
                "state_dir": sup.settings.state_dir, "file": sup.settings.path,
                "started": sup.started_at, "shutdown_grace": sup.settings.shutdown_grace}
