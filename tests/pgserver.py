"""A throw-away PostgreSQL server for the fleet tests, on a free loopback port.

Debian's postgresql-15 (tests/setup-system.sh installs it) provides initdb and pg_ctl.  PostgreSQL
refuses to run as root, and CI runs as root: then the cluster belongs to the ``postgres`` user
and every server command runs through ``runuser -u postgres --``.  The server listens on
127.0.0.1 only, with its socket in its own directory.  Host connections are trusted except for
the role ``fleet_pw`` (password ``PASSWORD``), which the wrong-password tests use.

``PgServer.start()`` -> ``url(dbname)``, ``create_db(name)``, ``stop()``/``start_again()``
(outages), ``close()``.  Tests get one through the ``pg`` fixture (conftest.py), which skips them
when PostgreSQL or psycopg is missing.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

PASSWORD_ROLE = "fleet_pw"
PASSWORD = "s3cret-pw-for-tests"


def bin_dir():
    """The directory of initdb and pg_ctl, or None."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "pg_ctl")):
            return candidate
    found = shutil.which("pg_ctl")
    return os.path.dirname(found) if found else None


def missing():
    """Why a server cannot be started here, or None."""
    if bin_dir() is None:
        return "PostgreSQL is not installed (tests/setup-system.sh installs postgresql-15)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a postgres user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root without runuser"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    return None


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgServer:
    def __init__(self, root=None):
        self.root = root or tempfile.mkdtemp(prefix="tc-pg-")
        self.data = os.path.join(self.root, "data")
        self.sock = os.path.join(self.root, "sock")
        self.logfile = os.path.join(self.root, "server.log")
        self.port = None
        self.bin = bin_dir()
        self.as_root = os.geteuid() == 0
        self.running = False

    def _cmd(self, *argv, check=True, timeout=60):
        argv = [os.path.join(self.bin, argv[0]), *argv[1:]]
        if self.as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, check=check, timeout=timeout, capture_output=True, text=True)

    def start(self):
        os.makedirs(self.sock, exist_ok=True)
        if self.as_root:
            os.chmod(self.root, 0o755)
            entry = pwd.getpwnam("postgres")
            for path in (self.root, self.sock):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._cmd("initdb", "-D", self.data, "-U", "postgres", "--auth-local=trust",
                  "--auth-host=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions")
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as hba:
            hba.write("local all all trust\n"
                      f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
                      "host all all 127.0.0.1/32 trust\n")
        self.port = free_port()
        self._pg_ctl_start()
        self.psql_as_super(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        return self

    def _pg_ctl_start(self):
        options = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        result = self._cmd("pg_ctl", "-D", self.data, "-l", self.logfile, "-o", options, "-w",
                           "-t", "60", "start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stdout} {result.stderr} "
                               f"{self.server_log()}")
        self.running = True

    def server_log(self):
        try:
            with open(self.logfile) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def psql_as_super(self, sql, db="postgres"):
        import psycopg
        with psycopg.connect(self.url(db), autocommit=True) as conn:
            conn.execute(sql)

    def url(self, db="postgres", user="postgres"):
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def create_db(self, name):
        self.psql_as_super(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self, mode="fast"):
        """Stop the server (an outage); ``start_again`` brings it back on the same port."""
        if self.running:
            self._cmd("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)
            self.running = False

    def start_again(self):
        deadline = time.monotonic() + 30
        while True:
            try:
                self._pg_ctl_start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self):
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
