"""settings.fleet: the URL check, the one way a URL is shown (redact), the node's name."""

import urllib.parse

import pytest
from hypothesis import given, settings, strategies as st

from torchcore import config, fleetspec
from torchcore.errors import ConfigError

SECRET = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="@/?#&'\\ "),
                 min_size=4, max_size=30)


@settings(derandomize=True, max_examples=300, deadline=None)      # seed fixed: the same examples every run
@given(SECRET, st.sampled_from(["", "?sslmode=require", "?application_name=x&sslmode=disable"]))
def test_redact_never_shows_a_password_written_in_a_url(secret, query):
    url = f"postgresql://tc:{urllib.parse.quote(secret, safe='')}@db.internal:5432/fleet{query}"
    assert fleetspec.redact(url) == f"postgresql://tc:***@db.internal:5432/fleet{query}"
    assert fleetspec.password_in(url) == secret


@settings(derandomize=True, max_examples=200, deadline=None)
@given(SECRET)
def test_redact_hides_a_password_in_key_value_form_and_in_the_query(secret):
    # exact answers: a secret like "name" is also a piece of "dbname", so "not in" cannot tell
    assert fleetspec.redact(f"host=db dbname=fleet password={secret} user=tc") \
        == "host=db dbname=fleet password=*** user=tc"
    assert fleetspec.redact(f"host=db password='{secret}'") == "host=db password=***"
    assert fleetspec.redact(f"postgresql://tc@db/fleet?password={secret}") \
        == "postgresql://tc@db/fleet?password=***"
    assert fleetspec.password_in(f"host=db password={secret}") == secret


# URLs as $TORCHCORE_DATABASE_URL may hold them (a secret is allowed there) that libpq refuses,
# quoting what it could not read: {0} is the secret as written in the URL
_LIBPQ_REFUSES = [
    "postgresql://tc:{0}@[db.internal/fleet",               # unparseable: quoted whole
    "postgresql://tc:{0}%ZZ@db.internal/fleet",             # a bad escape: the token quoted
    "postgresql://tc@db.internal/fleet?sslpassword={0}&bogus=1",
    "postgresql://tc@db.internal/fleet?pass%77ord={0}&bogus=1",   # libpq decodes keys too
    "host=db.internal sslpassword={0} bogus=1",
    "host=db.internal password='{0}' bogus=1",
]


@settings(derandomize=True, max_examples=100, deadline=None)
@given(SECRET, st.sampled_from(_LIBPQ_REFUSES))
def test_no_secret_of_a_url_shows_in_its_redacted_form_nor_in_libpq_s_errors(secret, form):
    """redact hides sslpassword (the client key's passphrase) and a percent-encoded password
    key; fleetdb.describe scrubs what libpq quotes back (a whole unparseable URL, a token)."""
    psycopg = pytest.importorskip("psycopg")
    from torchcore import fleetdb

    secret = f"SEKRET{secret}"          # a marker no message holds by chance
    url = form.format(urllib.parse.quote(secret, safe="") if "://" in form else secret)
    with pytest.raises(psycopg.Error) as refused:
        psycopg.conninfo.conninfo_to_dict(url)
    for shown in (fleetspec.redact(url), fleetdb.describe(refused.value, url),
                  str(fleetdb.classify(refused.value, url))):
        assert "SEKRET" not in shown, (url, shown)


@pytest.mark.parametrize("url", ["postgresql://tc:pw@db/x", "postgres://tc@db/x?password=pw",
                                 "host=db password=pw dbname=x", "postgresql://tc@db/x?sslpassword=pw",
                                 "postgresql://tc@db/x?pass%77ord=pw", "host=db sslpassword=pw"])
def test_a_password_in_the_task_file_is_refused_at_its_line(tmp_path, url):
    path = tmp_path / "tasks.yaml"
    path.write_text(f"settings:\n  fleet:\n    database: \"{url}\"\ntasks: []\n")
    with pytest.raises(ConfigError) as error:
        config.load(str(path))
    assert f"{path}:3: settings: fleet: database: the URL holds a password" in str(error.value)
    assert "pw" not in str(error.value).split("password;")[0].replace("password", "")


@pytest.mark.parametrize("body, problem", [
    ("    node: web-1\n", ":3: settings: fleet: database: missing"),
    ("    database: mysql://db/x\n", ":3: settings: fleet: database: expected a postgresql:// URL"),
    ("    database: justaword\n", ":3: settings: fleet: database: expected a libpq URL"),
    ("    database: postgresql://db/x\n    heartbeat: 0s\n", ":4: settings: fleet: heartbeat:"),
    ("    database: postgresql://db/x\n    node: -bad\n", ":4: settings: fleet: node:"),
    ("    database: postgresql://db/x\n    output_tail: 2G\n", ":4: settings: fleet: output_tail: at most"),
    ("    database: postgresql://db/x\n    lease: 5s\n", ":4: settings: fleet: "),
])
def test_bad_fleet_settings_name_file_line_and_field(tmp_path, body, problem):
    path = tmp_path / "tasks.yaml"
    path.write_text("settings:\n  fleet:\n" + body + "tasks: []\n")
    with pytest.raises(ConfigError) as error:
        config.load(str(path))
    assert f"{path}{problem}" in str(error.value)


def test_fleet_settings_and_their_defaults(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("settings:\n  fleet:\n    database: postgresql://tc@db.internal/fleet?sslmode=verify-full\n"
                    "tasks: []\n")
    fleet = config.load(str(path)).settings.fleet
    assert fleet.database == "postgresql://tc@db.internal/fleet?sslmode=verify-full"
    assert (fleet.node, fleet.heartbeat, fleet.output_tail, fleet.line) == (None, 5, 64 << 10, 3)
    assert config.load(str(path)).settings.fleet == fleet
    assert fleetspec.node_name(fleet, "web-1.example.com") == "web-1"
    assert fleetspec.node_name(fleet, "web-1.example.com", override="other") == "other"
    assert fleetspec.database_url(fleet, {"TORCHCORE_DATABASE_URL": "postgresql://x@y/z"}) \
        == "postgresql://x@y/z"
    assert fleetspec.database_url(fleet, {}) == fleet.database
    assert fleetspec.database_url(None, {}) is None


def test_a_file_without_fleet_loads_nothing_of_psycopg(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n  - name: a\n    schedule: '* * * * * *'\n    command: 'true'\n")
    code = ("import sys; from torchcore import config, fleetdb, fleetspec; "
            f"config.load({str(path)!r}); print('psycopg' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


@pytest.mark.parametrize("hostname", ["bad host", "-lead", "x" * 70, "h\u00e9te", "a/b"])
def test_a_hostname_that_makes_no_node_name_says_what_to_set(hostname):
    with pytest.raises(fleetspec.FleetSpecError, match="set settings.fleet.node or start with --node-name"):
        fleetspec.node_name(None, hostname)
    assert fleetspec.node_name(None, hostname, override="n1") == "n1"
