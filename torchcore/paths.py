"""Where the daemon's files live under ``state_dir`` and ``log_dir``, named once.

The supervisor, the commands that find it (``status``, ``stop``, ``history`` ...), the loader's
defaults and the records all take a path from here.  (The report pipe and the launchers'
socketpairs have no path: they are inherited descriptors.)  It imports only ``os``.
"""

import os

RECORDS_DB = "torchcore.db"         # run records (SQLite, with its -wal and -shm)
CONTROL_SOCKET = "control.sock"     # the daemon's control socket
LOAD_CACHE = "load.cache"           # the last big task file accepted, as loaded (loadcache.py)
PIDFILE = "torchcore.pid"           # the pidfile unless settings.pidfile says otherwise
LOG_DIR = "logs"                    # log_dir unless settings.log_dir says otherwise
DAEMON_LOG = "torchcore.log"        # the daemon's own log in log_dir (no task may be so named)
DEFAULT_SHELL = "/bin/sh"           # settings.shell unless set; the SHELL a user: task gets, as cron


def records_db(state_dir):
    """The records database of a state directory."""
    return os.path.join(state_dir, RECORDS_DB)


def control_socket(state_dir):
    """The control socket of the daemon with this state directory."""
    return os.path.join(os.path.abspath(state_dir), CONTROL_SOCKET)


def default_pidfile(state_dir):
    return os.path.join(state_dir, PIDFILE)


def default_log_dir(state_dir):
    return os.path.join(state_dir, LOG_DIR)


def daemon_log(log_dir):
    """The daemon's own log file."""
    return os.path.join(log_dir, DAEMON_LOG)
