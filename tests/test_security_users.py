"""A second local user attacks a root daemon through the paths it shares with them.

The tests create a user (``useradd``, a unique name per run, removed with ``userdel -r``) and
a world-writable sticky directory like /tmp. As that user (``runuser``) they pre-create the
daemon's log_dir or state_dir there with symlinks planted under the name of every file
torchcore writes, pointing at a root-owned file; plant pidfiles naming processes they want
root to kill; and try to read root's task output. Root's ``start`` must refuse with the path,
owner and mode; root's ``stop``/``reload``/``restart`` must refuse and the named process live;
the symlinks' targets stay untouched; task output is unreadable to the user. A daemon whose
own files sit in the shared directory works, and a reload to a directory the user controls
is refused with the old one kept.

Needs root (to create the user and to be the daemon the user attacks); skipped otherwise.
"""

import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from daemon_harness import wait_for

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates a second user and runs a root daemon: "
                                                 "needs root"),
    pytest.mark.skipif(not shutil.which("useradd") or not shutil.which("runuser"),
                       reason="needs useradd and runuser"),
]

TASK = "job"
BACKUPS = 5
TASKS = f"""tasks:
  - {{name: {TASK}, schedule: "* * * * * *", command: "echo secret-output-$$"}}
"""
# Every name torchcore writes in log_dir and state_dir, for the task above.
LOG_NAMES = [f"{TASK}.log", f"{TASK}.log.lock", "torchcore.log"] + \
    [f"{TASK}.log.{n}" for n in range(1, BACKUPS + 2)]
STATE_NAMES = ["torchcore.db", "torchcore.db-wal", "torchcore.db-shm", "torchcore.db-journal",
               "torchcore.pid", "control.sock", "logs"]


@pytest.fixture(scope="module")
def attacker():
    name = "tcatk" + uuid.uuid4().hex[:10]
    made = subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        subprocess.run(["userdel", "-r", name], capture_output=True)


def as_user(user, *argv, check=True):
    """Run argv as the attacker (cwd /, which they can enter)."""
    out = subprocess.run(["runuser", "-u", user.pw_name, "--", *argv], capture_output=True,
                         text=True, cwd="/", timeout=30)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture
def shared():
    """A directory like /tmp: root's, mode 1777, that the attacker can reach."""
    path = tempfile.mkdtemp(prefix="tc-shared-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def victim(tmp_path):
    """A root-owned file no one but root may touch; ``unchanged()`` checks it still is."""
    path = tmp_path / "victim" / "secret"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"root:do-not-touch\n")
    os.chmod(path, 0o600)
    before = snapshot(path)

    class Victim:
        target = str(path)
        created = str(path) + ".created"       # a dangling link's target: must never appear

        @staticmethod
        def unchanged():
            return snapshot(path) == before and not os.path.lexists(Victim.created)

    return Victim


def read(path):
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def snapshot(path):
    info = os.lstat(path)
    return path.read_bytes(), stat.S_IMODE(info.st_mode), info.st_uid, info.st_mtime_ns


class Site:
    """A task file in tmp_path whose settings point where the test says; runs torchcore."""

    def __init__(self, directory, settings):
        self.dir = str(directory)
        self.settings = dict(settings)
        self.write()

    def write(self, **changes):
        self.settings.update(changes)
        lines = "".join(f"  {key}: {value}\n" for key, value in self.settings.items())
        tmp = os.path.join(self.dir, "tasks.yaml.tmp")
        with open(tmp, "w") as handle:
            handle.write(f"settings:\n  timezone: UTC\n{lines}{TASKS}")
        os.replace(tmp, os.path.join(self.dir, "tasks.yaml"))

    def tc(self, *args, timeout=60):
        env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9")
        return subprocess.run([sys.executable, "-m", "torchcore", *args, "-c", "tasks.yaml"],
                              capture_output=True, text=True, cwd=self.dir, env=env,
                              timeout=timeout)


@pytest.fixture
def site(tmp_path):
    made = []

    def make(**settings):
        made.append(Site(tmp_path, settings))
        return made[-1]

    yield make
    for one in made:            # a daemon a test left behind: stop it, by its own pidfile
        one.tc("stop", "--timeout", "20")


def plant_links(user, directory, names, target):
    """As the attacker: a symlink at each name, half to the victim, half dangling."""
    for index, name in enumerate(names):
        aim = target if index % 2 == 0 else target + ".created"
        as_user(user, "ln", "-s", aim, os.path.join(directory, name))


def user_dir(user, path, mode):
    as_user(user, "mkdir", path)
    as_user(user, "chmod", f"{mode:o}", path)


def assert_refused(out, path, user):
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert path in out.stderr and user.pw_name in out.stderr, out.stderr
    assert re.search(r"mode [0-7]{4}", out.stderr), out.stderr


# ---- log_dir and state_dir pre-created by the other user -----------------------------------

LAYOUTS = ["dir-0777", "dir-0755", "dir-1777", "symlink-to-roots-dir"]


def prepare_layout(user, shared, layout, names, victim, root_dir):
    """The attacker's version of shared/<name>: their directory full of links, or a link."""
    path = os.path.join(shared, "taken")
    if layout.startswith("dir-"):
        user_dir(user, path, int(layout[4:], 8))
        plant_links(user, path, names, victim.target)
    else:
        as_user(user, "ln", "-s", root_dir, path)
    return path


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_log_dir_another_user_made_is_refused(attacker, shared, site, victim, tmp_path,
                                                layout, foreground, figures):
    figures.add(faults=1)          # one attack
    root_dir = tmp_path / "roots-logs"
    root_dir.mkdir(mode=0o750)
    log_dir = prepare_layout(attacker, shared, layout, LOG_NAMES, victim, str(root_dir))
    one = site(state_dir="state", log_dir=log_dir)
    out = one.tc("start", *(["--foreground"] if foreground else []))
    assert_refused(out, log_dir, attacker)
    assert victim.unchanged()
    assert os.listdir(root_dir) == []
    assert not os.path.exists(os.path.join(one.dir, "state", "torchcore.pid"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_state_dir_another_user_made_is_refused(attacker, shared, site, victim, tmp_path,
                                                  layout, figures):
    figures.add(faults=1)          # one attack
    root_dir = tmp_path / "roots-state"
    root_dir.mkdir(mode=0o700)
    state_dir = prepare_layout(attacker, shared, layout, STATE_NAMES, victim, str(root_dir))
    one = site(state_dir=state_dir)
    out = one.tc("start")
    assert_refused(out, state_dir, attacker)
    assert victim.unchanged()
    assert os.listdir(root_dir) == []


def test_a_records_database_another_user_made_is_refused(attacker, shared, site, victim, figures):
    """Their own state_dir (0700) with their own database in it: not opened by root."""
    figures.add(faults=1)          # one attack
    state_dir = os.path.join(shared, "state")
    user_dir(attacker, state_dir, 0o700)
    database = os.path.join(state_dir, "torchcore.db")
    as_user(attacker, "sh", "-c", f"printf 'SQLite format 3' > {database}")
    before = snapshot_as_root(database)
    out = site(state_dir=state_dir).tc("start", "--foreground")
    assert_refused(out, state_dir, attacker)
    assert snapshot_as_root(database) == before
    assert sorted(os.listdir(state_dir)) == ["torchcore.db"]


def snapshot_as_root(path):
    info = os.lstat(path)
    with open(path, "rb") as handle:
        return handle.read(), info.st_uid, stat.S_IMODE(info.st_mode), info.st_mtime_ns


# ---- pidfiles naming someone else's process ------------------------------------------------

def hold_lock(path, user=None):
    """A process holding an exclusive flock on ``path`` (as ``user`` if given)."""
    argv = ["flock", "-x", path, "sleep", "120"]
    if user is not None:
        argv = ["runuser", "-u", user.pw_name, "--", *argv]
    proc = subprocess.Popen(argv, cwd="/", start_new_session=True)
    info = os.stat(path)
    wait_for(lambda: lock_holders(info.st_dev, info.st_ino), 10, "the lock to be taken")
    return proc, next(iter(lock_holders(info.st_dev, info.st_ino)))


def lock_holders(dev, ino):
    """Pids holding a lock on (dev, ino), read from /proc/locks independently of torchcore."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    with open("/proc/locks") as handle:
        rows = [line.split() for line in handle]
    return {int(row[4]) for row in rows if len(row) > 5 and row[1] != "->" and row[5] == want}


def write_as(user, path, text):
    if user is None:
        with open(path, "w") as handle:
            handle.write(text)
        os.chmod(path, 0o644)
    else:
        as_user(user, "sh", "-c", f"umask 022; printf '%s' '{text}' > {path}")


# Each case: where the pidfile is and who made it, who holds its lock, which pid it names,
# and a word the refusal must contain. "victim" is a root process that must survive.
PIDFILE_CASES = {
    "their-file-locked-by-them": ("shared", "attacker", "attacker", "victim", "owned by"),
    "their-file-unlocked": ("shared", "attacker", None, "victim", "owned by"),
    "their-file-in-their-dir": ("their-dir", "attacker", "attacker", "victim", "owned by"),
    "root-file-their-lock": ("shared", "root", "attacker", "victim", "does not hold its lock"),
    "root-file-their-lock-their-pid": ("shared", "root", "attacker", "holder", "runs as uid"),
    "root-file-root-lock-not-torchcore": ("shared", "root", "root", "holder",
                                          "not a torchcore supervisor"),
    "root-file-other-root-holder": ("shared", "root", "root", "victim", "does not hold its lock"),
}


@pytest.mark.parametrize("command", ["stop", "reload", "restart"])
@pytest.mark.parametrize("case", list(PIDFILE_CASES))
def test_a_planted_pidfile_never_gets_a_process_killed(attacker, shared, site, case, command, figures):
    figures.add(faults=1)          # one attack
    where, maker, locker, named, reason = PIDFILE_CASES[case]
    directory = shared
    if where == "their-dir":
        directory = os.path.join(shared, "run")
        user_dir(attacker, directory, 0o755)
    path = os.path.join(directory, "torchcore.pid")
    maker_user = attacker if maker == "attacker" else None
    write_as(maker_user, path, "1")
    victim_proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    holder_proc = None
    try:
        if locker is not None:
            holder_proc, holder_pid = hold_lock(path, attacker if locker == "attacker" else None)
        target = victim_proc.pid if named == "victim" else holder_pid
        if maker_user is None:
            write_as(None, path, f"{target}\n")
        else:
            as_user(attacker, "sh", "-c", f"printf '%s\\n' {target} > {path}")
        out = site(state_dir="state").tc(command, "--pidfile", path, timeout=30)
        assert out.returncode == 1, (out.stdout, out.stderr)
        named_path = directory if where == "their-dir" else path
        assert reason in out.stderr and named_path in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        time.sleep(0.3)
        assert victim_proc.poll() is None, "the victim process was killed"
        if holder_proc is not None:
            assert holder_proc.poll() is None, "the lock holder was killed"
    finally:
        for proc in (victim_proc, holder_proc):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_daemon_with_its_files_in_the_shared_directory_works(attacker, shared, site):
    """The positive case: root's own pidfile, log_dir and state_dir under a sticky /tmp."""
    pidfile = os.path.join(shared, "tc.pid")
    one = site(state_dir=os.path.join(shared, "state"), log_dir=os.path.join(shared, "logs"),
               pidfile=pidfile)
    out = one.tc("start")
    assert out.returncode == 0, out.stderr
    log = os.path.join(shared, "logs", f"{TASK}.log")
    wait_for(lambda: os.path.exists(log) and os.path.getsize(log) > 0, 15, "the task's log")
    assert as_user(attacker, "kill", "-0", open(pidfile).read().strip(),
                   check=False).returncode != 0          # and they cannot signal it either
    out = one.tc("stop", "--pidfile", pidfile)
    assert out.returncode == 0 and "torchcore stopped" in out.stdout, out.stderr


# ---- reading root's task output --------------------------------------------------------------

@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "older-looser-modes"])
def test_task_output_is_unreadable_to_another_user(attacker, shared, site, existing, figures):
    figures.add(faults=1)          # one attack
    log_dir = os.path.join(shared, "logs")
    if existing:                    # what an older torchcore left: 0755 and 0644
        os.mkdir(log_dir, 0o755)
        os.chmod(log_dir, 0o755)
        for name in (f"{TASK}.log", "torchcore.log"):
            with open(os.path.join(log_dir, name), "w") as handle:
                handle.write("old secret-output\n")
            os.chmod(os.path.join(log_dir, name), 0o644)
    one = site(state_dir="state", log_dir=log_dir)
    out = one.tc("start")           # daemon mode: its own log goes to log_dir too
    assert out.returncode == 0, out.stderr
    log = os.path.join(log_dir, f"{TASK}.log")
    wait_for(lambda: "run " in read(log), 15, "the task's output")
    assert stat.S_IMODE(os.stat(log_dir).st_mode) == 0o750
    for name in (f"{TASK}.log", "torchcore.log"):
        assert stat.S_IMODE(os.stat(os.path.join(log_dir, name)).st_mode) == 0o640
        denied = as_user(attacker, "cat", os.path.join(log_dir, name), check=False)
        assert denied.returncode != 0 and "secret-output" not in denied.stdout
        assert "Permission denied" in denied.stderr
    listing = as_user(attacker, "ls", log_dir, check=False)
    assert listing.returncode != 0 and TASK not in listing.stdout
    assert one.tc("stop").returncode == 0


# ---- reload ----------------------------------------------------------------------------------

def test_a_reload_to_a_log_dir_another_user_made_is_refused_and_the_old_kept(
        attacker, shared, site, victim, figures):
    figures.add(faults=1)          # one attack
    theirs = os.path.join(shared, "theirs")
    user_dir(attacker, theirs, 0o777)
    plant_links(attacker, theirs, LOG_NAMES, victim.target)
    own_logs = os.path.join(shared, "logs")
    one = site(state_dir="state", log_dir=own_logs)
    assert one.tc("start").returncode == 0
    own_log = os.path.join(own_logs, f"{TASK}.log")
    wait_for(lambda: "run " in read(own_log), 15, "the task's first output")
    one.write(log_dir=theirs)
    out = one.tc("reload")
    assert out.returncode == 0, out.stderr
    daemon_log = os.path.join(own_logs, "torchcore.log")
    wait_for(lambda: "refused" in read(daemon_log), 15, "the refusal in the daemon log")
    text = open(daemon_log).read()
    assert theirs in text and attacker.pw_name in text and f"{own_logs} is kept" in text
    size = len(read(own_log))
    wait_for(lambda: len(read(own_log)) > size, 15, "more output in the old log_dir")
    assert victim.unchanged()
    assert one.tc("stop").returncode == 0
    assert victim.unchanged()
