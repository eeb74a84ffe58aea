"""Commands that start and steer the daemon: start, stop, reload, restart, status, run."""

import json
import logging
import logging.handlers
import os
import signal
import sys
import time

from torchcore import cli, config
from torchcore.errors import ConfigError, DaemonError, TorchcoreError
from torchcore.node import Node
from torchcore.pidfile import pid_alive_and_locked, pid_exists

log = logging.getLogger("torchcore")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def register(subparsers):
    start = subparsers.add_parser("start", help="run this node's share of the task file")
    _common(start)
    cli.add_node_options(start)
    start.add_argument("--foreground", action="store_true",
                       help="stay in the foreground and log to stderr (systemd, containers)")
    start.set_defaults(func=cmd_start)

    stop = subparsers.add_parser("stop", help="stop the daemon (SIGTERM) and wait for it")
    _common(stop)
    stop.add_argument("--timeout", type=float, default=None, metavar="S",
                      help="seconds to wait for the exit (default: shutdown_grace + 15)")
    stop.set_defaults(func=cmd_stop)

    reload = subparsers.add_parser("reload", help="reload the task file; report whether it was accepted")
    _common(reload)
    reload.set_defaults(func=cmd_reload)

    restart = subparsers.add_parser("restart", help="stop the daemon, then start it again")
    _common(restart)
    cli.add_node_options(restart)
    restart.add_argument("--timeout", type=float, default=None, metavar="S")
    restart.set_defaults(func=cmd_restart, foreground=False)


def _common(parser):
    cli.add_config_option(parser)
    parser.add_argument("--pidfile", metavar="PATH", default=None,
                        help="pidfile (default: settings.pidfile of the task file)")


# ---- start -------------------------------------------------------------------------------

def cmd_start(args):
    from torchcore.control import prepare_state_dir
    from torchcore.daemonize import Daemonizer
    from torchcore.pidfile import AlreadyRunning, Pidfile

    node = Node.detect(args.node_ip)
    taskfile = load_for_node(cli.task_file_path(args), node)
    pidfile_path = os.path.abspath(args.pidfile or taskfile.settings.pidfile)
    prepare_state_dir(taskfile.settings.state_dir)     # 0700 and ours, before anything goes in
    holder = running_pid(pidfile_path)
    if holder is not None:      # refuse at once; the daemon would refuse too, only later
        raise AlreadyRunning(holder, pidfile_path)
    refuse_if_served(taskfile.settings.state_dir)
    if args.foreground:
        setup_logging(None)
        with Pidfile(pidfile_path):
            return _supervise(taskfile, node)
    launcher = Daemonizer(started_message=f"torchcore started (pid {{pid}}) on {taskfile.path}")
    if not launcher.detach():
        return cli.EXIT_OK      # not reached: the launcher exits with the daemon's verdict
    pidfile = Pidfile(pidfile_path)
    try:                        # the pidfile first: a refused daemon writes into no one's log
        pidfile.acquire()
        setup_logging(os.path.join(taskfile.settings.log_dir, "torchcore.log"))
    except (DaemonError, OSError) as exc:
        pidfile.release()
        launcher.failed(str(exc))
        os._exit(cli.EXIT_ERROR)
    try:                        # helpers never keep the start-up pipe as their stderr
        code = _supervise(taskfile, node, on_ready=launcher.ready,
                          on_failure=launcher.failed, helper_stderr=os.devnull)
    finally:
        pidfile.release()
    os._exit(code)


def _supervise(taskfile, node, on_ready=None, on_failure=None, helper_stderr=None):
    """Run the supervisor.  A start refused (another daemon on the same state_dir, ...)
    is one line for the starting command, and nothing in the log, which may be the
    running daemon's; a failure after start-up goes to the log."""
    from torchcore.supervisor import Supervisor

    supervisor = Supervisor(taskfile, node, on_ready=on_ready, helper_stderr=helper_stderr)
    try:
        return supervisor.run()
    except Exception as exc:
        if supervisor.ready:
            log.exception("supervisor failed")
            return cli.EXIT_ERROR
        message = str(exc) if isinstance(exc, TorchcoreError) else \
            f"cannot start: {type(exc).__name__}: {exc}"
        if on_failure is None:
            raise TorchcoreError(message) from None     # the CLI prints it as one line
        on_failure(message)
        return cli.EXIT_ERROR


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


def load_for_node(path, node):
    """The task file, valid for this node (unknown users and the like are config errors)."""
    taskfile = config.load(path)
    problems = config.node_problems(taskfile, node)
    if problems:
        raise ConfigError(problems)
    return taskfile


def setup_logging(path):
    """stderr in the foreground; otherwise a file that logrotate may move (WatchedFileHandler)."""
    from torchcore.daemonlog import DaemonLogHandler

    if path is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = DaemonLogHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


# ---- finding and signalling the daemon ---------------------------------------------------

def locate(args):
    """(pidfile path, settings or None): from --pidfile, else the task file's settings.

    A task file that no longer validates still names its pidfile, so an operator can
    always stop what runs.
    """
    path = cli.task_file_path(args)
    settings = None
    try:
        settings = config.load(path).settings
    except ConfigError:
        settings = _lenient_settings(path)
    except OSError:
        if not args.pidfile:
            raise DaemonError(f"{path}: cannot read the task file to find the pidfile; "
                              "name it with --pidfile") from None
    pidfile = args.pidfile or (settings.pidfile if settings else None)
    return os.path.abspath(pidfile), settings


def _lenient_settings(path):
    """Where an invalid task file says its daemon keeps its pidfile and state (best effort,
    within the loading budget: a file that would take long to read gives the defaults)."""
    try:
        return config.load_settings(path)
    except (OSError, ConfigError):
        return config.default_settings(path)


def running_pid(pidfile):
    """The pid of the live daemon holding ``pidfile``, or None."""
    return pid_alive_and_locked(pidfile)


def not_running(pidfile):
    print(f"torchcore is not running (pidfile {pidfile})", file=sys.stderr)
    return cli.EXIT_NOT_RUNNING


def cmd_stop(args):
    pidfile, settings = locate(args)
    pid = running_pid(pidfile)
    if pid is None:
        return not_running(pidfile)
    grace = settings.shutdown_grace if settings else 30
    timeout = args.timeout if args.timeout is not None else grace + 15
    os.kill(pid, signal.SIGTERM)
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if not pid_exists(pid):
            print(f"torchcore stopped (pid {pid}, {time.monotonic() - began:.1f}s)")
            return cli.EXIT_OK
        time.sleep(0.05)
    print(f"torchcore: still running after {timeout:.0f}s (pid {pid}); "
          f"`kill -TERM {pid}` again skips the grace period", file=sys.stderr)
    return cli.EXIT_ERROR


def cmd_reload(args):
    pidfile, settings = locate(args)
    pid = running_pid(pidfile)
    if pid is None:
        return not_running(pidfile)
    reply = _control_request(settings, "reload")
    if reply is None:
        os.kill(pid, signal.SIGUSR2)
        print(f"sent SIGUSR2 to torchcore (pid {pid}); its log tells whether the file was accepted")
        return cli.EXIT_OK
    if reply.get("accepted"):
        print(f"reloaded: {reply.get('summary', '')}")
        return cli.EXIT_OK
    print("reload rejected; the running tasks stay as they were:", file=sys.stderr)
    for problem in reply.get("problems", []):
        print(problem, file=sys.stderr)
    return cli.EXIT_CONFIG


def cmd_restart(args):
    pidfile, _ = locate(args)
    if running_pid(pidfile) is not None:
        code = cmd_stop(args)
        if code != cli.EXIT_OK:
            return code
    return cmd_start(args)


def _control_request(settings, cmd, **fields):
    """A reply from the control socket, or None when the daemon has none to offer."""
    try:
        from torchcore.control import ControlClient
    except ImportError:
        return None
    if settings is None:
        return None
    path = os.path.join(settings.state_dir, "control.sock")
    if not os.path.exists(path):
        return None
    return ControlClient(path).request(cmd, **fields)


def print_json(value):
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
