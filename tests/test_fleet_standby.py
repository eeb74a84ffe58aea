"""A standby node of a `run: once` daemon (standby.py), against a real PostgreSQL: it looks for a
free slot when the holder's lease can end, not every second, and at once when a clean stop frees
the slot (NOTIFY)."""

import select
import socket
import time

import pytest

from torchcore import claimer, fleetdb, standby as standby_

pytestmark = pytest.mark.process
LEASE = 6


@pytest.fixture
def fleet(fleet):
    """conftest's fleet database, with two live nodes."""
    with fleetdb.connect(fleet.url) as conn:
        for number in (1, 2):
            conn.execute(f"""INSERT INTO {fleetdb.SCHEMA}.nodes (name, hostname, addresses,
                version, heartbeat, last_seen) VALUES (%s, %s, %s, 'test', 3600, now())""",
                         (f"n{number}", f"n{number}", [f"10.0.0.{number}"]))
    return fleet


def _node(url, name, counts):
    ours, theirs = socket.socketpair()
    proc = claimer.Claimer(theirs)
    proc.ours = ours            # (kept open: its supervisor)
    execute = proc.execute

    def counted(sql, params):
        counts[name] = counts.get(name, 0) + 1
        return execute(sql, params)
    proc.execute = counted
    proc.handle({"hello": {"url": url, "node": name, "takeover": 0.5, "lease": LEASE}})
    proc.handle({"daemons": [["single", [], [], 1, 1]]})
    return proc


def _drive(procs, seconds, until=lambda: False):
    """The claims processes' loops (their selects), for ``seconds`` or until ``until()``."""
    deadline = time.time() + seconds
    while time.time() < deadline and not until():
        fds = [fd for proc in procs for fd in proc.standby.fds(proc)]
        wait = min([proc.timeout() for proc in procs] + [deadline - time.time()])
        select.select(fds, [], [], max(0.0, wait))
        for proc in procs:
            proc.due()


def _slots(proc):
    return [key for key in proc.held if key[1] < 0]


def test_a_standby_looks_when_the_lease_can_end_and_at_once_when_the_slot_is_freed(fleet):
    counts = {}
    holder = _node(fleet.url, "n1", counts)
    standby = _node(fleet.url, "n2", counts)
    _drive([holder], 2, until=lambda: _slots(holder))
    assert _slots(holder) == [("single", -1)]
    counts.clear()
    _drive([holder, standby], 2 * LEASE)
    assert _slots(standby) == []
    # it looked about once per two thirds of the lease (a look: the live nodes and the slot),
    # not every second (that was 1.5 queries a second)
    assert counts["n2"] <= 2 * (2 * LEASE / (LEASE * 2 / 3) + 1), counts
    # a clean stop of the holder frees the slot: the standby is told and takes it at once
    holder.unreleased.append(["single", holder.held.pop(("single", -1)).fence])
    holder.release()
    freed = time.time()
    _drive([standby], 3, until=lambda: _slots(standby))
    assert _slots(standby) and time.time() - freed < 0.5
    # the new holder dies (renews no more): the other takes the slot when its lease has ended
    died = time.time()
    _drive([holder], LEASE + standby_.WAIT + 2, until=lambda: _slots(holder))
    assert _slots(holder)
    assert LEASE - 0.5 < time.time() - died <= LEASE + standby_.WAIT + 0.5


def test_a_max_raised_by_a_reload_gets_its_new_slots_without_a_restart(fleet):
    """The claims process made a task's slot rows once, by name: a reload raising ``max`` left
    the new slots unmade (fewer runs at once than the file says) until it restarted."""
    proc = claimer.Claimer(socket.socketpair()[1])
    proc.handle({"hello": {"url": fleet.url, "node": "n1", "takeover": 0.5, "lease": LEASE}})
    base = int(time.time()) + 100
    proc.slots_due[("wide", base)] = [base * 1000, 1, 0]
    proc.take_slots([("wide", base)])
    for second, most in ((base + 1, 3), (base + 2, 3)):     # the reload: max 3
        proc.slots_due[("wide", second)] = [second * 1000, most, 0]
    proc.take_slots([("wide", base + 1), ("wide", base + 2)])
    with fleetdb.connect(fleet.url) as conn:
        taken = dict(conn.execute(f"SELECT slot, second FROM {fleetdb.SCHEMA}.slots "
                                  "WHERE task = 'wide' AND node = 'n1'").fetchall())
    assert taken == {0: base, 1: base + 1, 2: base + 2}
