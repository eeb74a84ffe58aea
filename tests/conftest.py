"""Suite-wide plumbing: test kinds, and the reliability figures the fault tests record.

Kinds: a test module that starts real processes or daemons says ``pytestmark = pytest.mark.process``; a
test that takes more than a few seconds is also ``slow``.  Every other test is marked ``unit`` here, so
``pytest -m unit`` runs the fast, in-process tests alone, in seconds.

``make`` builds a supervisor on a fake clock with make-believe children (tests/supervisor_harness.py).

A reliability test takes the ``figures`` fixture and adds what it checked:
``figures.add(faults=3, runs=120, lost=0, doubled=0)``.  A test that finds a lost or doubled run
fails on its own; the table shows how much was tried, so "0 lost" means something.
"""

import dataclasses

import pytest
from supervisor_harness import build

_ROWS = {}      # test name -> Figures


@dataclasses.dataclass
class Figures:
    faults: int = 0     # faults injected (clock steps, signals, kills, reloads, bad inputs ...)
    runs: int = 0       # (task, second) runs checked against what was due
    lost: int = 0       # due runs neither started nor recorded as missed/skipped
    doubled: int = 0    # (task, second) pairs started more than once

    def add(self, faults=0, runs=0, lost=0, doubled=0):
        self.faults += faults
        self.runs += runs
        self.lost += lost
        self.doubled += doubled


@pytest.fixture(autouse=True)
def _no_thread_left_behind(request):
    """A test ends every thread it started (receivers, pools, talkers): the supervisor refuses to
    fork with a second thread alive (starting.py), so a thread one test leaves behind on an xdist
    worker fails whichever in-process supervisor test comes next there.  Threads of wider-scoped
    fixtures, alive when the test began, are theirs to end; a module marked ``module_threads``
    has a module-scoped server whose threads start with a test's first request.  Waiting for the
    threads to end here also keeps one ending slowly (a loaded machine) from the next test."""
    import threading
    import time

    before = set(threading.enumerate())
    yield
    if request.node.get_closest_marker("module_threads") is not None:
        return
    deadline = time.monotonic() + 10
    while True:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not left, f"threads left running by this test: {[t.name for t in left]}"


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("process") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def make(tmp_path):
    """``make(body)``: a supervisor Harness on that task file body, closed after the test."""
    made = []

    def factory(body, **kw):
        made.append(build(tmp_path, body, **kw))
        return made[-1]

    yield factory
    for sup in made:
        sup.close()


@pytest.fixture
def daemons(tmp_path):
    """``daemons(body, settings="", cls=Daemon)``: real daemons in directories of their own under
    tmp_path, each killed after the test (``cls`` e.g. a daemonized variant)."""
    from daemon_harness import Daemon

    made = []

    def factory(body, settings="", cls=None):
        directory = tmp_path / f"d{len(made)}"
        directory.mkdir()
        made.append((cls or Daemon)(directory, body, settings))
        return made[-1]

    yield factory
    for daemon in made:
        daemon.kill()
    if made:
        _end_leftovers(str(tmp_path))


def _end_leftovers(directory):
    """Processes still working in ``directory`` once its daemons are killed: a service or run a
    failed test left stopped (SIGSTOP before its SIGCONT) never sees its supervisor go.  Resumed
    and killed, so none outlives the test."""
    import os
    import time

    import psutil

    def working_there():
        found = []
        for proc in psutil.process_iter(["cwd"]):
            cwd = proc.info["cwd"] or ""
            if proc.pid != os.getpid() and (cwd == directory or cwd.startswith(directory + "/")):
                found.append(proc)
        return found

    if working_there():
        time.sleep(0.5)     # the services see their parent's end and go by themselves
    for proc in working_there():
        try:
            proc.resume()
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture
def figures(request):
    row = _ROWS.setdefault(request.node.originalname or request.node.name, Figures())
    return row


def pytest_sessionfinish(session):
    """Under pytest-xdist, a worker hands its figures to the controller (pytest_testnodedown)."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["figures"] = {name: dataclasses.asdict(row) for name, row in _ROWS.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for name, row in (getattr(node, "workeroutput", None) or {}).get("figures", {}).items():
        _ROWS.setdefault(name, Figures()).add(**row)


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("reliability figures")
    width = max(len(name) for name in _ROWS)
    write(f"{'test':<{width}}  {'faults':>7}  {'runs':>7}  {'lost':>5}  {'doubled':>7}")
    total = Figures()
    for name, row in sorted(_ROWS.items()):
        write(f"{name:<{width}}  {row.faults:>7}  {row.runs:>7}  {row.lost:>5}  {row.doubled:>7}")
        total.add(**dataclasses.asdict(row))
    write(f"{'total':<{width}}  {total.faults:>7}  {total.runs:>7}  {total.lost:>5}  "
          f"{total.doubled:>7}")


@pytest.fixture(scope="session")
def pg_server():
    """One throw-away PostgreSQL server for the session (tests/pgserver.py); skips without one."""
    import pgserver

    why = pgserver.missing()
    if why:
        pytest.skip(why)
    server = pgserver.PgServer().start()
    yield server
    server.close()


@pytest.fixture
def pg(pg_server, request):
    """A fresh, empty database on the session's server: ``pg.url`` and ``pg.server``."""
    import os
    import re
    import types

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40] + f"_{os.getpid()}_" \
        + str(len(_PG_NAMES))
    _PG_NAMES.append(name)
    url = pg_server.create_db(name)
    yield types.SimpleNamespace(url=url, name=name, server=pg_server)


@pytest.fixture
def fleet(pg):
    """``pg`` with the fleet schema made (``torchcore fleet init``'s migrations).  A test module
    may override it (test_fleet_commands.py: a task file and a connection besides)."""
    from torchcore import fleetdb

    with fleetdb.connect(pg.url) as conn:
        fleetdb.migrate(conn, pg.url)
    return pg


_PG_NAMES = []
