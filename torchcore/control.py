"""The control socket: small JSON requests to the running daemon, served from its select loop.

Protocol: one JSON object per line, one reply line each. ``{"cmd": "status"}``
-> ``{"ok": true, ...}``; anything wrong -> ``{"ok": false, "error": "..."}``.

The server never blocks and never starts a thread: the supervisor registers it
on its selector and calls it back::

    server = ControlServer(socket_path(state_dir), handler)
    server.register(selector)
    ...
    for key, mask in selector.select(timeout):
        if key.data == server.handle_event:       # a bound method: compare with ==, not is
            server.handle_event(key, mask)        # (or: if callable(key.data): key.data(key, mask))
    server.reap_idle(time.monotonic())

``handler`` is any object with ``control_<cmd>(request) -> dict`` methods;
the dict is the reply's payload.  A handler that can only answer later (a reload waiting for
its file's verdict) returns a ``Later`` and calls its ``send(payload)`` or ``fail(message)``
when it knows: that connection reads no further request meanwhile and is never idle.
Access control is layered: the state
directory must be 0700 and ours, the socket is 0600, and every peer's uid is
checked with SO_PEERCRED (ours or root).
"""

import errno
import json
import logging
import os
import re
import selectors
import socket
import stat
import struct
import time

from torchcore import paths
from torchcore.errors import DaemonError, TorchcoreError
from torchcore.safepaths import STATE_DIR_MODE, secure_dir

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
IDLE_TIMEOUT = 5.0
MAX_CONNECTIONS = 64
ACCEPTS_PER_EVENT = 16
LISTEN_BACKLOG = 128
ACCEPT_PAUSE = 1.0  # seconds without accepting after running out of descriptors
CMD_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,39}")
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path(state_dir):
    """Where the control socket of a daemon with this state_dir lives."""
    return paths.control_socket(state_dir)


def prepare_state_dir(state_dir):
    """Create state_dir 0700 if missing; refuse one we do not own or others can enter.

    The whole path is checked (safepaths.secure_dir): a state_dir another user
    pre-created, or reached through a directory or symlink they control, is refused.
    """
    secure_dir(state_dir, STATE_DIR_MODE, what="state directory", private=True)


def error_reply(message):
    return {"ok": False, "error": message}


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    return UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))


class Connection:
    """One accepted client: its buffers and when it last made progress."""

    def __init__(self, sock, peer_pid, now):
        self.sock = sock
        self.peer_pid = peer_pid
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.last_active = now
        self.closing = False  # close once outbuf is flushed
        self.waiting = None   # the Later whose reply this connection waits for


class Later:
    """A reply the handler gives later (see the module docstring)."""

    def __init__(self):
        self.reply = None
        self._deliver = None

    def send(self, payload):
        self._done({**payload, "ok": True})

    def fail(self, message):
        self._done(error_reply(message))

    def _done(self, reply):
        if self.reply is None:
            self.reply = reply
            if self._deliver is not None:
                self._deliver(reply)

    def attach(self, deliver):
        self._deliver = deliver
        if self.reply is not None:
            deliver(self.reply)


class ControlServer:
    """Non-blocking, selector-driven JSON-lines server on a unix socket."""

    def __init__(self, path, handler, idle_timeout=IDLE_TIMEOUT,
                 max_connections=MAX_CONNECTIONS, allowed_uids=None, clock=time.monotonic):
        self.path = os.path.abspath(path)
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.allowed_uids = frozenset(allowed_uids if allowed_uids is not None
                                      else (os.geteuid(), 0))
        self.clock = clock
        self.connections = {}  # fd -> Connection
        self.selector = None
        self.accept_paused_until = None  # set while out of descriptors (EMFILE)
        prepare_state_dir(os.path.dirname(self.path))
        remove_stale_socket(self.path)
        self.listener, self.inode = bind_listener(self.path, LISTEN_BACKLOG)

    def fileno(self):
        return self.listener.fileno()

    def register(self, selector):
        """Register the listening socket; accepted connections join the same selector."""
        self.selector = selector
        selector.register(self.listener, selectors.EVENT_READ, self.handle_event)

    def handle_event(self, key, mask):
        """Serve one selector event; never raises into the loop."""
        if key.fileobj is self.listener:
            try:
                self.accept_some()
            except Exception:  # a bug of ours must not stop the daemon
                log.exception("control: accepting a client failed")
            return
        conn = self.connections.get(key.fd)
        if conn is None:
            return
        try:
            if mask & selectors.EVENT_WRITE:
                self.flush(conn)
            elif mask & selectors.EVENT_READ:
                self.receive(conn)
        except OSError as exc:
            log.debug("control connection dropped: %s", exc)
            self.drop(conn)
        except Exception:
            log.exception("control connection failed; dropping it")
            self.drop(conn)

    def reap_idle(self, now):
        """Drop connections that made no progress for idle_timeout seconds.

        Also resumes accepting after a pause for lack of descriptors.
        """
        if self.accept_paused_until is not None and now >= self.accept_paused_until:
            self.accept_paused_until = None
            self.selector.register(self.listener, selectors.EVENT_READ, self.handle_event)
        for conn in list(self.connections.values()):
            if now - conn.last_active > self.idle_timeout and conn.waiting is None:
                log.info("control: dropping a client idle for %.1fs (pid %s)",
                         now - conn.last_active, conn.peer_pid)
                self.drop(conn)

    def close(self):
        """Close every socket and remove the socket file if it is still ours."""
        for conn in list(self.connections.values()):
            self.drop(conn)
        if self.selector is not None:
            self.unregister(self.listener)
        self.listener.close()
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass

    def close_fds(self):
        """In a forked child: close the inherited descriptors, touch nothing else."""
        for conn in self.connections.values():
            conn.sock.close()
        self.listener.close()

    # --- connections -------------------------------------------------------------------------

    def accept_some(self):
        """Accept pending clients (a bounded number per event, so others get their turn)."""
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: pause, or the loop would spin
                log.warning("control: cannot accept a client: %s; pausing for %gs",
                            exc.strerror, ACCEPT_PAUSE)
                self.unregister(self.listener)
                self.accept_paused_until = self.clock() + ACCEPT_PAUSE
                return
            self.admit(sock)

    def admit(self, sock):
        """Check the peer and the connection limit, then start serving it."""
        sock.setblocking(False)
        try:
            peer_pid, uid, _ = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        if uid not in self.allowed_uids:
            log.warning("control: refused a client with uid %d (pid %d)", uid, peer_pid)
            self.refuse(sock, f"permission denied: uid {uid} may not control this daemon")
        elif len(self.connections) >= self.max_connections:
            log.warning("control: refused a client: %d connections open", len(self.connections))
            self.refuse(sock, "too many control connections; try again shortly")
        else:
            self.connections[sock.fileno()] = Connection(sock, peer_pid, self.clock())
            self.selector.register(sock, selectors.EVENT_READ, self.handle_event)

    @staticmethod
    def refuse(sock, message):
        """Best-effort error line to a client we will not serve, then close."""
        try:
            sock.send(encode(error_reply(message)))
        except OSError:
            pass
        sock.close()

    def receive(self, conn):
        """Read what is there, answer every complete line."""
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):  # spurious readiness
            return
        conn.last_active = self.clock()
        if not data:  # the client finished sending: answer a last unterminated line, then close
            if conn.inbuf.strip() and conn.waiting is None:
                conn.outbuf += self.answer(bytes(conn.inbuf), conn)
            conn.inbuf.clear()
            conn.closing = True
        else:
            conn.inbuf += data
            self.answer_lines(conn)
        self.flush(conn)

    def answer_lines(self, conn):
        """Move replies for complete lines into outbuf; an oversized request ends the connection."""
        while not conn.closing and conn.waiting is None:
            end = conn.inbuf.find(b"\n")
            if end < 0:
                if len(conn.inbuf) > MAX_REQUEST:
                    self.reject_oversized(conn)
                return
            line = bytes(conn.inbuf[:end])
            del conn.inbuf[:end + 1]
            if len(line) > MAX_REQUEST:
                self.reject_oversized(conn)
            elif line.strip():
                conn.outbuf += self.answer(line, conn)

    @staticmethod
    def reject_oversized(conn):
        conn.outbuf += encode(error_reply(f"request too large (over {MAX_REQUEST} bytes)"))
        conn.inbuf.clear()
        conn.closing = True

    def flush(self, conn):
        """Send what we can; wait for writability while replies are pending."""
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent:
                del conn.outbuf[:sent]
                conn.last_active = self.clock()
        if conn.outbuf:
            self.selector.modify(conn.sock, selectors.EVENT_WRITE, self.handle_event)
        elif conn.closing and conn.waiting is None:
            self.drop(conn)
        else:
            self.selector.modify(conn.sock, selectors.EVENT_READ, self.handle_event)

    def drop(self, conn):
        if conn.sock.fileno() < 0:  # already dropped
            return
        self.connections.pop(conn.sock.fileno(), None)
        self.unregister(conn.sock)
        conn.sock.close()

    def unregister(self, sock):
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    # --- requests ----------------------------------------------------------------------------

    def answer(self, line, conn=None):
        """One request line -> one encoded reply line (nothing yet for a Later: see _late)."""
        reply = self.dispatch(line)
        if isinstance(reply, Later):
            if conn is None:
                return encode(error_reply("this request cannot wait for its reply"))
            conn.waiting = reply
            reply.attach(lambda late: self._late(conn, late))
            return b""
        return self._encode(reply)

    def _late(self, conn, reply):
        """The reply a connection waited for: sent, then its next requests are read."""
        conn.waiting = None
        if conn.sock.fileno() < 0:
            return          # the client went away meanwhile
        conn.outbuf += self._encode(reply)
        conn.last_active = self.clock()
        try:
            self.answer_lines(conn)
            self.flush(conn)
        except OSError as exc:
            log.debug("control connection dropped: %s", exc)
            self.drop(conn)

    @staticmethod
    def _encode(reply):
        try:
            return encode(reply)
        except (TypeError, ValueError) as exc:
            log.warning("control: reply is not JSON-serialisable: %s", exc)
            return encode(error_reply(f"the daemon could not encode its reply: {exc}"))

    def dispatch(self, line):
        """Parse, validate and run one request; always returns a reply dict."""
        try:
            request = json.loads(line)
        except ValueError as exc:  # includes UnicodeDecodeError
            return error_reply(f"invalid JSON: {exc}")
        if not isinstance(request, dict):
            return error_reply("a request must be a JSON object like {\"cmd\": \"status\"}")
        cmd = request.get("cmd")
        if not isinstance(cmd, str) or not cmd:
            return error_reply("a request needs a \"cmd\" string")
        method = self.command(cmd)
        if method is None:
            return error_reply(f"unknown command {cmd[:40]!r}; known: {', '.join(self.commands())}")
        return self.run_command(cmd, method, request)

    def command(self, cmd):
        if not CMD_PATTERN.fullmatch(cmd):
            return None
        method = getattr(self.handler, f"control_{cmd}", None)
        if method is None and cmd == "ping":
            return self.control_ping
        return method if callable(method) else None

    def commands(self):
        names = {name[len("control_"):] for name in dir(self.handler)
                 if name.startswith("control_") and callable(getattr(self.handler, name))}
        return sorted(names | {"ping"})

    def run_command(self, cmd, method, request):
        """Call the handler; its exception becomes an error reply and a warning."""
        try:
            payload = method(request)
        except TorchcoreError as exc:
            log.warning("control command %s failed: %s", cmd, exc)
            return error_reply(str(exc))
        except Exception as exc:
            log.warning("control command %s failed: %s", cmd, exc, exc_info=True)
            return error_reply(str(exc) or type(exc).__name__)
        if payload is None:
            payload = {}
        if isinstance(payload, Later):
            return payload
        if not isinstance(payload, dict):
            log.warning("control command %s returned %s, not a dict", cmd, type(payload).__name__)
            return error_reply(f"command {cmd!r} returned no valid reply")
        return {**payload, "ok": True}

    @staticmethod
    def control_ping(request):
        """Built-in liveness check, unless the handler defines its own."""
        return {"pong": True, "pid": os.getpid()}


def encode(reply):
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


def remove_stale_socket(path):
    """Remove a socket file nobody listens on; refuse a live socket or any other file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise DaemonError(f"{path} exists and is not a socket; remove it or choose another "
                          "state_dir")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale control socket %s", path)
        return
    except OSError as exc:
        raise DaemonError(f"cannot check the existing control socket {path}: "
                          f"{exc.strerror or exc}") from None
    finally:
        probe.close()
    raise DaemonError(f"another process is serving the control socket {path}; "
                      "is a second daemon using the same state_dir?")


def bind_listener(path, backlog):
    """A non-blocking listening socket at path, mode 0600 from birth; returns (sock, inode)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # single-threaded: the umask change is not seen elsewhere
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot create the control socket {path}: "
                          f"{exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock, os.stat(path).st_ino


class ControlClient:
    """Blocking client for the CLI: one request, one reply, clear errors."""

    def __init__(self, path, timeout=5.0):
        self.path = path
        self.timeout = timeout
        self.peer_pid = None        # the pid serving the socket (SO_PEERCRED), set by connect

    def request(self, cmd, **fields):
        """Send ``{"cmd": cmd, **fields}``; the reply dict, or DaemonError."""
        line = json.dumps({"cmd": cmd, **fields}).encode() + b"\n"
        with self.connect() as sock:
            try:
                send_tolerating_refusal(sock, line)
                raw = self.read_line(sock)
            except TimeoutError:
                raise DaemonError(f"the daemon did not answer {cmd!r} within {self.timeout:g}s "
                                  f"(socket {self.path})") from None
            except OSError as exc:
                raise DaemonError(f"lost the connection to the daemon ({self.path}): "
                                  f"{exc.strerror or exc}") from None
        return self.parse(raw, cmd)

    def connect(self):
        """Connect, waiting out a full listen backlog (EAGAIN) until the timeout."""
        deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        while True:
            try:
                sock.connect(self.path)
                return self.checked_server(sock)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                sock.close()
                raise DaemonError(f"the daemon is too busy to accept a connection on "
                                  f"{self.path}; try again") from None
            except OSError as exc:
                sock.close()
                raise DaemonError(self.connect_error(exc)) from None

    def checked_server(self, sock):
        """The socket, if the process serving it runs as root or as us (SO_PEERCRED).

        A socket another user serves (their state_dir, or a path they planted) could
        answer anything; its pid is kept in ``peer_pid``, the kernel's word on who serves.
        """
        pid, uid, _ = peer_credentials(sock)
        if uid not in (0, os.geteuid()):
            sock.close()
            from torchcore.safepaths import owner_name

            raise DaemonError(f"the control socket {self.path} is served by pid {pid} running "
                              f"as {owner_name(uid)}, not by root or "
                              f"{owner_name(os.geteuid())}; refusing to talk to it")
        self.peer_pid = pid
        return sock

    def connect_error(self, exc):
        if exc.errno == errno.ENOENT:
            return f"torchcore is not running (no control socket at {self.path})"
        if exc.errno == errno.ECONNREFUSED:
            return f"torchcore is not running (nobody listens on {self.path})"
        if exc.errno == errno.EACCES:
            return (f"permission denied on the control socket {self.path}; run this as the "
                    "daemon's user or root")
        return f"cannot reach the daemon at {self.path}: {exc.strerror or exc}"

    def read_line(self, sock):
        """Read up to the first newline (or EOF), within the overall timeout."""
        deadline = time.monotonic() + self.timeout
        data = bytearray()
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return bytes(data.split(b"\n", 1)[0])

    def parse(self, raw, cmd):
        if not raw:
            raise DaemonError(f"the daemon closed the connection without answering {cmd!r}")
        try:
            reply = json.loads(raw)
        except ValueError:
            raise DaemonError(f"the daemon sent an unreadable reply to {cmd!r}") from None
        if not isinstance(reply, dict):
            raise DaemonError(f"the daemon sent an unreadable reply to {cmd!r}")
        if not reply.get("ok"):
            raise DaemonError(f"{cmd}: {reply.get('error', 'the daemon reported an error')}")
        return reply


def send_tolerating_refusal(sock, data):
    """sendall, except that a peer that already closed may have left a reply to read.

    A refused client (wrong uid, too many connections) is sent its error line
    and closed at once, possibly before its request is written.
    """
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
