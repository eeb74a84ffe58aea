"""The fleet agent's state when the database lets it connect and heartbeat but not ship its runs
(an INSERT revoked, the runs table dropped): one state, said once, backing off as any refusal,
and up again once a batch goes in.  In process, on a real PostgreSQL, on a fake clock."""

import dataclasses
import logging

import pytest

from torchcore import fleetagent, fleetdb, fleetspec, fleetstore, records, taskspec
from torchcore.runrecord import RunRecord

pytestmark = pytest.mark.process


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _agent(tmp_path, url):
    path = str(tmp_path / "torchcore.db")
    with records.Records(path) as store:
        for run_id in range(1, 4):
            store.add(RunRecord(run_id, "t", "n", 100, 101.0, 102.0, 0))
        store.flush()
    settings = dataclasses.replace(taskspec.default_settings(str(tmp_path / "tasks.yaml")),
                                   fleet=fleetspec.FleetSettings(database=url))
    clock = _Clock()
    return fleetagent.Agent(fleetstore.Store(path), settings, "n1", url, monotonic=clock)


def _tries(agent, count):
    """The waits between ``count`` tries, each made when it is due."""
    waits = []
    for _ in range(count):
        agent.step()
        waits.append(agent.next_try - agent.monotonic.now)
        agent.monotonic.now = max(agent.next_try, agent.monotonic.now)
    return waits


@pytest.mark.parametrize("breakage, mend", [
    ("REVOKE INSERT, UPDATE ON torchcore.runs FROM {role}",
     "GRANT INSERT, UPDATE ON torchcore.runs TO {role}"),
    ("ALTER TABLE torchcore.runs RENAME TO runs_away", "ALTER TABLE torchcore.runs_away RENAME TO runs"),
])
def test_a_database_that_takes_the_heartbeat_but_not_the_runs_is_one_state(pg, tmp_path, caplog,
                                                                              breakage, mend):
    with fleetdb.connect(pg.url) as conn:
        fleetdb.migrate(conn, pg.url)
    role = "agent_" + pg.name[-12:]
    pg.server.psql_as_super(f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA torchcore TO {role}; "
                            f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA torchcore "
                            f"TO {role}", db=pg.name)
    url = pg.server.url(pg.name, user=role)
    pg.server.psql_as_super(breakage.format(role=role), db=pg.name)
    agent = _agent(tmp_path, url)
    caplog.set_level(logging.INFO, logger="torchcore")
    waits = _tries(agent, 6)
    assert agent.state in (fleetagent.REFUSED, fleetagent.SCHEMA)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text                  # once, not once per try
    assert "shipping to" not in caplog.text                 # never said up meanwhile
    assert waits[-1] > waits[0] * 4, waits                  # backing off
    pg.server.psql_as_super(mend.format(role=role), db=pg.name)
    agent.monotonic.now = agent.next_try
    agent.step()
    assert agent.state == fleetagent.UP
    assert "as n1 again after" in caplog.text and "3 records waiting" in caplog.text   # the backlog
    with fleetdb.connect(pg.url) as conn:
        assert conn.execute("SELECT count(*) FROM torchcore.runs").fetchone()[0] == 3
    agent.close()
    agent.store.close()


def test_a_second_daemon_with_the_node_s_name_ships_nothing_over_the_first_s_runs(pg, tmp_path,
                                                                                   caplog):
    """Both alive, one name: the one that finds the other's row heartbeating is refused (its
    records wait, status says why), so the first one's history is not overwritten; once the
    first stops, the second ships."""
    with fleetdb.connect(pg.url) as conn:
        fleetdb.migrate(conn, pg.url)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    import os
    first, second = _agent(tmp_path / "one", pg.url), _agent(tmp_path / "two", pg.url)
    first.control = lambda: {"pid": os.getpid()}
    second.control = lambda: {"pid": os.getppid()}          # another live process
    with records.Records(str(tmp_path / "two" / "torchcore.db")) as store:
        for run_id in range(1, 4):
            store.add(RunRecord(run_id, "other", "n", 100, 101.0, 102.0, 9))
        store.flush()
    caplog.set_level(logging.INFO, logger="torchcore")
    first.step()
    assert first.state == fleetagent.UP
    _tries(second, 4)
    assert second.state == fleetagent.REFUSED and "reports as node n1 too" in second.error
    assert caplog.text.count("reports as node n1 too") == 1
    with fleetdb.connect(pg.url) as conn:
        assert conn.execute("SELECT DISTINCT task FROM torchcore.runs").fetchall() == [("t",)]
        assert conn.execute("SELECT pid FROM torchcore.nodes").fetchall() == [(os.getpid(),)]
    first.finish(1.0)                                       # a clean stop: the name is free
    second.monotonic.now = second.next_try
    second.step()
    assert second.state == fleetagent.UP
    for agent in (first, second):
        agent.close()
        agent.store.close()
