"""The ``torchcore: http`` process: an HTTP server for /metrics, the API and the dashboard.

Started by the supervisor (services.py) as ``python -m torchcore.web --taskfile PATH
--state-dir DIR --node NAME --parent-fd FD [--listen ADDR]``:

- SIGTERM (or SIGINT): stop serving and exit promptly;
- SIGHUP: read the task file again (base path, token file, tasks);
- end of file on ``--parent-fd``: the supervisor is gone, exit.

The HTTP stack is aiohttp's server (it parses requests and their framing) on one asyncio loop: a
log follow is a coroutine, not a thread.  What blocks (SQLite reads, the control socket, the task
file, making JSON and the metrics page) runs on the loop's default executor, WORKERS threads (this
is not the supervisor, which has no threads): a slow query holds a worker, never the loop.
api.py's handlers know nothing of aiohttp: a ``Request`` in, ``(status, body)`` or a ``Stream`` out.
"""

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import SplitResult, parse_qs, urlsplit

try:
    from aiohttp import HttpVersion10, HttpVersion11, web
except ImportError:         # main() says what to install
    web = None

from torchcore.errors import TorchcoreError
from torchcore.web import api as api_mod
from torchcore.web.settings import loopback_address as _loopback_address
from torchcore.web.settings import loopback_host as _loopback_host
from torchcore.web.settings import parse_listen

log = logging.getLogger("torchcore.web")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
MAX_BODY = 64 << 10
MAX_FOLLOWERS = 32          # log follows streaming at once
MAX_CONNECTIONS = 128       # connections open at once; beyond: 503
WORKERS = 8                 # threads for the blocking work (reads, control requests)
REQUEST_DEADLINE = 20.0     # seconds to send a whole request (line, headers, body), or to idle
WRITE_DEADLINE = 60.0       # seconds an answer (or one event of a follow) may take to be taken
FOLLOW_POLL = 0.5           # seconds between looks at a followed log
FOLLOW_BATCH = 1000         # lines of a follow read in one go
HEARTBEAT = 15.0            # seconds between keep-alive comments on a quiet follow
STOP_WAIT = 2.0             # seconds the answers under way get when the service stops
SECURITY_HEADERS = (
    ("Server", "torchcore"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
)


class Service:
    """What the requests share: the backend, the API, the metrics, the static files, the count
    of follows; ``loopback`` and ``connections`` (the _Connections) are set when it serves."""

    def __init__(self, backend):
        from torchcore.web.metrics import Metrics

        self.backend = backend
        self.api = api_mod.Api(backend)
        self.metrics = Metrics(backend)
        self.static = load_static()
        self.followers = 0
        self.stopping = asyncio.Event()


def load_static():
    """The dashboard's files, read once: {name: (content type, bytes)}."""
    files = {}
    for name in os.listdir(STATIC_DIR):
        kind = STATIC_TYPES.get(os.path.splitext(name)[1])
        if kind:
            with open(os.path.join(STATIC_DIR, name), "rb") as handle:
                files[name] = (kind, handle.read())
    return files


class _Unframed(api_mod.HttpError):
    """A request whose body this server cannot delimit: answered, then the connection ends."""


# -- a request -------------------------------------------------------------------------------------

async def respond(service, request):
    """aiohttp's handler for every request: the answer, written here (so that the deadline of the
    connection's next request starts once it is taken), or the follow's stream, ended."""
    method = request.method
    close = False
    try:
        answer = await route(service, request)
        if isinstance(answer, web.StreamResponse):
            return answer
    except api_mod.HttpError as exc:
        close = isinstance(exc, _Unframed)
        answer = _json(exc.status, {"error": exc.message} if exc.message else None, exc.headers)
    except TorchcoreError as exc:     # the records could not be read, ...
        log.warning("http: %s %s: %s", method, request.raw_path, exc)
        answer = _json(503, {"error": str(exc)})
    except ConnectionError:
        raise
    except Exception:
        log.exception("http: %s %s failed", method, request.raw_path)
        answer = _json(500, {"error": "internal error; the service's log says more"})
    status, kind, data, headers, cache = answer
    log.debug("http: %s %s %s: %d", request.remote, method, request.raw_path, status)
    response = web.Response(status=status, body=data, headers=[      # aiohttp: no body to a HEAD
        ("Content-Type", kind), ("Cache-Control", cache), *SECURITY_HEADERS, *headers])
    if close:
        response.force_close()
    connections = service.connections
    with connections.deadline(request.protocol, WRITE_DEADLINE):
        await response.prepare(request)
        await response.write_eof()
    connections.arm(request.protocol, REQUEST_DEADLINE)      # for the next one
    return response


async def route(service, request):
    """The answer: (status, content type, bytes, headers, cache) or the ended follow."""
    await drain_body(request)   # first: whatever is refused below, the next request starts clean
    service.connections.disarm(request.protocol)        # all of it came in time
    method = request.method
    if service.loopback and not _loopback_host(request.headers.get("Host", "")):
        # a page elsewhere that rebinds its own name to 127.0.0.1 gets nothing from here
        raise api_mod.HttpError(403, "this service answers to a loopback Host only "
                                     "(localhost, 127.0.0.1, [::1])")
    raw = request.raw_path      # "//metrics/api/..." is a path, not urlsplit's host "metrics" and
    # path /api/... (the API past a proxy that passes only /metrics on); urlsplit: http://host/path
    url = SplitResult("", "", *raw.partition("#")[0].partition("?")[::2], "") \
        if raw.startswith("/") else urlsplit(raw)
    backend = service.backend
    base = backend.base_path
    if url.path + "/" == base:
        raise api_mod.HttpError(308, "", [("Location", base)])
    if not url.path.startswith(base):
        raise api_mod.HttpError(404, f"no such resource: {url.path} (the base path is {base})")
    path = url.path[len(base):]
    if path.startswith(("api/", "metrics")) and \
            request.headers.get("Sec-Fetch-Site", "").strip().lower() in ("cross-site", "same-site"):
        # a browser says another site's page sent it: the dashboard's own requests are
        # same-origin, so nothing that page can start (a log follow held open, a
        # 10,000-run history, a POST) reaches the routes
        raise api_mod.HttpError(403, "not from another site's page (Sec-Fetch-Site)")
    headers = {k.lower(): v for k, v in request.headers.items()}
    if path.startswith(("api/", "metrics")) and backend.auth == "all":
        # settings.http.auth: all: nothing of the records without the token (the
        # dashboard's own files, the same for everyone, come without it and ask for it)
        service.api.authorize(api_mod.Request(method, path, {}, headers),
                              "this service needs its token for every request "
                              "(settings.http.auth: all)")
    if path in ("metrics", "api/v1/openapi.json") and method not in ("GET", "HEAD"):
        raise api_mod.HttpError(405, f"/{path} takes GET", [("Allow", "GET, HEAD")])
    if path == "metrics":
        body, kind = await _blocking(service.metrics.exposition, request.headers.get("Accept"))
        return 200, kind, body, (), "no-store"
    if path == "api/v1/openapi.json":
        from torchcore.web.openapi import document

        return await _blocking(lambda: _json(200, document(service.api, base)))
    if not path.startswith("api/"):
        return _static(service, path, method)
    try:
        query = parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query),
                         max_num_fields=32)
    except ValueError as exc:
        raise api_mod.HttpError(400, f"bad query string: {exc}") from None
    call = api_mod.Request(method="GET" if method == "HEAD" else method, path=path, query=query,
                           headers=headers)
    answer = await _blocking(_api_answer, service.api, call)
    if isinstance(answer, api_mod.Stream):
        if method == "HEAD":
            return 200, "text/event-stream; charset=utf-8", b"", (), "no-store"
        return await follow(service, request, answer)
    return answer


def _api_answer(api, call):
    """In a worker: the handler's answer, its JSON made there too (a 10,000-run history)."""
    status, body = api.handle(call)
    return body if isinstance(body, api_mod.Stream) else _json(status, body)


def _blocking(function, *args):
    """``function(*args)`` on the loop's default executor (WORKERS threads)."""
    return asyncio.get_running_loop().run_in_executor(None, function, *args)


def _json(status, body, headers=()):
    data = b"" if body is None else json.dumps(body, indent=1).encode() + b"\n"
    return status, "application/json", data, tuple(headers), "no-store"


async def drain_body(request):
    """Read and drop a request's body, whatever the method: left unread, a body would be parsed
    as the next request on the connection (a request smuggled past a proxy).  A body this server
    will not delimit (chunked, a bad or repeated Content-Length) ends the connection; aiohttp's
    parser refuses the malformed ones (400) before they come here."""
    lengths = request.headers.getall("Content-Length", ["0"])
    length = lengths[0].strip()
    if request.headers.get("Transfer-Encoding") is not None:
        raise _Unframed(411, "send a request body with Content-Length, not Transfer-Encoding")
    if len(lengths) > 1 or not length.isascii() or not length.isdigit():
        raise _Unframed(400, "bad Content-Length")
    if int(length) > MAX_BODY:
        raise _Unframed(413, f"a request body of at most {MAX_BODY} bytes")
    if int(length):
        await request.read()


def _static(service, path, method):
    if method not in ("GET", "HEAD"):
        raise api_mod.HttpError(405, "the dashboard's pages take GET", [("Allow", "GET, HEAD")])
    name = "index.html" if path == "" else path.removeprefix("static/")
    found = service.static.get(name) if name != path or path == "" else None
    if found is None:
        raise api_mod.HttpError(404, f"no such resource: /{path}")
    kind, body = found
    return 200, kind, body, (), "no-cache"


async def follow(service, request, stream):
    """Server-sent events: one ``data:`` event per log line, until the client goes or the service
    stops.  A coroutine, not a thread: between looks at the file (a worker reads what is new,
    without waiting) it waits on the loop."""
    if service.followers >= MAX_FOLLOWERS:
        raise api_mod.HttpError(503, f"{MAX_FOLLOWERS} logs are followed already; try later")
    service.followers += 1
    lines = stream.lines(None)      # None: it yields None when there is nothing new (store.py)
    connections, connection = service.connections, request.protocol
    loop = asyncio.get_running_loop()
    response = web.StreamResponse(status=200, headers=[
        ("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-store"),
        *SECURITY_HEADERS])
    response.force_close()
    try:
        with connections.deadline(connection, WRITE_DEADLINE):
            await response.prepare(request)
        quiet = loop.time()
        while not service.stopping.is_set():
            got, idle = await _blocking(_take, lines, FOLLOW_BATCH)
            data = b"".join(b"data: " + line.encode("utf-8", "replace") + b"\n\n" for line in got)
            if not data and loop.time() - quiet >= HEARTBEAT:
                data = b": still here\n\n"
            if data:
                with connections.deadline(connection, WRITE_DEADLINE):
                    await response.write(data)
                quiet = loop.time()
            if isinstance(idle, Exception):
                raise idle
            if request.transport is None or request.transport.is_closing():
                break           # the client went
            if idle:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(service.stopping.wait(), FOLLOW_POLL)
    except ConnectionError:
        pass
    except Exception:       # the stream's 200 went out already: it ends here
        log.exception("http: a follow of %s failed", request.raw_path)
    finally:
        service.followers -= 1
        with contextlib.suppress(ValueError):       # still in a worker (the service stops)
            lines.close()
    return response


def _take(lines, most):
    """In a worker: up to ``most`` lines of a follow, and True when it has nothing more now
    (False: more to come at once; an exception: what ended it, after the lines read before)."""
    got = []
    try:
        for line in lines:
            if line is None:
                return got, True
            got.append(line)
            if len(got) >= most:
                return got, False
    except Exception as exc:
        return got, exc
    return got, True


# -- connections -----------------------------------------------------------------------------------

class _ConnectionLog(logging.LoggerAdapter):
    """aiohttp's words on a connection (a request it refused, ...): debug lines, no traceback."""

    def exception(self, msg, *args, exc_info=None, **kw):
        self.debug(f"http: {msg}: %s", *args, exc_info)


class _Busy(asyncio.Protocol):
    """A connection beyond MAX_CONNECTIONS: a 503, then closed (what it sent is read and dropped
    meanwhile, so that the close does not reset the connection before the client reads)."""

    def connection_made(self, transport):
        self.transport = transport
        transport.write(_BUSY)
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(1.0, transport.abort)

    def data_received(self, data):
        pass

    def eof_received(self):
        self.transport.close()

    def connection_lost(self, exc):
        self.timer.cancel()


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Content-Length: 50\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
         b'{"error": "too many open connections; try later"}\n')


class _Connections(web.Server if web is not None else object):
    """aiohttp's low-level server with two bounds on connections: at most MAX_CONNECTIONS open
    (beyond that each new one gets _Busy's 503), so clients holding connections open (slowloris)
    cannot use up the process's file descriptors; and a deadline for each request to arrive
    whole, from the connection's opening or its last answer (a client sending a byte now and
    then would otherwise hold its connection for ever)."""

    def __init__(self, handler, **kwargs):
        super().__init__(handler, request_factory=self.request, **kwargs)
        self.timers = {}        # RequestHandler -> the TimerHandle that ends it

    def request(self, message, payload, protocol, writer, task):
        """aiohttp's request, except for a request its parser refused (a repeated
        Content-Length, ...): aiohttp answers that one (400, the connection closed) for a
        stand-in request of HTTP/1.0, which here says HTTP/1.1 like every other answer."""
        if message.method == "UNKNOWN" and message.version == HttpVersion10:
            message = message._replace(version=HttpVersion11)
        return web.BaseRequest(message, payload, protocol, writer, task, asyncio.get_running_loop())

    def __call__(self):
        if len(self.timers) >= MAX_CONNECTIONS:
            return _Busy()
        return super().__call__()

    def connection_made(self, handler, transport):
        super().connection_made(handler, transport)
        self.timers[handler] = None
        self.arm(handler, REQUEST_DEADLINE)

    def connection_lost(self, handler, exc=None):
        super().connection_lost(handler, exc)
        timer = self.timers.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def arm(self, handler, seconds):
        """End the connection in ``seconds`` unless disarmed (or armed again) before."""
        if handler not in self.timers:
            return      # gone already
        self.disarm(handler)
        self.timers[handler] = asyncio.get_running_loop().call_later(seconds, _cut, handler)

    def disarm(self, handler):
        timer = self.timers.get(handler)
        if timer is not None:
            timer.cancel()
            self.timers[handler] = None

    @contextlib.contextmanager
    def deadline(self, handler, seconds):
        """``with``: armed for the block, disarmed after it."""
        self.arm(handler, seconds)
        try:
            yield
        finally:
            self.disarm(handler)


def _cut(handler):
    """End a connection past its deadline, dropping what it buffers (a close waits for ever)."""
    transport = handler.transport
    handler.force_close()
    if transport is not None:
        transport.abort()


# -- serving ---------------------------------------------------------------------------------------

def listen_socket(address):
    """The listening socket, bound to exactly the address given (a name: its IPv4 address)."""
    host, port = address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Running:
    """A service serving on the running loop: ``server_address``, ``close()``."""

    async def start(self, backend, sock):
        self.loop = asyncio.get_running_loop()
        self.service = service = Service(backend)
        self.server_address = sock.getsockname()[:2]
        service.loopback = _loopback_address(self.server_address[0])
        service.connections = _Connections(
            functools.partial(respond, service), access_log=None,
            logger=_ConnectionLog(logging.getLogger("torchcore.web.connection"), {}))
        self.runner = web.ServerRunner(service.connections, shutdown_timeout=STOP_WAIT)
        await self.runner.setup()
        await web.SockSite(self.runner, sock, backlog=64).start()
        self.closed = asyncio.Event()
        return self

    async def close(self):
        """Stop listening, end the follows, give the answers under way STOP_WAIT seconds."""
        self.service.stopping.set()
        try:
            await self.runner.cleanup()
        finally:
            self.closed.set()


def serve(backend, address, poll_interval=None):
    """Serve on a loop of its own in a thread (tests, the benchmark) until ``stop()``; returns
    (server, thread), ``server.server_address`` the address bound.  ``poll_interval`` is not
    used (kept for callers written for the former server)."""
    if web is None:
        raise ImportError("No module named 'aiohttp'")
    sock = listen_socket(address)
    started, box = threading.Event(), {}

    def run():
        loop = _new_loop()
        try:
            box["server"] = loop.run_until_complete(Running().start(backend, sock))
        except BaseException as exc:
            box["error"] = exc
        started.set()
        if "server" in box:
            loop.run_until_complete(box["server"].closed.wait())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    thread = threading.Thread(target=run, name="http", daemon=True)
    thread.start()
    started.wait()
    if "error" in box:
        raise box["error"]
    return box["server"], thread


def _new_loop():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_default_executor(ThreadPoolExecutor(WORKERS, thread_name_prefix="http"))
    return loop


def stop(server, thread):
    asyncio.run_coroutine_threadsafe(server.close(), server.loop).result(STOP_WAIT + 10)
    thread.join(10)


# -- the process ------------------------------------------------------------------------------------

def parse_args(argv):
    from torchcore import services

    def extra(parser):
        parser.add_argument("--listen", default=None, metavar="HOST:PORT",
                            help="listen here instead of settings.http.listen (start --http)")

    return services.child_args(argv, "torchcore's HTTP service (started by the daemon)", extra)


def setup_logging(args):
    """The daemon's own log (services.setup_logging): ``--log-file`` when the daemon is in the
    background; without it, when our stderr is /dev/null, the file the daemon writes,
    log_dir/torchcore.log; else stderr."""
    from torchcore import services

    if not getattr(args, "log_file", None):
        try:
            if os.path.samestat(os.fstat(2), os.stat(os.devnull)):
                from torchcore import config
                args.log_file = os.path.join(config.load_settings(args.taskfile).log_dir,
                                             "torchcore.log")
        except Exception:
            pass
    services.setup_logging(args)


def main(argv=None):
    from torchcore import services

    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args)
    services.set_title("http")
    early = set()       # signals that came while the task file loads: handled once serving
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda n, f: early.add(n))
    from torchcore.web.store import Backend

    listen = args.listen
    try:
        if web is None:
            raise ImportError("No module named 'aiohttp'")
        backend = Backend(args.taskfile, args.state_dir, args.node)
        http = backend.taskfile.settings.http
        listen = args.listen or (http.listen if http else None)
        if listen is None:
            raise TorchcoreError("no address to listen on: set settings.http.listen or pass --listen")
        sock = listen_socket(parse_listen(listen))
    except (TorchcoreError, ValueError) as exc:
        log.error("http: %s", exc)
        return 2
    except ImportError as exc:
        return _missing(exc)
    except OSError as exc:
        log.error("http: cannot listen on %s: %s", listen, exc.strerror or exc)
        return 2
    loop = _new_loop()
    try:
        return loop.run_until_complete(_serve(args, backend, sock, listen, early))
    except ImportError as exc:     # prometheus-client, imported by the Service
        return _missing(exc)
    finally:
        loop.close()


def _missing(exc):
    log.error("http: %s: the HTTP service needs aiohttp and prometheus-client: "
              "pip install 'torchcore[http]'", exc)
    return 2


async def _serve(args, backend, sock, listen, early):
    """Serve until SIGTERM, the supervisor's end or a new ``listen``; the exit status."""
    from torchcore import services

    loop = asyncio.get_running_loop()
    running = await Running().start(backend, sock)
    log.info("http: serving on %s (base path %s)", listen, backend.base_path)
    done = loop.create_future()
    reloading, tasks = asyncio.Lock(), set()

    def finish(code=0, why=None):
        if why:
            log.info("http: %s", why)
        if not done.done():
            done.set_result(code)

    def parent():
        if services.parent_gone(args.parent_fd):
            finish(0, "the supervisor is gone; stopping")

    async def reload():
        async with reloading:
            if not await loop.run_in_executor(None, backend.reload) or args.listen is not None:
                return
            http = backend.taskfile.settings.http
            if http is not None and http.listen is not None and http.listen != listen:
                finish(0, f"settings.http.listen is now {http.listen}; exiting to be started there")

    def hangup():
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, finish)
    loop.add_signal_handler(signal.SIGHUP, hangup)
    loop.add_reader(args.parent_fd, parent)
    if early & {signal.SIGTERM, signal.SIGINT}:
        finish()
    elif signal.SIGHUP in early:
        hangup()
    try:
        return await done
    finally:
        loop.remove_reader(args.parent_fd)
        await running.close()
