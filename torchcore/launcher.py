"""Launchers: small processes that fork the executors, so the supervisor never has to.

fork() copies the page tables of the process that calls it: from a supervisor
holding 100,000 parsed tasks it costs tens of milliseconds, from a fresh
interpreter that imported only what an executor needs it costs about one.  The
supervisor starts one launcher per core (``python -m torchcore.launcher``) before
it forks anything, and hands each run to one of them as a line of JSON on a
socket.  The launcher forks the executor and answers ``forked`` with its pid (or
``fork_failed``), reaps it, and answers ``exited`` with its wait status.  The
executors report their results straight to the supervisor over the shared
report pipe, as before.  A launcher is single-threaded and exits when the
supervisor closes its socket.
"""

import errno
import json
import os
import selectors
import signal
import socket
import subprocess
import sys

LINE_LIMIT = 1 << 20


class Launcher:
    """The supervisor's handle on one launcher process."""

    def __init__(self, report_fd):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torchcore.launcher", str(theirs.fileno()), str(report_fd)],
            pass_fds=(theirs.fileno(), report_fd), stdin=subprocess.DEVNULL, close_fds=True)
        theirs.close()
        self.sock.setblocking(False)
        self.pid = self.proc.pid
        self.pending = bytearray()      # job lines not yet accepted by the socket
        self.buffer = b""               # partial answer line
        self.runs = 0                   # runs handed over and not yet exited

    def fileno(self):
        return self.sock.fileno()

    def submit(self, job):
        """Queue one job; raises OSError if the launcher is gone."""
        self.pending += job.to_json().encode() + b"\n"
        self.runs += 1
        self.flush()

    def flush(self):
        """Write what the socket takes now; True when nothing is left to write."""
        while self.pending:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                return False
            del self.pending[:sent]
        return True

    def answers(self):
        """Every complete answer line available now; None at end of file (it died)."""
        chunks = []
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                return None
            chunks.append(chunk)
        *lines, self.buffer = (self.buffer + b"".join(chunks)).split(b"\n")
        return [json.loads(line) for line in lines if line]

    def close(self):
        """Close its socket: a launcher exits when the supervisor hangs up."""
        self.sock.close()


# ---- the launcher process ----------------------------------------------------------------

def serve(sock, report_fd):
    """Fork an executor for each job line; answer forked/fork_failed/exited lines."""
    from torchcore import executor

    # Executors are born with go/cancel blocked: a prepared one waits for them with
    # sigtimedwait, any other unblocks them at once (see executor.GO_SIGNALS).
    signal.pthread_sigmask(signal.SIG_BLOCK, executor.GO_SIGNALS)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a terminal's Ctrl-C is the supervisor's
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "jobs")
    sel.register(wake_r, selectors.EVENT_READ, "signal")
    children, buffer = {}, b""
    while True:
        for key, _ in sel.select(1.0):
            if key.data == "signal":
                _drain(wake_r)
                continue
            data = sock.recv(65536)
            if not data:
                return          # the supervisor hung up: its executors go on by themselves
            *lines, buffer = (buffer + data).split(b"\n")
            if len(buffer) > LINE_LIMIT:
                return
            for line in lines:
                _launch(executor, executor.Job.from_json(line), sock, report_fd, children, wake_r,
                        wake_w)
        _reap(sock, children)


def _launch(executor, job, sock, report_fd, children, wake_r, wake_w):
    try:
        pid = os.fork()
    except OSError as exc:
        _answer(sock, {"fork_failed": job.run_id, "error": str(exc)})
        return
    if pid == 0:
        for fd in (sock.fileno(), wake_r, wake_w):
            os.close(fd)
        executor.execute(job, report_fd)        # never returns
    children[pid] = job.run_id
    _answer(sock, {"forked": job.run_id, "pid": pid})


def _reap(sock, children):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        run_id = children.pop(pid, None)
        if run_id is not None:
            _answer(sock, {"exited": run_id, "pid": pid, "status": status})


def _answer(sock, message):
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    sock.setblocking(True)
    try:
        sock.sendall(data)
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise
    finally:
        sock.setblocking(False)


def _drain(fd):
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def main(argv):
    import setproctitle

    setproctitle.setproctitle("torchcore: launcher")
    sock = socket.socket(fileno=int(argv[0]))
    sock.setblocking(False)
    serve(sock, int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
