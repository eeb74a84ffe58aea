"""The fleet routes of the HTTP service (/api/v1/fleet/) against a real PostgreSQL: the nodes with
their states, drift and clock offset, the fleet history and its filters, one run with its stored
output, the task file across the fleet; bad input answered 400/404 with a message; the database
stopped answered 503 at once while the local routes go on; the password never shown.

Rows are written into torchcore.nodes and torchcore.runs as the fleet agent writes them
(tests/fleetrows.py); the service runs in the test process over them (as in test_web_api.py).
"""

import json
import logging
import os
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("prometheus_client")

import fleetrows  # noqa: E402
import pgserver  # noqa: E402

from torchcore import config, fleetquery  # noqa: E402
from torchcore.web import fleet as web_fleet  # noqa: E402
from torchcore.web import server  # noqa: E402
from torchcore.web.openapi import document  # noqa: E402
from torchcore.web.store import Backend  # noqa: E402

pytestmark = pytest.mark.process

TASKS = """tasks:
  - {name: backup, schedule: "0 0 3 * * *", command: "echo backup"}
  - {name: report, schedule: "*/5 * * * *", command: "echo report", hosts: [web-3]}
  - {name: lonely, schedule: "@every 1h", command: "true", hosts: [db-*]}
"""


def write_taskfile(directory, database):
    path = os.path.join(directory, "tasks.yaml")
    fleet = f"  fleet:\n    database: {database}\n" if database else ""
    with open(path, "w") as handle:
        handle.write(f"settings:\n  timezone: UTC\n  state_dir: state\n{fleet}{TASKS}")
    return path


def fill(conn, digest):
    """web-1 up on the file, web-2 up on an older one (drifted) with its clock 2.5 s off, web-3 down."""
    fleetrows.add_node(conn, "web-1", digest=digest, file_age=600, addresses=("10.0.0.1",),
                       clock_offset=0.01, running=1)
    fleetrows.add_node(conn, "web-2", digest="0ld" * 8, file_age=7200, addresses=("10.0.0.2",),
                       clock_offset=2.5)
    fleetrows.add_node(conn, "web-3", digest=digest, age=120, addresses=("10.0.0.3",))
    fleetrows.add_run(conn, "web-1", 1, "backup", age=300, output="backup done\n")
    fleetrows.add_run(conn, "web-2", 1, "backup", age=200, exit_code=2,
                      output="disk full\n\x1b[31mred\n")
    fleetrows.add_run(conn, "web-3", 7, "report", age=3000)
    fleetrows.add_run(conn, "web-1", 2, "report", age=100, skipped="max 1 reached")
    fleetrows.add_run(conn, "web-2", 2, "gone", age=50)     # a task the file no longer has


@pytest.fixture
def fleet_site(tmp_path, pg):
    """A served Backend whose task file has settings.fleet on a filled database."""
    conn = fleetrows.init(pg.url)
    path = write_taskfile(str(tmp_path), pg.url)
    digest = config.load(path).digest
    fill(conn, digest)
    site = serve(path)
    site.conn, site.pg = conn, pg
    try:
        yield site
    finally:
        site.stop()
        conn.close()


class Site:
    def __init__(self, backend, srv, thread):
        self.backend, self.srv, self.thread = backend, srv, thread
        self.base = f"http://127.0.0.1:{srv.server_address[1]}/"

    def get(self, path):
        started = time.monotonic()
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        self.took = time.monotonic() - started
        return status, json.loads(body) if body else None

    def stop(self):
        server.stop(self.srv, self.thread)
        if self.backend.fleet is not None:
            self.backend.fleet.close()


def serve(path):
    backend = Backend(path)
    backend.live = lambda: None
    srv, thread = server.serve(backend, ("127.0.0.1", 0), poll_interval=0.05)
    return Site(backend, srv, thread)


def schema_of(path):
    jsonschema = pytest.importorskip("jsonschema")
    spec = document(None)
    schema = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    return lambda body: jsonschema.validate(body, schema)


def test_nodes_with_state_drift_and_clock_offset(fleet_site):
    status, body = fleet_site.get("api/v1/fleet/nodes")
    assert status == 200, body
    schema_of("/api/v1/fleet/nodes")(body)
    nodes = {n["name"]: n for n in body["nodes"]}
    assert {name: n["state"] for name, n in nodes.items()} == \
        {"web-1": "up", "web-2": "up", "web-3": "down"}
    assert [name for name, n in nodes.items() if n["drifted"]] == ["web-2"]
    assert nodes["web-2"]["drifted_since"] and nodes["web-1"]["drifted_since"] is None
    assert nodes["web-2"]["clock_flagged"] and nodes["web-2"]["clock_offset"] == 2.5
    assert not nodes["web-1"]["clock_flagged"]
    assert nodes["web-2"]["failed_24h"] == 1 and nodes["web-1"]["failed_24h"] == 0
    assert nodes["web-1"]["running"] == 1
    assert body["counts"] == {"up": 2, "late": 0, "down": 1, "stopped": 0, "drifted": 1,
                              "clock_flagged": 1}
    assert body["ok"] is False and body["database"] == fleet_site.pg.url
    assert body["now"].endswith("+00:00")       # the task file's zone (UTC)
    status, local = fleet_site.get("api/v1/status")     # says the fleet is set up (and where)
    assert status == 200 and local["fleet"] == {"database": fleet_site.pg.url}


def test_fleet_history_and_its_filters(fleet_site):
    check = schema_of("/api/v1/fleet/history")
    status, runs = fleet_site.get("api/v1/fleet/history")
    assert status == 200
    check(runs)
    assert [(r["node"], r["run_id"]) for r in runs] == \
        [("web-2", 2), ("web-1", 2), ("web-2", 1), ("web-1", 1), ("web-3", 7)]
    assert runs == fleetquery.history(fleet_site.conn, tz=fleet_site.backend.tz)
    for query, expected in [
        ("node=web-2", [("web-2", 2), ("web-2", 1)]),
        ("failed=true", [("web-2", 1)]),
        ("task=report", [("web-1", 2), ("web-3", 7)]),
        ("task=report&node=web-3", [("web-3", 7)]),
        ("since=3m", [("web-2", 2), ("web-1", 2)]),
        ("limit=2", [("web-2", 2), ("web-1", 2)]),
        ("task=nothing", []),
    ]:
        status, runs = fleet_site.get("api/v1/fleet/history?" + query)
        assert status == 200, (query, runs)
        assert [(r["node"], r["run_id"]) for r in runs] == expected, query
    failed = fleet_site.get("api/v1/fleet/history?failed=1")[1][0]
    assert failed["exit_code"] == 2 and failed["failed"] and failed["task"] == "backup"


@pytest.mark.parametrize("query, status, words", [
    ("node=web-9", 404, "no node 'web-9' in the fleet database"),
    ("node=wbe-3", 404, "did you mean 'web-3'"),
    ("node=bad!name", 400, "node: 'bad!name' is not a node name"),
    ("limit=0", 400, "limit: 0 is out of range 1-10000"),
    ("limit=100000000", 400, "limit: 100000000 is out of range 1-10000"),
    ("limit=lots", 400, "limit: expected a whole number"),
    ("since=tomorrowish", 400, "since: expected"),
    ("since=99999999999999w", 400, "since:"),
    ("failed=maybe", 400, "failed: expected true or false"),
    ("task=no%20such", 400, "task: 'no such' is not a task name"),
    ("node=web-1&node=web-2", 400, "node: given 2 times"),
    ("host=web-1", 400, "unknown parameter 'host'"),
])
def test_bad_fleet_history_queries(fleet_site, query, status, words):
    answer = fleet_site.get("api/v1/fleet/history?" + query)
    assert answer[0] == status and words in answer[1]["error"], answer


def test_one_run_with_its_stored_output(fleet_site):
    status, run = fleet_site.get("api/v1/fleet/runs/web-2/1")
    assert status == 200, run
    schema_of("/api/v1/fleet/runs/{node}/{run_id}")(run)
    assert run["node"] == "web-2" and run["task"] == "backup" and run["exit_code"] == 2
    assert run["output"] == "disk full\n\x1b[31mred\n"
    assert run["lines"] == ["disk full", "\\x1b[31mred"]       # escaped as `logs` does
    status, run = fleet_site.get("api/v1/fleet/runs/web-3/7")
    assert status == 200 and run["output"] is None and run["lines"] == []
    for path, status, words in [
        ("web-2/99", 404, "no run 99 of node 'web-2' in the fleet database"),
        ("web-9/1", 404, "no node 'web-9' in the fleet database"),
        ("web-2/abc", 400, "run_id: expected a whole number, got 'abc'"),
        ("web-2/1234567890123456789012", 400, "run_id: expected a whole number"),
        ("-web/1", 400, "node: '-web' is not a node name"),
        ("web-2", 404, "no such resource"),
    ]:
        answer = fleet_site.get("api/v1/fleet/runs/" + path)
        assert answer[0] == status and words in answer[1]["error"], (path, answer)


def test_the_task_file_across_the_fleet(fleet_site):
    check = schema_of("/api/v1/fleet/tasks")
    status, view = fleet_site.get("api/v1/fleet/tasks")
    assert status == 200, view
    check(view)
    tasks = {t["name"]: t for t in view["tasks"]}
    assert list(tasks) == ["backup", "report", "lonely"]
    assert tasks["backup"]["should"] == ["web-1", "web-2", "web-3"]
    assert tasks["report"]["should"] == ["web-3"] and tasks["lonely"]["should"] == []
    ran = {r["node"]: r for r in tasks["backup"]["ran"]}
    assert ran["web-1"]["failed"] is False and ran["web-2"]["failed"] is True
    assert ran["web-2"]["last_result"] == "exit 2" and ran["web-1"]["last_result"] == "ok"
    kinds = {(p["kind"], p.get("task") or p.get("node")) for p in view["problems"]}
    assert kinds == {("failing", "backup"), ("orphan", "lonely"), ("drift", "web-2")}
    assert view["nodes_on_file"] == ["web-1", "web-3"] and view["database"] == fleet_site.pg.url
    status, one = fleet_site.get("api/v1/fleet/tasks?task=backup")
    assert status == 200
    check(one)
    assert [t["name"] for t in one["tasks"]] == ["backup"]
    assert [p["kind"] for p in one["problems"]] == ["failing"]
    status, body = fleet_site.get("api/v1/fleet/tasks?task=backpu")
    assert status == 404 and "no task 'backpu'" in body["error"] and "backup" in body["error"]


def test_the_database_stopped_is_a_quick_503_and_the_local_routes_go_on(fleet_site, caplog):
    caplog.set_level(logging.INFO, logger="torchcore.web")
    assert fleet_site.get("api/v1/fleet/nodes")[0] == 200        # the connection is kept
    fleet_site.pg.server.stop()
    try:
        for route in ("api/v1/fleet/nodes", "api/v1/fleet/history", "api/v1/fleet/tasks",
                      "api/v1/fleet/runs/web-2/1", "api/v1/fleet/nodes"):
            status, body = fleet_site.get(route)
            assert status == 503, (route, body)
            assert fleet_site.took < 3.0, (route, fleet_site.took)
            assert fleet_site.pg.url in body["error"], body
            status, local = fleet_site.get("api/v1/status")
            assert status == 200 and fleet_site.took < 2.0, (local, fleet_site.took)
            assert fleet_site.get("api/v1/history?limit=5")[0] == 200
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]      # once, not per request
        assert fleet_site.pg.url in warnings[0].getMessage()
    finally:
        fleet_site.pg.server.start_again()
    deadline = time.monotonic() + 15
    while fleet_site.get("api/v1/fleet/nodes")[0] != 200:
        assert time.monotonic() < deadline, "the fleet pages did not come back"
        time.sleep(0.3)
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_an_unreachable_database_is_a_bounded_503(tmp_path, pg):
    """Nothing listens (a port just freed): refused at once; each attempt at most the connect
    timeout, and the requests between two attempts are answered at once."""
    url = f"postgresql://torchcore@127.0.0.1:{pgserver.free_port()}/fleet"
    site = serve(write_taskfile(str(tmp_path), url))
    try:
        for _ in range(3):
            status, body = site.get("api/v1/fleet/nodes")
            assert status == 503 and site.took < web_fleet.CONNECT_TIMEOUT + 1.5, site.took
            assert body["error"].startswith(f"cannot connect to the fleet database {url}: ")
    finally:
        site.stop()


def test_a_database_without_the_schema_says_to_run_fleet_init(tmp_path, pg):
    site = serve(write_taskfile(str(tmp_path), pg.url))
    try:
        status, body = site.get("api/v1/fleet/nodes")
        assert status == 503 and "torchcore fleet init" in body["error"], body
    finally:
        site.stop()


def test_the_password_is_never_shown(tmp_path, pg, monkeypatch, caplog):
    """A password in $TORCHCORE_DATABASE_URL (allowed there): not in an answer nor in the log,
    whether the login works, is refused, or the server is down."""
    caplog.set_level(logging.DEBUG, logger="torchcore.web")
    fleetrows.init(pg.url).close()
    port = pg.server.port
    good = f"postgresql://{pgserver.PASSWORD_ROLE}:{pgserver.PASSWORD}@127.0.0.1:{port}/{pg.name}"
    wrong = f"postgresql://{pgserver.PASSWORD_ROLE}:not-{pgserver.PASSWORD}@127.0.0.1:{port}/{pg.name}"
    shown = f"postgresql://{pgserver.PASSWORD_ROLE}:***@127.0.0.1:{port}/{pg.name}"
    path = write_taskfile(str(tmp_path), "postgresql://torchcore@db.invalid/torchcore")
    answers = []
    monkeypatch.setenv("TORCHCORE_DATABASE_URL", wrong)
    site = serve(path)
    try:
        answers.append(site.get("api/v1/fleet/nodes"))
        assert answers[-1][0] == 503 and shown in answers[-1][1]["error"], answers[-1]
        assert "password authentication failed" in answers[-1][1]["error"]
    finally:
        site.stop()
    monkeypatch.setenv("TORCHCORE_DATABASE_URL", good)
    site = serve(path)
    try:
        answers.append(site.get("api/v1/fleet/nodes"))
        assert answers[-1][0] == 200 and answers[-1][1]["database"] == shown
        pg.server.stop()
        try:
            answers.append(site.get("api/v1/fleet/history"))
            assert answers[-1][0] == 503 and shown in answers[-1][1]["error"]
        finally:
            pg.server.start_again()
    finally:
        site.stop()
    for answer in answers:
        assert pgserver.PASSWORD not in json.dumps(answer)
    assert caplog.records and all(pgserver.PASSWORD not in r.getMessage() for r in caplog.records)


def test_a_reload_that_adds_the_fleet_connects_it(tmp_path, pg):
    fleetrows.init(pg.url).close()
    path = write_taskfile(str(tmp_path), None)
    site = serve(path)
    try:
        status, body = site.get("api/v1/fleet/nodes")
        assert status == 404 and body["error"].startswith("the fleet is not set up")
        write_taskfile(str(tmp_path), pg.url)
        assert site.backend.reload()
        assert site.get("api/v1/fleet/nodes") == (200, {
            "database": pg.url, "now": None, "nodes": [], "ok": True,
            "counts": {"up": 0, "late": 0, "down": 0, "stopped": 0, "drifted": 0,
                       "clock_flagged": 0}})
        write_taskfile(str(tmp_path), None)
        assert site.backend.reload() and site.backend.fleet is None
        assert site.get("api/v1/fleet/nodes")[0] == 404
    finally:
        site.stop()


def test_a_server_process_that_stopped_answering_is_a_bounded_503(fleet_site, monkeypatch):
    """The backend serving the service's connection stops (SIGSTOP: its kernel still acknowledges,
    so neither TCP's bounds nor the server's statement_timeout end the read): the request is a
    503 within READ_DEADLINE, and a request that waited for the connection meanwhile is
    answered on a new one."""
    import signal
    import threading

    import psycopg

    monkeypatch.setattr(web_fleet, "READ_DEADLINE", 2.0, raising=False)
    assert fleet_site.get("api/v1/fleet/nodes")[0] == 200        # the connection is kept
    with psycopg.connect(fleet_site.pg.url, autocommit=True) as conn:
        pid, = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND "
                            "application_name = 'torchcore: http'", (fleet_site.pg.name,)).fetchone()
    os.kill(pid, signal.SIGSTOP)
    try:
        answers = []
        first = threading.Thread(target=lambda: answers.append(
            (fleet_site.get("api/v1/fleet/history"), fleet_site.took)))
        first.start()
        deadline = time.monotonic() + 10
        while not fleet_site.backend.fleet._lock.locked():     # the first holds the connection
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, body = fleet_site.get("api/v1/fleet/nodes")       # waits for the connection
        assert status == 200 and fleet_site.took < 2.0 + 1.5, (body, fleet_site.took)
        first.join(30)
        ((status, body), took), = answers
        assert status == 503 and took < 2.0 + 1.5, (body, took)
        assert body["error"] == (f"the fleet database {fleet_site.pg.url} did not answer within "
                                 "2s; its connection was cut")
    finally:
        os.kill(pid, signal.SIGCONT)
