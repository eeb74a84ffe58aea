"""The HTTP service in-process: settings.http, the token rules, every API route with good and
bad input, /metrics parsed by prometheus-client, the OpenAPI document against the answers.

A real server on a free loopback port over a records database made here; the daemon's side
(the control socket) is stood in for by the backend's ``live`` and ``control``.
"""

import json
import os
import re
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

from torchcore import config, tasklog
from torchcore.commands import history
from torchcore.errors import ConfigError, DaemonError
from torchcore.records import Records, RunRecord, db_path
from torchcore.web import detail, server, wanted
from torchcore.web.settings import TokenError, parse_base_path, parse_listen, read_token
from torchcore.web.store import Backend

TOKEN = "s3cret-token-0123456789"
TASKS = """
tasks:
  - name: backup
    schedule: "0 0 3 * * *"
    command: "echo backup"
  - name: report
    schedule: "*/5 * * * *"
    command: [sh, -c, "exit 3"]
    env: {PASSWORD: hunter2}
  - name: idle
    schedule: "@every 1h"
    command: "true"
"""


def write_taskfile(directory, http="", body=TASKS):
    path = os.path.join(directory, "tasks.yaml")
    with open(path, "w") as handle:
        handle.write(f"settings:\n  timezone: UTC\n  state_dir: state\n{http}{body}")
    return path


def write_token(directory, mode=0o600):
    path = os.path.join(directory, "token")
    with open(path, "w") as handle:
        handle.write(TOKEN + "\n")
    os.chmod(path, mode)
    return path


@pytest.fixture
def site(tmp_path):
    """A served Backend with runs recorded and a log written; closed after the test."""
    write_token(tmp_path)
    path = write_taskfile(tmp_path, "  http:\n    listen: 127.0.0.1:9\n    token_file: token\n"
                                    "    base_path: /cron/\n")
    backend = Backend(path)
    now = float(int(time.time()))      # whole seconds: the lateness of each run is exact
    os.makedirs(backend.log_dir, exist_ok=True)
    with Records(db_path(backend.state_dir)) as store:
        for record in [
            RunRecord(1, "backup", "n1", int(now - 7200), now - 7200, now - 7190, 0, None),
            RunRecord(2, "report", "n1", int(now - 3600), now - 3600 + 0.02, now - 3599.5, 3, None),
            RunRecord(3, "backup", "n1", int(now - 1800), None, None, None, None,
                      skipped="max 1 reached"),
            RunRecord(4, "report", "n1", None, now - 600, now - 540, None, 15, timed_out=True,
                      manual=True),
            RunRecord(5, "backup", "n1", int(now - 60), now - 60 + 0.3, None, None, None, pid=4242),
            RunRecord(6, "idle", "n1", int(now - 30), None, None, None, None, missed=True,
                      skipped="missed 2 run(s)"),
        ]:
            store.add(record)
    log = tasklog.TaskLog(backend.log_dir, "report", 2, 1 << 20, 1)
    log.write("stdout", b"hello from run 2\n\x1b[31mred\n")
    log.close()
    calls = []

    def control(cmd, **fields):
        calls.append((cmd, fields))
        if cmd == "run":
            return {"ok": True, "run_id": 99, "executor_pid": 1}
        if cmd == "reload":
            return {"ok": True, "accepted": True, "problems": [], "summary": "3 tasks"}
        if fields.get("task") == "idle":
            raise DaemonError(f"{cmd}: task 'idle' is busy")
        return {"ok": True, "disabled": cmd == "disable", "changed": True}

    backend.live = lambda: None
    backend.control = control
    srv, thread = server.serve(backend, ("127.0.0.1", 0), poll_interval=0.05)
    base = f"http://127.0.0.1:{srv.server_address[1]}/cron/"
    yield type("Site", (), {"backend": backend, "base": base, "calls": calls, "now": now,
                            "dir": str(tmp_path)})
    server.stop(srv, thread)


def get(url, headers=None, method="GET"):
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url, **kw):
    status, _, body = get(url, **kw)
    return status, json.loads(body) if body else None


# -- settings.http ---------------------------------------------------------------------------------

def test_listen_and_base_path_forms():
    assert parse_listen("9177") == ("127.0.0.1", 9177)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("localhost:1") == ("localhost", 1)
    for bad in ("::1:80", "1.2.3.4", "host:0", "host:65536", "[1.2.3.4]:80", "bad_host!:80"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    assert parse_base_path("/cron") == "/cron/"
    assert parse_base_path("/") == "/"
    for bad in ("cron/", "/a/../b/", "/a b/", "/a//b/"):
        with pytest.raises(ValueError):
            parse_base_path(bad)


def test_settings_http_errors_name_file_and_line(tmp_path):
    path = write_taskfile(tmp_path, "  http:\n    listen: 10.0.0.1:99999\n    base_path: x y\n"
                                    "    token: t\n", body="tasks: []\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    problems = caught.value.problems
    assert any(p.startswith(f"{path}:5: settings: http: listen: port '99999'") for p in problems)
    assert any(p.startswith(f"{path}:6: settings: http: base_path: expected a URL path")
               for p in problems)
    assert any(p.startswith(f"{path}:7: settings: http: token: unknown key") for p in problems)


def test_http_is_off_unless_listen_is_set(tmp_path):
    assert not wanted(config.load(write_taskfile(tmp_path, body="tasks: []\n")))
    loaded = config.load(write_taskfile(tmp_path, "  http:\n    base_path: /x/\n", "tasks: []\n"))
    assert not wanted(loaded) and loaded.settings.http.base_path == "/x/"
    loaded = config.load(write_taskfile(tmp_path, "  http:\n    listen: 9177\n", "tasks: []\n"))
    assert wanted(loaded) and loaded.settings.http.address == ("127.0.0.1", 9177)
    bare = config.load(write_taskfile(tmp_path, body="tasks: []\n"))
    assert wanted(bare, None, {"http": ["--listen", "127.0.0.1:9"]})
    assert not wanted(bare, None, {"notifier": ["--x"]})


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_token_file_readable_by_others_is_refused_at_its_line(tmp_path, mode):
    write_token(tmp_path, mode)
    path = write_taskfile(tmp_path, "  http:\n    listen: 9177\n    token_file: token\n", "tasks: []\n")
    taskfile = config.load(path)        # the form is fine; the node check refuses the mode
    problems = config.node_problems(taskfile, None)
    assert problems == [(f"{path}:6: settings: http: token_file: {tmp_path}/token has mode "
                         f"{mode:04o}; others may read it: `chmod 600 {tmp_path}/token` "
                         "(refused until then)")]


def test_token_file_checks(tmp_path):
    good = write_token(tmp_path)
    assert read_token(good) == TOKEN
    os.symlink(good, tmp_path / "link")
    for path, words in [(tmp_path / "missing", "cannot read"), (tmp_path / "link", "symbolic link"),
                        (tmp_path, "not a regular file")]:
        with pytest.raises(TokenError, match=words):
            read_token(str(path))
    (tmp_path / "short").write_text("abc\n")
    os.chmod(tmp_path / "short", 0o600)
    with pytest.raises(TokenError, match="at least 16"):
        read_token(str(tmp_path / "short"))


def test_settings_http_auth(tmp_path):
    write_token(tmp_path)
    default = config.load(write_taskfile(tmp_path, "  http:\n    listen: 9177\n", "tasks: []\n"))
    assert default.settings.http.auth == "changes"
    loaded = config.load(write_taskfile(tmp_path, "  http:\n    listen: 9177\n    token_file: token\n"
                                                  "    auth: all\n", "tasks: []\n"))
    assert loaded.settings.http.auth == "all"
    assert detail(loaded) == {"listen": "127.0.0.1:9177", "auth": "all"}
    assert detail(loaded, {"http": ["--listen", "[::1]:80"]}) == {"listen": "[::1]:80", "auth": "all"}
    for http, line, words in [
        ("    auth: all\n", 6, "auth: all needs a token_file (the token every request must send)"),
        ("    auth: everything\n    token_file: token\n", 6,
         "auth: expected changes (the token for actions only) or all (the token for every "
         "request), got 'everything'"),
        ("    auth: [all]\n", 6, "auth: expected changes or all"),
    ]:
        path = write_taskfile(tmp_path, "  http:\n    listen: 9177\n" + http, "tasks: []\n")
        with pytest.raises(ConfigError) as caught:
            config.load(path)
        assert [p for p in caught.value.problems
                if p.startswith(f"{path}:{line}: settings: http: {words}")], caught.value.problems


# -- reading ---------------------------------------------------------------------------------------

def test_history_is_history_json(site):
    status, body = get_json(site.base + "api/v1/history?limit=10")
    assert status == 200
    with Records(db_path(site.backend.state_dir)) as store:
        expected = [history.run_json(r, site.backend.tz) for r in store.query(limit=10)]
    assert body == json.loads(json.dumps(expected))
    assert [r["run_id"] for r in body] == [6, 5, 4, 3, 2, 1]
    assert body[0]["scheduled"].endswith("+00:00")
    _, failed = get_json(site.base + "api/v1/history?failed=true")
    assert [r["run_id"] for r in failed] == [4, 2]
    _, one = get_json(site.base + "api/v1/history?task=backup&since=1h&limit=5")
    assert [r["run_id"] for r in one] == [5, 3]


@pytest.mark.parametrize("query, words", [
    ("limit=0", "limit: 0 is out of range 1-10000"),
    ("limit=99999999", "out of range"),
    ("limit=abc", "expected a whole number"),
    ("limit=1&limit=2", "given 2 times"),
    ("since=tomorrowish", "since: expected"),
    ("failed=maybe", "expected true or false"),
    ("task=..%2F..", "not a task name"),
    ("color=red", "unknown parameter 'color'"),
])
def test_bad_history_queries_are_400_with_a_message(site, query, words):
    status, body = get_json(site.base + "api/v1/history?" + query)
    assert status == 400 and words in body["error"]


def test_runs_and_logs(site):
    status, run = get_json(site.base + "api/v1/runs/2")
    assert status == 200 and run["exit_code"] == 3 and run["failed"]
    assert get_json(site.base + "api/v1/runs/12345")[0] == 404
    status, log = get_json(site.base + "api/v1/runs/2/log")
    assert status == 200 and log["task"] == "report"
    assert log["lines"][0].endswith("hello from run 2")
    assert log["lines"][1].endswith("\\x1b[31mred")      # escaped as `logs` shows it
    _, log = get_json(site.base + "api/v1/tasks/report/log?lines=1")
    assert len(log["lines"]) == 1
    assert get_json(site.base + "api/v1/tasks/nope/log")[0] == 404
    assert get_json(site.base + "api/v1/tasks/report/log?lines=0")[0] == 400
    status, headers, body = get(site.base + "api/v1/tasks/report/log/follow", method="HEAD")
    assert (status, body) == (200, b"") and headers["Content-Type"].startswith("text/event-stream")


def test_tasks_and_one_task(site):
    status, page = get_json(site.base + "api/v1/tasks")
    assert status == 200 and page["total"] == 3
    states = {t["name"]: t["state"] for t in page["tasks"]}
    assert states == {"backup": "ok", "report": "failing", "idle": "never ran"}
    backup = next(t for t in page["tasks"] if t["name"] == "backup")
    assert backup["description"] == "At 03:00" and backup["next_run"].endswith("+00:00")
    _, page = get_json(site.base + "api/v1/tasks?q=rep&limit=1")
    assert [t["name"] for t in page["tasks"]] == ["report"]
    _, page = get_json(site.base + "api/v1/tasks?state=failing")
    assert [t["name"] for t in page["tasks"]] == ["report"]
    status, task = get_json(site.base + "api/v1/tasks/report")
    assert status == 200 and len(task["next_runs"]) == 5 and task["command"] == ["sh", "-c", "exit 3"]
    assert "hunter2" not in json.dumps(task) and "env" not in task
    status, body = get_json(site.base + "api/v1/tasks/reprot")
    assert status == 404 and "did you mean" in body["error"]
    status, body = get_json(site.base + "api/v1/status")
    assert status == 200 and body["tasks"] == 3 and body["daemon"]["running"] is False


def test_a_loopback_service_answers_to_loopback_hosts_only(site):
    for host in ("localhost:9177", "127.0.0.1", "[::1]:80", "LOCALHOST."):
        assert get(site.base + "api/v1/status", {"Host": host})[0] == 200, host
    for host in ("evil.example:9177", "10.0.0.1", "[2001:db8::1]:80"):
        status, _, body = get(site.base + "api/v1/status", {"Host": host})
        assert status == 403 and b"loopback Host" in body, host


def test_paths_outside_the_base_path_and_static_files(site):
    root = site.base.removesuffix("cron/")
    assert get(root + "api/v1/status")[0] == 404
    status, headers, body = get(site.base)
    assert status == 200 and b"static/app.js" in body and headers["Content-Type"].startswith("text/html")
    assert "Access-Control-Allow-Origin" not in headers
    assert get(site.base + "static/app.js")[0] == 200
    assert get(site.base + "static/../server.py")[0] == 404
    assert get(site.base + "nothing")[0] == 404
    assert get(site.base + "nothing", method="HEAD")[::2] == (404, b"")     # no body to a HEAD
    assert get(root + "cron")[0] in (200, 308)     # urllib follows the redirect to /cron/


# -- acting ----------------------------------------------------------------------------------------

def test_actions_need_the_token(site):
    url = site.base + "api/v1/tasks/backup/run"
    status, headers, body = get(url, method="POST")
    assert status == 401 and "Bearer" in headers["WWW-Authenticate"] and b"Authorization" in body
    status, _, body = get(url, {"Authorization": "Bearer wrong-token-00000000"}, method="POST")
    assert (status, body) == (401, b"")
    status, _, body = get(url, {"Authorization": f"Basic {TOKEN}"}, method="POST")
    assert (status, body) == (401, b"")
    assert site.calls == []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, reply = get_json(url, headers=auth, method="POST")
    assert (status, reply) == (202, {"task": "backup", "run_id": 99})
    assert get_json(site.base + "api/v1/tasks/backup/disable", headers=auth, method="POST")[1] == \
        {"task": "backup", "disabled": True, "changed": True}
    status, reply = get_json(site.base + "api/v1/tasks/idle/enable", headers=auth, method="POST")
    assert (status, reply["error"]) == (409, "task 'idle' is busy")
    assert get_json(site.base + "api/v1/reload", headers=auth, method="POST")[1]["accepted"]
    assert get_json(site.base + "api/v1/tasks/nope/run", headers=auth, method="POST")[0] == 404
    assert get(site.base + "api/v1/reload")[0] == 405
    assert [c[0] for c in site.calls] == ["run", "disable", "enable", "reload"]


def test_actions_are_off_with_a_bad_token_file(site):
    os.chmod(os.path.join(site.dir, "token"), 0o644)
    site.backend.reload()
    status, body = get_json(site.base + "api/v1/reload", method="POST",
                            headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 403 and "mode 0644" in body["error"]
    assert site.calls == []


# -- settings.http.auth: all ------------------------------------------------------------------------

READS = ["api/v1/status", "api/v1/tasks", "api/v1/tasks/report", "api/v1/tasks/report/log",
         "api/v1/history?since=tomorrowish", "api/v1/runs/2", "api/v1/runs/2/log",
         "api/v1/tasks/nope", "api/v1/openapi.json", "metrics", "api/v1/tasks/report/log/follow"]


def auth_all(site, auth="all"):
    write_taskfile(site.dir, "  http:\n    listen: 127.0.0.1:9\n    token_file: token\n"
                             f"    base_path: /cron/\n    auth: {auth}\n")
    assert site.backend.reload() and site.backend.auth == auth


def test_auth_all_refuses_every_read_without_the_token(site):
    auth_all(site)
    for path in READS:      # the 401 comes before anything else: not even a 404 or a 400 shows
        status, headers, body = get(site.base + path)
        assert status == 401 and "Bearer" in headers["WWW-Authenticate"], path
        assert b"settings.http.auth: all" in body and b"report" not in body, path
        for given in ("Bearer wrong-token-00000000", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x"):
            assert get(site.base + path, {"Authorization": given})[::2] == (401, b""), (path, given)
        assert get(site.base + path, method="HEAD")[0] == 401
    status, _, body = get(site.base + "api/v1/tasks/backup/run", method="POST")
    assert status == 401 and b"auth: all" in body
    assert site.calls == []
    for page in ("", "static/app.js"):      # the dashboard's files: the same for everyone
        assert get(site.base + page)[0] == 200


def test_auth_all_answers_with_the_token(site):
    auth_all(site)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in READS[:-1]:
        status, _, body = get(site.base + path, auth)
        expected = 404 if "nope" in path else 400 if "tomorrowish" in path else 200
        assert status == expected, (path, body[:200])
    status, kind, body = get(site.base + "metrics", auth)
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "torchcore_task_runs" in families
    with urllib.request.urlopen(urllib.request.Request(
            site.base + "api/v1/tasks/report/log/follow?lines=5", headers=auth), timeout=10) as follow:
        line = follow.readline()
        assert follow.status == 200 and line.startswith(b"data: ") and b"hello from run 2" in line
    assert get_json(site.base + "api/v1/tasks/backup/run", headers=auth, method="POST")[0] == 202
    auth_all(site, "changes")       # back to the default: reads open again, actions still need it
    assert get(site.base + "api/v1/status")[0] == 200
    assert get(site.base + "api/v1/reload", method="POST")[0] == 401


def test_auth_all_with_an_unusable_token_file_refuses_everything(site):
    auth_all(site)
    os.chmod(os.path.join(site.dir, "token"), 0o644)
    site.backend.reload()
    for path in ("api/v1/status", "metrics"):
        status, body = get_json(site.base + path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 403 and body["error"].startswith("every request is refused: token_file:")
        assert "mode 0644" in body["error"]


# -- metrics and the OpenAPI document --------------------------------------------------------------

def test_metrics_parse_and_agree_with_history(site):
    status, headers, body = get(site.base + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    runs = {(s.labels["task"], s.labels["result"]): s.value
            for s in families["torchcore_task_runs"].samples if s.name.endswith("_total")}
    history = get_json(site.base + "api/v1/history?limit=100")[1]
    for task in ("backup", "report", "idle"):
        finished = [r for r in history if r["task"] == task and r["ended"] and not r["skipped"]]
        assert runs[(task, "failure")] == sum(r["failed"] for r in finished)
        assert runs[(task, "success")] == sum(not r["failed"] for r in finished)
    skipped = {(s.labels["task"], s.labels["reason"]): s.value
               for s in families["torchcore_task_skipped"].samples if s.name.endswith("_total")}
    assert skipped == {("backup", "max"): 1}       # a reason shows once it happened
    missed = {s.labels["task"]: s.value for s in families["torchcore_task_missed"].samples
              if s.name.endswith("_total")}
    assert missed == {"backup": 0, "report": 0, "idle": 1}
    hist = {s.labels.get("le"): s.value for s in families["torchcore_launch_lateness_seconds"].samples
            if s.name.endswith("_bucket")}
    assert hist["0.05"] == 2 and hist["0.5"] == 3 and hist["+Inf"] == 3
    last = {s.labels["task"]: s.value
            for s in families["torchcore_task_last_success_timestamp_seconds"].samples}
    assert last == {"backup": pytest.approx(site.now - 7190)}
    assert families["torchcore_up"].samples[0].value == 0
    assert {s.labels["task"] for s in families["torchcore_task_next_run_timestamp_seconds"].samples} == \
        {"backup", "report", "idle"}


def test_fleet_routes_without_settings_fleet_say_what_to_add(site):
    """No settings.fleet: every fleet route is a 404 saying so and what to add, whatever its
    values (an unknown parameter is still a 400); nothing connects."""
    for route in ("api/v1/fleet/nodes", "api/v1/fleet/tasks", "api/v1/fleet/history?node=web-1",
                  "api/v1/fleet/runs/web-1/1"):
        status, body = get_json(site.base + route)
        assert status == 404, (route, body)
        assert body["error"].startswith("the fleet is not set up: add settings.fleet.database")
        assert "torchcore fleet init" in body["error"] and site.backend.path in body["error"]
    assert get_json(site.base + "api/v1/fleet/history?limit=0")[0] == 404
    assert get_json(site.base + "api/v1/fleet/history?host=web-1")[0] == 400   # unknown: 400
    assert site.backend.fleet is None and get_json(site.base + "api/v1/status")[1]["fleet"] is None


def test_openapi_covers_every_route_and_matches_answers(site):
    jsonschema = pytest.importorskip("jsonschema")
    status, spec = get_json(site.base + "api/v1/openapi.json")
    assert status == 200 and spec["servers"] == [{"url": "/cron"}]
    documented = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    routes = {(method, "/" + re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern))
              for method, pattern, _, _ in server.api_mod.Api(site.backend).routes}
    assert documented == routes
    for path, sample in [("/api/v1/history", "api/v1/history?limit=100"),
                         ("/api/v1/runs/{run_id}", "api/v1/runs/4"),
                         ("/api/v1/tasks/{name}", "api/v1/tasks/report"),
                         ("/api/v1/tasks", "api/v1/tasks"), ("/api/v1/status", "api/v1/status"),
                         ("/api/v1/runs/{run_id}/log", "api/v1/runs/2/log")]:
        schema = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        jsonschema.validate(get_json(site.base + sample)[1], schema)


# -- the connection: bodies, hosts, how many at once -----------------------------------------------

def raw_exchange(port, data, wait=3.0):
    """Send ``data`` on one connection; everything answered until the server closes it."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def status_lines(answer):
    return re.findall(rb"(?:^|\r\n\r\n|\n)(HTTP/1\.1 \d{3})", answer)


SMUGGLED = b"GET /cron/api/v1/history HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.mark.parametrize("method, path, host", [
    ("GET", "/cron/api/v1/status", "localhost"),
    ("HEAD", "/cron/", "localhost"),
    ("POST", "/cron/api/v1/reload", "localhost"),
    ("POST", "/cron/api/v1/reload", "evil.example"),      # refused by its Host
    ("GET", "/elsewhere", "localhost"),                    # refused: outside the base path
    ("DELETE", "/cron/api/v1/status", "localhost"),
])
def test_a_request_body_is_never_read_as_the_next_request(site, method, path, host):
    """Whatever the method and whatever the answer, a body is the request's own: a second request
    hidden in it (behind a proxy that reuses connections, a request smuggled past it) is not run."""
    port = int(site.base.split(":")[2].split("/")[0])
    first = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
             f"Content-Length: {len(SMUGGLED)}\r\n\r\n").encode() + SMUGGLED
    last = b"GET /cron/api/v1/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(port, first + last)
    assert len(status_lines(answer)) == 2, answer
    assert status_lines(answer)[-1] == b"HTTP/1.1 200"


@pytest.mark.parametrize("headers, status", [
    (b"Transfer-Encoding: chunked\r\n", b"411"),
    (b"Content-Length: 5\r\nContent-Length: 0\r\n", b"400"),
    (b"Content-Length: -1\r\n", b"400"),
    (b"Content-Length: 99999999\r\n", b"413"),
])
def test_a_body_it_cannot_delimit_ends_the_connection(site, headers, status):
    port = int(site.base.split(":")[2].split("/")[0])
    answer = raw_exchange(port, b"POST /cron/api/v1/reload HTTP/1.1\r\nHost: localhost\r\n" + headers
                          + b"\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED)
    assert status_lines(answer) == [b"HTTP/1.1 " + status], answer


def test_connections_beyond_the_bound_get_503_and_the_service_goes_on(site, monkeypatch):
    """Clients holding connections open (slowloris) take at most MAX_CONNECTIONS threads; the
    next connection is answered 503 at once, and once they go the service answers again."""
    import socket

    monkeypatch.setattr(server, "MAX_CONNECTIONS", 4)
    srv, thread = server.serve(site.backend, ("127.0.0.1", 0), poll_interval=0.05)
    port = srv.server_address[1]
    held = []
    try:
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /cron/api/v1/status HTTP/1.1\r\nHost: loc")     # never finished
            held.append(sock)
        time.sleep(0.3)
        started = time.monotonic()
        answer = raw_exchange(port, b"GET /cron/api/v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status_lines(answer) == [b"HTTP/1.1 503"] and time.monotonic() - started < 2
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"].startswith("too many")
        for sock in held:
            sock.close()
        held = []
        deadline = time.monotonic() + 5
        while True:
            status = get(f"http://127.0.0.1:{port}/cron/api/v1/status")[0]
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 200
    finally:
        for sock in held:
            sock.close()
        server.stop(srv, thread)


@pytest.mark.parametrize("host", ["127.0.0.1:80@evil.example", "[::1]evil.example", "localhost/x",
                                  "127.0.0.1 evil.example", "localhost:9177:1", "", "[::1"])
def test_a_host_header_of_another_form_is_not_loopback(site, host):
    assert not server._loopback_host(host)
    status, _, _ = get(site.base + "api/v1/status", {"Host": host} if host else {"Host": "x.example"})
    assert status == 403


@hypothesis_settings(max_examples=200, deadline=None)
@given(name=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True),
       port=st.integers(0, 65535), trick=st.sampled_from(["{lo}:{port}@{name}", "{lo}@{name}",
                                                          "{name}:{port}", "[{name}]", "{lo} {name}"]),
       lo=st.sampled_from(["127.0.0.1", "localhost", "[::1]"]))
def test_only_a_loopback_name_with_a_port_is_a_loopback_host(name, port, trick, lo):
    from torchcore.web.server import _loopback_address

    assert server._loopback_host(f"{lo}:{port}")
    text = trick.format(lo=lo, port=port, name=name)
    if trick == "{name}:{port}":
        assert server._loopback_host(text) == _loopback_address(name.rstrip("."))
    else:
        assert not server._loopback_host(text), text



@pytest.mark.slow     # waits out real timeouts: not a unit test
def test_a_cached_answer_is_never_older_than_twice_its_reuse_time(site):
    """Served stale while a background thread makes the next one, but only for as long again:
    after a quiet spell (a scrape every 15 s) the answer is made anew, not the last scrape's."""
    made = []

    def make():
        made.append(time.monotonic())
        return len(made)

    backend = site.backend
    assert backend._cached("probe", 0.3, make) == 1
    assert backend._cached("probe", 0.3, make) == 1        # fresh
    time.sleep(0.8)                                          # beyond twice 0.3
    assert backend._cached("probe", 0.3, make) == 2
    time.sleep(0.35)                                         # stale, within twice: served, renewed
    assert backend._cached("probe", 0.3, make) == 2
    deadline = time.monotonic() + 3
    while (len(made) < 3 or "probe" in backend._refreshing) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend._cached("probe", 0.3, make) == 3


@pytest.mark.parametrize("site_header, status", [("cross-site", 403), ("same-site", 403),
                                                 ("same-origin", 200), ("none", 200)])
def test_what_a_browser_sends_for_another_sites_page_is_refused(site, site_header, status):
    """No CORS already keeps another site's page from reading the API or sending the token; a
    page cannot even start a request here (a log follow held open, a POST) when its browser
    says it comes from another site.  The dashboard's own requests are same-origin."""
    headers = {"Sec-Fetch-Site": site_header}
    for route in ("api/v1/status", "api/v1/tasks/report/log/follow?lines=0", "metrics"):
        if status == 200 and "follow" in route:
            continue
        assert get(site.base + route, headers)[0] == status, route
    answer = get(site.base + "api/v1/reload", headers, method="POST")
    assert answer[0] == (403 if status == 403 else 401)
    assert get(site.base, headers)[0] == 200        # the page itself: a link from elsewhere works


@pytest.mark.slow     # waits out real timeouts: not a unit test
def test_a_request_must_arrive_whole_within_the_deadline(site, monkeypatch):
    """A client that sends its request a byte now and then (or idles) is cut off at the
    deadline, though every single read is quick; a log follow, past its request, goes on."""
    import socket

    monkeypatch.setattr(server, "REQUEST_DEADLINE", 1.0, raising=False)
    srv, thread = server.serve(site.backend, ("127.0.0.1", 0), poll_interval=0.05)
    port = srv.server_address[1]
    try:
        follow = socket.create_connection(("127.0.0.1", port), timeout=5)
        follow.sendall(b"GET /cron/api/v1/tasks/report/log/follow?lines=1 HTTP/1.1\r\n"
                       b"Host: localhost\r\n\r\n")
        assert follow.recv(65536).startswith(b"HTTP/1.1 200")
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        started = time.monotonic()
        closed = None
        for byte in b"GET /cron/api/v1/status HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40:
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = time.monotonic() - started
                break
            time.sleep(0.1)
            slow.setblocking(False)
            try:
                if slow.recv(65536) == b"":
                    closed = time.monotonic() - started
                    break
            except BlockingIOError:
                pass
            finally:
                slow.setblocking(True)
        slow.close()
        assert closed is not None and closed < 3.0, closed
        follow.settimeout(0.5)
        try:
            while True:
                assert follow.recv(65536) != b"", "the follow was ended"     # its lines, then
        except TimeoutError:                                                 # quiet: still open
            pass
        assert get(f"http://127.0.0.1:{port}/cron/api/v1/status")[0] == 200
        follow.close()
    finally:
        server.stop(srv, thread)
