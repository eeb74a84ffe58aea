"""The fleet database's schema: migrations under the advisory lock, the check `start` makes, the
one-line errors (a real PostgreSQL, tests/pgserver.py)."""

import concurrent.futures
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchcore import fleetdb

pytestmark = pytest.mark.process


def _versions(url):
    with fleetdb.connect(url) as conn:
        return [row[0] for row in conn.execute(
            f"SELECT version FROM {fleetdb.SCHEMA}.schema_version ORDER BY version")]


def test_migrations_from_empty_and_from_an_older_schema(pg):
    with fleetdb.connect(pg.url) as conn:
        assert fleetdb.schema_version(conn) == 0
        assert "fleet init" in fleetdb.schema_problem(0)
        assert fleetdb.migrate(conn, pg.url, upto=1) == (0, 1)
        with pytest.raises(fleetdb.SchemaError, match="version 1, this torchcore needs"):
            fleetdb.check_schema(conn, pg.url)
        assert fleetdb.migrate(conn, pg.url) == (1, fleetdb.CODE_VERSION)
        fleetdb.check_schema(conn, pg.url)
        assert fleetdb.migrate(conn, pg.url) == (fleetdb.CODE_VERSION,) * 2
    assert _versions(pg.url) == list(range(1, fleetdb.CODE_VERSION + 1))


def test_a_newer_schema_names_both_versions(pg):
    with fleetdb.connect(pg.url) as conn:
        fleetdb.migrate(conn, pg.url)
        conn.execute(f"INSERT INTO {fleetdb.SCHEMA}.schema_version (version, what) VALUES (99, 'x')")
        with pytest.raises(fleetdb.SchemaError, match=f"version 99, newer than .* \\({fleetdb.CODE_VERSION}\\)"):
            fleetdb.check_schema(conn, pg.url)
        with pytest.raises(fleetdb.SchemaError):
            fleetdb.migrate(conn, pg.url)


def _init(url):
    return subprocess.run([sys.executable, "-m", "torchcore", "fleet", "init", "--database", url,
                           "--json"], capture_output=True, text=True, timeout=120)


def test_twenty_nodes_migrating_at_once_migrate_once(pg):
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(_init, [pg.url] * 20))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    import json
    applied = [json.loads(r.stdout)["applied"] for r in results]
    assert sum(1 for a in applied if a) == 1        # one did the work, the others found none left
    assert _versions(pg.url) == list(range(1, fleetdb.CODE_VERSION + 1))


def _start(tmp_path, url, env=None):
    (tmp_path / "tasks.yaml").write_text(
        f"settings:\n  fleet:\n    database: {url}\n"
        "tasks:\n  - name: a\n    schedule: '0 0 3 1 1 *'\n    command: 'true'\n")
    return subprocess.run([sys.executable, "-m", "torchcore", "start", "-c", "tasks.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_start_refuses_a_database_without_the_schema_with_exit_78(pg, tmp_path):
    result = _start(tmp_path, pg.url)
    assert result.returncode == 78, result.stderr
    assert "run `torchcore fleet init` once" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_wrong_password_is_one_line_without_the_password(pg, tmp_path):
    import pgserver
    url = f"postgresql://{pgserver.PASSWORD_ROLE}@127.0.0.1:{pg.server.port}/{pg.name}"
    result = _start(tmp_path, url, env={"PGPASSWORD": "wrong-horse-battery"})
    assert result.returncode == 78, result.stderr
    assert "password authentication failed" in result.stderr
    assert "wrong-horse-battery" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    init = _init(url.replace("@", ":wrong-horse-battery@"))
    assert init.returncode == 1 and "wrong-horse-battery" not in init.stderr + init.stdout
    assert "password authentication failed" in init.stderr


def test_the_right_password_from_pgpassword(pg, tmp_path):
    import pgserver
    url = f"postgresql://{pgserver.PASSWORD_ROLE}@127.0.0.1:{pg.server.port}/{pg.name}"
    init = subprocess.run([sys.executable, "-m", "torchcore", "fleet", "init", "--database", url],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PGPASSWORD": pgserver.PASSWORD})
    assert init.returncode == 0, init.stderr
    assert "schema version 0 -> " in init.stdout


def test_an_unreachable_database_is_one_line(tmp_path):
    from pgserver import free_port
    url = f"postgresql://tc@127.0.0.1:{free_port()}/fleet"
    init = _init(url)
    assert init.returncode == 1 and "cannot connect to the fleet database" in init.stderr
    assert len(init.stderr.strip().splitlines()) == 1 and "Traceback" not in init.stderr


def _libpq_keywords():
    import psycopg
    return {option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults()}


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.one_of(
    st.from_regex(r"[a-z_]{3,14}", fullmatch=True).map(lambda key: f"?{key}=1"),     # a typo
    st.tuples(st.sampled_from(["sslmode", "channel_binding", "gssencmode", "target_session_attrs"]),
              st.from_regex(r"[a-z]{1,9}", fullmatch=True)).map(lambda kv: f"?{kv[0]}={kv[1]}x"),
    st.sampled_from(["[::1", ":port"]).map(lambda host: f"@{host}")))
def test_a_url_libpq_cannot_use_is_refused_not_unreachable(mistake):
    """An unknown option, a value libpq does not know, a broken host: no try will ever connect,
    so it is said as the login refused (start: exit 78), not as a database that is away."""
    if mistake.startswith("?") and mistake[1:].split("=")[0] in _libpq_keywords():
        return
    url = f"postgresql://tc@127.0.0.1:1/fleet{mistake}" if mistake.startswith("?") else \
        f"postgresql://tc{mistake}/fleet"
    with pytest.raises(fleetdb.FleetError) as error:
        fleetdb.connect(url, timeout=1)
    assert isinstance(error.value, fleetdb.FleetRefused), str(error.value)


def test_start_refuses_a_url_libpq_cannot_use_with_exit_78(tmp_path):
    from pgserver import free_port
    result = _start(tmp_path, f"postgresql://tc@127.0.0.1:{free_port()}/fleet?sslmod=require")
    assert result.returncode == 78, result.stderr
    assert 'invalid URI query parameter: "sslmod"' in result.stderr
    assert "starting anyway" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
