"""A real daemon with its HTTP service on a free loopback port, for the web process and browser tests."""

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

from daemon_harness import Daemon, wait_for

TOKEN = "browser-test-token-0123456789abcdef"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WebDaemon(Daemon):
    """``torchcore start --foreground`` with settings.http on a free port (and a 0600 token);
    ``settings``: more of the settings mapping (indented two spaces), e.g. ``fleet``."""

    def __init__(self, directory, body, base_path="/", auth=None, settings=""):
        self.port = free_port()
        token = os.path.join(str(directory), "token")
        with open(token, "w") as handle:
            handle.write(TOKEN + "\n")
        os.chmod(token, 0o600)
        settings = (f"  http:\n    listen: 127.0.0.1:{self.port}\n    token_file: token\n"
                    f"    base_path: {base_path}\n" + (f"    auth: {auth}\n" if auth else "")
                    + settings)
        super().__init__(directory, body, settings)
        self.base = f"http://127.0.0.1:{self.port}{base_path}"

    def start(self, *extra, wait=True):
        super().start(*extra, wait=wait)
        self.wait_http()
        return self

    def wait_http(self, timeout=20):
        """The service the daemon started answers."""
        wait_for(self.answers, timeout, "the http service to answer:\n{}", lambda: self.log)

    def answers(self):
        try:
            request = urllib.request.Request(self.base + "api/v1/status",
                                             headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    # -- requests -------------------------------------------------------------------------------

    def request(self, path, method="GET", token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.base + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, path, method="GET", token=None):
        status, body = self.request(path, method, token)
        return status, json.loads(body) if body else None

    def cli(self, *args):
        """``torchcore ARGS -c tasks.yaml`` in the daemon's directory: (exit code, stdout)."""
        done = subprocess.run([sys.executable, "-m", "torchcore", *args, "-c", self.path],
                              capture_output=True, text=True, cwd=self.dir, timeout=60,
                              env=dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9"))
        return done.returncode, done.stdout
