"""A task file against the one running: the settings a reload changes, and whether the file on
disk changed.

``running_settings`` are the settings that take effect (all but state_dir, log_dir and pidfile,
fixed until a restart: ``warn_fixed_settings`` says so in the log); which tasks a reload adds,
changes and removes is found by reloading.py, and applied by Supervisor._apply.  ``signature``
and ``digest`` tell the file watch whether the file on disk is another one than the one running.
"""

import dataclasses
import hashlib
import logging

from torchcore import config, safepaths
from torchcore.watch import signature   # noqa: F401  (the file's signature, for the supervisor)

log = logging.getLogger("torchcore")

FIXED_SETTINGS = ("state_dir", "log_dir", "pidfile")    # taken at the start, kept until a restart


def running_settings(new, old):
    """The settings that take effect from the file's ``new`` ones: all but the fixed ones,
    which keep the ``old`` (running) values until a restart."""
    return dataclasses.replace(new, **{field: getattr(old, field) for field in FIXED_SETTINGS})


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
