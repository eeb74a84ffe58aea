"""The HTTP service: Prometheus metrics, a JSON API and the dashboard (``torchcore: http``).

A child of the supervisor, never part of it: ``python -m torchcore.web`` serves what
``settings.http`` (or ``start --http ADDR``) asks for, reading the records database and
asking the supervisor over the control socket.  This module stays light (the supervisor
imports it to decide whether the service runs); the server's pieces are imported by the
child only.
"""


def wanted(taskfile, node=None, options=None):
    """Whether the HTTP service runs: ``settings.http.listen`` is set, or ``start --http ADDR``
    was given (``options["http"]``: the child's extra arguments, ``["--listen", ADDR]``); the same
    on every node."""
    if (options or {}).get("http"):
        return True
    http = getattr(taskfile.settings, "http", None)
    return http is not None and http.listen is not None


def detail(taskfile, options=None):
    """What ``status`` shows of the service: the address and the auth mode
    (settings.http.auth: ``changes`` or ``all``)."""
    http = getattr(taskfile.settings, "http", None) if taskfile is not None else None
    extra = (options or {}).get("http") or []
    listen = extra[-1] if extra else (http.listen if http else None)
    return {"listen": listen, "auth": http.auth if http else "changes"}
