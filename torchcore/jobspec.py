"""The job spec: everything one run needs, fixed when it is launched, and what it makes of it.

A ``Job`` is plain data (it travels to a launcher process as JSON, see wire.py): the task's
command, environment, user and limits, and where the run's output and record go.  With it go
the rules that turn it into a process's surroundings: its environment (``task_environment``),
its credentials (``credentials``) and its rlimits (``limit_setter``).  The supervisor makes the
jobs, the launchers carry them, the executors run them, and ``torchcore run --local`` runs one
in a terminal.  It imports nothing heavier than ``json``, ``pwd`` and ``resource``: the launchers
load it (see proctitle).
"""

import json
import os
import pwd
import resource

from torchcore import paths

# json.dumps(obj, separators=(",", ":")) without making an encoder for each call (one per run)
_compact = json.JSONEncoder(separators=(",", ":")).encode

USER_PATH = "/usr/local/bin:/usr/bin:/bin"   # PATH of a user: task without inherit_env (as cron)


class Job:
    """Everything an executor needs for one run, fixed when it is launched.

    Plain data (it travels to a launcher process as JSON): the task's command,
    environment and limits, and where the run's output and record go.  A plain class
    rather than a dataclass: dataclasses imports inspect, and the launcher that forks
    the executors is kept to the modules an executor needs (see proctitle).
    """

    FIELDS = (
        ("run_id", None), ("name", None), ("argv", None),
        ("env", ()),                    # (key, value) pairs of the task's own env
        ("cwd", None), ("user", None), ("group", None),
        ("inherit_env", False),         # a user: task keeps the daemon's environment
        ("timeout", None), ("kill_grace", 10),
        ("memory", None),               # bytes of resident memory of the process tree
        ("cpu", None),                  # CPU seconds (RLIMIT_CPU)
        ("nofile", None),               # open files (RLIMIT_NOFILE)
        ("scheduled", None), ("manual", False),
        ("log_dir", "."), ("log_max_bytes", 10 << 20), ("log_backups", 5),
        ("db_path", ""), ("node", ""),
        ("prepared", False),            # forked ahead of its second: waits for go on its go pipe
        ("hold_until", None),           # in a burst: wrap up (log, report, exit) no earlier than this
    )
    __slots__ = tuple(name for name, _ in FIELDS) + ("_frame",)
    RUN_FIELDS = ("run_id", "scheduled", "manual", "prepared", "hold_until")   # the rest: the task's

    def __init__(self, **fields):
        object.__setattr__(self, "_frame", None)
        for required in ("run_id", "name", "argv"):
            if required not in fields:
                raise TypeError(f"Job needs {required}")
        for name, default in self.FIELDS:
            object.__setattr__(self, name, fields.pop(name, default))
        if fields:
            raise TypeError(f"Job has no field {sorted(fields)[0]}")

    def __setattr__(self, name, value):
        raise AttributeError("a Job is fixed once made")

    def __eq__(self, other):
        return type(other) is Job and self.fields() == other.fields()

    __hash__ = None

    def __repr__(self):
        return f"Job(run_id={self.run_id!r}, name={self.name!r}, argv={self.argv!r})"

    def fields(self):
        return {name: getattr(self, name) for name, _ in self.FIELDS}

    @classmethod
    def for_task(cls, task, settings, run_id=0, scheduled=None, manual=False, db_path="", node="",
                 prepared=False, hold_until=None, extra_env=()):
        """The job for one run of a config.Task under the file's settings (``extra_env``: what
        torchcore adds to the task's env, e.g. the fencing token of a `run: once` run)."""
        return cls(
            run_id=run_id, name=task.name, argv=tuple(task.argv(settings.shell)),
            env=task.env + tuple(extra_env) if extra_env else task.env,
            cwd=task.cwd, user=task.user, group=task.group,
            inherit_env=getattr(task, "inherit_env", False), timeout=task.timeout,
            kill_grace=task.kill_grace, memory=task.limits.memory, cpu=task.limits.cpu,
            nofile=task.limits.nofile, scheduled=scheduled, manual=manual,
            log_dir=settings.log_dir, log_max_bytes=settings.log_max_bytes,
            log_backups=settings.log_backups, db_path=db_path, node=node, prepared=prepared,
            hold_until=hold_until)

    def to_json(self):
        return _compact(self.fields())

    def line(self):
        """The job as the launcher's wire line (JSON object and newline, bytes): the same object
        as ``to_json``; a job made by a ``JobMaker`` reuses its task's part, encoded once."""
        if self._frame is None:
            return (self.to_json() + "\n").encode()
        own = _compact({name: getattr(self, name) for name in self.RUN_FIELDS})
        return self._frame + own[1:].encode() + b"\n"

    @classmethod
    def from_json(cls, text):
        return cls.from_fields(json.loads(text))

    @classmethod
    def from_fields(cls, fields):
        fields = dict(fields)
        fields["argv"] = tuple(fields["argv"])
        fields["env"] = tuple(tuple(pair) for pair in fields["env"])
        return cls(**fields)


class JobMaker:
    """The jobs of one task's runs under one set of settings: the task's part of every job
    (command, env, limits, paths) made once, and encoded once, for all of its runs (the
    supervisor keeps one per task starting; see Starter)."""

    __slots__ = ("task", "settings", "_fixed", "_frame")

    def __init__(self, task, settings, db_path="", node=""):
        self.task, self.settings = task, settings
        job = Job.for_task(task, settings, db_path=db_path, node=node)
        self._fixed = {name: getattr(job, name) for name, _ in Job.FIELDS
                       if name not in Job.RUN_FIELDS}
        text = _compact(self._fixed)
        self._frame = (text[:-1] + ",").encode() if self._fixed else b"{"

    def job(self, run_id, scheduled=None, manual=False, prepared=False, hold_until=None):
        """The Job of one run: equal to ``Job.for_task`` with the same arguments."""
        job = Job.__new__(Job)
        put = object.__setattr__
        for name, value in self._fixed.items():
            put(job, name, value)
        put(job, "run_id", run_id)
        put(job, "scheduled", scheduled)
        put(job, "manual", manual)
        put(job, "prepared", prepared)
        put(job, "hold_until", hold_until)
        put(job, "_frame", self._frame)
        return job


def task_environment(job, user_entry=None):
    """The command's environment, plus the task's ``env`` on top.

    A ``user:`` task gets what cron gives: HOME, USER, LOGNAME and SHELL of its passwd
    entry and PATH=/usr/local/bin:/usr/bin:/bin, none of the daemon's variables (its
    secrets, root's PATH), unless ``inherit_env: true``.  A task without ``user:`` runs
    as the daemon's user and gets the daemon's environment minus torchcore's own
    (TORCHCORE_*); so does a user: task with inherit_env (with HOME .. SHELL its own).
    """
    if user_entry is None and job.user:
        try:
            user_entry = pwd.getpwnam(job.user)
        except KeyError:
            pass
    if job.user and not job.inherit_env:
        env = {"PATH": USER_PATH}
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHCORE_")}
    if user_entry is not None:
        env.update(HOME=user_entry.pw_dir, USER=user_entry.pw_name, LOGNAME=user_entry.pw_name,
                   SHELL=paths.DEFAULT_SHELL)    # as cron: a login shell of nologin is no shell to run with
    env.update(dict(job.env))
    return env


def credentials(job):
    """(pwd entry or None, uid or None, gid, extra groups) to switch to, or None to stay as is.

    ``user:`` switches to that user, with its groups (``group:`` its primary group instead
    of the passwd one).  ``group:`` alone keeps the daemon's user and runs with that group
    as the only group: primary, and no supplementary groups (those of root would give the
    command more than the group asked for).  Not as root, config.node_problems refuses a
    switch; a group that is already ours needs none.
    """
    if os.geteuid() != 0:
        return None
    if not job.user and not job.group:
        return None
    gid = None
    if job.group:
        import grp
        gid = grp.getgrnam(job.group).gr_gid
    if not job.user:
        return None, None, gid, []
    entry = pwd.getpwnam(job.user)
    gid = entry.pw_gid if gid is None else gid
    return entry, entry.pw_uid, gid, os.getgrouplist(entry.pw_name, gid)


def limit_setter(job):
    """A preexec function applying the rlimits that fit (cpu seconds, open files)."""
    wanted = []
    if job.cpu:
        wanted.append((resource.RLIMIT_CPU, job.cpu))
    if job.nofile:
        wanted.append((resource.RLIMIT_NOFILE, job.nofile))
    if not wanted:
        return None

    def apply():
        for which, value in wanted:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, hard if hard != resource.RLIM_INFINITY else value))
    return apply
