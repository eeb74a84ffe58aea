"""The states of a run and of a daemon task.  Imports nothing from the package."""


class RunState:
    PREPARED = "prepared"    # forked ahead of its second, waiting for go (not counted as running)
    STARTING = "starting"    # forked; the executor has not reported the command's pid yet
    RUNNING = "running"      # the command runs in its own process group
    STOPPING = "stopping"    # TERM sent (timeout, shutdown, daemon stop); KILL follows after a grace
    EXITED = "exited"        # the executor reported the result, or was reaped without one


class DaemonState:
    RUNNING = "running"          # kept at `max` instances
    BACKOFF = "backoff"          # failed starts: waiting before the next try


class TaskHealth:
    """What `status` shows for a task."""

    OK = "ok"
    FAILING = "failing"                 # the last run failed
    CRASH_LOOPING = "crash-looping"     # a daemon in backoff
    SKIPPED_BY_MAX = "skipped by max"   # the last due run was skipped by a limit
    NOT_ON_THIS_NODE = "not on this node"
    DISABLED = "disabled"
    NEVER_RAN = "never ran"
