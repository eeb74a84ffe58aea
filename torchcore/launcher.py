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
supervisor closes its socket; it ignores the signals sent to a whole process
group (TERM from `timeout` or systemd, INT and HUP from a terminal): the
supervisor decides when it ends, and stops it by hanging up.

The supervisor holds its launchers in a LauncherPool: started (and started again when one
is missing), each job handed to the least busy, go and cancel sent to the one holding the run.
The supervisor's handle never raises on a dead launcher: ``dead`` turns true and
the supervisor replaces it.  A job line over LINE_LIMIT (a launcher would quit on
it) is refused with JobTooLarge before anything is sent.

A prepared run (forked ahead of its second) gets a go pipe: the launcher keeps
the write end.  ``wire.Go`` writes one byte to each (start now), ``wire.Cancel``
closes them (the run ends untraced); so does the launcher's own end, so nothing
prepared ever starts without a go.  Every line both ways is a wire.py message.
"""

import collections
import errno
import gc
import os
import selectors
import signal
import socket
import sys

from torchcore import wire
from torchcore.errors import TorchcoreError

LINE_LIMIT = 1 << 20
# An executor's title (``torchcore: TASK [run ID]``, up to about 100 bytes) is written over
# its launcher's command line and environment: setproctitle has no more room than they took,
# and none at all without an environment.  A daemon started with a small one (``env -i``)
# would give its executors a cut title, by which no supervisor finds them (procscan.py).
# The launcher gets this variable (TORCHCORE_*: no command inherits it) to make the room.
TITLE_ROOM = ("TORCHCORE_TITLE_ROOM", "." * 128)
FORKS_PER_PASS = 16     # forks between two looks at the socket (where go and cancel arrive)
GROUP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class JobTooLarge(TorchcoreError):
    """A job whose message is over the launcher's line limit: it cannot be handed over."""


class Launcher:
    """The supervisor's handle on one launcher process."""

    def __init__(self, report_fd, stderr=None, mark_fd=None):
        """Start one launcher.  ``stderr``: a path its stderr (and its executors') goes to,
        appended (the daemon's log, or os.devnull); None: the supervisor's own.  A daemon
        passes one: its own stderr is the start-up pipe until it is ready, and a helper
        keeping that pipe would get EPIPE once the starting command has exited.
        ``mark_fd``: the daemon's state directory, open; its executors hold it (procscan.py)."""
        # The supervisor's side only: the launcher process stays without it (see proctitle).
        import subprocess

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err = None if stderr is None else _open_stderr(stderr)
        fds = (theirs.fileno(), report_fd) + (() if mark_fd is None else (mark_fd,))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torchcore.launcher", *map(str, fds)],
                pass_fds=fds, stdin=subprocess.DEVNULL, stderr=err, close_fds=True,
                env=dict(os.environ, **dict([TITLE_ROOM])))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if err is not None:
                os.close(err)
        self.sock = ours
        self.sock.setblocking(False)
        self.dead = False               # its socket failed: the supervisor replaces it
        self.pid = self.proc.pid
        self.pending = bytearray()      # lines not yet accepted by the socket
        self.mid_line = False           # the socket took part of pending's first line
        self.buffer = b""               # partial answer line
        self.runs = 0                   # runs handed over and not yet exited

    def fileno(self):
        return self.sock.fileno()

    def submit(self, job):
        """Queue one job (see ``dead`` afterwards); JobTooLarge if it cannot be framed."""
        line = job.line()
        if len(line) > LINE_LIMIT:
            raise JobTooLarge(f"its job message is {len(line)} bytes, over the launcher's limit "
                              f"of {LINE_LIMIT} bytes (the command or env is too long)")
        self.pending += line
        self.runs += 1
        self.flush()

    def go(self, run_ids):
        """Start these prepared runs now (one message for all of them)."""
        self._send(wire.Go(list(run_ids)))

    def cancel(self, run_ids):
        """Cancel these prepared runs: their executors end without starting anything."""
        self._send(wire.Cancel(list(run_ids)))

    def _send(self, message):
        """Queue go/cancel ahead of any job lines still waiting: a run's start never waits
        behind the forks of other runs (the launcher keeps an early go for a job it has
        not forked yet)."""
        line = wire.encode(message)
        at = self.pending.index(b"\n") + 1 if self.mid_line else 0
        self.pending[at:at] = line
        self.flush()        # if it died, its end closes every go pipe it held (= cancel)

    def flush(self):
        """Write what the socket takes now; True when nothing is left to write.

        Never raises: a launcher whose socket fails (EPIPE, ECONNRESET ...) is ``dead``
        and what was queued for it is dropped."""
        while self.pending:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                return False
            except OSError:
                self.dead = True
                self.pending.clear()
                return True
            if sent:
                self.mid_line = self.pending[sent - 1] != ord("\n")
            del self.pending[:sent]
        return True

    def answers(self):
        """Every complete answer available now (wire.Forked, ForkFailed, Exited); None at end
        of file or on a socket error (it died).  A line that is no answer is dropped."""
        chunks = []
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                self.dead = True
                return None
            if not chunk:
                return None
            chunks.append(chunk)
            if len(chunk) < 65536:      # all there was: what comes later wakes the loop again
                break
        *lines, self.buffer = (self.buffer + b"".join(chunks)).split(b"\n")
        return [answer for answer in map(wire.decode_answer, lines) if answer is not None]

    def close(self):
        """Close its socket: a launcher exits when the supervisor hangs up."""
        self.sock.close()

    def kill(self):
        """SIGKILL it (a launcher found dead may be only stopped or hung); not once reaped."""
        if self.proc.returncode is not None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass


class LauncherPool:
    """The supervisor's launchers: started (and again when missing), each job handed to the
    least busy, go and cancel routed to the one holding the run, its answers read.

    The supervisor decides what a launcher's answers and death mean for its runs: the pool
    calls ``on_answers(launcher, answers)`` and ``on_death(launcher)`` from the loop."""

    def __init__(self, system, stderr, clock, contain, on_answers, on_death):
        self.system = system
        self.stderr = stderr        # a path for the launchers' stderr (None: the supervisor's)
        self.clock = clock
        self.contain = contain      # contain(what, exc): a failure counted, logged once
        self.on_answers = on_answers
        self.on_death = on_death
        self.target = 0             # how many run (one per core, four at most; set by start)
        self.handed_to = None       # the launcher the last submit went to
        self.retry_at = 0.0         # monotonic time to try again to start missing launchers
        self.selector = None
        self.report_w = None
        self._launchers = []

    def __len__(self):
        return len(self._launchers)

    def __iter__(self):
        return iter(self._launchers)

    def find(self, pid):
        return next((item for item in self._launchers if item.pid == pid), None)

    def start(self, selector, report_w, target):
        self.selector, self.report_w, self.target = selector, report_w, target
        self.start_missing()

    def start_missing(self):
        """One small forking process per core (two at most on this machine's kind, four at most).

        A launcher that cannot start (no memory, no pids) is tried again a few seconds later;
        meanwhile the others take the jobs (with none, the supervisor forks them itself)."""
        for _ in range(self.target - len(self._launchers)):
            try:
                launcher = self.system.start_launcher(self.report_w, self.stderr)
            except OSError as exc:
                self.retry_at = self.clock.monotonic() + 5.0
                self.contain("starting a launcher", exc)
                return
            self._launchers.append(launcher)
            self.selector.register(launcher.sock, selectors.EVENT_READ, self._event)

    def missing(self):
        """Fewer run than should, and the time to try again has come."""
        return len(self._launchers) < self.target and self.clock.monotonic() >= self.retry_at

    def submit(self, job):
        """Queue ``job`` on the least busy launcher.  One found dead is replaced and the job
        goes to the next; JobTooLarge for a job no launcher can take; OSError when none is left."""
        self.handed_to = None
        for _ in range(len(self._launchers) + 1):
            if not self._launchers:
                break
            chosen = min(self._launchers, key=lambda launcher: launcher.runs)
            chosen.submit(job)
            if chosen.dead:
                self.on_death(chosen)
                continue
            self._watch_pending(chosen)
            self.handed_to = chosen
            return
        raise OSError(errno.EAGAIN, "no launcher takes jobs now")

    def go(self, launcher, run_ids):
        launcher.go(run_ids)
        self._watch_pending(launcher)

    def cancel(self, launcher, run_ids):
        launcher.cancel(run_ids)
        self._watch_pending(launcher)

    def _watch_pending(self, launcher):
        """Have the loop finish writing to a launcher whose socket did not take everything."""
        if launcher.pending and launcher in self._launchers:
            self.selector.modify(launcher.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 self._event)

    def _event(self, key, mask):
        launcher = next((item for item in self._launchers if item.sock is key.fileobj), None)
        if launcher is None:
            return
        if mask & selectors.EVENT_WRITE and launcher.flush() and not launcher.dead:
            self.selector.modify(launcher.sock, selectors.EVENT_READ, self._event)
        answers = launcher.answers() if mask & selectors.EVENT_READ else []
        if answers is None or launcher.dead:
            self.on_death(launcher)
            return
        self.on_answers(launcher, answers)

    def remove(self, launcher):
        """Take a dead launcher out (killed: a stopped or hung one too); False if it is out
        already."""
        if launcher not in self._launchers:
            return False
        self._launchers.remove(launcher)
        self.selector.unregister(launcher.sock)
        launcher.close()
        launcher.kill()         # a stopped or hung one too: its socket is closed now
        return True

    def stop(self):
        for launcher in self._launchers:
            launcher.close()
        for launcher in self._launchers:
            try:
                launcher.proc.wait(2)
            except Exception:
                launcher.proc.kill()
        self._launchers = []


def _open_stderr(path):
    """A descriptor appending to ``path`` (created 0600), or /dev/null if it cannot be opened."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


# ---- the launcher process ----------------------------------------------------------------

def serve(sock, report_fd, mark_fd=None):
    """Fork an executor for each job line; answer forked/fork_failed/exited lines.
    ``mark_fd``: the daemon's mark, kept open by every executor (see procscan.py)."""
    from torchcore import executor, jobspec

    gc.freeze()     # what exists now is never scanned again, here or in the executors

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    for signum in GROUP_SIGNALS:    # sent to the whole group: the supervisor's to act on
        signal.signal(signum, signal.SIG_IGN)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "jobs")
    sel.register(wake_r, selectors.EVENT_READ, "signal")
    children, buffer = {}, b""
    gates = {}          # run id -> write end of a prepared run's go pipe
    queue = collections.deque()     # jobs received, not forked yet
    early = {}          # run id of a job not forked yet -> go (b"g") or cancel (b"") that came first
    newest = 0          # the highest run id received (the supervisor hands them out in order)
    while True:
        for key, _ in sel.select(0 if queue else 1.0):
            if key.data == "signal":
                _drain(wake_r)
                continue
            try:
                data = sock.recv(65536)
            except ConnectionResetError:    # closed with our answers unread (it was stopping)
                data = b""
            if not data:
                return          # the supervisor hung up: its executors go on by themselves
            *lines, buffer = (buffer + data).split(b"\n")
            if len(buffer) > LINE_LIMIT:
                return
            for line in lines:
                order = wire.decode_order(line)
                if isinstance(order, (wire.Go, wire.Cancel)):
                    # go/cancel overtake job lines on the way here (Launcher._send): one for a
                    # job not forked yet, queued or still to come, waits for it.
                    byte = b"g" if isinstance(order, wire.Go) else b""
                    queued = {job.run_id for job in queue}
                    for run_id in order.run_ids:
                        if run_id in gates:
                            _open_gates(gates, [run_id], byte)
                        elif run_id in queued or run_id > newest:
                            early[run_id] = byte
                else:
                    job = jobspec.Job.from_fields(order)
                    newest = max(newest, job.run_id)
                    queue.append(job)
        for _ in range(min(len(queue), FORKS_PER_PASS)):
            job = queue.popleft()
            _launch(executor, job, sock, report_fd, children, gates, mark_fd)
            if job.run_id in early:
                _open_gates(gates, [job.run_id], early.pop(job.run_id))
        _reap(sock, children, gates)


def _launch(executor, job, sock, report_fd, children, gates, mark_fd=None):
    go_r = go_w = None
    try:
        if job.prepared:
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except OSError as exc:
        for fd in (go_r, go_w):
            if fd is not None:
                os.close(fd)
        _answer(sock, wire.ForkFailed(job.run_id, str(exc)))
        return
    if pid == 0:
        # The executor closes every other descriptor (other runs' go pipes included).
        executor.execute(job, report_fd, go_r, mark_fd)     # never returns
    if go_r is not None:
        os.close(go_r)
        gates[job.run_id] = go_w
    children[pid] = job.run_id
    _answer(sock, wire.Forked(job.run_id, pid))


def _open_gates(gates, run_ids, byte):
    """Write ``byte`` to each run's go pipe (go), or nothing (cancel); then close it."""
    for run_id in run_ids:
        fd = gates.pop(run_id, None)
        if fd is None:
            continue
        try:
            if byte:
                os.write(fd, byte)
        except OSError:
            pass            # the executor is gone already
        finally:
            os.close(fd)


def _reap(sock, children, gates):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        run_id = children.pop(pid, None)
        if run_id is not None:
            _open_gates(gates, [run_id], b"")
            _answer(sock, wire.Exited(run_id, pid, status))


def _answer(sock, message):
    data = wire.encode(message)
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
    from torchcore import proctitle

    proctitle.set_title("torchcore: launcher")
    sock = socket.socket(fileno=int(argv[0]))
    sock.setblocking(False)
    mark_fd = int(argv[2]) if len(argv) > 2 else None
    if mark_fd is not None:
        os.set_inheritable(mark_fd, False)      # kept across fork, never across an exec
    serve(sock, int(argv[1]), mark_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
