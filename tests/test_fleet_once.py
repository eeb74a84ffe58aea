"""`run: once` against a real PostgreSQL (tests/pgserver.py): the claim statements raced from many
connections, the claims process on its own, and several real daemons on one machine as separate
nodes (``--node-name``, ``--node-ip``, own state dirs), each scheduled second counted from the
commands' own output (``TORCHCORE_SCHEDULED_AT``, ``TORCHCORE_FENCE``).

The node registry (``nodes``) is written here, as the fleet agent would: the contract is the
table.  The nodes' heartbeats are set an hour apart, so a killed node stays "live" (and
preferred for its share of the seconds) for the whole test: the others must take over."""

import collections
import concurrent.futures
import os
import signal
import socket
import time

import pytest
from daemon_harness import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchcore import claimer, claims, fleetdb

pytestmark = pytest.mark.process


def _nodes(url, count):
    with fleetdb.connect(url) as conn:
        for number in range(1, count + 1):
            conn.execute(f"""INSERT INTO {fleetdb.SCHEMA}.nodes (name, hostname, addresses,
                version, heartbeat, last_seen) VALUES (%s, %s, %s, 'test', 3600, now())""",
                         (f"n{number}", f"n{number}", [f"10.0.0.{number}"]))


def _claim(url, node, keys):
    with fleetdb.connect(url) as conn:
        return conn.execute(claims.CLAIM, {"node": node, **claims.columns(keys)}).fetchall()


# ---- the statements ---------------------------------------------------------------------------

def test_one_node_wins_each_claim_raced_from_many_connections_and_fences_increase(fleet):
    now = int(time.time())
    keys = [("report", now + 10 + s) for s in range(20)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: _claim(fleet.url, f"n{n}", keys), range(8)))
    winners = collections.Counter((task, second) for rows in results for task, second, _ in rows)
    assert winners == collections.Counter(keys)        # every key won, each by one node only
    fences = sorted((second, fence) for rows in results for _, second, fence in rows)
    assert [fence for _, fence in fences] == [claims.first_fence(second) for second, _ in fences]
    with fleetdb.connect(fleet.url) as conn:        # not expired yet: nothing to take over
        def run(sql, node, keys, **more):
            return conn.execute(sql, {"node": node, **claims.columns(keys), **more}).fetchall()
        assert run(claims.TAKE_OVER, "n9", keys) == []
        past = [("late", now - 5)]
        run(claims.CLAIM, "n1", past)
        taken = run(claims.TAKE_OVER, "n2", past)
        assert taken == [("late", now - 5, claims.first_fence(now - 5) + 1)]
        # the first holder's start is refused (its fence is stale); the taker's is confirmed
        assert run(claims.START, "n1", past, fences=[claims.first_fence(now - 5)]) == []
        assert run(claims.START, "n2", past, fences=[taken[0][2]]) == [("late", now - 5)]
        assert run(claims.TAKE_OVER, "n3", past) == []


# The slots of a batch of won claims (TAKE_SLOTS), against the same batch taken one claim at a
# time in the batch's order: each claim the lowest free slot of its task below its max (free: no
# lease, or a lease past), none free -> no slot and its claim decided (started and ended).
BATCH_TASKS = {"two": 2, "a": 1, "b": 1, "c": 1}
SLOT_STATES = st.sampled_from(["free", "past", "held"])


@st.composite
def _slot_batches(draw):
    states = {(task, slot): draw(SLOT_STATES)
              for task, most in BATCH_TASKS.items() for slot in range(most)}
    keys = draw(st.lists(st.tuples(st.sampled_from(sorted(BATCH_TASKS)), st.integers(0, 3)),
                         min_size=1, max_size=8, unique=True))
    return states, keys


@settings(derandomize=True, max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=_slot_batches())
def test_a_batch_of_won_claims_takes_the_slots_that_one_claim_at_a_time_would(fleet, batch):
    states, keys = batch
    base = int(time.time()) + 100
    keys = [(task, base + second) for task, second in keys]
    free = {task: [slot for slot in range(most) if states[(task, slot)] != "held"]
            for task, most in BATCH_TASKS.items()}
    expected = {}
    for task, second in keys:
        expected[(task, second)] = free[task].pop(0) if free[task] else None
    with fleetdb.connect(fleet.url) as conn:
        conn.execute(f"DELETE FROM {fleetdb.SCHEMA}.claims")
        conn.execute(f"DELETE FROM {fleetdb.SCHEMA}.slots")
        conn.execute(claims.MAKE_SLOTS_OF, {"tasks": list(BATCH_TASKS),
                                            "maxes": list(BATCH_TASKS.values())})
        for (task, slot), state in states.items():
            if state != "free":
                conn.execute(f"""UPDATE {fleetdb.SCHEMA}.slots SET node = 'other', second = 1,
                    fence = 1000, lease_until = now() + make_interval(secs => %s)
                    WHERE task = %s AND slot = %s""", (60 if state == "held" else -60, task, slot))
        conn.execute(claims.CLAIM, {"node": "n1", **claims.columns(keys)})
        rows = conn.execute(claims.TAKE_SLOTS, {
            "node": "n1", **claims.columns(keys),
            "fences": [claims.first_fence(second) for _, second in keys],
            "maxes": [BATCH_TASKS[task] for task, _ in keys]}).fetchall()
        assert sorted((task, second, fence, slot) for task, second, fence, slot in rows) == sorted(
            (task, second, claims.first_fence(second), slot)
            for (task, second), slot in expected.items() if slot is not None)
        slots = {(task, slot): (node, second, bool(ahead)) for task, slot, node, second, ahead in
                 conn.execute(f"""SELECT task, slot, node, second, lease_until > now()
                     FROM {fleetdb.SCHEMA}.slots""")}
        for (task, slot), state in states.items():
            holder = [second for (name, second), got in expected.items()
                      if name == task and got == slot]
            if holder:              # taken by the batch, until FIRE_WINDOW after its second
                assert slots[(task, slot)] == ("n1", holder[0], True)
            elif state == "held":
                assert slots[(task, slot)] == ("other", 1, True)
            else:                   # free, and left free
                assert slots[(task, slot)] == ((None, None, False) if state == "free" else
                                               ("other", 1, False))
        decided = {(task, second) for task, second in conn.execute(
            f"SELECT task, second FROM {fleetdb.SCHEMA}.claims WHERE ended IS NOT NULL")}
        assert decided == {key for key, slot in expected.items() if slot is None}


def test_batches_of_slots_raced_from_many_connections_never_exceed_the_fleet_max(fleet):
    import threading
    base = int(time.time()) + 100
    with fleetdb.connect(fleet.url) as conn:
        conn.execute(claims.MAKE_SLOTS_OF, {"tasks": list(BATCH_TASKS),
                                            "maxes": list(BATCH_TASKS.values())})
    barrier = threading.Barrier(6)

    def take(number):       # each node its own seconds of every task, two of "two"
        keys = [(task, base + 10 * number + k) for task in BATCH_TASKS
                for k in range(2 if task == "two" else 1)]
        with fleetdb.connect(fleet.url) as conn:
            conn.execute(claims.CLAIM, {"node": f"n{number}", **claims.columns(keys)})
            barrier.wait()
            return conn.execute(claims.TAKE_SLOTS, {
                "node": f"n{number}", **claims.columns(keys),
                "fences": [claims.first_fence(second) for _, second in keys],
                "maxes": [BATCH_TASKS[task] for task, _ in keys]}).fetchall()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        rows = [row for rows in pool.map(take, range(6)) for row in rows]
    taken = collections.Counter((task, slot) for task, _, _, slot in rows)
    assert all(count == 1 for count in taken.values()), rows       # no slot given twice
    assert all(slot < BATCH_TASKS[task] for task, slot in taken)
    with fleetdb.connect(fleet.url) as conn:
        held = {(task, slot): fence for task, slot, fence in conn.execute(
            f"SELECT task, slot, fence FROM {fleetdb.SCHEMA}.slots WHERE lease_until > now()")}
        decided = conn.execute(f"SELECT count(*) FROM {fleetdb.SCHEMA}.claims "
                               "WHERE ended IS NOT NULL").fetchone()[0]
    assert held == {(task, slot): fence for task, _, fence, slot in rows}
    assert decided == 6 * 5 - len(rows)         # every claim without a slot decided


# ---- the claims process on its own --------------------------------------------------------------

def _claimer(url, node, takeover=0.5):
    ours, theirs = socket.socketpair()
    proc = claimer.Claimer(theirs)
    proc.handle({"hello": {"url": url, "node": node, "takeover": takeover, "lease": 15}})
    ours.settimeout(5)
    return proc, ours


def _read(sock, proc, until):
    """Drive the claimer until a message with ``until`` comes back; that message."""
    deadline = time.monotonic() + 5
    buffer = b""
    sock.setblocking(False)
    while time.monotonic() < deadline:
        proc.due()
        try:
            buffer += sock.recv(65536)
        except BlockingIOError:
            pass
        messages, rest = claims.decode_lines(b"", buffer)
        for message in messages:
            if until in message:
                return message
        time.sleep(0.01)
    raise AssertionError(f"no {until!r} message")


def test_the_preferred_node_claims_at_once_the_others_at_the_takeover_time(fleet):
    _nodes(fleet.url, 2)
    second = int(time.time()) + 3
    names = ["n1", "n2"]
    task = next(f"t{i}" for i in range(100) if claims.preferred(f"t{i}", second, names) == "n2")
    n1, sock1 = _claimer(fleet.url, "n1")
    n2, sock2 = _claimer(fleet.url, "n2")
    request = {"claim": second, "tasks": [[task, ["10.0.0.0/24"], []]]}
    assert n1.handle(request) == []             # not preferred: waits until second - takeover
    assert n1.waiting == {(task, second): second - 0.5}
    assert n2.handle(request) == [(task, second)]
    n2.attempt([(task, second)])
    assert _read(sock2, n2, "won")["won"] == [[task, second, claims.first_fence(second)]]
    started = time.time()
    answer = _read(sock1, n1, "won")
    assert answer["won"] == [] and answer["lost"] == [[task, second]]
    assert time.time() >= second - 0.5 - 0.05 and time.time() - started < 3


def test_an_expired_claim_is_taken_over_late_and_the_stale_start_revoked(fleet):
    second = int(time.time()) + 1
    n1, sock1 = _claimer(fleet.url, "n1")
    n2, sock2 = _claimer(fleet.url, "n2")
    n1.attempt([("job", second)])
    assert _read(sock1, n1, "won")["won"] == [["job", second, claims.first_fence(second)]]
    n2.attempt([("job", second)])
    assert _read(sock2, n2, "won")["lost"] == [["job", second]]
    # n1 never starts it: from second + 1 s, n2 takes it over with the next token
    answer = _read(sock2, n2, "won")
    assert answer == {"won": [["job", second, claims.first_fence(second) + 1]], "lost": [],
                      "late": True}
    assert time.time() >= second + claims.EXPIRE_AFTER
    n1.handle({"start": [["job", second, claims.first_fence(second), None, 1]]})   # too late
    assert _read(sock1, n1, "revoked")["revoked"] == [["job", second, claims.first_fence(second)]]


def test_an_unreachable_database_answers_nothing_and_says_so_once(tmp_path):
    from pgserver import free_port
    proc, sock = _claimer(f"postgresql://tc@127.0.0.1:{free_port()}/x", "n1")
    second = int(time.time()) + 2
    proc.attempt([("job", second)])
    message = _read(sock, proc, "db")
    assert message["db"] == "down" and "cannot connect to the fleet database" in message["error"]
    proc.attempt([("job", second)])
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(100)          # nothing more: no answer, and "down" said once


# ---- real daemons as nodes ----------------------------------------------------------------------

TASKS = """\
tasks:
  - name: tick
    schedule: "* * * * * *"
    run: once
    max: 10                 # a second taken over late (or ending late under load) may
                            # overlap the next one's run: the fleet max is tested below
    ips: [10.0.0.0/24]
    command: echo "$TORCHCORE_SCHEDULED_AT $TORCHCORE_FENCE {node}" >> {out}; sleep 0.4
  - name: each
    schedule: "* * * * * *"
    command: echo "{node}" >> {each}
"""


def _fleet_daemons(daemons, url, tmp_path, count):
    found = []
    for number in range(1, count + 1):
        node = f"n{number}"
        body = TASKS.format(node=node, out=tmp_path / "once.txt", each=tmp_path / "each.txt")
        daemon = daemons(body, settings=f"  fleet:\n    database: {url}\n")
        found.append(daemon.start("--node-name", node, "--node-ip", f"10.0.0.{number}"))
    return found


def _once_runs(tmp_path):
    """(second, fence, node) of every once-run, from the commands' own output."""
    path = tmp_path / "once.txt"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        second, fence, node = line.split()
        rows.append((int(second), int(fence), node))
    return rows


@pytest.mark.slow
def test_three_nodes_run_every_second_once_and_a_node_killed_mid_run_costs_no_second(
        fleet, daemons, tmp_path, figures):
    _nodes(fleet.url, 3)
    nodes = _fleet_daemons(daemons, fleet.url, tmp_path, 3)
    wait_for(lambda: len(_once_runs(tmp_path)) >= 3, 15, "the first once-runs")
    first = min(second for second, _, _ in _once_runs(tmp_path))
    # the seconds spread over all three (rendezvous hashing): each has run some before the kill
    wait_for(lambda: {n for _, _, n in _once_runs(tmp_path)} == {"n1", "n2", "n3"}, 20,
             "runs on every node")
    # kill -9 node 1 while its run is under way (each run sleeps 0.4 s after its line)
    wait_for(lambda: any(n == "n1" and s >= int(time.time()) - 1
                         for s, _, n in _once_runs(tmp_path)), 10, "a run of n1")
    nodes[0].proc.send_signal(signal.SIGKILL)
    nodes[0].proc.wait()
    killed = time.time()
    time.sleep(8)
    last = int(time.time()) - 2         # the seconds whose runs have surely started
    for daemon in nodes[1:]:
        daemon.stop()
    runs = [row for row in _once_runs(tmp_path) if first <= row[0] <= last]
    per_second = collections.Counter(second for second, _, _ in runs)
    doubled = [s for s, count in per_second.items() if count > 1]
    missed = [s for s in range(first, last + 1) if s not in per_second]
    figures.add(faults=1, runs=last - first + 1, lost=len(missed), doubled=len(doubled))
    assert not doubled, doubled
    assert not missed, (missed, killed)
    assert {node for second, _, node in runs if second > killed + 1} <= {"n2", "n3"}
    fences = [fence for _, fence, _ in sorted(runs)]
    assert fences == sorted(set(fences))            # strictly increasing over the seconds
    assert all(claims.fence_second(fence) == second for second, fence, _ in runs)
    each = (tmp_path / "each.txt").read_text().split()
    assert {"n1", "n2", "n3"} <= set(each)


@pytest.mark.slow
def test_with_the_database_stopped_once_tasks_are_skipped_with_the_reason_each_tasks_go_on(
        fleet, daemons, tmp_path, figures):
    _nodes(fleet.url, 2)
    nodes = _fleet_daemons(daemons, fleet.url, tmp_path, 2)
    wait_for(lambda: len(_once_runs(tmp_path)) >= 2, 15, "the first once-runs")
    fleet.server.stop()
    stopped = time.time()
    try:
        time.sleep(5)
        each_during = len((tmp_path / "each.txt").read_text().split())
        time.sleep(1)
        assert len((tmp_path / "each.txt").read_text().split()) > each_during    # each goes on
    finally:
        fleet.server.start_again()
    back = time.time()
    wait_for(lambda: any(s > back for s, _, _ in _once_runs(tmp_path)), 15, "once-runs again")
    time.sleep(1)
    for daemon in nodes:
        daemon.stop()
    runs = _once_runs(tmp_path)
    during = [s for s, _, _ in runs if stopped + 1 < s < back - 1]
    assert during == []
    per_second = collections.Counter(s for s, _, _ in runs)
    assert [s for s, c in per_second.items() if c > 1] == []
    skipped = {r["scheduled"] for d in nodes for r in d.runs("tick")
               if r["skipped"] == claims.UNREACHABLE}
    quiet = range(int(stopped) + 1, int(back))
    assert set(quiet) <= skipped | set(per_second)      # every second not run is recorded
    assert all(f"skipped: {claims.UNREACHABLE}" in d.log for d in nodes)
    assert sum("the fleet database is reachable again" in d.log for d in nodes) == 2
    figures.add(faults=1, runs=len(quiet), doubled=0)


# ---- fleet-wide max and leases -----------------------------------------------------------------

MAX_TASKS = """\
tasks:
  - name: one
    schedule: "* * * * * *"
    run: once
    command: >-
      echo "s $(date +%s.%N) $TORCHCORE_SCHEDULED_AT" >> {out}; sleep 1.3;
      echo "e $(date +%s.%N) $TORCHCORE_SCHEDULED_AT" >> {out}
  - name: two
    schedule: "*/2 * * * * *"
    run: once
    max: 2
    command: >-
      echo "s $(date +%s.%N) $TORCHCORE_SCHEDULED_AT" >> {two}; sleep 3;
      echo "e $(date +%s.%N) $TORCHCORE_SCHEDULED_AT" >> {two}
"""


def _most_at_once(path, until=None):
    """The most runs under way at one moment, from their own start and end stamps, and the
    seconds they ran for (a second run twice is there twice).  With ``until`` (when the nodes
    began to stop), only runs started before it count, and one with no end stamp (stopped by
    the shutdown) counts until then."""
    starts, ends = [], {}
    for line in path.read_text().splitlines():
        kind, at, second = line.split()
        if kind == "s":
            starts.append((int(second), float(at)))
        else:
            ends.setdefault(int(second), []).append(float(at))
    if until is not None:
        starts = [(second, at) for second, at in starts if at < until]
    events = []
    for second, at in starts:
        left = ends.get(second)
        end = left.pop(0) if left else until if until is not None else float("inf")
        events += [(at, 1), (end, -1)]
    running = most = 0
    for _, step in sorted(events):      # an end before a start at the same moment
        running += step
        most = max(most, running)
    return most, [second for second, _ in starts]


@pytest.mark.slow
def test_fleet_max_holds_across_nodes_and_full_seconds_are_skipped_with_the_reason(
        fleet, daemons, tmp_path, figures):
    _nodes(fleet.url, 2)
    nodes = []
    for number in (1, 2):
        body = MAX_TASKS.format(out=tmp_path / "one.txt", two=tmp_path / "two.txt")
        daemon = daemons(body, settings=f"  fleet:\n    database: {fleet.url}\n")
        nodes.append(daemon.start("--node-name", f"n{number}", "--node-ip", f"10.0.0.{number}"))
    time.sleep(12)
    stopping = time.time()      # a run the stop ends writes no end stamp: counted until here
    for daemon in nodes:
        daemon.stop()
    most, seconds = _most_at_once(tmp_path / "one.txt", stopping)
    assert most == 1 and len(seconds) >= 4              # max 1: never two at once, fleet-wide
    assert len(seconds) == len(set(seconds))
    skipped = {r["scheduled"] for d in nodes for r in d.runs("one")
               if r["skipped"] == "fleet max 1 reached"}
    assert len(skipped) >= 4 and not skipped & set(seconds)
    most, seconds = _most_at_once(tmp_path / "two.txt", stopping)
    assert most == 2 and len(seconds) == len(set(seconds)) >= 4     # max 2: two at once, no more
    steady = sorted(seconds)[2:]        # (a second run late at the start holds a slot longer)
    assert all(b - a == 2 for a, b in zip(steady, steady[1:]))      # then none skipped
    figures.add(runs=len(seconds) + len(skipped), doubled=0)


@pytest.mark.slow
def test_a_node_that_cannot_renew_its_lease_stops_its_run_before_the_lease_ends(
        fleet, daemons, tmp_path):
    _nodes(fleet.url, 1)
    body = ("tasks:\n  - name: long\n    schedule: '* * * * * *'\n    run: once\n"
            "    kill_grace: 1s\n    command: echo started >> {out}; sleep 60\n")
    daemon = daemons(body.format(out=tmp_path / "long.txt"),
                     settings=f"  fleet:\n    database: {fleet.url}\n    lease: 6s\n")
    daemon.start("--node-name", "n1", "--node-ip", "10.0.0.1")
    wait_for(lambda: (tmp_path / "long.txt").exists(), 15, "the long run")
    time.sleep(2.5)     # its lease renewed at least once (every 2 s)
    fleet.server.stop()
    stopped = time.time()
    try:
        run = wait_for(lambda: [r for r in daemon.runs("long") if r["ended"] and r["started"]],
                       12, "its end")[0]
        assert (tmp_path / "long.txt").read_text() == "started\n"    # max 1: one run all along
    finally:
        fleet.server.start_again()
    # the lease ran at most 6 s past the last renewal, before the database stopped
    assert run["ended"] - stopped < 6
    assert run["stopped"] == "its fleet lease could not be kept"
    assert "cannot renew the lease of 1 run(s)" in daemon.log
    daemon.stop()


def test_with_its_supervisor_gone_the_claims_process_holds_the_lease_until_the_run_ends(fleet):
    import subprocess
    second = int(time.time()) + 1
    proc, sock = _claimer(fleet.url, "n1")
    proc.handle({"claim": second, "tasks": [["job", [], [], 1]], "now": True})
    proc.attempt([("job", second)])
    proc.slots_due[("job", second)][2] = 0          # its slot now, not 0.25 s before
    assert _read(sock, proc, "slots")["slots"] == [["job", second, claims.first_fence(second), 0]]
    command = subprocess.Popen(["sh", "-c", "sleep 1.5 & exit 0"], start_new_session=True)
    command.wait()              # its group lives on in the sleep (reaped by init, as a run's
    #                             command by its executor)
    proc.handle({"start": [["job", second, claims.first_fence(second), command.pid, 1]]})
    assert proc.held[("job", second)].confirmed

    def lease():
        with fleetdb.connect(fleet.url) as conn:
            return conn.execute(f"SELECT lease_until > now() FROM {fleetdb.SCHEMA}.slots "
                                "WHERE task = 'job'").fetchone()[0]
    assert lease()
    sock.close()                # the supervisor is gone (killed): the run goes on
    started = time.monotonic()
    proc.run()                  # returns once the run's process group is gone
    assert 1.0 < time.monotonic() - started < 8     # (the sleep reaped by init meanwhile)
    assert lease() is None      # its slot freed: another node may start the next run
    # a restarted claims process is handed the leases of the runs under way, and renews them
    again, sock2 = _claimer(fleet.url, "n1")
    again.attempt([("job", second + 5)])
    again.slots_due[("job", second + 5)][2] = 0
    fence = claims.first_fence(second + 5)
    assert _read(sock2, again, "slots")["slots"] == [["job", second + 5, fence, 0]]
    third, _ = _claimer(fleet.url, "n1")
    third.handle({"hold": [["job", second + 5, fence, None, 1]]})
    assert third.held[("job", second + 5)].confirmed and lease()


# ---- a singleton daemon ------------------------------------------------------------------------

SINGLETON = """\
tasks:
  - name: single
    type: daemon
    run: once
    kill_grace: 1s
    command: >-
      trap 'echo "e $(date +%s.%N) {node} $TORCHCORE_FENCE" >> {out}; exit 0' TERM;
      echo "s $(date +%s.%N) {node} $TORCHCORE_FENCE" >> {out};
      while true; do sleep 0.1; done
"""


def _stamps(path):
    """[(kind, at, node, fence)] of the daemon's instances, in time order."""
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return sorted((kind, float(at), node, int(fence)) for kind, at, node, fence in rows)


def _kill_node(daemon):
    """The node dies: its supervisor and every process under it (the daemon's command too)."""
    import psutil
    root = psutil.Process(daemon.proc.pid)
    for proc in [root] + root.children(recursive=True):
        try:
            proc.kill()
        except psutil.Error:
            pass
    daemon.proc.wait()


@pytest.mark.slow
def test_a_once_daemon_runs_on_one_node_and_moves_within_lease_and_2s(fleet, daemons, tmp_path):
    _nodes(fleet.url, 3)
    out = tmp_path / "stamps.txt"
    nodes = {}
    for number in (1, 2, 3):
        daemon = daemons(SINGLETON.format(node=f"n{number}", out=out),
                         settings=f"  fleet:\n    database: {fleet.url}\n    lease: 6s\n")
        nodes[f"n{number}"] = daemon.start("--node-name", f"n{number}", "--node-ip",
                                           f"10.0.0.{number}")
    first = wait_for(lambda: [s for s in _stamps(out) if s[0] == "s"], 15, "an instance")[0]
    time.sleep(2)
    assert [s for s in _stamps(out) if s[0] == "s"] == [first]        # one instance, not three
    _kill_node(nodes[first[2]])                                        # its node dies
    killed = time.time()
    second = wait_for(lambda: [s for s in _stamps(out) if s[0] == "s" and s[1] > killed], 12,
                      "the instance to move")[0]
    assert second[2] != first[2] and second[1] - killed <= 6 + 2       # within lease + 2 s
    stopped = time.time()                                              # a clean stop hands it
    nodes[second[2]].stop()                                            # over at once
    third = wait_for(lambda: [s for s in _stamps(out) if s[0] == "s" and s[1] > stopped], 10,
                     "the instance to move again")[0]
    assert third[2] not in (first[2], second[2]) and third[1] - stopped < 2.5
    time.sleep(1)
    for daemon in nodes.values():
        if daemon.proc.poll() is None:
            daemon.stop()
    stamps = _stamps(out)
    # never two instances at once: each start after the previous one's end (or its node's death)
    ends = {fence: at for kind, at, _, fence in stamps if kind == "e"}
    ends[first[3]] = killed
    starts = [(at, fence) for kind, at, _, fence in stamps if kind == "s"]
    assert len(starts) == 3
    assert all(ends[prev] <= at for (_, prev), (at, _) in zip(starts, starts[1:]))
    assert [fence for _, fence in starts] == sorted(fence for _, fence in starts)   # tokens grow


def test_a_renewed_lease_never_stops_its_run_and_an_unrenewed_one_stops_it_before_it_ends(fleet):
    """The claims process on a fake clock (the database's is real): a run far longer than a
    third of its lease, with kill_grace 10 s and lease 15 s, is never stopped while renewals
    work; when they fail, TERM comes at once (kill_grace does not fit in what is left) and KILL
    0.5 s before the lease ends."""
    clock = [1000.0]
    ours, theirs = socket.socketpair()
    proc = claimer.Claimer(theirs, clock=lambda: clock[0])
    proc.handle({"hello": {"url": fleet.url, "node": "n1", "takeover": 0.5, "lease": 15}})
    second = int(time.time()) + 30
    proc.attempt([("job", second)])
    proc.take_slots([("job", second)])
    fence = claims.first_fence(second)
    proc.handle({"start": [["job", second, fence, None, 10, None]]})
    ours.setblocking(False)

    def messages():
        try:
            return claims.decode_lines(b"", ours.recv(65536))[0]
        except BlockingIOError:
            return []
    assert [m for m in messages() if "slots" in m][0]["slots"] == [["job", second, fence, 0]]
    while clock[0] < 1060:              # a minute of renewals: never stopped
        clock[0] += 0.5
        proc.due()
    assert not [m for m in messages() if "stop" in m]
    renewed = proc.held[("job", second)].lease_end
    assert renewed > 1060
    proc.lost(RuntimeError("the database went away"))        # from now on it cannot renew
    proc._connect = lambda url: (_ for _ in ()).throw(RuntimeError("down"))
    stops = []
    while clock[0] < renewed + 1 and ("job", second) in proc.held or not stops:
        clock[0] += 0.25
        proc.due()
        stops += [(clock[0], m["kill"]) for m in messages() if "stop" in m]
    assert [kill for _, kill in stops] == [False, True]
    term_at, kill_at = (at for at, _ in stops)
    assert term_at <= renewed - 15 + 15 / 3 + 1.0 + 0.25     # at the first failed renewal
    assert renewed - 0.5 <= kill_at <= renewed - 0.25         # before the lease ends
