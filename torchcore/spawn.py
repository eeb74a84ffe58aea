"""Starting a run's command: posix_spawn (the quick path), the gate, or subprocess.Popen.

``SpawnedCommand`` makes everything ready ahead (pipes, file actions, signal dispositions, the
environment) so a start is one posix_spawn, or, for a prepared run, spawns the gate
(``torchcore-gate``, csrc/tc_gate.c) that holds the command until its go byte and then only
execs it.  ``PopenCommand`` is the path for a command that needs Python between fork and exec
(a working directory, a user switch, rlimits).  The executor (executor.py) picks one.
"""

import os
import signal

GATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_gate")   # csrc/tc_gate.c


def gate_usable():
    """Is the gate there to run (built next to the package by setup.py)?"""
    return os.access(GATE, os.X_OK)


class PopenCommand:
    """A command started by subprocess.Popen: the path for a working directory, a user
    switch or rlimits (work that needs Python code between fork and exec)."""

    def __init__(self, argv, options):
        # Imported here, not at the top, so only these runs pay for it (see proctitle); and
        # when the command is made ready, so a prepared run pays before its second.
        import subprocess

        self.subprocess = subprocess
        self.argv, self.options, self.proc = argv, options, None

    def start(self):
        subprocess = self.subprocess
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         **self.options)
        except subprocess.SubprocessError as exc:   # what preexec_fn raised, in the child
            raise OSError(str(exc)) from exc

    def discard(self):
        pass


class SpawnedCommand:
    """A command started with posix_spawn (vfork and exec, no Python in between).

    The quick path for a run that needs no working directory, user switch or rlimits.
    Everything but the spawn itself (pipes, file actions, signal dispositions, the
    environment) is made ready beforehand, so a prepared run's start at its second
    is one system call.
    """

    _DEFAULT_SIGNALS = tuple(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})

    def __init__(self, argv, env):
        self.argv, self.env, self.proc = list(argv), env, None
        self._fds = []
        self._status = None
        try:
            self.out_r, self.out_w = self._pipe()
            self.err_r, self.err_w = self._pipe()
            self.null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            self._fds.append(self.null)
        except OSError:
            self.discard()
            raise
        self.file_actions = [(os.POSIX_SPAWN_DUP2, self.null, 0),
                             (os.POSIX_SPAWN_DUP2, self.out_w, 1),
                             (os.POSIX_SPAWN_DUP2, self.err_w, 2)]

    def _pipe(self):
        fds = os.pipe()
        self._fds += fds
        return fds

    def start(self):
        pid = os.posix_spawnp(self.argv[0], self.argv, self.env, setsid=True, setsigmask=(),
                              setsigdef=self._DEFAULT_SIGNALS, file_actions=self.file_actions)
        self._started(pid)

    def start_at_gate(self, go_fd, wait):
        """Spawn the gate now: it execs the command when a byte arrives on ``go_fd``."""
        status_r, status_w = os.pipe()
        argv_r, argv_w = os.pipe()
        try:
            pid = os.posix_spawn(
                GATE, ["torchcore-gate", str(int(wait * 1000))], self.env,
                setsid=True, setsigmask=(), setsigdef=self._DEFAULT_SIGNALS,
                file_actions=self.file_actions + [(os.POSIX_SPAWN_DUP2, go_fd, 3),
                                                  (os.POSIX_SPAWN_DUP2, status_w, 4),
                                                  (os.POSIX_SPAWN_DUP2, argv_r, 5)])
        except OSError:
            for fd in (status_r, argv_w):
                os.close(fd)
            raise
        finally:
            for fd in (status_w, argv_r):
                os.close(fd)
        self.status_r = status_r
        os.close(go_fd)
        self._started(pid)
        try:        # the command line, after the spawn: the gate reads it as it is written
            with open(argv_w, "wb") as words:
                words.write(b"".join(os.fsencode(word) + b"\0" for word in self.argv))
        except OSError:
            pass    # the gate is gone: its status says so

    def gate_status(self):
        """Everything the gate wrote on its status pipe, once it closed (exec, exit)."""
        if self._status is None:
            chunks = []
            while True:
                chunk = os.read(self.status_r, 256)
                if not chunk:
                    break
                chunks.append(chunk)
            os.close(self.status_r)
            self._status = b"".join(chunks)
        return self._status

    def _started(self, pid):
        for fd in (self.null, self.out_w, self.err_w):
            os.close(fd)
        self._fds = []
        self.proc = _SpawnedProcess(self.argv, pid, self.out_r, self.err_r)

    def discard(self):
        """Close what was made ready for a command that will not start."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class _SpawnedProcess:
    """A posix_spawned command, with the part of Popen's interface an executor uses:
    pid, stdout, stderr, poll(), wait() and returncode (minus the signal number when a
    signal ended it, as Popen's)."""

    def __init__(self, argv, pid, out_r, err_r):
        self.args, self.pid, self.returncode = argv, pid, None
        # The pipes belong to this object, as Popen's do.
        self.stdout = open(out_r, "rb", 0)  # noqa: SIM115
        self.stderr = open(err_r, "rb", 0)  # noqa: SIM115

    def poll(self):
        if self.returncode is None:
            self._waitpid(os.WNOHANG)
        return self.returncode

    def wait(self):
        while self.returncode is None:
            self._waitpid(0)
        return self.returncode

    def _waitpid(self, flags):
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:       # reaped elsewhere: nothing more can be known
            self.returncode = 255
            return
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)
