"""The supervisor's side of `run: once` claims (coordinator.py) on a fake clock, with the claims
process replaced by the messages it would send: each won claim starts once on this node.  And the
claims process's side of a burst: its statements counted, the database replaced."""

import socket
import types

from torchcore import claimer, claims
from torchcore.coordinator import FleetCoordinator
from torchcore.states import RunState


class Clock:
    def __init__(self, now):
        self.now = now

    def time(self):
        return self.now

    def monotonic(self):
        return self.now


class Starter:
    """Starts what the coordinator hands it, asking the coordinator as the real one does."""

    def __init__(self, coordinator, task):
        self.coordinator, self.task = coordinator, task
        self.table, self.runs = [], []
        self.stopping_now = False

    def launch(self, second):
        if self.coordinator.claim(self.task, second) is not True:
            return None
        run = types.SimpleNamespace(task=self.task, scheduled=second, state=RunState.RUNNING,
                                    run_id=len(self.runs) + 1, pgid=None, executor_pid=None)
        self.runs.append(run)
        self.table.append(run)
        self.coordinator.started(run)
        return run

    def start_claimed(self, name, second):
        self.launch(second)

    def prepare_claimed(self, name, second):
        pass


def _coordinator(now):
    task = types.SimpleNamespace(name="job", run="once", type="task", max=1, ips=(), hosts=(),
                                 kill_grace=1)
    coordinator = FleetCoordinator(Clock(now), "n1")
    coordinator.once = {"job"}
    coordinator.hello = {"url": "postgresql://x/y", "node": "n1", "takeover": 0.5, "lease": 15}
    coordinator.sent = []
    coordinator._send = coordinator.sent.append        # the claims process, as its messages
    coordinator.starter = Starter(coordinator, task)
    return coordinator, task


def test_a_claim_answered_after_its_second_but_before_its_tick_starts_once():
    second = 1000
    coordinator, task = _coordinator(second - 1.5)
    coordinator.ahead(second, [task])
    coordinator.clock.now = second + 0.05           # the answers come late (a busy start-up)
    coordinator._answer({"won": [["job", second, second * 1000]], "lost": [], "late": False})
    coordinator._answer({"slots": [["job", second, second * 1000, 0]], "full": []})
    assert len(coordinator.starter.runs) == 1       # started at once: its second has come
    assert coordinator.starter.launch(second) is None   # the tick: not a second time
    assert len(coordinator.starter.runs) == 1
    assert [m for m in coordinator.sent if "start" in m] == [
        {"start": [["job", second, second * 1000, None, 1, None]]}]


def test_a_daemon_stopped_as_its_lease_cannot_be_kept_is_not_restarted_in_that_slot():
    coordinator, _ = _coordinator(1000.0)
    task = types.SimpleNamespace(name="single", run="once", type="daemon", max=1, ips=(),
                                 hosts=(), kill_grace=1)
    coordinator.once = {"single"}
    starter = coordinator.starter
    starter.task, starter.signals = task, []
    starter.table = Table()
    starter.tend_daemons = lambda: None
    starter.signal_run = lambda run, signum, why: starter.signals.append((run.run_id, signum))
    coordinator._answer({"daemon": [["single", -1, 1234]]})         # a slot taken for it
    run = starter.launch(None)
    assert run is not None
    coordinator._answer({"stop": [["single", -1, 1234]], "kill": False})   # renewals fail
    assert starter.signals == [(run.run_id, 15)]                    # TERM
    starter.table.remove(run)
    coordinator.ended(run)                          # it ended: its slot freed, not used again
    assert coordinator.sent[-1] == {"end": [["single", -1, 1234]]}
    assert starter.launch(None) is None
    coordinator._answer({"stop": [["single", -1, 1234]], "kill": True})    # (nothing left)
    assert starter.signals == [(run.run_id, 15)]


class Table(list):
    def get(self, run_id):
        return next((run for run in self if run.run_id == run_id), None)


def test_a_burst_of_starts_then_ends_costs_one_statement_each_not_one_per_run():
    ours, theirs = socket.socketpair()
    proc = claimer.Claimer(theirs)
    proc.handle({"hello": {"url": "postgresql://x/y", "node": "n1", "takeover": 0.5, "lease": 15}})
    calls = []

    def execute(sql, params):
        calls.append(sql)
        if sql == claims.START:
            return list(zip(params["tasks"], params["seconds"]))
        if sql == claims.RENEW:
            return list(zip(params["tasks"], params["fences"]))
        return []
    proc.execute = execute
    runs = [[f"t{i}", 1000, 1000000] for i in range(30)]
    ours.sendall(b"".join(claims.encode({"start": [run + [None, 1, None]]}) for run in runs) +
                 b"".join(claims.encode({"end": [run]}) for run in runs))
    proc.read()
    assert calls == [claims.START, claims.RENEW, claims.RELEASE]
    assert proc.held == {} and proc.unreleased == []
