"""Process titles for the processes that fork by the hundred: launchers and executors.

The titles are setproctitle's, but its package (``import setproctitle``) imports
logging, and logging imports threading, whose at-fork hook runs in every forked
child: measured on a launcher, each fork plus exit costs about 0.4 ms more with
threading loaded (1.1 ms instead of 0.65).  At a few hundred executors a second that
is a tenth of a core, so the launcher loads setproctitle's C extension by itself and
keeps logging and threading out.  If the extension cannot be found that way, the
package is imported as usual.
"""

import importlib.machinery
import importlib.util
import os
import sys

_setproctitle = None


def _load():
    if "setproctitle" in sys.modules:                   # imported already (the supervisor)
        return sys.modules["setproctitle"]
    spec = importlib.util.find_spec("setproctitle")     # finds it without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_setproctitle" + suffix)
            if os.path.exists(path):
                loader = importlib.machinery.ExtensionFileLoader("setproctitle._setproctitle", path)
                module = importlib.util.module_from_spec(
                    importlib.util.spec_from_loader(loader.name, loader))
                loader.exec_module(module)
                return module
    import setproctitle

    return setproctitle


def set_title(title):
    """Set this process's title as `ps` shows it (and its name in /proc/PID/comm)."""
    global _setproctitle
    if _setproctitle is None:
        _setproctitle = _load()
    _setproctitle.setproctitle(title)


class SupervisorTitle:
    """The supervisor's title, ``torchcore: supervisor FILE (N tasks, M running)``, set only
    when what it shows changes (``set_title``: the system's)."""

    def __init__(self, set_title):
        self.set_title = set_title
        self.shown = None

    def show(self, path, tasks, running, stopping):
        title = f"torchcore: supervisor {os.path.basename(path)} ({tasks} tasks, {running} running)"
        if stopping:
            title += " stopping"
        if title != self.shown:
            self.set_title(title)
            self.shown = title
