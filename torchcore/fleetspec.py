"""``settings.fleet`` of the task file: the fleet database, this node's name in it, the heartbeat.

::

    settings:
      fleet:
        database: postgresql://torchcore@db.internal/torchcore   # a libpq URL, no password in it
        node: web-1            # default: the short hostname; unique per node
        heartbeat: 5s          # "late" after 2 missed heartbeats, "down" after 6
        output_tail: 64K        # how much of each run's output the fleet history keeps
        takeover: 0.5s         # `run: once`: the other nodes claim a second this long before it
        lease: 15s             # `run: once`: a running run's lease, renewed every third of it

``$TORCHCORE_DATABASE_URL`` replaces ``database`` and ``--node-name`` replaces ``node`` (both
where the daemon or a command runs).  The password comes from where libpq looks for it
(``PGPASSWORD``, ``PGPASSFILE``, ``~/.pgpass``), never from the task file, which is kept in git
and read by every node: a URL with a password in it is refused at its line.

This module imports neither psycopg nor anything of the fleet's: a file without ``fleet``
loads nothing of it.  ``redact`` is the one way a URL is shown (logs, ``status``, errors).
"""

import re
import urllib.parse
from dataclasses import dataclass

ENV_DATABASE = "TORCHCORE_DATABASE_URL"
DEFAULT_HEARTBEAT = 5
DEFAULT_OUTPUT_TAIL = 64 << 10
MAX_OUTPUT_TAIL = 1 << 20
LATE_AFTER = 2          # heartbeats missed before a node is late
DOWN_AFTER = 6          # ... and down
CLOCK_TOLERANCE = 1.0   # seconds a node's clock may be off the database's before a warning
DEFAULT_TAKEOVER = 0.5  # seconds before a `run: once` second the nodes not preferred claim it
MAX_TAKEOVER = 3.0
DEFAULT_LEASE = 15      # seconds a running `run: once` run holds its claim without a renewal
MIN_LEASE = 6           # renewed every third: at least 2 s between renewals
MAX_LEASE = 3600
_FIELDS = ("database", "node", "heartbeat", "output_tail", "takeover", "lease")
_SECONDS = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s)?")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_SECRET_KEYS = ("password", "sslpassword")     # libpq's parameters whose values are secrets
_KEYWORD_SECRET = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class FleetSettings:
    database: str                       # the libpq URL or key=value string, as written
    node: str | None = None             # None: the short hostname
    heartbeat: int = DEFAULT_HEARTBEAT  # seconds
    output_tail: int = DEFAULT_OUTPUT_TAIL  # bytes
    takeover: float = DEFAULT_TAKEOVER  # seconds (see claims.py)
    lease: int = DEFAULT_LEASE          # seconds
    line: int = 0                       # the line of the first field of ``fleet`` (for errors)


class FleetSpecError(ValueError):
    """A database URL or node name that cannot be used; the message says why."""


def redact(url):
    """``url`` with any password replaced by ``***``: the one form a URL is ever shown in."""
    if url is None:
        return None
    text = str(url)
    if "://" in text:
        try:
            parts = urllib.parse.urlsplit(text)
        except ValueError:
            return "<a database URL that cannot be parsed>"
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, _ = userinfo.partition(":")
            netloc = f"{user}{':***' if sep else ''}@{hostport}"
        query = "&".join(_redact_pair(pair) for pair in parts.query.split("&")) \
            if parts.query else ""
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return _KEYWORD_SECRET.sub(lambda m: m.group(1) + "***", text)


def _secret_key(key):
    """Whether a URL query's ``key`` (as written: libpq decodes %XX in keys too) names a secret."""
    return urllib.parse.unquote(key).strip().lower() in _SECRET_KEYS


def _redact_pair(pair):
    key, sep, _ = pair.partition("=")
    return f"{key}=***" if sep and _secret_key(key) else pair


def secrets_in(url):
    """Every form in which a secret of ``url`` (its password, an ``sslpassword``) may be quoted
    back by libpq or the server, as written and decoded, longest first: what ``redact`` hides,
    for scrubbing error text.  A URL that cannot be parsed counts as a secret itself (libpq
    quotes the whole of it in its complaint)."""
    text = str(url)
    found = set()
    if "://" in text:
        rest = text.split("://", 1)[1]
        authority = rest.split("/", 1)[0]
        if "@" in authority:        # libpq ends the user info at the first "@", urlsplit at the last
            for userinfo in (authority.rpartition("@")[0], authority.partition("@")[0]):
                found.add(userinfo.partition(":")[2])
        query = rest.partition("?")[2].partition("#")[0]
        for pair in query.split("&"):
            key, sep, value = pair.partition("=")
            if sep and _secret_key(key):
                found.add(value)
        try:
            urllib.parse.urlsplit(text)
        except ValueError:
            found.add(text)
    else:
        for match in _KEYWORD_SECRET.finditer(text):
            value = match.group(2)
            found.add(value)
            found.add(value.strip("'"))
            found.add(re.sub(r"\\(.)", r"\1", value.strip("'")))
    found |= {urllib.parse.unquote(secret) for secret in found}
    return sorted((secret for secret in found if secret), key=len, reverse=True)


def password_in(url):
    """The password written in ``url`` (a URL or key=value string), or None."""
    text = str(url)
    if "://" in text:
        try:
            parts = urllib.parse.urlsplit(text)
        except ValueError:
            return None
        if parts.password:
            return urllib.parse.unquote(parts.password)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if key.lower() == "password" and value:
                return value
        return None
    match = _KEYWORD_PASSWORD.search(text)
    return match.group(2).strip("'") if match else None


def check_url(text):
    """A database URL as the file may hold it; FleetSpecError naming the problem."""
    text = str(text).strip()
    if not text:
        raise FleetSpecError("expected a libpq URL like postgresql://torchcore@db.internal/torchcore")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in ("postgresql", "postgres"):
            raise FleetSpecError(f"expected a postgresql:// URL, got a {scheme}:// one")
        try:
            urllib.parse.urlsplit(text).port      # a bad port raises here
        except ValueError as exc:
            raise FleetSpecError(f"cannot parse {redact(text)}: {exc}") from None
    elif "=" not in text:
        raise FleetSpecError("expected a libpq URL like postgresql://torchcore@db.internal/torchcore "
                             "or key=value pairs like 'host=db.internal dbname=torchcore'")
    if password_in(text) or secrets_in(text):     # a password, or an sslpassword, in any form
        raise FleetSpecError("the URL holds a password; the task file is read by every node and "
                             "kept in git: remove it and use PGPASSWORD, PGPASSFILE or ~/.pgpass "
                             "(and the key's own file for sslpassword) where the daemon runs")
    return text


def check_node_name(text):
    text = str(text).strip()
    if not _NODE_NAME.fullmatch(text):
        raise FleetSpecError(f"a node name is 1-63 letters, digits, '.', '_' or '-', starting with a "
                             f"letter or digit; got {text!r}")
    return text


def short_hostname(hostname):
    """``web-1.example.com`` -> ``web-1``."""
    return hostname.split(".", 1)[0] or hostname


def node_name(fleet, hostname, override=None):
    """This node's name in the fleet: ``--node-name``, else ``fleet.node``, else the short hostname."""
    if override:
        return check_node_name(override)
    if fleet is not None and fleet.node:
        return fleet.node
    try:
        return check_node_name(short_hostname(hostname))
    except FleetSpecError as exc:
        raise FleetSpecError(f"this node's hostname does not make a node name ({exc}): set "
                             "settings.fleet.node or start with --node-name") from None


def database_url(fleet, environ):
    """The URL to use: ``$TORCHCORE_DATABASE_URL`` when set (a password there is allowed: it is not
    in the shared file), else the file's ``fleet.database``; None without either."""
    env = (environ.get(ENV_DATABASE) or "").strip()
    if env:
        return env
    return fleet.database if fleet is not None else None


def parse(loader, node):
    """The FleetSettings of a ``settings.fleet`` mapping node; problems go to the loader.

    Called by the settings table of validate.py as ``SETTINGS_FIELDS["fleet"](loader, node)``.
    """
    import yaml

    from torchcore import yamlread

    where = "settings: fleet: "
    if not isinstance(node, yaml.MappingNode):
        raise yamlread.Bad(f"expected a mapping with {', '.join(_FIELDS)}, {yamlread.got(node)}", node)
    values = {"line": yamlread.line_of(node)}
    fields = loader.mapping(node, where, _FIELDS)
    for key, (_, value) in fields.items():
        if value.tag == yamlread.NULL:
            continue
        try:
            if key == "database":
                values["database"] = _checked(check_url, yamlread.want_text(
                    value, "a libpq URL like postgresql://torchcore@db.internal/torchcore"), value)
            elif key == "node":
                values["node"] = _checked(check_node_name, yamlread.want_word(value, "a node name"),
                                          value)
            elif key == "heartbeat":
                values["heartbeat"] = yamlread.want_duration(value, 1)
                if values["heartbeat"] > 3600:
                    raise yamlread.Bad("at most 1h", value)
            elif key == "output_tail":
                values["output_tail"] = yamlread.want_size(value)
                if values["output_tail"] > MAX_OUTPUT_TAIL:
                    raise yamlread.Bad(f"at most {MAX_OUTPUT_TAIL >> 20}MiB", value)
            elif key == "takeover":
                values["takeover"] = _seconds(value, 0.1, MAX_TAKEOVER)
            elif key == "lease":
                values["lease"] = yamlread.want_duration(value, MIN_LEASE)
                if values["lease"] > MAX_LEASE:
                    raise yamlread.Bad("at most 1h", value)
        except yamlread.Bad as bad:
            loader.problem(bad.node or value, where, f"{key}: {bad}")
    if "database" not in values:
        if "database" not in fields:
            loader.problem(node, where, "database: missing: the fleet needs the database's URL, "
                           "like postgresql://torchcore@db.internal/torchcore")
        return None
    return FleetSettings(**values)


def _seconds(node, minimum, maximum):
    """Seconds, fractions allowed, from ``0.5``, ``0.5s`` or ``500ms``, within the bounds."""
    import yaml

    from torchcore import yamlread

    text = node.value.strip().lower() if isinstance(node, yaml.ScalarNode) else None
    match = _SECONDS.fullmatch(text) if text else None
    if match is None:
        raise yamlread.Bad(f"expected seconds like 0.5s or 500ms, {yamlread.got(node)}", node)
    value = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    if not minimum <= value <= maximum:
        raise yamlread.Bad(f"expected {minimum:g}s to {maximum:g}s, got {node.value}", node)
    return value


def _checked(check, text, node):
    from torchcore.yamlread import Bad

    try:
        return check(text)
    except FleetSpecError as exc:
        raise Bad(str(exc), node) from None
