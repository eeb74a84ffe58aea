"""The HTTP service's server (aiohttp on one asyncio loop): log follows as coroutines, not threads,
and blocking reads on the worker threads, so neither holds up the other clients.

A real server on a free loopback port in the test process, as in test_web_api.py; the margins are
seconds where the answers take milliseconds, so they hold on a loaded machine.
"""

import json
import os
import socket
import threading
import time
import urllib.request

import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("aiohttp")

from torchcore import tasklog
from torchcore.web import server
from torchcore.web.store import Backend

TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def site(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    os.chmod(tmp_path / "token", 0o600)
    (tmp_path / "tasks.yaml").write_text(
        "settings:\n  timezone: UTC\n  state_dir: state\n  http:\n    listen: 127.0.0.1:9\n"
        "    token_file: token\ntasks:\n  - {name: chatty, schedule: '* * * * *', command: 'true'}\n")
    backend = Backend(str(tmp_path / "tasks.yaml"))
    backend.live = lambda: None
    os.makedirs(backend.log_dir, exist_ok=True)
    log = tasklog.TaskLog(backend.log_dir, "chatty", 1, 1 << 20, 1)
    log.write("stdout", b"first line\n")
    srv, thread = server.serve(backend, ("127.0.0.1", 0))
    yield type("Site", (), {"backend": backend, "server": srv, "thread": thread, "log": log,
                            "port": srv.server_address[1],
                            "base": f"http://127.0.0.1:{srv.server_address[1]}/"})
    log.close()
    if thread.is_alive():
        server.stop(srv, thread)


def get(url, timeout=10, **kw):
    started = time.monotonic()
    with urllib.request.urlopen(urllib.request.Request(url, **kw), timeout=timeout) as response:
        return response.status, response.read(), time.monotonic() - started


def open_follow(port, version=b"1.1"):
    """A follow of chatty's log on a raw socket: (socket, what came with the answer's head)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /api/v1/tasks/chatty/log/follow?lines=1 HTTP/" + version +
                 b"\r\nHost: localhost\r\n\r\n")
    got = b""
    while b"first line" not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    return sock, got


def read_until(sock, words, seconds=10):
    sock.settimeout(seconds)
    got = b""
    while words not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    return got


def test_many_follows_hold_no_thread_and_do_not_slow_the_api(site):
    """MAX_FOLLOWERS clients follow a log at once: the process has no more threads than with one
    (a follow waits on the event loop; a worker reads the file only when it looks), the API
    answers meanwhile, each follow gets the new line, and one more follow is a 503."""
    first, _ = open_follow(site.port)
    follows = [first]
    try:
        baseline = threading.active_count()
        for _ in range(server.MAX_FOLLOWERS - 1):
            follows.append(open_follow(site.port)[0])
        assert threading.active_count() <= baseline + server.WORKERS, threading.enumerate()
        for _ in range(20):
            status, body, took = get(site.base + "api/v1/status")
            assert status == 200 and json.loads(body)["tasks"] == 1 and took < 3.0, took
        status, _, took = get(site.base + "static/app.js")
        assert status == 200 and took < 3.0
        try:
            get(site.base + "api/v1/tasks/chatty/log/follow")
            raise AssertionError("a follow beyond MAX_FOLLOWERS was served")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and b"followed already" in exc.read()
        site.log.write("stdout", b"news for everyone\n")
        for sock in follows:
            assert b"data: " in read_until(sock, b"news for everyone")
        assert threading.active_count() <= baseline + server.WORKERS
    finally:
        for sock in follows:
            sock.close()
    deadline = time.monotonic() + 10        # the follows of the clients gone are ended
    while site.server.service.followers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert site.server.service.followers == 0


def test_a_blocked_request_does_not_stall_the_others(site):
    """A control request the daemon does not answer (or a slow SQLite read) holds one worker
    thread: the loop goes on serving the others."""
    release = threading.Event()

    def control(cmd, **fields):
        release.wait(20)
        return {"ok": True, "run_id": 7, "executor_pid": 1}

    site.backend.control = control
    answers = []
    poster = threading.Thread(target=lambda: answers.append(get(
        site.base + "api/v1/tasks/chatty/run", timeout=30, method="POST",
        headers={"Authorization": f"Bearer {TOKEN}"})))
    poster.start()
    try:
        time.sleep(0.3)                     # the POST is in its worker, waiting
        for route in ("api/v1/status", "api/v1/history", "metrics", ""):
            status, _, took = get(site.base + route)
            assert status == 200 and took < 5.0, (route, took)
        sock, _ = open_follow(site.port)
        sock.close()
        assert not answers, "the POST did not wait for the daemon"
    finally:
        release.set()
        poster.join(30)
    (status, body, _), = answers
    assert status == 202 and json.loads(body)["run_id"] == 7


def test_a_follow_over_http_1_0_streams_without_chunks(site):
    """A reverse proxy speaking HTTP/1.0 to the service (nginx's proxy_pass by default) gets the
    events as they are, delimited by the connection's end."""
    sock, head = open_follow(site.port, b"1.0")
    try:
        assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
        assert b"\r\n\r\ndata: " in head
        site.log.write("stdout", b"later\n")
        assert b"data: " in read_until(sock, b"later")
    finally:
        sock.close()


def test_stopping_ends_the_follows_promptly(site):
    """SIGTERM's path: the follows end (their connections close) and the service is gone within
    STOP_WAIT, though a follow never ends by itself."""
    sock, _ = open_follow(site.port)
    started = time.monotonic()
    server.stop(site.server, site.thread)
    assert not site.thread.is_alive() and time.monotonic() - started < server.STOP_WAIT + 3
    sock.settimeout(5)
    while sock.recv(65536):         # the rest of the stream, then its end
        pass
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", site.port), timeout=2)


def test_a_follow_that_fails_ends_its_stream_only(site):
    def broken(task, lines, run_id, sleep=None):
        yield "one line"
        raise OSError("the log's disk went away")

    site.backend.follow = broken
    sock = socket.create_connection(("127.0.0.1", site.port), timeout=10)
    sock.sendall(b"GET /api/v1/tasks/chatty/log/follow HTTP/1.1\r\nHost: localhost\r\n\r\n")
    got = b""
    while chunk := sock.recv(65536):        # the line, then the stream's end
        got += chunk
    sock.close()
    assert got.startswith(b"HTTP/1.1 200") and b"data: one line" in got
    assert site.server.service.followers == 0
    assert get(site.base + "api/v1/status")[0] == 200


def test_a_client_that_does_not_read_is_cut_off_at_the_write_deadline(site, monkeypatch):
    """A follow and a big answer to clients that never read: once an answer (or an event) has
    waited WRITE_DEADLINE to be taken, the connection ends, the follow's place is free again,
    and what was waiting to be sent is dropped (a close would wait for it for ever).  The
    answers are larger than the kernel's socket buffers take (4 MiB), so some wait in the
    service's own."""
    monkeypatch.setattr(server, "WRITE_DEADLINE", 1.0)
    monkeypatch.setattr(server, "REQUEST_DEADLINE", 120.0)     # not what ends them
    line = b"y" * 1200 + b"\n"
    big = tasklog.TaskLog(site.backend.log_dir, "chatty", 2, 1 << 30, 1)     # not rotated
    big.write("stdout", line * 10000)                           # a 12 MB answer of log lines
    readers = []
    for path in (b"/api/v1/tasks/chatty/log/follow?lines=1", b"/api/v1/tasks/chatty/log?lines=10000"):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", site.port))
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        readers.append(sock)
    try:
        deadline = time.monotonic() + 20
        while site.server.service.followers == 0:
            assert time.monotonic() < deadline, "the follow did not start"
            time.sleep(0.05)
        for _ in range(12):         # the followed log grows by 12 MB
            big.write("stdout", line * 800)
            time.sleep(0.05)
        connections = site.server.service.connections.timers
        deadline = time.monotonic() + 30
        while site.server.service.followers or connections:
            assert time.monotonic() < deadline, (site.server.service.followers, len(connections))
            time.sleep(0.1)
        status, _, took = get(site.base + "api/v1/status")
        assert status == 200 and took < 3.0
    finally:
        big.close()
        for sock in readers:
            sock.close()


def _raw_get(port, target):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    sock.close()
    return int(got.split(b" ", 2)[1]), got.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("target, status", [
    (b"//metrics/api/v1/status", 404),          # not the API: a path, whatever urlsplit says
    (b"//localhost/api/v1/tasks/chatty/log", 404),
    (b"//api/v1/status", 404),
    (b"/api/v1/status", 200),
    (b"/api/v1/status?", 200),
    (b"http://localhost/api/v1/status", 200),   # the absolute form a proxy is sent
])
def test_a_path_that_starts_with_two_slashes_is_a_path(site, target, status):
    """A proxy that lets only /metrics through (nginx's location /metrics, which matches
    //metrics/... with its slashes merged and passes the target on as it came) must not open
    the API: //metrics/api/v1/... is the path /metrics/api/v1/..., not host 'metrics'."""
    got, body = _raw_get(site.port, target)
    assert got == status, body
