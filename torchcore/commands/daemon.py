"""Commands that start and steer the daemon: start, stop, reload, restart."""

import logging
import logging.handlers
import os
import signal
import sys
import time

from torchcore import daemonlog, loadchild, paths
from torchcore.commands import common
from torchcore.commands.common import control_request, find_daemon, not_running, verified_daemon
from torchcore.errors import ConfigError, DaemonError, TorchcoreError

log = logging.getLogger("torchcore")


def register(subparsers):
    start = subparsers.add_parser("start", help="run this node's share of the task file")
    common.add_daemon_options(start)
    common.add_node_options(start)
    start.add_argument("--foreground", action="store_true",
                       help="stay in the foreground and log to stderr (systemd, containers)")
    start.add_argument("--create-dirs", action="store_true",
                       help="create the pidfile's directory if it is missing (default: refuse)")
    start.add_argument("--http", type=_listen_address, metavar="ADDR", default=None,
                       help="serve metrics, the API and the dashboard on ADDR (HOST:PORT or a port on "
                            "127.0.0.1), whatever settings.http.listen says")
    start.set_defaults(func=cmd_start)

    stop = subparsers.add_parser("stop", help="stop the daemon (SIGTERM) and wait for it")
    common.add_daemon_options(stop)
    stop.add_argument("--timeout", type=float, default=None, metavar="S",
                      help="seconds to wait for the exit (default: shutdown_grace + 15)")
    stop.set_defaults(func=cmd_stop)

    reload = subparsers.add_parser("reload", help="reload the task file; report whether it was accepted")
    common.add_daemon_options(reload)
    reload.set_defaults(func=cmd_reload)

    restart = subparsers.add_parser("restart", help="stop the daemon, then start it again")
    common.add_daemon_options(restart)
    common.add_node_options(restart)
    restart.add_argument("--timeout", type=float, default=None, metavar="S")
    restart.set_defaults(func=cmd_restart, foreground=False, create_dirs=False)


def _listen_address(text):
    import argparse

    from torchcore.web.settings import parse_listen
    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# ---- start -------------------------------------------------------------------------------

def cmd_start(args):
    from torchcore.control import prepare_state_dir
    from torchcore.daemonize import Daemonizer
    from torchcore.pidfile import AlreadyRunning, Pidfile

    node = common.node_of(args)
    taskfile = loadchild.load_for_node(common.task_file_path(args), node)   # parsed in a child
    pidfile_path = os.path.abspath(args.pidfile or taskfile.settings.pidfile)
    prepare_state_dir(taskfile.settings.state_dir)     # 0700 and ours, before anything goes in
    prepare_log_dir(taskfile.settings.log_dir)         # 0750 and ours, its whole path checked
    check_pidfile_dir(pidfile_path, args)
    found = find_daemon(args, taskfile.settings)
    if found.pid is not None:   # refuse at once (whatever pidfile it holds); it would fail later
        raise AlreadyRunning(found.pid, found.pidfile, found.socket if found.info else None)
    refuse_if_served(taskfile.settings.state_dir)   # serving, but did not answer the ping
    check_fleet(taskfile, node, getattr(args, "node_name", None))
    if args.foreground:
        setup_logging(None)
        with Pidfile(pidfile_path):
            return _supervise(taskfile, node, pidfile_path, options=_service_options(args))
    launcher = Daemonizer(started_message=f"torchcore started (pid {{pid}}) on {taskfile.path}")
    if not launcher.detach():
        return common.EXIT_OK      # not reached: the launcher exits with the daemon's verdict
    pidfile = Pidfile(pidfile_path)
    try:                        # the pidfile first: a refused daemon writes into no one's log
        pidfile.acquire()
        setup_logging(paths.daemon_log(taskfile.settings.log_dir))
    except (DaemonError, OSError) as exc:
        pidfile.release()
        launcher.failed(str(exc))
        os._exit(common.EXIT_ERROR)
    try:                        # helpers never keep the start-up pipe as their stderr; the
        # services (the notifier) log to their stderr: the daemon's log, as in the foreground
        code = _supervise(taskfile, node, pidfile_path, on_ready=launcher.ready,
                          on_failure=launcher.failed, helper_stderr=os.devnull,
                          options=_service_options(args),
                          service_stderr=paths.daemon_log(taskfile.settings.log_dir))
    finally:
        pidfile.release()
    os._exit(code)


def check_pidfile_dir(path, args):
    """Refuse a pidfile whose directory is missing (as nginx does), unless --create-dirs."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent) and not getattr(args, "create_dirs", False):
        raise DaemonError(f"cannot use pidfile {path}: directory {parent} does not exist "
                          "(create it, or pass --create-dirs)")


def check_fleet(taskfile, node, node_name=None):
    """With ``settings.fleet``: the database's schema checked before the daemon starts.  A schema
    missing, older or newer than the code, a refused login or no psycopg is a configuration error
    (exit 78, with what to do), as is a hostname that makes no node name when neither
    fleet.node nor --node-name names one; a database that cannot be reached now is only a warning: the
    daemon starts, schedules as always, and its fleet agent keeps trying."""
    fleet = taskfile.settings.fleet
    if fleet is None:
        return
    from torchcore import fleetdb, fleetspec

    try:
        fleetspec.node_name(fleet, node.hostname, override=node_name)
    except fleetspec.FleetSpecError as exc:
        raise ConfigError(f"{taskfile.path}:{fleet.line}: settings: fleet: {exc}") from None
    url = fleetspec.database_url(fleet, os.environ)
    try:
        fleetdb.open_checked(url, timeout=3).close()
    except fleetdb.FleetUnreachable as exc:
        print(f"torchcore: warning: {exc}; starting anyway (runs do not wait for the fleet "
              "database; the fleet agent keeps trying)", file=sys.stderr)
    except fleetdb.FleetError as exc:
        raise ConfigError(f"{taskfile.path}:{fleet.line}: settings: fleet: {exc}") from None


def _service_options(args):
    """The start options the services get (services.py): ``--http ADDR`` for the HTTP one,
    ``--node-name NAME`` for the fleet agent."""
    options = {}
    http = getattr(args, "http", None)
    if http:
        options["http"] = ["--listen", http]
    if getattr(args, "node_name", None):
        options["fleet"] = ["--node-name", args.node_name]
    return options


def _supervise(taskfile, node, pidfile, on_ready=None, on_failure=None, helper_stderr=None,
               options=None, service_stderr=None):
    """Run the supervisor.  A start refused (another daemon on the same state_dir, ...)
    is one line for the starting command, and nothing in the log, which may be the
    running daemon's; a failure after start-up goes to the log."""
    from torchcore.supervisor import Supervisor

    supervisor = Supervisor(taskfile, node, on_ready=on_ready, helper_stderr=helper_stderr,
                            pidfile=pidfile, service_options=options,
                            service_stderr=service_stderr)
    try:
        return supervisor.run()
    except Exception as exc:
        if supervisor.ready:
            log.exception("supervisor failed")
            return common.EXIT_ERROR
        message = str(exc) if isinstance(exc, TorchcoreError) else \
            f"cannot start: {type(exc).__name__}: {exc}"
        if on_failure is None:
            raise TorchcoreError(message) from None     # the CLI prints it as one line
        on_failure(message)
        return common.EXIT_ERROR


def refuse_if_served(state_dir):
    """DaemonError if a process serves the control socket of ``state_dir`` (a daemon whose
    pidfile is elsewhere): checked before anything of the new daemon exists."""
    import socket

    from torchcore.control import socket_path

    path = socket_path(state_dir)
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return          # stale, or not a socket: the daemon sorts that out as before
    finally:
        probe.close()
    raise DaemonError(f"another process is serving the control socket {path}; "
                      "is a second daemon using the same state_dir?")


def setup_logging(path):
    """stderr in the foreground; otherwise a file that logrotate may move (WatchedFileHandler)."""

    if path is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        from torchcore.safepaths import log_file_handler

        prepare_log_dir(os.path.dirname(path))
        handler = log_file_handler(path)
    handler.setFormatter(daemonlog.Formatter())
    # The format shows no caller, thread or process: each record need not look them up (the
    # supervisor logs a line for each run that ends; see "Optimization" in logging's HOWTO).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def prepare_log_dir(log_dir):
    """Create log_dir 0750 if missing; refuse one another user owns, made or can write to."""
    from torchcore import safepaths

    safepaths.secure_dir(log_dir, safepaths.LOG_DIR_MODE, what="log_dir")


def cmd_stop(args):
    found = find_daemon(args)
    if found.pid is None:
        return not_running(found)
    daemon = verified_daemon(found)     # only a supervisor of ours holding the pidfile's lock
    if daemon is None:
        return not_running(found)
    grace = (found.info or {}).get("shutdown_grace", found.settings.shutdown_grace)
    timeout = args.timeout if args.timeout is not None else grace + 15
    with daemon:
        pid = daemon.pid
        began = time.monotonic()
        if not daemon.signal(signal.SIGTERM) or daemon.wait(timeout):
            print(f"torchcore stopped (pid {pid}, {time.monotonic() - began:.1f}s)")
            return common.EXIT_OK
    print(f"torchcore: still running after {timeout:.0f}s (pid {pid}); "
          f"`kill -TERM {pid}` again skips the grace period", file=sys.stderr)
    return common.EXIT_ERROR


RELOAD_TIMEOUT = 300.0  # the daemon answers once the file is loaded (in a child) and applied


def cmd_reload(args):
    found = find_daemon(args)
    if found.pid is None:
        return not_running(found)
    reply = control_request(found, "reload", timeout=RELOAD_TIMEOUT)
    if reply is None:
        daemon = verified_daemon(found)     # a signal only to a supervisor of ours
        if daemon is None:
            return not_running(found)
        with daemon:
            pid = daemon.pid
            daemon.signal(signal.SIGUSR2)
        print(f"sent SIGUSR2 to torchcore (pid {pid}); its log tells whether the file was accepted")
        return common.EXIT_OK
    if reply.get("accepted"):
        print(reload_text(reply))
        return common.EXIT_OK
    print("reload rejected; the running tasks stay as they were:", file=sys.stderr)
    for problem in reply.get("problems", []):
        print(problem, file=sys.stderr)
    return common.EXIT_CONFIG


def reload_text(reply):
    """What `reload` says: the changes it applied, or that the file watch applied them."""
    already = reply.get("already")
    if already:
        at = time.strftime("%H:%M:%S", time.localtime(already["at"]))
        return f"already applied by the file watch at {at}: {change_counts(already)}"
    return f"reloaded: {reply.get('summary', '')}"


def change_counts(changes):
    """ "1 changed, 2 added" (only what is not zero), or "no change"."""
    parts = [f"{changes[key]} {key}" for key in ("added", "changed", "removed") if changes.get(key)]
    return ", ".join(parts) or "no change"


def cmd_restart(args):
    found = find_daemon(args)
    if found.pid is not None:
        if not args.pidfile and found.info:
            args.pidfile = found.pidfile      # start again where it ran
        code = cmd_stop(args)
        if code != common.EXIT_OK:
            return code
    return cmd_start(args)
