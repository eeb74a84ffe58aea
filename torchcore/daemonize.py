"""Going to the background, with the daemon's verdict carried back to the shell.

A plain double fork returns at once, so `torchcore start` would report success
before the daemon has read its task file or taken the pidfile. Here the
original process (the launcher) waits on a readiness pipe created before the
first fork, and exits with the daemon's verdict:

    launcher = Daemonizer(ready_timeout=30)
    if launcher.detach():          # only the daemon gets here
        try:
            pidfile.acquire(); ...
        except TorchcoreError as exc:
            launcher.failed(str(exc)); sys.exit(1)
        launcher.ready()

Until the verdict, the daemon's stderr also goes into the pipe, so whatever
it prints while starting (a warning, or a traceback if it crashes) reaches
the user. The launcher prints a failure to stderr and exits 1; it exits 0
once ``ready()`` arrives.

On the pipe, the daemon's messages are NUL-framed: ``\\0PID <pid>\\0``,
``\\0OK\\0``, ``\\0FAIL <text>\\0``; anything else is stderr text.
"""

import logging
import os
import select
import sys
import time

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT = 30.0
EXIT_FAILED = 1
FRAME = b"\0"


class Daemonizer:
    """Detaches the process and relays the daemon's readiness to the launcher."""

    def __init__(self, ready_timeout=DEFAULT_READY_TIMEOUT, started_message=None,
                 capture_stderr=True):
        self.ready_timeout = ready_timeout
        self.started_message = started_message  # printed on success; may use {pid}
        self.capture_stderr = capture_stderr
        self.notify_fd = None

    def detach(self):
        """Double fork + setsid; True in the daemon, never returns in the launcher."""
        sys.stdout.flush()
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()  # both close-on-exec
        first = os.fork()
        if first:
            os.close(write_fd)
            self.wait_and_exit(read_fd, first)
        os.close(read_fd)
        self.notify_fd = write_fd
        leave_session_or_exit(write_fd)
        try:
            enter_daemon_environment(write_fd if self.capture_stderr else None)
        except OSError as exc:
            self.failed(f"cannot set up the daemon's environment: {exc}")
            os._exit(EXIT_FAILED)
        self.send(f"PID {os.getpid()}")
        return True

    def ready(self):
        """Tell the launcher the daemon is up: it exits 0."""
        self.finish("OK")

    def failed(self, message):
        """Tell the launcher the daemon could not start: it prints ``message`` and exits 1.

        The daemon should exit afterwards.
        """
        self.finish(f"FAIL {message}")

    def finish(self, verdict):
        """Send the verdict, then stop writing stderr into the pipe and close it."""
        if self.notify_fd is None:
            return
        sys.stderr.flush()
        self.send(verdict)
        redirect_fd(os.devnull, 2, os.O_WRONLY)
        os.close(self.notify_fd)
        self.notify_fd = None

    def send(self, message):
        """One framed message; a launcher that gave up (EPIPE) is not our problem."""
        try:
            os.write(self.notify_fd, FRAME + message.encode(errors="replace") + FRAME)
        except OSError as exc:
            log.debug("launcher no longer listening: %s", exc.strerror)

    def wait_and_exit(self, read_fd, first_child):
        """Launcher side: wait for the verdict, report it, ``os._exit`` with its status."""
        status = EXIT_FAILED
        try:
            verdict = read_verdict(read_fd, self.ready_timeout)
            os.waitpid(first_child, 0)
            status = report(verdict, self.started_message)
        except KeyboardInterrupt:
            print("torchcore: interrupted; the daemon may still be starting", file=sys.stderr)
        except BaseException as exc:  # never fall back into the caller's code
            print(f"torchcore: {exc!r}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)


def daemonize(ready_timeout=DEFAULT_READY_TIMEOUT, started_message=None):
    """Detach now; returns the Daemonizer in the daemon (call ``ready``/``failed`` on it)."""
    launcher = Daemonizer(ready_timeout, started_message)
    launcher.detach()
    return launcher


def leave_session_or_exit(notify_fd):
    """In the first child: new session, fork again, the session leader exits.

    The daemon is then no session leader, so it can never acquire a
    controlling terminal by opening one.
    """
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
    except OSError as exc:
        os.write(notify_fd, FRAME + f"FAIL cannot detach: {exc.strerror}".encode() + FRAME)
        os._exit(EXIT_FAILED)


def enter_daemon_environment(stderr_fd):
    """chdir /, umask 022, stdin/stdout to /dev/null, stderr to ``stderr_fd`` or /dev/null."""
    os.chdir("/")
    os.umask(0o022)
    redirect_fd(os.devnull, 0, os.O_RDONLY)
    redirect_fd(os.devnull, 1, os.O_WRONLY)
    if stderr_fd is None:
        redirect_fd(os.devnull, 2, os.O_WRONLY)
    else:
        os.dup2(stderr_fd, 2)


def redirect_fd(path, target_fd, flags):
    """Point ``target_fd`` at ``path`` (dup2 keeps it inheritable for children)."""
    fd = os.open(path, flags)
    if fd != target_fd:
        os.dup2(fd, target_fd)
        os.close(fd)


class Verdict:
    """What the launcher learned: ``kind`` is OK, FAIL, DIED or TIMEOUT."""

    def __init__(self, kind, pid=None, message="", output=""):
        self.kind, self.pid, self.message, self.output = kind, pid, message, output


def read_verdict(read_fd, timeout):
    """Read the pipe until a verdict, EOF (the daemon died) or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        verdict = parse_messages(data)
        if verdict.kind in ("OK", "FAIL"):
            return verdict
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            verdict.kind = "TIMEOUT"
            return verdict
        readable, _, _ = select.select([read_fd], [], [], remaining)
        if readable:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                verdict.kind = "DIED"
                return verdict
            data += chunk


def parse_messages(data):
    """Split the pipe's bytes into frames and stderr text; the last verdict wins."""
    verdict = Verdict("PENDING")
    text = []
    parts = data.split(FRAME)
    for index, part in enumerate(parts):
        if index % 2 == 0:  # outside a frame: stderr text
            text.append(part.decode(errors="replace"))
            continue
        if index == len(parts) - 1:  # a frame not yet complete
            break
        word, _, rest = part.decode(errors="replace").partition(" ")
        if word == "PID" and rest.isdigit():
            verdict.pid = int(rest)
        elif word in ("OK", "FAIL"):
            verdict.kind, verdict.message = word, rest
    verdict.output = "".join(text).strip()
    return verdict


def report(verdict, started_message):
    """Print the outcome for the user; return the launcher's exit status."""
    if verdict.kind == "OK":
        if started_message:
            print(started_message.format(pid=verdict.pid))
        return 0
    if verdict.output:
        print(verdict.output, file=sys.stderr)
    reason = describe_failure(verdict)
    prefix = "" if reason.startswith("torchcore") else "torchcore: "
    print(prefix + reason, file=sys.stderr)
    return EXIT_FAILED


def describe_failure(verdict):
    """The one-line reason the start failed."""
    if verdict.kind == "FAIL":
        return verdict.message
    pid = f" (pid {verdict.pid})" if verdict.pid else ""
    if verdict.kind == "TIMEOUT":
        return (f"the daemon{pid} did not report ready within the timeout; "
                "it may still be starting, check its log and `torchcore status`")
    return f"the daemon{pid} exited before it was ready"
