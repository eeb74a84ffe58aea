"""Control socket: a tiny selector loop here, real clients in other processes."""

import errno
import json
import logging
import os
import selectors
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from torchcore.control import MAX_REQUEST, ControlClient, ControlServer, send_tolerating_refusal, socket_path
from torchcore.errors import DaemonError

CLIENT_PRELUDE = textwrap.dedent("""
    import json, socket, sys, time
    from torchcore.control import ControlClient
    from torchcore.errors import DaemonError
    path = sys.argv[1]

    def connect():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        while True:
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:  # listen backlog full: the server is catching up
                time.sleep(0.01)

    def read_lines(sock, count):
        data = b""
        while data.count(b"\\n") < count:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return [json.loads(line) for line in data.splitlines()]

    def emit(obj):
        print(json.dumps(obj), flush=True)
""")


class Handler:
    """A stand-in for the supervisor's control handler."""

    def __init__(self):
        self.requests = []

    def control_status(self, request):
        self.requests.append(request)
        return {"tasks": 3, "running": ["backup"]}

    def control_run(self, request):
        self.requests.append(request)
        if request.get("task") != "x":
            raise DaemonError(f"no task named {request.get('task')!r}")
        return {"run_id": 17}

    def control_reload(self, request):
        return {"reloaded": True, "ok": "payload cannot override ok"}

    def control_boom(self, request):
        raise RuntimeError("handler exploded")

    def control_notadict(self, request):
        return [1, 2]

    def control_unencodable(self, request):
        return {"value": object()}


class Loop:
    """The supervisor's use of the server, reduced to the loop itself."""

    def __init__(self, state_dir, **options):
        self.handler = Handler()
        self.selector = selectors.DefaultSelector()
        self.server = ControlServer(socket_path(state_dir), self.handler, **options)
        self.server.register(self.selector)
        self.path = self.server.path

    def step(self, timeout=0.02):
        for key, mask in self.selector.select(timeout):
            assert key.data == self.server.handle_event
            key.data(key, mask)
        self.server.reap_idle(time.monotonic())

    def serve_while(self, alive, limit=30.0):
        deadline = time.monotonic() + limit
        while alive():
            assert time.monotonic() < deadline, "client did not finish"
            self.step()

    def client(self, body, limit=30.0):
        """Run client code in another process while serving; its stdout lines as JSON."""
        proc = subprocess.Popen([sys.executable, "-c", CLIENT_PRELUDE + textwrap.dedent(body),
                                 self.path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.serve_while(lambda: proc.poll() is None, limit)
        out, err = proc.communicate()
        assert proc.returncode == 0, err.decode()
        return [json.loads(line) for line in out.decode().splitlines()]

    def assert_still_serving(self):
        assert self.client("emit(ControlClient(path).request('ping'))")[0]["pong"] is True


@pytest.fixture
def loop(tmp_path):
    served = Loop(tmp_path / "state")
    yield served
    served.server.close()
    assert threading.active_count() == 1


def test_requests_and_replies(loop):
    replies = loop.client("""
        client = ControlClient(path)
        emit(client.request("ping"))
        emit(client.request("status"))
        emit(client.request("run", task="x"))
        emit(client.request("reload"))
    """)
    assert replies[0]["ok"] is True and replies[0]["pong"] is True
    assert replies[1] == {"ok": True, "tasks": 3, "running": ["backup"]}
    assert replies[2] == {"ok": True, "run_id": 17}
    assert replies[3] == {"ok": True, "reloaded": True}
    assert loop.handler.requests == [{"cmd": "status"}, {"cmd": "run", "task": "x"}]


def test_error_replies_raise_daemon_error_in_client(loop, caplog):
    caplog.set_level(logging.WARNING, logger="torchcore.control")
    replies = loop.client("""
        client = ControlClient(path)
        for cmd, fields in [("run", {"task": "nope"}), ("boom", {}), ("notadict", {}),
                            ("unencodable", {}), ("frobnicate", {})]:
            try:
                client.request(cmd, **fields)
                emit("no error")
            except DaemonError as exc:
                emit(str(exc))
    """)
    assert replies[0] == "run: no task named 'nope'"
    assert replies[1] == "boom: handler exploded"
    assert replies[2] == "notadict: command 'notadict' returned no valid reply"
    assert replies[3].startswith("unencodable: the daemon could not encode its reply")
    assert replies[4].startswith("frobnicate: unknown command 'frobnicate'; known: boom,")
    assert "handler exploded" in caplog.text
    loop.assert_still_serving()


def test_garbage_on_one_connection_gets_errors_and_the_connection_goes_on(loop):
    replies = loop.client(r"""
        sock = connect()
        sock.sendall(b'not json\n[1, 2]\n"text"\n42\n{}\n{"cmd": 7}\n{"cmd": "../etc"}\n'
                     b'\xff\xfe\n\n   \n{"cmd": "control_status"}\n{"cmd": "ping"}\n')
        emit(read_lines(sock, 10))
    """)[0]
    errors = [reply.get("error", "") for reply in replies]
    assert all(reply["ok"] is False for reply in replies[:9]), replies
    assert errors[0].startswith("invalid JSON")
    assert errors[1:4] == ["a request must be a JSON object like {\"cmd\": \"status\"}"] * 3
    assert errors[4:6] == ["a request needs a \"cmd\" string"] * 2
    assert errors[6].startswith("unknown command '../etc'")
    assert errors[7].startswith("invalid JSON")
    assert errors[8].startswith("unknown command 'control_status'")
    assert replies[9]["ok"] is True and replies[9]["pong"] is True
    loop.assert_still_serving()


def test_huge_request_is_refused_and_the_connection_closed(loop):
    replies = loop.client(f"""
        sock = connect()
        try:
            sock.sendall(b"x" * {MAX_REQUEST + 5000})
        except BrokenPipeError:
            pass
        emit(read_lines(sock, 1))
        emit(sock.recv(10) == b"")
        sock = connect()
        try:
            sock.sendall(b'{{"cmd": "ping", "pad": "' + b"y" * {MAX_REQUEST} + b'"}}\\n')
        except (BrokenPipeError, ConnectionResetError):
            pass
        emit(read_lines(sock, 1))
    """)
    assert replies[0] == [{"ok": False, "error": f"request too large (over {MAX_REQUEST} bytes)"}]
    assert replies[1] is True
    assert replies[2][0]["ok"] is False and "too large" in replies[2][0]["error"]
    assert loop.server.connections == {}
    loop.assert_still_serving()


def test_request_in_dribbles_and_pipelined(loop):
    replies = loop.client("""
        sock = connect()
        for byte in b'{"cmd": "run", "task": "x"}\\n':
            sock.send(bytes([byte]))
            time.sleep(0.002)
        emit(read_lines(sock, 1))
        sock.sendall(b'{"cmd": "ping"}\\n{"cmd": "status"}\\n{"cmd": "run", "task": "x"}\\n')
        emit(read_lines(sock, 3))
        sock.sendall(b'{"cmd": "status"}')  # no newline, then end of input
        sock.shutdown(socket.SHUT_WR)
        emit(read_lines(sock, 1))
    """)
    assert replies[0] == [{"ok": True, "run_id": 17}]
    assert [r.get("pong") or r.get("tasks") or r.get("run_id") for r in replies[1]] == [True, 3, 17]
    assert replies[2] == [{"ok": True, "tasks": 3, "running": ["backup"]}]


@pytest.mark.process
def test_stalled_client_is_dropped_others_are_served(tmp_path):
    loop = Loop(tmp_path / "state", idle_timeout=0.5)
    replies = loop.client("""
        stalled = connect()
        stalled.sendall(b'{"cmd": "pi')          # half a request, then nothing
        silent = connect()                        # connects and never speaks
        started = time.monotonic()
        emit(ControlClient(path).request("status")["tasks"])
        emit(stalled.recv(100) == b"" and silent.recv(100) == b"")
        emit(time.monotonic() - started)
    """)
    assert replies[0] == 3
    assert replies[1] is True
    assert 0.3 < replies[2] < 5.0
    assert loop.server.connections == {}
    loop.server.close()


@pytest.mark.process
def test_many_clients_and_the_connection_limit(tmp_path):
    loop = Loop(tmp_path / "state", max_connections=64)
    replies = loop.client("""
        socks = [connect() for _ in range(80)]    # all open at once
        time.sleep(0.3)
        results = []
        for sock in socks:
            try:
                sock.sendall(b'{"cmd": "ping"}\\n')
            except OSError:
                pass
            reply = read_lines(sock, 1)
            results.append(reply[0] if reply else None)
        emit([r["ok"] if r else None for r in results])
        emit(sorted({r["error"] for r in results if r and not r["ok"]}))
        for sock in socks:
            sock.close()
        emit(sum(ControlClient(path).request("ping")["pong"] for _ in range(200)))
    """)
    assert replies[0].count(True) == 64
    assert replies[0].count(False) == 16
    assert replies[1] == ["too many control connections; try again shortly"]
    assert replies[2] == 200
    loop.server.close()


def test_socket_and_state_dir_permissions(loop, tmp_path):
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    info = os.lstat(loop.path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600


def test_state_dir_open_to_others_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    with pytest.raises(DaemonError, match=r"accessible by group or others \(mode 0755\); "
                                          r"run: chmod 700"):
        ControlServer(socket_path(state), Handler())
    assert not (state / "control.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_state_dir_owned_by_another_user_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(DaemonError, match="is owned by uid 65534"):
        ControlServer(socket_path(state), Handler())


def test_stale_socket_replaced_live_socket_and_other_files_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(state / "control.sock"))
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves
    first = Loop(state)
    assert first.client("emit(ControlClient(path).request('status'))")[0]["tasks"] == 3
    with pytest.raises(DaemonError, match="another process is serving the control socket"):
        ControlServer(socket_path(state), Handler())
    assert os.path.exists(first.path)
    first.server.close()
    assert not os.path.exists(first.path)
    (state / "control.sock").write_text("not a socket")
    with pytest.raises(DaemonError, match="exists and is not a socket"):
        ControlServer(socket_path(state), Handler())


def test_peer_uid_checked_with_so_peercred(tmp_path, caplog):
    loop = Loop(tmp_path / "state", allowed_uids=[os.geteuid() + 4242])
    replies = loop.client("""
        sock = connect()
        emit(read_lines(sock, 1))
        try:
            ControlClient(path).request("status")
        except DaemonError as exc:
            emit(str(exc))
    """)
    uid = os.geteuid()
    assert replies[0] == [{"ok": False,
                           "error": f"permission denied: uid {uid} may not control this daemon"}]
    assert replies[1] == f"status: permission denied: uid {uid} may not control this daemon"
    assert loop.handler.requests == []
    assert f"refused a client with uid {uid}" in caplog.text
    loop.server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_other_user_refused_even_when_permissions_are_loosened():
    base = tempfile.mkdtemp()
    try:
        loop = Loop(os.path.join(base, "state"))
        for path, mode in [(base, 0o711), (os.path.dirname(loop.path), 0o711),
                           (loop.path, 0o666)]:
            os.chmod(path, mode)
        reply = as_other_user_request(loop, 65534)
        assert reply == {"ok": False, "error": "permission denied: uid 65534 may not control "
                                               "this daemon"}
        assert loop.handler.requests == []
        loop.server.close()
    finally:
        shutil.rmtree(base)


def as_other_user_request(loop, uid):
    """Fork; the child becomes ``uid`` and sends a status request; return its reply."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(loop.path)
                send_tolerating_refusal(sock, b'{"cmd": "status"}\n')
                os.write(write_fd, sock.recv(4096))
        finally:
            os._exit(0)
    os.close(write_fd)
    loop.serve_while(lambda: os.waitpid(child, os.WNOHANG) == (0, 0))
    with os.fdopen(read_fd, "rb") as pipe:
        return json.loads(pipe.read())


def test_client_errors_when_daemon_unreachable(tmp_path):
    with pytest.raises(DaemonError, match="torchcore is not running \\(no control socket at"):
        ControlClient(str(tmp_path / "control.sock")).request("status")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    with pytest.raises(DaemonError, match="nobody listens on"):
        ControlClient(str(tmp_path / "dead.sock")).request("status")


@pytest.mark.process
def test_client_times_out_on_a_daemon_that_does_not_answer(tmp_path):
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(1)
    started = time.monotonic()
    with pytest.raises(DaemonError, match=r"did not answer 'status' within 0\.3s"):
        ControlClient(str(tmp_path / "mute.sock"), timeout=0.3).request("status")
    assert time.monotonic() - started < 3
    mute.close()


def test_close_removes_socket_and_unregisters(tmp_path):
    loop = Loop(tmp_path / "state")
    loop.client("import socket as s; c = connect(); c.sendall(b'{\"cmd\": \"ping\"}\\n');"
                " emit(read_lines(c, 1))")
    loop.server.close()
    assert not os.path.exists(loop.path)
    assert len(loop.selector.get_map()) == 0
    with pytest.raises(DaemonError, match="not running"):
        ControlClient(loop.path).request("ping")


@pytest.mark.process
def test_handle_event_never_raises_on_a_vanished_peer(loop):
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_PRELUDE + textwrap.dedent("""
        for _ in range(20):
            sock = connect()
            sock.sendall(b'{"cmd": "status"}\\n' * 2000)   # replies pile up, never read
            sock.close()
    """), loop.path])
    loop.serve_while(lambda: proc.poll() is None)
    for _ in range(50):
        loop.step()
    assert proc.returncode == 0
    loop.assert_still_serving()


def test_close_fds_in_forked_child_leaves_the_server_alone(loop):
    loop.client("c = connect(); c.sendall(b'{\"cmd\": \"ping\"}\\n'); emit(read_lines(c, 1))")
    child = os.fork()
    if child == 0:
        try:
            loop.server.close_fds()
            code = 0 if os.path.exists(loop.path) else 1
        finally:
            os._exit(locals().get("code", 2))
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.path.exists(loop.path)
    loop.assert_still_serving()


def test_out_of_descriptors_pauses_accepting_instead_of_spinning(loop, monkeypatch):
    def no_descriptors(sock):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket.socket, "accept", no_descriptors)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(loop.path)  # waits in the listen backlog
    client.sendall(b'{"cmd": "status"}\n')
    loop.step()
    assert loop.server.accept_paused_until is not None
    assert loop.selector.select(0.05) == []  # nothing left to wake the loop needlessly
    monkeypatch.undo()
    loop.server.reap_idle(time.monotonic() + 2)  # the pause is over
    client.settimeout(0.01)
    reply = b""
    deadline = time.monotonic() + 10
    while not reply.endswith(b"\n"):
        assert time.monotonic() < deadline
        loop.step()
        try:
            reply += client.recv(4096)
        except TimeoutError:
            pass
    assert json.loads(reply)["tasks"] == 3
    client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to serve a socket as another user")
def test_client_refuses_a_socket_served_by_another_user(tmp_path):
    """A control socket someone else serves (a planted state_dir) is not talked to."""
    path = str(tmp_path / "control.sock")
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(path)
            os.setgid(65534)
            os.setuid(65534)                # SO_PEERCRED reports who called listen()
            server.listen(1)
            os.write(ready_w, b"x")
            conn, _ = server.accept()
            conn.sendall(b'{"ok": true, "tasks": 0}\n')
            conn.recv(1)
        finally:
            os._exit(0)
    try:
        os.close(ready_w)
        os.read(ready_r, 1)
        with pytest.raises(DaemonError, match=rf"served by pid {child} running as uid 65534"):
            ControlClient(path).request("status")
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(ready_r)
