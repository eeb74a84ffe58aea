"""The ``torchcore: http`` process: an HTTP server for /metrics, the API and the dashboard.

Started by the supervisor (services.py) as ``python -m torchcore.web --taskfile PATH
--state-dir DIR --node NAME --parent-fd FD [--listen ADDR]``:

- SIGTERM (or SIGINT): stop serving and exit promptly;
- SIGHUP: read the task file again (base path, token file, tasks);
- end of file on ``--parent-fd``: the supervisor is gone, exit.

The HTTP stack is the standard library's ``ThreadingHTTPServer`` (a thread per connection;
the request line and headers parsed by ``http.server``): the service reads SQLite and a
unix socket, so it needs no event loop, and the daemon's install stays free of a web
framework.  Only prometheus-client is added, by the ``torchcore[http]`` extra.
"""

import ipaddress
import json
import logging
import os
import re
import selectors
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from torchcore.errors import TorchcoreError
from torchcore.web import api as api_mod
from torchcore.web.settings import parse_listen

log = logging.getLogger("torchcore.web")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
MAX_BODY = 64 << 10
MAX_FOLLOWERS = 32          # log follows streaming at once (each holds a thread)
MAX_CONNECTIONS = 128       # connections open at once (each holds a thread); beyond: 503
REQUEST_DEADLINE = 20.0     # seconds to send a whole request (line, headers, body), or to idle
FOLLOW_POLL = 0.5           # seconds between looks at a followed log
HEARTBEAT = 15.0            # seconds between keep-alive comments on a quiet follow
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
)


class Service:
    """What the handler threads share: the backend, the API, the metrics, the static files."""

    def __init__(self, backend):
        from torchcore.web.metrics import Metrics

        self.backend = backend
        self.api = api_mod.Api(backend)
        self.metrics = Metrics(backend)
        self.static = load_static()
        self.stopping = threading.Event()
        self.followers = threading.BoundedSemaphore(MAX_FOLLOWERS)


def load_static():
    """The dashboard's files, read once: {name: (content type, bytes)}."""
    files = {}
    for name in os.listdir(STATIC_DIR):
        kind = STATIC_TYPES.get(os.path.splitext(name)[1])
        if kind:
            with open(os.path.join(STATIC_DIR, name), "rb") as handle:
                files[name] = (kind, handle.read())
    return files


class Handler(BaseHTTPRequestHandler):
    server_version = "torchcore"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 60                # an idle or stalled connection is dropped
    disable_nagle_algorithm = True      # headers and body are two writes: no 40 ms wait for an ACK

    @property
    def service(self):
        return self.server.service

    def log_message(self, format, *args):
        log.debug("http: %s %s", self.address_string(), format % args)

    def handle_one_request(self):
        """One request, which must arrive whole within REQUEST_DEADLINE (a client sending a byte
        now and then would otherwise hold its thread for ever: the socket's timeout is per read)."""
        self.server.watch(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch(self.connection)

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_OTHER(self):
        """Any other method: 405 with the ones the resource takes (not http.server's 501 page)."""
        self.dispatch(self.command)

    def __getattr__(self, name):        # http.server looks up do_<METHOD>: every method has one
        if name.startswith("do_"):
            return self.do_OTHER
        raise AttributeError(name)

    def dispatch(self, method):
        head = method == "HEAD"
        try:
            self.route(method)
        except api_mod.HttpError as exc:
            self.send_json(exc.status, {"error": exc.message} if exc.message else None, exc.headers,
                           head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except TorchcoreError as exc:     # the records could not be read, ...
            log.warning("http: %s %s: %s", method, self.path, exc)
            self.send_json(503, {"error": str(exc)}, head=head)
        except Exception:
            log.exception("http: %s %s failed", method, self.path)
            self.send_json(500, {"error": "internal error; the service's log says more"}, head=head)

    def route(self, method):
        self.drain_body()       # first: whatever is refused below, the next request starts clean
        self.server.unwatch(self.connection)        # all of it came in time
        if self.server.loopback and not _loopback_host(self.headers.get("Host", "")):
            # a page elsewhere that rebinds its own name to 127.0.0.1 gets nothing from here
            raise api_mod.HttpError(403, "this service answers to a loopback Host only "
                                         "(localhost, 127.0.0.1, [::1])")
        url = urlsplit(self.path)
        base = self.service.backend.base_path
        if url.path + "/" == base:
            raise api_mod.HttpError(308, "", [("Location", base)])
        if not url.path.startswith(base):
            raise api_mod.HttpError(404, f"no such resource: {url.path} (the base path is {base})")
        path = url.path[len(base):]
        if path.startswith(("api/", "metrics")) and \
                self.headers.get("Sec-Fetch-Site", "").strip().lower() in ("cross-site", "same-site"):
            # a browser says another site's page sent it: the dashboard's own requests are
            # same-origin, so nothing that page can start (a log follow held open, a
            # 10,000-run history, a POST) reaches the routes
            raise api_mod.HttpError(403, "not from another site's page (Sec-Fetch-Site)")
        headers = {k.lower(): v for k, v in self.headers.items()}
        if path.startswith(("api/", "metrics")) and self.service.backend.auth == "all":
            # settings.http.auth: all: nothing of the records without the token (the
            # dashboard's own files, the same for everyone, come without it and ask for it)
            self.service.api.authorize(api_mod.Request(method, path, {}, headers),
                                       "this service needs its token for every request "
                                       "(settings.http.auth: all)")
        if path == "metrics" and method in ("GET", "HEAD"):
            body, kind = self.service.metrics.exposition(self.headers.get("Accept"))
            return self.send(200, kind, body, head=method == "HEAD")
        if path in ("metrics", "api/v1/openapi.json") and method not in ("GET", "HEAD"):
            raise api_mod.HttpError(405, f"/{path} takes GET", [("Allow", "GET, HEAD")])
        if path == "api/v1/openapi.json":
            from torchcore.web.openapi import document

            return self.send_json(200, document(self.service.api, base), head=method == "HEAD")
        if not path.startswith("api/"):
            return self.send_static(path, method)
        try:
            query = parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query),
                             max_num_fields=32)
        except ValueError as exc:
            raise api_mod.HttpError(400, f"bad query string: {exc}") from None
        request = api_mod.Request(method="GET" if method == "HEAD" else method, path=path,
                                  query=query, headers=headers)
        status, body = self.service.api.handle(request)
        if isinstance(body, api_mod.Stream):
            if method == "HEAD":
                return self.send(200, "text/event-stream; charset=utf-8", b"", head=True)
            return self.stream(body)
        self.send_json(status, body, head=method == "HEAD")

    def drain_body(self):
        """Read and drop a request's body, whatever the method: left unread, a body would be
        parsed as the next request on the connection (a request smuggled past a proxy).  A
        body this server cannot delimit (chunked, a bad or repeated Content-Length) ends the
        connection."""
        lengths = self.headers.get_all("Content-Length") or ["0"]
        length = lengths[0].strip()
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise api_mod.HttpError(411, "send a request body with Content-Length, not "
                                         "Transfer-Encoding")
        if len(lengths) > 1 or not length.isascii() or not length.isdigit():
            self.close_connection = True
            raise api_mod.HttpError(400, "bad Content-Length")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise api_mod.HttpError(413, f"a request body of at most {MAX_BODY} bytes")
        if int(length):
            self.rfile.read(int(length))

    def send_static(self, path, method):
        if method not in ("GET", "HEAD"):
            raise api_mod.HttpError(405, "the dashboard's pages take GET", [("Allow", "GET, HEAD")])
        name = "index.html" if path == "" else path.removeprefix("static/")
        if name == path and path != "":
            raise api_mod.HttpError(404, f"no such resource: /{path}")
        found = self.service.static.get(name)
        if found is None:
            raise api_mod.HttpError(404, f"no such resource: /{path}")
        kind, body = found
        self.send(200, kind, body, head=method == "HEAD", cache="no-cache")

    def send_json(self, status, body, headers=(), head=False):
        data = b"" if body is None else json.dumps(body, indent=1).encode() + b"\n"
        self.send(status, "application/json", data, headers, head=head)

    def send(self, status, kind, data, headers=(), head=False, cache="no-store"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        for name, value in SECURITY_HEADERS + tuple(headers):
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def stream(self, body):
        """Server-sent events: one ``data:`` event per log line, until the client goes."""
        service = self.service
        if not service.followers.acquire(blocking=False):
            raise api_mod.HttpError(503, f"{MAX_FOLLOWERS} logs are followed already; try later")
        try:
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            for name, value in SECURITY_HEADERS:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.flush()
            quiet = [time.monotonic()]

            def sleep(seconds):
                if service.stopping.wait(FOLLOW_POLL):
                    raise _Done()
                if time.monotonic() - quiet[0] >= HEARTBEAT:
                    self.wfile.write(b": still here\n\n")
                    self.wfile.flush()
                    quiet[0] = time.monotonic()

            for line in body.lines(sleep):
                self.wfile.write(b"data: " + line.encode("utf-8", "replace") + b"\n\n")
                self.wfile.flush()
                quiet[0] = time.monotonic()
        except (_Done, BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            service.followers.release()


class _Done(Exception):
    """The service stops: end a follow."""


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, service):
        host, port = address
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.service = service
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.deadlines = {}         # socket -> monotonic time its request must have arrived by
        self.deadlines_lock = threading.Lock()
        super().__init__((host, port), Handler)
        self.loopback = _loopback_address(self.server_address[0])

    def process_request(self, request, client_address):
        """A thread for the connection, while fewer than MAX_CONNECTIONS are open; beyond that a
        503 written from here and the connection closed, so that clients holding connections
        open (slowloris) cannot use up the process's threads and file descriptors."""
        if not self.slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(_BUSY)
                request.recv(65536)     # what came already: closed unread, it would reset the
            except OSError:             # connection before the client reads the 503
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def watch(self, sock):
        with self.deadlines_lock:
            self.deadlines[sock] = time.monotonic() + REQUEST_DEADLINE

    def unwatch(self, sock):
        with self.deadlines_lock:
            self.deadlines.pop(sock, None)

    def service_actions(self):
        """serve_forever's hook, at least every poll interval: end the connections whose
        request is late (the read waiting in their thread returns; the thread ends)."""
        now = time.monotonic()
        with self.deadlines_lock:
            late = [sock for sock, deadline in self.deadlines.items() if deadline <= now]
            for sock in late:
                del self.deadlines[sock]
        for sock in late:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        """A connection that failed outside the routes (ended while its request was read, ...):
        a line in the debug log, not a traceback on the daemon's log."""
        log.debug("http: connection from %s ended: %s", client_address[0], sys.exc_info()[1])

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Content-Length: 50\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
         b'{"error": "too many open connections; try later"}\n')


def _loopback_address(text):
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return text == "localhost"


_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]@/\s]+))(?::[0-9]{0,5})?")


def _loopback_host(header):
    """Whether a Host header is a loopback name of this machine, with or without a port
    (``localhost:9177``, ``127.0.0.1``, ``[::1]:80``); anything else in it (``127.0.0.1:80@evil``,
    ``[::1]evil``) is not a Host header's form, and no."""
    match = _HOST.fullmatch(header.strip())
    if match is None:
        return False
    return _loopback_address(match["v6"] or match["name"].lower().rstrip("."))


def serve(backend, address, poll_interval=0.5):
    """Serve until ``stop()`` (which waits up to ``poll_interval``); returns (server, thread)."""
    server = Server(address, Service(backend))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll_interval},
                              name="http", daemon=True)
    thread.start()
    return server, thread


def stop(server, thread):
    server.service.stopping.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


# -- the process ------------------------------------------------------------------------------------

def parse_args(argv):
    from torchcore import services

    def extra(parser):
        parser.add_argument("--listen", default=None, metavar="HOST:PORT",
                            help="listen here instead of settings.http.listen (start --http)")

    return services.child_args(argv, "torchcore's HTTP service (started by the daemon)", extra)


def setup_logging(taskfile):
    """The daemon's own log: its stderr in the foreground; when the daemon went to the background
    (our stderr is /dev/null) the file it writes, log_dir/torchcore.log."""
    handler = None
    try:
        if os.path.samestat(os.fstat(2), os.stat(os.devnull)):
            from torchcore import config
            from torchcore.safepaths import log_file_handler

            path = os.path.join(config.load_settings(taskfile).log_dir, "torchcore.log")
            handler = log_file_handler(path)
    except Exception:
        handler = None      # stderr, then
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[handler] if handler else None)


def main(argv=None):
    from torchcore import services

    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.taskfile)
    services.set_title("http")
    signals = {}
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda n, f: signals.__setitem__(n, True))
    from torchcore.web.store import Backend

    try:
        backend = Backend(args.taskfile, args.state_dir, args.node)
        http = backend.taskfile.settings.http
        listen = args.listen or (http.listen if http else None)
        if listen is None:
            raise TorchcoreError("no address to listen on: set settings.http.listen or pass --listen")
        address = parse_listen(listen)
        server, thread = serve(backend, address)
    except (TorchcoreError, ValueError) as exc:
        log.error("http: %s", exc)
        return 2
    except ImportError as exc:
        log.error("http: %s: the HTTP service needs prometheus-client: pip install 'torchcore[http]'",
                  exc)
        return 2
    except OSError as exc:
        log.error("http: cannot listen on %s: %s", listen, exc.strerror or exc)
        return 2
    log.info("http: serving on %s (base path %s)", listen, backend.base_path)
    selector = selectors.DefaultSelector()
    selector.register(wake_r, selectors.EVENT_READ)
    selector.register(args.parent_fd, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in selector.select():
                if key.fd == args.parent_fd and services.parent_gone(args.parent_fd):
                    log.info("http: the supervisor is gone; stopping")
                    return 0
                if key.fd == wake_r:
                    os.read(wake_r, 512)
            if signals.pop(signal.SIGTERM, None) or signals.pop(signal.SIGINT, None):
                return 0
            if signals.pop(signal.SIGHUP, None) and backend.reload() and args.listen is None:
                http = backend.taskfile.settings.http
                if http is not None and http.listen is not None and http.listen != listen:
                    log.info("http: settings.http.listen is now %s; exiting to be started there",
                             http.listen)
                    return 0
    finally:
        stop(server, thread)
