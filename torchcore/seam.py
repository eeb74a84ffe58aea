"""The seam for running with other nodes: the supervisor asks before every launch.

A node that reads the shared task file alone needs no coordination: every node runs its own
share, decided by the task's `ips`/`hosts`.  ``LocalCoordinator`` always says yes, and names
what the supervisor asks; ``FleetCoordinator`` (coordinator.py, with ``settings.fleet``)
answers for the `run: once` tasks from the claims won in the fleet database.
"""


class LocalCoordinator:
    """Always yes: this node runs every due run of its own tasks."""

    once = frozenset()      # the names of the node's `run: once` tasks (none without a fleet)

    def claim(self, task, second):
        """May this node start ``task`` for the scheduled ``second``?  True; False (another
        node runs it); or a text: the reason the second is skipped."""
        return True

    def release(self, task, second):
        """The run for ``second`` has ended (nothing to do locally)."""

    def ahead(self, second, tasks):
        """``tasks`` (`run: once`) are due at ``second``, which is being prepared."""

    def env(self, task, second):
        """Variables the run of ``task`` for ``second`` gets on top of its own."""
        return ()

    def use(self, settings, tasks):
        """The settings and the node's tasks in force (a TaskTable: ``once`` names its
        `run: once` tasks, ``daemons`` its daemon tasks)."""

    def attach(self, selector, starter):
        """The supervisor's selector, and the starter to hand won claims to."""

    def exited(self, pid, status):
        """Reaping: True if ``pid`` was the coordinator's child."""
        return False

    def started(self, run):
        """``run`` started (its claim, if any, is confirmed and its lease held)."""

    def ended(self, run):
        """``run`` ended, or never started (its slot is freed)."""

    def adopted(self, runs):
        """``runs``: those a killed supervisor left behind, adopted by this one."""

    def close(self):
        """At shutdown."""

    def holders(self, name):
        """Who runs the `run: once` task ``name`` across the fleet, for ``status`` (None: not
        a `once` task here)."""
        return None
