"""Commands that start and steer the daemon: start, stop, reload, restart, status, run."""

import dataclasses
import json
import logging
import logging.handlers
import os
import signal
import sys
import time

from torchcore import cli, config
from torchcore.errors import ConfigError, DaemonError
from torchcore.node import Node
from torchcore.pidfile import find_daemon, pid_alive_and_locked

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
    prepare_log_dir(taskfile.settings.log_dir)         # 0750 and ours, its whole path checked
    holder = running_pid(pidfile_path)
    if holder is not None:      # refuse at once; the daemon would refuse too, only later
        raise AlreadyRunning(holder, pidfile_path)
    if args.foreground:
        setup_logging(None)
        with Pidfile(pidfile_path):
            return _supervise(taskfile, node)
    launcher = Daemonizer(started_message=f"torchcore started (pid {{pid}}) on {taskfile.path}")
    if not launcher.detach():
        return cli.EXIT_OK      # not reached: the launcher exits with the daemon's verdict
    try:
        setup_logging(os.path.join(taskfile.settings.log_dir, "torchcore.log"))
        pidfile = Pidfile(pidfile_path)
        pidfile.acquire()
    except (DaemonError, OSError) as exc:
        launcher.failed(str(exc))
        os._exit(cli.EXIT_ERROR)
    try:
        code = _supervise(taskfile, node, on_ready=launcher.ready,
                          on_failure=launcher.failed)
    finally:
        pidfile.release()
    os._exit(code)


def _supervise(taskfile, node, on_ready=None, on_failure=None):
    from torchcore.supervisor import Supervisor

    supervisor = Supervisor(taskfile, node, on_ready=on_ready)
    try:
        return supervisor.run()
    except Exception as exc:
        if on_failure is not None and not supervisor.ready:
            on_failure(f"cannot start: {exc}")
        log.exception("supervisor failed")
        return cli.EXIT_ERROR


def load_for_node(path, node):
    """The task file, valid for this node (unknown users and the like are config errors)."""
    taskfile = config.load(path)
    problems = config.node_problems(taskfile, node)
    if problems:
        raise ConfigError(problems)
    return taskfile


def setup_logging(path):
    """stderr in the foreground; otherwise a file that logrotate may move (WatchedFileHandler)."""
    if path is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        from torchcore.safepaths import log_file_handler

        prepare_log_dir(os.path.dirname(path))
        handler = log_file_handler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def prepare_log_dir(log_dir):
    """Create log_dir 0750 if missing; refuse one another user owns, made or can write to."""
    from torchcore import safepaths

    safepaths.secure_dir(log_dir, safepaths.LOG_DIR_MODE, what="log_dir")


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
    """Where an invalid task file says its daemon keeps its pidfile and state (best effort)."""
    import yaml

    settings = config.default_settings(path)
    try:
        with open(path, "rb") as handle:
            raw = yaml.safe_load(handle)
        named = raw.get("settings") or {}
        base = os.path.dirname(settings.path)
        state_dir = os.path.join(base, str(named.get("state_dir", settings.state_dir)))
        pidfile = os.path.join(base, str(named.get("pidfile", os.path.join(state_dir, "torchcore.pid"))))
        return dataclasses.replace(settings, state_dir=state_dir, pidfile=pidfile)
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return settings


def running_pid(pidfile):
    """The pid of the live daemon holding ``pidfile``, or None."""
    return pid_alive_and_locked(pidfile)


def not_running(pidfile):
    print(f"torchcore is not running (pidfile {pidfile})", file=sys.stderr)
    return cli.EXIT_NOT_RUNNING


def cmd_stop(args):
    pidfile, settings = locate(args)
    daemon = find_daemon(pidfile)       # only a verified supervisor holding the lock
    if daemon is None:
        return not_running(pidfile)
    grace = settings.shutdown_grace if settings else 30
    timeout = args.timeout if args.timeout is not None else grace + 15
    with daemon:
        pid = daemon.pid
        began = time.monotonic()
        if not daemon.signal(signal.SIGTERM) or daemon.wait(timeout):
            print(f"torchcore stopped (pid {pid}, {time.monotonic() - began:.1f}s)")
            return cli.EXIT_OK
    print(f"torchcore: still running after {timeout:.0f}s (pid {pid}); "
          f"`kill -TERM {pid}` again skips the grace period", file=sys.stderr)
    return cli.EXIT_ERROR


def cmd_reload(args):
    pidfile, settings = locate(args)
    daemon = find_daemon(pidfile)       # only a verified supervisor holding the lock
    if daemon is None:
        return not_running(pidfile)
    with daemon:
        pid = daemon.pid
        reply = _control_request(settings, "reload")
        if reply is None:
            daemon.signal(signal.SIGUSR2)
    if reply is None:
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
    daemon = find_daemon(pidfile)       # refuses a pidfile that is not a daemon's of ours
    if daemon is not None:
        daemon.close()
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
