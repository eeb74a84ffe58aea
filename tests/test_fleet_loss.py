"""`run: once` runs whose node died (claimloss.py), against a real PostgreSQL (tests/pgserver.py):
recorded lost by one node when their lease has passed, their fleet history row closed and kept
closed, and with ``on_node_loss: rerun`` re-run once, with a new token, within misfire_grace."""

import concurrent.futures
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from torchcore import claimer, claimloss, claims, fleetdb, fleetrows
from torchcore.runrecord import RunRecord

pytestmark = pytest.mark.process
S = fleetdb.SCHEMA


def _started(conn, node, task, second, lease, run_id=None):
    """A `once` run of ``node`` started for ``second``: claim, slot (lease seconds from now, may
    be negative) and, with ``run_id``, its fleet history row as the agent ships it."""
    fence = claims.first_fence(second)
    conn.execute(f"""INSERT INTO {S}.claims (task, second, slot, fence, node, expires, started)
        VALUES (%s, %s, 0, %s, %s, now(), now())""", (task, second, fence, node))
    conn.execute(f"""INSERT INTO {S}.slots (task, slot, second, fence, node, lease_until)
        VALUES (%s, (SELECT count(*) FROM {S}.slots WHERE task = %s), %s, %s, %s,
                now() + make_interval(secs => %s))""", (task, task, second, fence, node, lease))
    if run_id is not None:
        _ship(conn, node, RunRecord.of_start(run_id, task, node, second, second + 0.01, False, 99))
    return fence


def _ship(conn, node, record):
    conn.execute(fleetrows.UPSERT_RUNS, fleetrows.run_row(node, record, None))


def _look(url, node, tasks):
    with fleetdb.connect(url) as conn:
        names = sorted(tasks)
        return conn.execute(claimloss.FIND_LOST, {
            "node": node, "tasks": names, "graces": [tasks[n] for n in names]}).fetchall()


def _lost(rows):
    return [row[:6] for row in rows if row[0] is not None]


def test_a_run_whose_lease_passed_is_recorded_lost_once_and_its_history_row_stays_closed(fleet):
    now = int(time.time())
    with fleetdb.connect(fleet.url) as conn:
        dead = _started(conn, "n1", "report", now - 20, -1, run_id=7)      # its lease passed
        _started(conn, "n2", "report", now - 5, 10, run_id=3)             # renewed: alive
    # eight nodes look at once: one records it
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda n: _lost(_look(fleet.url, f"n{n + 3}", {"report": None})),
                              range(8)))
    assert sorted(map(len, found)) == [0] * 7 + [1]
    assert sum(found, []) == [("report", now - 20, dead, "n1", dead, False)]
    assert _lost(_look(fleet.url, "n3", {"report": None})) == []        # recorded once
    with fleetdb.connect(fleet.url) as conn:
        row = conn.execute(f"SELECT lost IS NOT NULL, lost_node, lost_fence, node, fence, reruns "
                           f"FROM {S}.claims WHERE second = %s", (now - 20,)).fetchone()
        assert row == (True, "n1", dead, "n1", dead, 0)         # not re-run: the default
        history = f"SELECT ended IS NOT NULL, error, failed FROM {S}.runs WHERE node = %s"
        closed = conn.execute(history, ("n1",)).fetchone()
        assert closed[0] and closed[1].startswith("lost: node n1 stopped renewing") and closed[2]
        assert conn.execute(history, ("n2",)).fetchone() == (False, None, False)
        # the dead node restarts: its agent ships the start again (it was waiting), then its
        # own lost record (adopt.py): never "running" again; its own words are kept
        start = RunRecord.of_start(7, "report", "n1", now - 20, now - 19.99, False, 99)
        _ship(conn, "n1", start)
        assert conn.execute(history, ("n1",)).fetchone()[0]
        _ship(conn, "n1", start.lost(time.time(), "its supervisor and executor stopped"))
        assert conn.execute(history, ("n1",)).fetchone()[:2] == (
            True, "lost: its supervisor and executor stopped")
        # the node's own late release of the claim (it came back) leaves it recorded lost
        conn.execute(claims.RELEASE, {"node": "n1", "tasks": ["report"], "fences": [dead]})
        assert conn.execute(f"SELECT lost IS NOT NULL, ended IS NOT NULL FROM {S}.claims "
                            "WHERE second = %s", (now - 20,)).fetchone() == (True, True)


def test_on_node_loss_rerun_runs_a_lost_second_once_more_with_a_higher_token(fleet):
    now = int(time.time())
    with fleetdb.connect(fleet.url) as conn:
        recent = _started(conn, "n1", "job", now - 10, -1)        # within the grace (60 s)
        old = _started(conn, "n1", "job", now - 100, -1)          # past it: recorded only
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        found = sum(pool.map(lambda n: _lost(_look(fleet.url, f"n{n + 2}", {"job": 60})),
                             range(4)), [])
    assert sorted((second, fence, lost, rerun) for _, second, fence, _, lost, rerun in found) == [
        (now - 100, old, old, False), (now - 10, recent + 1, recent, True)]
    with fleetdb.connect(fleet.url) as conn:
        rerunner, started = conn.execute(f"SELECT node, started FROM {S}.claims "
                                         "WHERE second = %s", (now - 10,)).fetchone()
        assert rerunner in {"n2", "n3", "n4", "n5"} and started is None
        # the lost node comes back: its start and renewal are refused (its token is stale)
        assert conn.execute(claims.START, {"node": "n1", **claims.columns([("job", now - 10)]),
                                           "fences": [recent]}).fetchall() == []
        # the rerun started, then lost in turn: recorded, never re-run a second time
        conn.execute(claims.START, {"node": rerunner, **claims.columns([("job", now - 10)]),
                                    "fences": [recent + 1]})
        conn.execute(f"UPDATE {S}.slots SET fence = %s, node = %s, second = %s, "
                     "lease_until = now() - interval '1 second' WHERE fence = %s",
                     (recent + 1, rerunner, now - 10, recent))
    assert _lost(_look(fleet.url, "n5", {"job": 60})) == [
        ("job", now - 10, recent + 1, rerunner, recent + 1, False)]
    assert _lost(_look(fleet.url, "n5", {"job": 60})) == []


def test_a_node_never_reruns_its_own_lost_run_it_leaves_it_to_another_within_the_grace(fleet):
    """A node stopped past its lease (SIGSTOP) finds its own run lost on resuming, while that
    run's command may still be going (it is killed then): re-run there, the rerun would run
    beside it, and replace the claim the kill is matched on.  Within the grace it leaves the
    loss to another node, which re-runs it; past the grace it records it, not re-run."""
    now = int(time.time())
    with fleetdb.connect(fleet.url) as conn:
        recent = _started(conn, "n1", "job", now - 10, -1)
        old = _started(conn, "n1", "job", now - 100, -1)
    assert _lost(_look(fleet.url, "n1", {"job": 60})) == [("job", now - 100, old, "n1", old, False)]
    assert _lost(_look(fleet.url, "n2", {"job": 60})) == [
        ("job", now - 10, recent + 1, "n1", recent, True)]


def test_a_rerun_never_started_is_recorded_lost_when_its_claim_expires(fleet):
    now = int(time.time())
    with fleetdb.connect(fleet.url) as conn:
        fence = _started(conn, "n1", "job", now - 5, -1)
    [(_, _, rerun, _, _, _)] = _lost(_look(fleet.url, "n2", {"job": 60}))
    assert rerun == fence + 1
    assert _lost(_look(fleet.url, "n3", {"job": 60})) == []           # not expired yet
    time.sleep(claims.EXPIRE_AFTER + 0.2)
    assert _lost(_look(fleet.url, "n3", {"job": 60})) == [
        ("job", now - 5, rerun, "n2", rerun, False)]


def test_the_look_says_when_the_earliest_running_lease_ends(fleet):
    now = int(time.time())
    with fleetdb.connect(fleet.url) as conn:
        _started(conn, "n1", "job", now - 5, 4)
        _started(conn, "n1", "job", now - 4, 9)
    [row] = _look(fleet.url, "n2", {"job": None})
    assert row[:6] == (None,) * 6 and 3 < row[6] <= 4


# ---- the rules in Python are the statement's, on generated rows ---------------------------------

_claim = st.fixed_dictionaries({
    "task": st.sampled_from(["a", "b"]),
    "offset": st.sampled_from([-200, -50, -5, 5]),      # the second, from now (grace: 30 s)
    "started": st.booleans(),
    "ended": st.booleans(),
    "reruns": st.sampled_from([0, 1]),
    "lost": st.sampled_from(["no", "this", "older"]),   # lost_fence: none, the fence, an older
    "expires": st.sampled_from([-5, 5]),
    "lease": st.sampled_from([None, -5, 5]),            # its slot's lease end, from now
    "slot_fence": st.booleans(),                        # the slot still has its fence
    "slot_node": st.booleans(),                         # ... and its node
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_claim, max_size=8, unique_by=lambda c: (c["task"], c["offset"])),
       graces=st.fixed_dictionaries({"a": st.sampled_from([None, 30]),
                                     "b": st.sampled_from([None, 30])}),
       finder=st.sampled_from(["n2", "n1"]))       # another node, or the one that lost them
def test_the_statement_and_the_python_rules_agree_on_which_claims_are_lost_and_rerun(
        fleet, rows, graces, finder):
    base = int(time.time())
    expected = set()
    leases = {}
    with fleetdb.connect(fleet.url) as conn:
        conn.execute(f"TRUNCATE {S}.claims, {S}.slots")
        for number, row in enumerate(rows):
            second = base + row["offset"]
            fence = claims.first_fence(second) + row["reruns"]
            lost_fence = {"no": None, "this": fence, "older": fence - 1}[row["lost"]]
            conn.execute(f"""INSERT INTO {S}.claims (task, second, slot, fence, node, expires,
                started, ended, reruns, lost_fence) VALUES (%s, %s, 0, %s, 'n1',
                now() + make_interval(secs => %s), CASE WHEN %s THEN now() END,
                CASE WHEN %s THEN now() END, %s, %s)""",
                         (row["task"], second, fence, row["expires"], row["started"],
                          row["ended"], row["reruns"], lost_fence))
            if row["lease"] is not None:
                slot_fence = fence if row["slot_fence"] else fence + 500
                slot_node = "n1" if row["slot_node"] else "n9"
                conn.execute(f"""INSERT INTO {S}.slots (task, slot, second, fence, node,
                    lease_until) VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s))""",
                             (row["task"], number, second, slot_fence, slot_node, row["lease"]))
                leases[(row["task"], slot_fence, slot_node)] = row["lease"]
            claim = {"task": row["task"], "second": row["offset"], "fence": fence,
                     "node": "n1", "lost_fence": lost_fence, "reruns": row["reruns"],
                     "started": 0 if row["started"] else None,
                     "ended": 0 if row["ended"] else None, "expires": row["expires"]}
            if claimloss.is_lost(claim, leases, 0) and not claimloss.left_to_others(
                    claim, graces[row["task"]], 0, finder):
                expected.add((row["task"], second,
                              claimloss.may_rerun(claim, graces[row["task"]], 0)))
    found = _lost(_look(fleet.url, finder, graces))
    assert {(task, second, rerun) for task, second, _, _, _, rerun in found} == expected


# ---- the claims process looks, and answers a rerun as a late win -------------------------------

def test_the_claims_process_records_a_lost_run_and_takes_its_rerun_with_a_slot(fleet):
    now = int(time.time())
    with fleetdb.connect(fleet.url) as conn:
        fence = _started(conn, "n1", "job", now - 3, -1)
    ours, theirs = socket.socketpair()
    proc = claimer.Claimer(theirs)
    proc.handle({"hello": {"url": fleet.url, "node": "n2", "takeover": 0.5, "lease": 15}})
    proc.handle({"once": [["job", 1, 60]]})
    assert proc.losses.due(time.time())
    ours.settimeout(5)
    proc.due()
    buffer = b""
    while buffer.count(b"\n") < 3:
        buffer += ours.recv(65536)
    messages, _ = claims.decode_lines(b"", buffer)
    assert messages.pop(0) == {"db": "up"}          # its first connection
    assert messages[0] == {"won": [["job", now - 3, fence + 1]], "lost": [], "late": True}
    assert messages[1] == {"slots": [["job", now - 3, fence + 1, 0]], "full": []}
    assert not proc.losses.due(time.time()) and proc.losses.at <= time.time() + 5 + 0.1


# ---- real daemons as nodes: a node dies mid-run -----------------------------------------------

RERUN = """\
tasks:
  - name: report
    schedule: "*/15 * * * * *"
    run: once
    on_node_loss: rerun
    ips: [10.0.0.0/24]
    command: echo "$TORCHCORE_SCHEDULED_AT $TORCHCORE_FENCE {node}" >> {out}; sleep 60
"""


def _two_nodes(fleet, daemons, out, lease="6s", sleep=60):
    """Nodes n1 and n2 running RERUN (its command sleeping ``sleep`` s), writing to ``out``."""
    from test_fleet_once import _nodes

    _nodes(fleet.url, 2)
    nodes = {}
    for number in (1, 2):
        body = RERUN.format(node=f"n{number}", out=out).replace("sleep 60", f"sleep {sleep}")
        daemon = daemons(body, settings=f"  misfire_grace: 1m\n  fleet:\n    database: "
                                        f"{fleet.url}\n    lease: {lease}\n")
        nodes[f"n{number}"] = daemon.start("--node-name", f"n{number}", "--node-ip",
                                           f"10.0.0.{number}")
    return nodes


def _lines(out):
    """What the runs wrote, a line split in words each."""
    return [line.split() for line in out.read_text().splitlines()] if out.exists() else []


@pytest.mark.slow
def test_a_node_killed_mid_run_has_its_run_recorded_lost_and_rerun_once_on_another(
        fleet, daemons, tmp_path):
    from daemon_harness import wait_for
    from test_fleet_once import _kill_node

    out = tmp_path / "runs.txt"
    nodes = _two_nodes(fleet, daemons, out)

    def lines():
        return _lines(out)
    [(second, fence, node)] = wait_for(lines, 25, "the first run")
    _kill_node(nodes[node])                 # supervisor, claims process, executors, command
    killed = time.time()
    other = "n2" if node == "n1" else "n1"
    rerun = wait_for(lambda: lines()[1:], 6 + 5, "the rerun")[0]
    assert time.time() - killed <= 6 + 3            # within the lease and a look
    assert rerun == [second, str(int(fence) + 1), other]    # same second, next token
    time.sleep(2)
    nodes[other].stop()
    assert [line for line in lines() if line[0] == second] == [[second, fence, node], rerun]
    with fleetdb.connect(fleet.url) as conn:
        row = conn.execute(f"SELECT lost_node, lost_fence, node, reruns, takeovers FROM {S}.claims "
                           "WHERE task = 'report' AND second = %s", (int(second),)).fetchone()
    # The start is confirmed in the database a moment after the command starts (batched): a
    # kill inside that moment leaves an unconfirmed claim, which expires and is taken over
    # (the same second, the next token, on the other node), not a lost run to re-run.
    if row[0] is None:
        assert row[:4] == (None, None, other, 0) and row[4] >= 1, row
    else:
        assert row[:4] == (node, int(fence), other, 1), row
        assert "is lost: its lease ended unrenewed; re-running it here" in nodes[other].log


# ---- a node starting: no false "unreachable" ---------------------------------------------------

EVERY_SECOND = """\
tasks:
  - name: tick
    schedule: "* * * * * *"
    run: once
    max: 3          # a run slow to end on a loaded machine holds its slot past the next second's
    command: echo "$TORCHCORE_SCHEDULED_AT" >> {out}
"""


@pytest.mark.slow
def test_a_node_starting_alone_skips_no_second_as_unreachable_while_its_claims_process_connects(
        fleet, daemons, tmp_path):
    out = tmp_path / "ticks.txt"
    daemon = daemons(EVERY_SECOND.format(out=out),
                     settings=f"  fleet:\n    database: {fleet.url}\n").start("--node-name", "n1")
    started = time.time()
    time.sleep(5)
    daemon.stop()
    runs = daemon.runs("tick")
    # no second skipped as unreachable; one skipped as its slots were all held (runs slow to end
    # on a loaded machine, claims.SLOT_AHEAD) is recorded, and is no start-up fault
    skipped = {r["scheduled"]: r["skipped"] for r in runs if r["skipped"]}
    assert [s for s, why in skipped.items() if not why.startswith("fleet max")] == [], skipped
    ran = {int(line) for line in out.read_text().split()}
    first = min(r["scheduled"] for r in runs)
    assert first <= started + 2.5          # its first seconds are run (late, if need be) ...
    assert set(range(first, int(started) + 4)) <= ran | set(skipped)    # ... none missed from it


def _coordinator(clock, **calls):
    """A FleetCoordinator of node n1 for one `run: once` task "job", its claims process not
    started (``hello`` set), the supervisor's side a stub with ``calls`` (start_claimed, ...):
    (coordinator, task, the messages it sends)."""
    import types
    from torchcore import coordinator

    sent = []
    starter = types.SimpleNamespace(prepare_claimed=lambda *a: None, **calls)
    fleet_ = coordinator.FleetCoordinator(clock, "n1")
    fleet_.attach(None, starter)
    fleet_._send = sent.append
    fleet_.hello = {"url": "postgresql://x", "node": "n1", "takeover": 0.5, "lease": 15}
    fleet_.once = {"job"}
    task = types.SimpleNamespace(name="job", run="once", type="common", max=1, ips=(), hosts=())
    return fleet_, task, sent


def test_before_the_claims_process_first_answers_a_tick_waits_then_runs_late_or_skips():
    import types

    clock = types.SimpleNamespace(time=time.time, monotonic=time.monotonic)
    started = []
    fleet_, task, _ = _coordinator(
        clock, start_claimed=lambda name, second: started.append(
            (name, second, fleet_.claim(task, second))),
        skip_claimed=lambda name, second, reason: started.append((name, second, reason)))
    now = int(time.time())
    for second in (now - 1, now):
        fleet_.ahead(second, [task])
        assert fleet_.claim(task, second) is False          # no answer yet: waited for
    fleet_._answer({"won": [["job", now - 1, 7]], "lost": [["job", now]], "late": False})
    fleet_._answer({"slots": [["job", now - 1, 7, 0]], "full": []})
    assert started == [("job", now - 1, True)]              # won: started now, late
    fleet_.ahead(now + 1, [task])
    fleet_.connected = False                                # (a restarted claims process)
    assert fleet_.claim(task, now + 1) is False
    fleet_._answer({"db": "down", "error": "refused"})      # unreachable: skipped after all
    assert started[1:] == [("job", now + 1, claims.UNREACHABLE)]
    fleet_.ahead(now + 2, [task])
    assert fleet_.claim(task, now + 2) == claims.UNREACHABLE    # connected (down): at once


def test_a_second_whose_tick_waited_and_was_won_beyond_misfire_grace_is_recorded_missed():
    import types

    clock = types.SimpleNamespace(time=time.time, monotonic=time.monotonic)
    missed = []
    fleet_, task, sent = _coordinator(clock, start_claimed=lambda *a: pytest.fail("started"),
                                      missed_claimed=lambda *a: missed.append(a))
    fleet_.misfire_grace = 0
    second = int(time.time()) - 1
    fleet_.ahead(second, [task])
    assert fleet_.claim(task, second) is False
    fleet_._answer({"db": "up"})
    fleet_._answer({"won": [["job", second, 7]], "lost": [], "late": False})
    assert missed == [("job", second)] and fleet_.won == {}
    fleet_._answer({"slots": [["job", second, 7, 0]], "full": []})
    assert sent[-1] == {"end": [["job", second, 7]]}       # its slot freed, the claim ended


def test_a_second_waiting_for_a_first_answer_that_never_comes_is_recorded_as_skipped():
    """A claim asked while the claims process was being restarted never reached it (and one the
    process drops once connected, past its fire window, is never answered): the second whose
    tick waited for it is recorded as skipped, unreachable, once no answer can come; a late
    answer then only frees its slot."""
    import types

    now = [time.time()]
    clock = types.SimpleNamespace(time=lambda: now[0], monotonic=time.monotonic)
    skipped = []
    fleet_, task, sent = _coordinator(clock, start_claimed=lambda *a: pytest.fail("started"),
                                      skip_claimed=lambda *a: skipped.append(a))
    second = int(now[0])
    fleet_.ahead(second, [task])
    assert fleet_.claim(task, second) is False             # waits for the first answer
    fleet_._answer({"db": "up"})                            # connected: no answer for it yet
    now[0] += claims.RECHECK_FOR
    fleet_._answer({"holding": {"at": now[0], "tasks": {}}})
    assert skipped == []                                    # it could still be answered
    now[0] += 2
    fleet_._answer({"holding": {"at": now[0], "tasks": {}}})
    assert skipped == [("job", second, claims.UNREACHABLE)]
    fleet_._answer({"won": [["job", second, 7]], "lost": [], "late": False})
    assert fleet_.won == {} and sent[-1] == {"end": [["job", second, 7]]}
    fleet_.ahead(second + 20, [task])
    assert skipped == [("job", second, claims.UNREACHABLE)]     # recorded once


def test_a_claim_made_after_its_second_is_not_taken_over_before_it_could_start(fleet):
    now = int(time.time())
    with fleetdb.connect(fleet.url) as conn:
        def run(sql, node, keys):
            return conn.execute(sql, {"node": node, **claims.columns(keys)}).fetchall()
        assert run(claims.CLAIM_LATE, "n1", [("job", now - 5)]) == [
            ("job", now - 5, claims.first_fence(now - 5))]
        assert run(claims.TAKE_OVER, "n2", [("job", now - 5)]) == []     # 1 s to start
        time.sleep(claims.EXPIRE_AFTER + 0.1)
        assert run(claims.TAKE_OVER, "n2", [("job", now - 5)]) == [
            ("job", now - 5, claims.first_fence(now - 5) + 1)]


@pytest.mark.slow
def test_a_node_starting_with_the_database_silent_records_every_first_second_as_skipped(
        daemons, tmp_path):
    """A database that accepts the connection and never answers (a hung server, a black hole
    behind a proxy): the claims process's first connection fails only at its timeout, after the
    first ticks.  Those seconds are recorded as skipped with the reason even with
    ``misfire_grace: 0s`` (a skip is a record, not a late start)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)                   # never accepted, never answered
    try:
        url = f"postgresql://torchcore@127.0.0.1:{silent.getsockname()[1]}/torchcore"
        out = tmp_path / "ticks.txt"
        daemon = daemons(EVERY_SECOND.format(out=out),
                         settings=f"  misfire_grace: 0s\n  fleet:\n    database: {url}\n")
        daemon.start("--node-name", "n1")
        started = time.time()
        time.sleep(7)
        daemon.stop()
    finally:
        silent.close()
    assert not out.exists()
    skipped = {r["scheduled"] for r in daemon.runs("tick") if r["skipped"] == claims.UNREACHABLE}
    assert set(range(int(started) + 1, int(started) + 6)) <= skipped, (started, sorted(skipped))


# ---- a node restarted: the runs it adopts keep their leases -------------------------------------

@pytest.mark.slow
def test_a_once_run_adopted_by_a_restarted_node_keeps_its_lease_and_is_neither_lost_nor_rerun(
        fleet, daemons, tmp_path):
    """Its supervisor and claims process killed (kill -9; its executor and command live on), the
    node restarts at once and adopts the run: the new claims process renews its lease, so no
    other node records it lost, nor re-runs it while it still runs here."""
    from daemon_harness import wait_for
    out = tmp_path / "runs.txt"
    nodes = _two_nodes(fleet, daemons, out, lease="12s", sleep=25)

    def lines():
        return _lines(out)
    [(second, fence, node)] = wait_for(lines, 25, "the first run")
    _wait_confirmed(fleet, second)
    _restart_keeping_runs(nodes[node], node)
    time.sleep(12 + 5)                  # past the lease the killed claims process last renewed
    assert [line for line in lines() if line[0] == second] == [[second, fence, node]]
    with fleetdb.connect(fleet.url) as conn:
        assert conn.execute(f"SELECT lost, reruns, node, fence FROM {S}.claims WHERE task = "
                            "'report' AND second = %s", (int(second),)).fetchone() == (
            None, 0, node, int(fence))
    assert not any("is lost" in daemon.log for daemon in nodes.values())


def _wait_confirmed(fleet, second):
    """Until the start of report's run of ``second`` is confirmed in the fleet database: a node
    killed before that has its claim taken over as unconfirmed (same second, next token), which
    is another case than the adoption these tests are about."""
    from daemon_harness import wait_for

    def confirmed():
        with fleetdb.connect(fleet.url) as conn:
            return conn.execute(f"SELECT started IS NOT NULL FROM {S}.claims WHERE task = "
                                "'report' AND second = %s", (int(second),)).fetchone()[0]
    wait_for(confirmed, 10, "the run's start confirmed in the fleet database")


def _restart_keeping_runs(daemon, node, after=0.0):
    """kill -9 of the node's supervisor and claims process (its executors and commands live
    on), then its restart (``after`` seconds later), which adopts the runs."""
    import psutil
    from daemon_harness import titled, wait_for

    root = psutil.Process(daemon.proc.pid)
    claims_process = titled(root.children(), "fleet claims")
    assert len(claims_process) == 1
    for proc in [root] + claims_process:
        proc.kill()
    daemon.proc.wait()
    time.sleep(after)
    starts = daemon.log.count("torchcore started")
    daemon.start("--node-name", node, "--node-ip", f"10.0.0.{node[1:]}", wait=False)
    wait_for(lambda: daemon.log.count("torchcore started") > starts, 15, "the restart")
    assert "still runs: it counts against max (adopted" in daemon.log


@pytest.mark.slow
def test_a_once_daemon_adopted_by_a_restarted_node_keeps_its_slot_and_runs_nowhere_else(
        fleet, daemons, tmp_path):
    from daemon_harness import wait_for
    from test_fleet_once import SINGLETON, _nodes, _stamps

    _nodes(fleet.url, 2)
    out = tmp_path / "stamps.txt"
    nodes = {}
    for number in (1, 2):
        daemon = daemons(SINGLETON.format(node=f"n{number}", out=out),
                         settings=f"  fleet:\n    database: {fleet.url}\n    lease: 12s\n")
        nodes[f"n{number}"] = daemon.start("--node-name", f"n{number}", "--node-ip",
                                           f"10.0.0.{number}")
    first = wait_for(lambda: [s for s in _stamps(out) if s[0] == "s"], 15, "an instance")[0]
    _restart_keeping_runs(nodes[first[2]], first[2])
    time.sleep(12 + 5)
    assert _stamps(out) == [first], nodes[first[2]].log     # the adopted instance only
    with fleetdb.connect(fleet.url) as conn:
        assert conn.execute(f"SELECT node, fence, lease_until > now() FROM {S}.slots "
                            "WHERE task = 'single'").fetchall() == [(first[2], first[3], True)]
    stopped = time.time()                       # a clean stop still hands it over at once
    nodes[first[2]].stop()
    moved = wait_for(lambda: [s for s in _stamps(out) if s[0] == "s" and s[1] > stopped], 10,
                     "the instance to move")[0]
    assert moved[2] != first[2] and moved[3] > first[3]


@pytest.mark.slow
def test_a_run_adopted_after_its_lease_ended_is_killed_and_runs_once_more_only(
        fleet, daemons, tmp_path):
    """Restarted only after its lease ended, the node finds its adopted run's lease gone (the
    run recorded lost, re-run once): it kills it at once."""
    from daemon_harness import wait_for
    out = tmp_path / "runs.txt"
    nodes = _two_nodes(fleet, daemons, out)

    def lines():
        return _lines(out)
    [(second, fence, node)] = wait_for(lines, 25, "the first run")
    _wait_confirmed(fleet, second)
    _restart_keeping_runs(nodes[node], node, after=6 + 3)
    wait_for(lambda: "adopted run(s) no longer hold their fleet lease" in nodes[node].log, 10,
             "the adopted run killed")
    records = wait_for(lambda: [r for r in nodes[node].runs("report")
                                if r["scheduled"] == int(second) and r["ended"]], 10, "its end")
    import psutil
    assert records[0]["signal"] == 9 or records[0]["error"].startswith("lost"), records

    def gone():
        try:
            return psutil.Process(records[0]["pid"]).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_for(gone, 5, "its command gone")
    assert [line[:2] for line in lines() if line[0] == second] == [[second, fence],
                                                                   [second, str(int(fence) + 1)]]
