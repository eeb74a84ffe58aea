"""torchcore: a cron replacement for a fleet of servers.

One task file, kept in version control, lists every scheduled job of the fleet
and which machines run it; every machine runs the ``torchcore`` daemon on that
file and runs only its own share.
"""

__version__ = "0.1.0"
