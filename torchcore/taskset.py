"""A task file against the one running: what a reload changes, and whether the file on disk did.

``compare`` finds the tasks of this node added, changed and removed, and the settings that take
effect (all but state_dir, log_dir and pidfile, fixed until a restart: ``warn_fixed_settings``
says so in the log).  The supervisor applies the change (Supervisor._apply).  ``signature`` and
``digest`` tell the file watch whether the file on disk is another one than the one running.
"""

import dataclasses
import hashlib
import logging

from torchcore import config, safepaths
from torchcore.watch import signature   # noqa: F401  (the file's signature, for the supervisor)

log = logging.getLogger("torchcore")

FIXED_SETTINGS = ("state_dir", "log_dir", "pidfile")    # taken at the start, kept until a restart


@dataclasses.dataclass(frozen=True)
class Change:
    """What applying a new task file changes on this node."""

    tasks: dict                 # name -> Task of the new file on this node
    settings: object            # the new Settings, the fixed ones kept
    added: list                 # names, in the new file's order
    changed: list
    removed: list               # in the running set's order

    def counts(self):
        return {"added": len(self.added), "changed": len(self.changed),
                "removed": len(self.removed)}

    def summary(self):
        return (f"{len(self.tasks)} tasks on this node: {len(self.added)} added, "
                f"{len(self.changed)} changed, {len(self.removed)} removed")


def compare(old_tasks, old_settings, new, node):
    """The Change from ``old_tasks`` (name -> Task) and ``old_settings`` to the TaskFile ``new``."""
    new_tasks = {task.name: task for task in new.local_tasks(node)}
    settings = dataclasses.replace(
        new.settings, **{field: getattr(old_settings, field) for field in FIXED_SETTINGS})
    removed = [name for name in old_tasks if name not in new_tasks]
    changed = [name for name, task in new_tasks.items()
               if name in old_tasks and old_tasks[name] != task]
    added = [name for name in new_tasks if name not in old_tasks]
    return Change(new_tasks, settings, added, changed, removed)


def warn_fixed_settings(old, new):
    """Log each fixed setting the new file changes: refused, or in effect at the next restart."""
    for field in FIXED_SETTINGS:
        if getattr(new, field) != getattr(old, field):
            problem = safepaths.problem_with(field, getattr(new, field))
            if problem:
                log.warning("settings.%s changed to %s: refused, %s is kept: %s", field,
                            getattr(new, field), getattr(old, field), problem)
                continue
            log.warning("settings.%s changed to %s: it takes effect at the next restart",
                        field, getattr(new, field))


def digest(path):
    """The file's digest, as a loaded TaskFile's; None if it cannot be read.  At most the
    loader's limit is read: a bigger file is a change (and a rejected reload)."""
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read(config.MAX_FILE_BYTES + 1)).hexdigest()
    except OSError:
        return None
