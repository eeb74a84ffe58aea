"""Local receivers for the notification tests: an HTTP server and an SMTP server on free
loopback ports, run in threads of the test process (never the supervisor's), stopped after."""

import http.server
import json
import socket
import threading
import time


class HttpReceiver:
    """Records every POST: (path, headers, body); ``status`` (an int, or a function of the
    request count) decides the answer."""

    def __init__(self, status=200):
        self.status = status
        self.requests = []
        self.answered = []          # (status, request) in order
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size)
                with receiver.lock:
                    status = receiver.status if isinstance(receiver.status, int) else receiver.status()
                    request = (self.path, dict(self.headers), body)
                    receiver.answered.append((status, request))
                    if 200 <= status < 300:
                        receiver.requests.append(request)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self):
        with self.lock:
            return [json.loads(body) for path, headers, body in self.requests
                    if headers.get("Content-Type") == "application/json"]

    def paths(self):
        with self.lock:
            return [path for path, _, _ in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class SmtpReceiver:
    """aiosmtpd on a free loopback port; ``messages``: (envelope sender, recipients, text)."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        receiver = self
        self.messages = []

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                receiver.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.content.decode("utf-8", "replace")))
                return "250 OK"

        self.port = _free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self):
        self.controller.stop()


def _free_port():
    """A loopback port free a moment ago (aiosmtpd's controller cannot take port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
