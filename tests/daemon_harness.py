"""Run the real daemon on a temporary task file, for tests on real processes and real seconds."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import psutil

# Marks this test process's daemons and, through their environment, their commands.
SUITE = ("TC_TEST_SUITE", f"{os.getpid()}-{time.time_ns()}")
SETTINGS = "settings:\n  timezone: UTC\n  state_dir: state\n"


class Daemon:
    """``torchcore start --foreground`` in a subprocess; stderr goes to a file the test reads."""

    def __init__(self, directory, body, settings=""):
        self.dir = str(directory)
        self.path = os.path.join(self.dir, "tasks.yaml")
        self.write(body, settings)
        self.err_path = os.path.join(self.dir, "daemon.err")
        self.proc = None

    def write(self, body, settings=""):
        """Replace the task file atomically (as an editor or `git pull` does)."""
        tmp = self.path + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(SETTINGS + settings + body)
        os.replace(tmp, self.path)

    def start(self, *extra, wait=True):
        env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9", **{SUITE[0]: SUITE[1]})
        with open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torchcore", "start", "--foreground", "-c", self.path, *extra],
                stdout=subprocess.DEVNULL, stderr=err, cwd=self.dir, env=env)
        if wait:
            self.wait_log("torchcore started")
        return self

    @property
    def log(self):
        with open(self.err_path, errors="replace") as handle:
            return handle.read()

    def wait_log(self, text, timeout=15):
        return wait_for(lambda: text in self.log, timeout, f"{text!r} in the daemon log:\n{{}}",
                        lambda: self.log)

    def signal(self, signum):
        self.proc.send_signal(signum)

    def stop(self, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def runs(self, task=None):
        """Finished-or-started runs from the records: list of dicts, oldest first."""
        db = os.path.join(self.dir, "state", "torchcore.db")
        if not os.path.exists(db):
            return []
        try:        # read-only: a reader never creates the file the daemon is about to make
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        except sqlite3.OperationalError:
            return []
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute("SELECT * FROM runs ORDER BY run_id").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):     # made a moment ago, its schema not in yet
                return []
            raise
        finally:
            conn.close()
        return [dict(r) for r in rows if task is None or r["task"] == task]


def wait_for(predicate, timeout, message="condition", detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + message.format(detail()))


def titled(procs, text):
    """Those of ``procs`` whose title (command line) holds ``text``, passing over a process that
    ends meanwhile (gone, or a zombie not yet reaped: psutil raises on reading its title)."""
    found = []
    for proc in procs:
        try:
            if text in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def processes_with(marker, env=None):
    """Live (non-zombie) processes whose command line contains ``marker``, of the daemons this
    test process started (their commands inherit ``SUITE`` from the daemon's environment), or,
    with ``env`` a (name, value) pair, whose environment holds that: never another suite's
    processes running the same commands on the machine."""
    env = env or SUITE
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and \
                    marker in " ".join(proc.info["cmdline"] or ()) and \
                    (env is None or proc.environ().get(env[0]) == env[1]):
                found.append(proc)
        except psutil.Error:
            pass
    return found
