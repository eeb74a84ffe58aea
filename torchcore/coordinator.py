"""The seam for running with other nodes: the supervisor asks before every launch.

A node that reads the shared task file alone needs no coordination: every node
runs its own share, decided by the task's `ips`/`hosts`.  A cluster backend
(one eligible node per scheduled second) implements the same two methods.
"""


class LocalCoordinator:
    """Always yes: this node runs every due run of its own tasks."""

    def claim(self, task, second):
        """May this node start ``task`` for the scheduled ``second``?"""
        return True

    def release(self, task, second):
        """The run for ``second`` has ended (nothing to do locally)."""
