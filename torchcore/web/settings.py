"""``settings.http`` of the task file: where the HTTP service listens, its token, its base path.

::

    settings:
      http:
        listen: 127.0.0.1:9177          # off unless set; a bare port means 127.0.0.1
        token_file: /etc/torchcore/token  # needed for anything that changes state
        base_path: /cron/               # when served behind a reverse proxy
        auth: all                       # the token for every request (default: changes)

The file's form is validated with the rest of the task file (config.load, validate.py); the token file
itself is checked where the daemon runs (``token_problem``, through config.node_problems):
a token others can read is refused, at the file and line that names it.
"""

import ipaddress
import os
import re
import stat
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
MAX_TOKEN_BYTES = 4096
MIN_TOKEN_CHARS = 16
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")
_BASE_PATH = re.compile(r"/(?:[A-Za-z0-9._~-]+/)*")
_FIELDS = ("listen", "token_file", "base_path", "auth")
AUTH_MODES = {      # settings.http.auth -> what needs the token
    "changes": "the token for actions only; anyone on the machine may read",
    "all": "the token for every request",
}


@dataclass(frozen=True, slots=True)
class HttpSettings:
    listen: str | None = None           # "host:port" as given (a bare port: 127.0.0.1:port)
    token_file: str | None = None       # absolute path
    base_path: str = "/"                # starts and ends with "/"
    token_line: int = 0                 # where token_file is written (for node problems)
    auth: str = "changes"               # AUTH_MODES: what needs the token

    @property
    def address(self):
        """(host, port) to bind, or None when off."""
        return None if self.listen is None else parse_listen(self.listen)


def parse_listen(text):
    """``127.0.0.1:9177``, ``[::1]:9177``, ``localhost:9177`` or ``9177`` -> (host, port).

    ValueError with a message for anything else.
    """
    text = str(text).strip()
    if text.isdigit():
        host, port = DEFAULT_HOST, text
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT like 127.0.0.1:9177 or [::1]:9177, got {text!r}")
        if host.startswith("["):
            if not host.endswith("]"):
                raise ValueError(f"expected [IPv6]:PORT like [::1]:9177, got {text!r}")
            host = host[1:-1]
            try:
                if ipaddress.ip_address(host).version != 6:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv6 address") from None
        elif ":" in host:
            raise ValueError(f"write an IPv6 address in brackets, like [{host}]:{port}")
        elif not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not an address or a host name")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number in 1-65535")
    return host, int(port)


def loopback_address(text):
    """Whether an address (or ``localhost``) is this machine's loopback."""
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return text == "localhost"


_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]@/\s]+))(?::[0-9]{0,5})?")


def loopback_host(header):
    """Whether a Host header is a loopback name of this machine, with or without a port
    (``localhost:9177``, ``127.0.0.1``, ``[::1]:80``); anything else in it (``127.0.0.1:80@evil``,
    ``[::1]evil``) is not a Host header's form, and no."""
    match = _HOST.fullmatch(header.strip())
    return match is not None and loopback_address(match["v6"] or match["name"].lower().rstrip("."))


def parse_base_path(text):
    """``/cron`` or ``/cron/`` -> ``/cron/``; ValueError for anything a URL path cannot hold."""
    path = str(text).strip()
    if not path.endswith("/"):
        path += "/"
    if not _BASE_PATH.fullmatch(path) or any(part in (".", "..") for part in path.split("/")):
        raise ValueError(f"expected a URL path like /cron/ (letters, digits, '.', '_', '~', '-' "
                         f"between slashes), got {text!r}")
    return path


def parse(loader, node):
    """The HttpSettings of a ``settings.http`` mapping node; problems go to the loader.

    Called by the settings table of validate.py as ``SETTINGS_FIELDS["http"](loader, node)``.
    """
    import yaml

    from torchcore import yamlread  # the loader's helpers (this module is imported by validate)

    if not isinstance(node, yaml.MappingNode):
        raise yamlread.Bad(f"expected a mapping with {', '.join(_FIELDS)}, {yamlread.got(node)}", node)
    values = {}
    auth_node = None
    for key, (_, value) in loader.mapping(node, "settings: http: ", _FIELDS).items():
        if value.tag == yamlread.NULL:
            continue
        try:
            if key == "listen":
                text = yamlread.want_text(value, "HOST:PORT like 127.0.0.1:9177")
                host, port = _checked(parse_listen, text, value)
                values["listen"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            elif key == "token_file":
                values["token_file"] = loader.abspath(value)
                values["token_line"] = yamlread.line_of(value)
            elif key == "auth":
                auth_node = value
                values["auth"] = _checked(parse_auth, yamlread.want_word(value, "changes or all"),
                                          value)
            else:
                values["base_path"] = _checked(parse_base_path,
                                               yamlread.want_word(value, "a URL path"), value)
        except yamlread.Bad as bad:
            loader.problem(bad.node or value, "settings: http: ", f"{key}: {bad}")
    if values.get("auth") == "all" and "token_file" not in values:
        loader.problem(auth_node, "settings: http: ", "auth: all needs a token_file (the token every "
                       "request must send); set token_file, or auth: changes")
    return HttpSettings(**values)


def parse_auth(text):
    """``changes`` or ``all``; ValueError for anything else."""
    if text not in AUTH_MODES:
        raise ValueError(f"expected changes (the token for actions only) or all (the token for "
                         f"every request), got {text!r}")
    return text


def _checked(parser, text, node):
    from torchcore.yamlread import Bad

    try:
        return parser(text)
    except ValueError as exc:
        raise Bad(str(exc), node) from None


# -- the token ---------------------------------------------------------------------------------

class TokenError(Exception):
    """The token file cannot be used; the message says why and what to do."""


def read_token(path):
    """The token in ``path``: a regular file of ours (or root's), mode 0600 or 0400, not a link.

    Raises TokenError naming the problem and the fix.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == 40:     # ELOOP: a symbolic link
            raise TokenError(f"{path} is a symbolic link; name the file itself") from None
        raise TokenError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenError(f"{path} is not a regular file")
        if info.st_uid not in (os.geteuid(), 0):
            raise TokenError(f"{path} belongs to uid {info.st_uid}, not to torchcore's user or root")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise TokenError(f"{path} has mode {mode:04o}; others may read it: "
                             f"`chmod 600 {path}` (refused until then)")
        data = os.read(fd, MAX_TOKEN_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenError(f"{path} is over {MAX_TOKEN_BYTES} bytes; a token is one line")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenError(f"{path}: a token is printable ASCII") from None
    if len(token) < MIN_TOKEN_CHARS or any(not ch.isprintable() or ch.isspace() for ch in token):
        raise TokenError(f"{path}: the token must be one word of at least {MIN_TOKEN_CHARS} printable "
                         "characters (e.g. `openssl rand -hex 32`)")
    return token


def token_problem(taskfile):
    """``file:line: settings: http: token_file: ...`` when the token file is unusable, else None."""
    http = getattr(taskfile.settings, "http", None)
    if http is None or http.token_file is None:
        return None
    try:
        read_token(http.token_file)
    except TokenError as exc:
        return f"{taskfile.path}:{http.token_line}: settings: http: token_file: {exc}"
    return None
