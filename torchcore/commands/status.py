"""`torchcore status` and `torchcore run`: what runs, what ran, and a run right now."""

import os
import signal
import subprocess
import sys
import time
from datetime import datetime

from torchcore import config, fleetstore, holders, jobspec, notifystore, paths, records
from torchcore.commands import common
from torchcore.commands.common import control_request, find_daemon, not_running, print_json
from torchcore.errors import ConfigError, TorchcoreError
from torchcore.node import Node
from torchcore.schedule import Schedule
from torchcore.states import TaskHealth
from torchcore.textfmt import format_relative, format_table
from torchcore.units import format_duration
from torchcore.web.settings import AUTH_MODES as AUTH_WORDS


def register(subparsers):
    status = subparsers.add_parser("status", help="the daemon and every task: next run, running, last result")
    common.add_daemon_options(status)
    common.add_node_options(status)
    common.add_json_option(status)
    status.set_defaults(func=cmd_status)

    run = subparsers.add_parser("run", help="start a run of TASK now, through the daemon")
    common.add_daemon_options(run)
    common.add_node_options(run)
    run.add_argument("task", metavar="TASK")
    run.add_argument("--local", action="store_true",
                     help="run it here in the foreground, output to the terminal, without a daemon")
    run.set_defaults(func=cmd_run)


# ---- status ------------------------------------------------------------------------------

def cmd_status(args):
    found = find_daemon(args)
    live = control_request(found, "status") if found.pid is not None else None
    try:
        tasks, digest, problems = _tasks_to_show(common.task_file_path(args), live)
    except ConfigError as exc:      # say first what status is asked for: whether torchcore runs
        state = (f"torchcore runs (pid {found.pid}) but does not answer on {found.socket}"
                 if found.pid is not None else "torchcore is not running")
        raise ConfigError([f"{state}; the task file does not validate:", *exc.problems]) from None
    node = _node_of(live, args)
    last = _last_results(found.settings)
    now = time.time()
    rows = [task_status(task, node, live, last.get(task.name), now) for task in tasks]
    notifications = notifystore.overview_in(found.settings.state_dir)
    fleet = fleetstore.state_in(found.settings.state_dir)
    if args.json:
        print_json({**status_json(found, live, digest, problems, rows),
                    "notifications": _notifications_json(notifications),
                    "fleet": _fleet_json(fleet)})
    else:
        print(_daemon_text(live, found, digest, now))
        for line in notifystore.summary(notifications) + fleetstore.summary(fleet, bool(live)):
            print(line)
        if problems:
            print("the task file on disk is invalid (the daemon runs its last valid version):")
            print("\n".join("  " + problem for problem in problems))
        print()
        print(_tasks_text(rows, now))
        for line in _once_text(rows, (fleet or {}).get("node")):
            print(line)
    if live:
        return common.EXIT_OK
    return common.EXIT_ERROR if found.pid is not None else common.EXIT_NOT_RUNNING


def _tasks_to_show(path, live):
    """(tasks, digest, problems): the file's tasks, or the daemon's when the file is invalid."""
    try:
        taskfile = load_within(path, LOAD_BUDGET)
        return taskfile.tasks, taskfile.digest, []
    except ConfigError as exc:
        if not live:
            raise
        tasks = [_LiveTask.of(name, entry) for name, entry in live["tasks"].items()]
        return tasks, None, exc.problems


LOAD_BUDGET = 10     # seconds status gives the task file on disk before it shows the daemon's


def load_within(path, seconds):
    """config.load, or ConfigError after ``seconds``: status must answer whatever the file holds.

    A command-line process, not the supervisor: the alarm's handler may raise here.
    """
    def expired(signum, frame):
        raise _Expired()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return config.load(path)
    except _Expired:
        raise ConfigError(f"{path}: not validated within {seconds}s (too large or too deeply "
                          "aliased); the daemon's running tasks are shown") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Expired(BaseException):   # not an Exception: no handler inside the loader catches it
    """The task file took longer than status allows."""


class _LiveTask:
    """A task as the daemon reports it, for when the file on disk no longer validates."""

    enabled = True

    def __init__(self, name, type, schedule_text, timezone):
        self.name, self.type, self.schedule_text = name, type, schedule_text
        self.schedule = Schedule(schedule_text, timezone) if schedule_text else None

    @classmethod
    def of(cls, name, entry):
        return cls(name, entry["type"], entry["schedule"], entry["timezone"])

    def runs_on(self, node):
        return True     # the daemon only runs tasks of its own node


def _node_of(live, args):
    if live:
        return Node.detect(live["node"]["addresses"], hostname=live["node"]["hostname"])
    return common.node_of(args)


def _last_results(settings):
    path = paths.records_db(settings.state_dir)
    if not os.path.exists(path):
        return {}
    store = records.Records(path)
    try:
        return store.last_results()
    finally:
        store.close()


def task_status(task, node, live, last, now):
    """One task's row: schedule, next run, running pids, last result and health."""
    entry = (live or {}).get("tasks", {}).get(task.name, {})
    next_run = None
    if task.schedule is not None and not task.schedule.is_reboot and task.enabled:
        when = task.schedule.next_after(datetime.fromtimestamp(now, task.schedule.tz or _local_zone()))
        next_run = when.timestamp() if when is not None else None      # None: it never fires
    row = {"name": task.name, "type": task.type, "schedule": task.schedule_text,
           "next_run": next_run, "running": [r["pid"] for r in entry.get("running", [])],
           "running_runs": entry.get("running", []),
           "last": _last_json(last), "state": _health(task, node, entry, last)}
    if "daemon" in entry:
        row["daemon"] = entry["daemon"]
    if "once" in entry:
        row["once"] = entry["once"]
    return row


def _local_zone():
    return datetime.now().astimezone().tzinfo


def _health(task, node, entry, last):
    if not task.enabled or entry.get("disabled"):      # in the file, or until a reload
        return TaskHealth.DISABLED
    if not task.runs_on(node):
        return TaskHealth.NOT_ON_THIS_NODE
    if entry.get("daemon", {}).get("state") == "backoff":
        return TaskHealth.CRASH_LOOPING
    if entry.get("skipped"):
        return TaskHealth.SKIPPED_BY_MAX
    if last is None:
        return TaskHealth.OK if entry.get("running") else TaskHealth.NEVER_RAN
    return TaskHealth.FAILING if last.failed else TaskHealth.OK


def _last_json(last):
    if last is None:
        return None
    return {"run_id": last.run_id, "exit_code": last.exit_code, "signal": last.signal,
            "timed_out": last.timed_out, "ended": last.ended, "duration": last.duration,
            "error": last.error, "stopped": last.stopped, "failed": last.failed,
            "result": last.describe()}


def status_json(found, live, digest, problems, rows):
    """The document of ``status --json`` (its schema is in the README): times ISO 8601 with
    their offset, each task once, nothing of the daemon's wire format."""
    return {"daemon": _daemon_json(found, live, digest), "file_errors": problems,
            "tasks": [_task_json(row) for row in rows]}


def _daemon_json(found, live, digest):
    out = {"running": found.pid is not None, "answering": bool(live), "pid": found.pid,
           "pidfile": found.pidfile, "control_socket": found.socket}
    if not live:
        return out
    reload = live.get("last_reload")
    out.update({
        "started": iso(live["started"]), "file": live["file"], "version": live["digest"],
        "file_changed_since_load": digest is not None and live["digest"] != digest,
        "node": live["node"], "stopping": live["stopping"], "stats": live["stats"],
        "last_reload": reload and {"at": iso(reload["at"]), "accepted": reload["accepted"],
                                   "message": reload["message"]},
        "reload_error": live.get("reload_error"),
        "services": live.get("services", [])})
    return out


def _task_json(row):
    out = {"name": row["name"], "type": row["type"], "schedule": row["schedule"],
           "next_run": iso(row["next_run"]), "state": row["state"],
           "running": [{"run_id": r.get("run_id"), "pid": r.get("pid"),
                        "executor_pid": r.get("executor_pid"),
                        "started": iso(r.get("started")), "state": r.get("state")}
                       for r in row["running_runs"]],
           "last": None}
    last = row["last"]
    if last is not None:
        out["last"] = {**last, "ended": iso(last["ended"]),
                       "duration": None if last["duration"] is None else round(last["duration"], 3)}
    daemon = row.get("daemon")
    if daemon is not None:
        end = daemon.get("last_exit") or None
        out["daemon"] = {
            "state": daemon["state"], "restarts": daemon["restarts"],
            "failures": daemon["failures"], "next_try_in": round(daemon["next_try_in"], 3),
            "last_exit": end and {"exit_code": end.get("exit_code"), "signal": end.get("signal"),
                                  "timed_out": bool(end.get("timed_out")),
                                  "ended": iso(end.get("ended"))}}
    once = row.get("once")
    if once is not None:        # `run: once`: who ran the last second, who holds the slots
        out["once"] = {**holders.as_json(once, lambda epoch, timespec: iso(epoch)),
                       "as_of": iso(once.get("at"))}
    return out


def _notifications_json(overview):
    return {"states": overview["states"],
            "rejected_by": [{**r, "at": iso(r["at"])} for r in overview["rejected_by"]]}


def _fleet_json(state):
    """The fleet agent's state (fleetstore.py): state, since, waiting, error, database, node,
    the clock offset at its last heartbeat and whether it is beyond the tolerance."""
    if not state:
        return None
    return {"state": state.get("state"), "since": iso(state.get("since")),
            "waiting": state.get("waiting", 0), "error": state.get("error"),
            "database": state.get("database"), "node": state.get("node"), "at": iso(state.get("at")),
            "clock_offset": state.get("clock_offset"),
            "clock_flagged": fleetstore.clock_warning(state) is not None}


def iso(epoch):
    """Epoch seconds as ISO 8601 in local time with its offset (as ``history --json``)."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def _daemon_text(live, found, digest, now):
    if not live and found.pid is not None:
        return (f"torchcore runs (pid {found.pid}, pidfile {found.pidfile}) but does not answer "
                f"on {found.socket}; its log says why")
    if not live:
        return (f"torchcore is not running (no daemon answers on {found.socket}; "
                f"pidfile {found.pidfile})")
    lines = [(f"torchcore running: pid {live['pid']}, up {format_duration(now - live['started'])}, "
              f"file {live['file']} (version {live['digest'][:12]})"),
             (f"node: {live['node']['hostname']} "
              f"({', '.join(live['node']['addresses']) or 'no addresses'})")]
    reload = live.get("last_reload")
    if reload:
        verdict = "accepted" if reload["accepted"] else "REJECTED"
        if not reload["accepted"] and not live.get("reload_error"):
            verdict += " (the file on disk is the running version again)"
        lines.append(f"last reload: {format_relative(reload['at'], now)}, {verdict}")
    if live.get("reload_error"):
        lines.append("reload error (the previous tasks keep running):")
        lines.extend("  " + line for line in live["reload_error"].splitlines())
    elif digest is not None and live["digest"] != digest:
        lines.append("note: the file on disk differs from the version running")
    for service in live.get("services", []):
        pid = f"pid {service['pid']}, " if service.get("pid") else ""
        line = f"service {service['name']}: {pid}{service['state']}"
        if service.get("auth"):         # the HTTP service: where, and what needs its token
            line += (f", on {service.get('listen')}, auth {service['auth']} ("
                     f"{AUTH_WORDS.get(service['auth'], '?')})")
        if service.get("restarts"):
            line += f", restarted {service['restarts']} times, last {service.get('last_exit')}"
        lines.append(line)
    stats = live["stats"]
    lines.append(f"runs: {stats['started']} started, {stats['failed']} failed, "
                 f"{stats['skipped']} skipped, {stats['missed']} missed")
    return "\n".join(lines)


def _tasks_text(rows, now):
    table = []
    for row in rows:
        nxt = format_relative(row["next_run"], now) if row["next_run"] else "-"
        running = ",".join(str(pid) for pid in row["running"] if pid) or "-"
        table.append([row["name"], row["type"], row["schedule"] or "-", nxt, running,
                      _last_text(row["last"], now), _state_text(row)])
    return format_table(["NAME", "TYPE", "SCHEDULE", "NEXT RUN", "RUNNING", "LAST RESULT", "STATE"],
                        table)


def _once_text(rows, me):
    """The holders of the `run: once` tasks, as the claims process last read them."""
    once = [(row["name"], _task_json(row)["once"]) for row in rows if row.get("once")]
    if not once:
        return []
    read = [entry["as_of"] for _, entry in once if entry["as_of"]]
    today = datetime.now().astimezone().date()
    when = f"the fleet database at {read[0][11:19]}" if read else "the fleet database not read yet"
    lines = ["", f"run: once ({when}; this node's own runs and slots since):"]
    for name, entry in once:
        lines += ["  " + line for line in holders.lines(name, entry, me, today)]
    return lines


def _last_text(last, now):
    if last is None:
        return "-"
    how = last["result"]
    when = format_relative(last["ended"], now) if last["ended"] else ""
    took = f", {format_duration(last['duration'])}" if last["duration"] is not None else ""
    return f"{how}, {when}{took}"


def _state_text(row):
    daemon = row.get("daemon")
    if daemon and daemon["restarts"]:
        extra = f" ({daemon['restarts']} restarts"
        if daemon["state"] == "backoff":
            extra += f", next try in {format_duration(daemon['next_try_in'])}"
        return row["state"] + extra + ")"
    return row["state"]


# ---- run ---------------------------------------------------------------------------------

def cmd_run(args):
    if args.local:
        return _run_local(args)
    found = find_daemon(args)
    if found.pid is None:
        not_running(found)
        print("(use `torchcore run --local TASK` to run it here without a daemon)", file=sys.stderr)
        return common.EXIT_NOT_RUNNING
    reply = control_request(found, "run", task=args.task)
    if reply is None:
        raise TorchcoreError("the daemon's control socket is missing; cannot start a run")
    print(f"started {args.task} run {reply['run_id']}; "
          f"`torchcore logs {args.task} --run {reply['run_id']}` shows its output")
    return common.EXIT_OK


def _run_local(args):
    """The task's command in this terminal: its env, cwd, user and limits, not its schedule."""
    taskfile = config.load(common.task_file_path(args))
    task = common.lookup_task(taskfile, args.task)
    job = jobspec.Job.for_task(task, taskfile.settings)
    cred = jobspec.credentials(job)
    extra = {}
    if cred:
        extra = {"user": cred[1], "group": cred[2], "extra_groups": cred[3]}
    env = jobspec.task_environment(job, cred[0] if cred else None)
    try:
        done = subprocess.run(job.argv, env=env, cwd=job.cwd or None,
                              preexec_fn=jobspec.limit_setter(job),
                              timeout=task.timeout, check=False, **extra)
    except FileNotFoundError as exc:
        raise TorchcoreError(f"task {task.name!r}: cannot start: {exc}") from None
    except subprocess.TimeoutExpired:
        print(f"torchcore: task {task.name!r} timed out after {task.timeout}s", file=sys.stderr)
        return 124
    return done.returncode if done.returncode >= 0 else 128 - done.returncode
