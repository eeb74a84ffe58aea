"""Crontabs in, task-file entries out: the parsing and conversion behind ``torchcore import``.

A crontab is read the way Vixie cron and cronie read it: blank lines and ``#`` lines are
comments, ``NAME = value`` lines set the environment of the lines below them, every other
line is a job (``min hour dom month dow [user] command`` or ``@macro [user] command``).
Each job becomes an :class:`Entry`; a line that cannot be converted becomes a
:class:`Problem` and is kept as a comment by the writer, taskwriter.py (never dropped).
Fields, month and day names and macros are schedule.py's: one table for both.

>>> result = convert("MAILTO=ops\\n*/15 9-17 * * mon-fri /usr/bin/sync.sh --all\\n", "web1")
>>> [(e.name, e.schedule, e.command) for e in result.entries]
[('sync.sh', '*/15 9-17 * * mon-fri', '/usr/bin/sync.sh --all')]
"""

import dataclasses
import hashlib
import os
import re
import shlex
import unicodedata
import urllib.parse

from torchcore import schedule
from torchcore.errors import TorchcoreError
from torchcore.schedule import check_zone
from torchcore.taskspec import DEFAULT_SHELL, RESERVED_NAMES
from torchcore.units import OutOfRange, parse_digits, shown

# Shells whose `-c` text takes the POSIX `printf ... | ( ... )` form used for %-stdin.
POSIX_SHELLS = {"sh", "bash", "dash", "ash", "ksh", "mksh", "zsh", "yash", "posh"}
# cron's @macros -> the name torchcore writes for each (the first of its meaning in schedule.MACROS)
MACROS = {name: next(first for first, other in schedule.MACROS.items() if other == macro)
          for name, macro in schedule.MACROS.items()}
FIELDS = schedule.FIELDS[schedule.MINUTE:]      # a crontab's five fields: no second
MAIL_VARS = {"MAILTO", "MAILFROM", "CONTENT_TYPE", "CONTENT_TRANSFER_ENCODING"}
DEFAULT_SMTP = "localhost:25"       # cron handed its mail to the local MTA
MAIL_SENDER = "torchcore@localhost"
NAME_MAX = 64
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


class CrontabError(TorchcoreError):
    """One crontab line cannot be converted; the message says why."""


@dataclasses.dataclass
class Entry:
    """One converted job: everything a task needs, plus where it came from."""

    source: str
    lineno: int
    text: str                       # the original line, as written
    schedule: str                   # as emitted (5 fields, or a macro)
    command: object                 # str (run by /bin/sh -c) or list (argv)
    user: str | None = None
    env: dict = dataclasses.field(default_factory=dict)
    timezone: str | None = None
    cwd: str | None = None
    notes: list = dataclasses.field(default_factory=list)      # comments about the conversion
    ips: list = dataclasses.field(default_factory=list)
    hosts: list = dataclasses.field(default_factory=list)
    mail_to: list = dataclasses.field(default_factory=list)    # MAILTO's addresses: output is mailed
    mail_from: str | None = None    # MAILFROM
    smtp: str = DEFAULT_SMTP        # the SMTP server the mail goes through (cron: the local MTA)
    name: str = ""
    task: object = None             # the config.Task it loads as, once validated

    @property
    def description(self):
        return f"imported from {self.source} line {self.lineno}"


@dataclasses.dataclass
class Problem:
    """A line that could not be converted; it is reported and kept as a comment."""

    source: str
    lineno: int
    text: str
    reason: str

    def __str__(self):
        return f"{self.source}:{self.lineno}: cannot convert: {self.reason}"


@dataclasses.dataclass
class Comment:
    """A crontab line kept as a comment only (a comment or an environment assignment)."""

    source: str
    lineno: int
    text: str


@dataclasses.dataclass
class ImportResult:
    """Everything read from one or more crontabs, in order."""

    items: list = dataclasses.field(default_factory=list)    # Entry | Problem | Comment
    warnings: list = dataclasses.field(default_factory=list)

    @property
    def entries(self):
        return [i for i in self.items if isinstance(i, Entry)]

    @property
    def problems(self):
        return [i for i in self.items if isinstance(i, Problem)]


# --- environment lines --------------------------------------------------------------------

def parse_env(line):
    """Return ``(name, value)`` if ``line`` is an environment assignment as cron reads it, else None.

    Quotes around the name or the value are removed (no escapes inside them), spaces around
    ``=`` are allowed, an unquoted value loses its trailing blanks.

    >>> parse_env('FOO = "a b"')
    ('FOO', 'a b')
    >>> parse_env("0 * * * * cmd") is None
    True
    """
    m = re.fullmatch(r"""[ \t]*(?:"([^"=]*)"|'([^'=]*)'|((?!['"])[^\s=]*))\s*=\s*(.*)""",
                     line, re.DOTALL)
    if not m:
        return None
    name = next(g for g in m.groups()[:3] if g is not None)
    rest = m.group(4)
    if rest[:1] in ("'", '"'):
        q = rest[0]
        end = rest.find(q, 1)
        if end < 0 or rest[end + 1:].strip():
            return None
        value = rest[1:end]
    else:
        value = rest.rstrip()
    return name, value


# --- the % rule -------------------------------------------------------------------------------

def split_percent(command):
    """Split a crontab command at its first unescaped ``%`` the way cron does.

    Returns ``(command, stdin)``: in the command ``\\%`` becomes ``%``; ``stdin`` is None when
    there is no unescaped ``%``, else the exact text cron writes to the job's standard input
    (later ``%`` become newlines, ``\\%`` a literal ``%``, and a newline is added when the
    text written does not end with one).

    >>> split_percent(r"date +\\%F")
    ('date +%F', None)
    >>> split_percent("mail -s hi root%line one%line two")
    ('mail -s hi root', 'line one\\nline two\\n')
    """
    out, i, escaped = [], 0, False
    while i < len(command):
        ch = command[i]
        if escaped:
            if ch == "%":
                out[-1] = "%"
            else:
                out.append(ch)
            escaped = False
        elif ch == "%":
            return "".join(out), _stdin_text(command[i + 1:])
        else:
            out.append(ch)
            escaped = ch == "\\"
        i += 1
    return "".join(out), None


def _stdin_text(data):
    """The bytes cron writes to stdin for the text after the first ``%`` (as a str)."""
    out, escaped, need_newline = [], False, False
    for ch in data:
        if escaped:
            if ch != "%":
                out.append("\\")
        elif ch == "%":
            ch = "\n"
        escaped = ch == "\\"
        if not escaped:
            out.append(ch)
            need_newline = ch != "\n"
    if escaped:
        out.append("\\")
    if need_newline:
        out.append("\n")
    return "".join(out)


def with_stdin(command, data):
    """Shell text that runs ``command`` with exactly ``data`` on its standard input.

    ``printf '%s'`` writes the bytes unchanged (a builtin: no argument-length limit) and the
    command runs in a subshell, on lines of its own, so ``;``, ``&&`` and a trailing ``#``
    comment in it behave as before and every part of it reads the same pipe cron gave it.
    """
    return f"printf '%s' {shlex.quote(data)} | (\n{command}\n)"


# --- schedules --------------------------------------------------------------------------------

def _number(token, field):
    name, low, high, names = field
    if token.isascii() and token.isdigit():     # ASCII only: '²'.isdigit() is True, int('²') fails
        value = _digits(token, high + 1)
    elif token.isascii() and token.upper() in names:
        value = names[token.upper()]
    else:
        allowed = f" or a name ({min(names, key=names.get)}-{max(names, key=names.get)})".lower() \
            if names else ""
        raise CrontabError(f"{name} field: {shown(token, 40)!r} is not a number{allowed}")
    if not low <= value <= high:
        raise CrontabError(f"{name} field: {shown(token)} is out of range {low}-{high}")
    return value


def _digits(token, maximum):
    """The value of an ASCII numeral, or ``maximum`` when larger (no int() of a huge numeral)."""
    try:
        return parse_digits(token, maximum)
    except OutOfRange:
        return maximum


def parse_field(text, field):
    """The set of values one cron field allows (Vixie cron's grammar), or CrontabError.

    >>> sorted(parse_field("1-7/3,mon", FIELDS[4]))
    [1, 4, 7]
    """
    name, low, high, _ = field
    values = set()
    for part in text.split(","):
        body, slash, step_text = part.partition("/")
        if "~" in body:
            raise CrontabError(f"{name} field: random ranges ('~') are not supported")
        if body == "*":
            first, last = low, high
        elif "-" in body:
            a, b = body.split("-", 1)
            first, last = _number(a, field), _number(b, field)
            if first > last:
                raise CrontabError(f"{name} field: range {body!r} runs backwards")
        else:
            first = last = _number(body, field)
            if step_text:
                raise CrontabError(f"{name} field: {part!r} (a single value with a step) means "
                                   "different things to different crons; write a range")
        step = 1
        if slash:
            step = _digits(step_text, high + 1) if step_text.isascii() and step_text.isdigit() else 0
            if step == 0:
                raise CrontabError(f"{name} field: step {shown(step_text, 40)!r} must be a number above 0")
        values.update(range(first, last + 1, step))
    return values


def check_fields(fields):
    """Validate five cron fields (raise CrontabError naming the wrong one) and return them.

    They are kept as written: torchcore reads names, ranges, steps and ``7`` for Sunday as
    cron does, and applies cron's day rule (when day-of-month or day-of-week starts with
    ``*`` a day must match both, otherwise either).
    """
    for text, field in zip(fields, FIELDS):
        parse_field(text, field)
    return fields


# --- job lines --------------------------------------------------------------------------------

def parse_job(line, system):
    """Split a job line into ``(schedule, user, command, notes)`` or raise CrontabError."""
    notes = []
    rest = line.lstrip(" \t")
    if rest.startswith("-"):
        rest = rest[1:]
        notes.append("cron's '-' flag (do not log to syslog) dropped: torchcore records every run")
    if rest.startswith("@"):
        word, rest = _split_word(rest)
        if word not in MACROS:
            raise CrontabError(f"unknown time macro {word!r} "
                               f"(cron knows {', '.join(sorted(MACROS))})")
        schedule = MACROS[word]
    else:
        fields = []
        for name, *_ in FIELDS:
            word, rest = _split_word(rest)
            if not word:
                raise CrontabError(f"the line ends before its {name} field")
            fields.append(word)
        schedule = " ".join(check_fields(fields))
    user = None
    if system:
        user, rest = _split_word(rest)
        if not user:
            raise CrontabError("the line has no user column (system crontab format)")
    if not rest.strip() or (not system and rest.startswith("*")):
        raise CrontabError("no command after the schedule"
                           + ("" if system else " (or a 6th time field: not valid in a crontab)"))
    return schedule, user, rest, notes


def _split_word(text):
    """Cron's field splitting: a run of non-blanks, then the blanks after it are skipped."""
    m = re.match(r"([^ \t]*)[ \t]*", text)
    return m.group(1), text[m.end():]


# --- whole crontabs ---------------------------------------------------------------------------

def convert(text, source, system=False, user=None):
    """Convert one crontab's text; ``source`` names it in comments, descriptions and messages.

    ``system``: the ``/etc/crontab`` format, with a user column before the command.
    ``user``: the ``user:`` to give every task of a user crontab (None: leave it out).
    """
    result = ImportResult()
    env = {}
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    elif lines[-1].strip():
        result.warnings.append(f"{source}:{len(lines)}: no newline at the end of the file "
                               "(cron ignores such a last line); converted anyway")
    if any(line.endswith("\r") for line in lines):
        result.warnings.append(f"{source}: carriage returns at line ends (CRLF) were dropped")
    for lineno, line in enumerate(lines, 1):
        result.items.append(_convert_line(line.removesuffix("\r"), lineno, source, env,
                                          system, user))
    result.items = [item for item in result.items if item is not None]
    result.warnings += percent_warnings(result.entries, system)
    return result


def percent_warnings(entries, system=False):
    """A warning for each job whose command has an unescaped ``%`` (``date +%F``): cron cut the
    command there and fed the rest to its standard input, and so does the conversion."""
    return [f"{entry.source}:{entry.lineno}: unescaped '%' in the command: cron runs only the "
            "text before it and feeds the rest to standard input (converted the same way); "
            "for a literal % (as in `date +%F`) write '\\%' in the crontab"
            for entry in entries
            if split_percent(parse_job(entry.text, system)[2])[1] is not None]


def _convert_line(line, lineno, source, env, system, user):
    """One line -> Entry, Problem, Comment or None (blank); updates ``env`` on assignments."""
    stripped = line.strip(" \t")
    if not stripped:
        return None
    if re.search("[\udc80-\udcff]", line):   # bytes that are not UTF-8, shown as latin-1
        latin = line.encode("utf-8", "surrogateescape").decode("latin-1")
        if stripped.startswith("#"):
            return Comment(source, lineno, latin)
        return Problem(source, lineno, latin, "the line is not valid UTF-8")
    if "\x00" in line:
        return Problem(source, lineno, line, "the line holds a NUL byte; no command, variable "
                                             "or name can hold one")
    if stripped.startswith("#"):
        return Comment(source, lineno, line)
    assignment = parse_env(line)
    try:
        if assignment:
            _assign(env, *assignment)
            return Comment(source, lineno, line)
        return _entry(line, lineno, source, env, system, user)
    except CrontabError as exc:
        return Problem(source, lineno, line, str(exc))


def _assign(env, name, value):
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise CrontabError(f"environment variable name {name!r} cannot be set by a task "
                           "(names are [A-Za-z_][A-Za-z0-9_]*); it is not set for the lines below")
    if name == "CRON_TZ" and value and check_zone(value) is None:
        env[name] = None   # poisons the lines below: they are reported, not guessed
        raise CrontabError(f"{name}={value!r} is not a known IANA time zone; "
                           "the lines below it cannot be converted")
    env[name] = value


def _entry(line, lineno, source, env, system, user):
    schedule, line_user, command, notes = parse_job(line, system)
    shell = env.get("SHELL") or DEFAULT_SHELL
    if env.get("CRON_TZ", "") is None:
        raise CrontabError("an invalid CRON_TZ above this line leaves its time zone unknown")
    zone = env.get("CRON_TZ") or _tz_zone(env.get("TZ"), notes)
    cmd, stdin = split_percent(command)
    if stdin is not None and cmd.strip() == "":
        raise CrontabError("the command before '%' is empty")
    if stdin:
        if os.path.basename(shell) not in POSIX_SHELLS:
            raise CrontabError(f"'%' standard input with SHELL={shell}: "
                               "only POSIX shells can be given it in the command")
        notes.append("the text after '%' is fed to the command's standard input, as cron did")
        if cmd.count("'") % 2 or cmd.count('"') % 2:
            notes.append("that '%' is inside quotes: cron split the command there all the same; "
                         "write '\\%' for a literal %")
        cmd = with_stdin(cmd, stdin)
    for var in sorted(MAIL_VARS & env.keys()):
        notes.append(f"{var}={env[var]} (cron mailed the output there; so does notify below)"
                     if var == "MAILTO" and env[var] else
                     f"{var}={env[var]}" if env[var] else f"{var}= (cron mailed nothing)")
    return Entry(
        source=source, lineno=lineno, text=line, schedule=schedule,
        command=cmd if shell == DEFAULT_SHELL else [shell, "-c", cmd],
        user=line_user if system else user,
        env={k: v for k, v in env.items() if k not in MAIL_VARS and k != "CRON_TZ"},
        timezone=zone, cwd=_cwd(env, notes), notes=notes,
        mail_to=mail_addresses(env.get("MAILTO", "")), mail_from=env.get("MAILFROM") or None,
        name=base_name(split_percent(command)[0]))


def mail_addresses(mailto):
    """MAILTO's addresses (commas or blanks between them); a bare user name is a local mailbox,
    as cron's sendmail read it.

    >>> mail_addresses("ops@example.com, root")
    ['ops@example.com', 'root@localhost']
    """
    return [a if "@" in a else f"{a}@localhost" for a in re.split(r"[,\s]+", mailto.strip()) if a]


def mail_url(entry, address):
    """The Apprise URL that mails an entry's output to ``address`` through ``entry.smtp``
    (one URL per address: Apprise reads a list of them unreliably)."""
    query = urllib.parse.urlencode({"to": address, "from": entry.mail_from or MAIL_SENDER})
    return f"mailto://{entry.smtp}?{query}"


# --- names ------------------------------------------------------------------------------------

# Programs that only wrap the real one: (their options that take a value, positionals to skip).
WRAPPERS = {
    "nice": ({"-n", "--adjustment"}, 0), "ionice": ({"-c", "-n", "-p", "-t"}, 0),
    "nohup": (set(), 0), "timeout": ({"-s", "-k", "--signal", "--kill-after"}, 1),
    "flock": ({"-w", "-E", "--timeout", "--conflict-exit-code"}, 1), "env": ({"-u", "-C"}, 0),
    "chronic": (set(), 0), "cronic": (set(), 0), "time": ({"-f", "-o"}, 0),
    "exec": ({"-a"}, 0), "command": (set(), 0), "sudo": ({"-u", "-g", "-C", "-h"}, 0),
    "run-one": (set(), 0), "setlock": (set(), 1), "stdbuf": ({"-i", "-o", "-e"}, 0),
}
# Programs that rarely name a job (`cd /x && real-job`): skipped unless nothing else is left.
MINOR = {"cd", "test", "[", "[[", "true", "false", ":", "sleep", "export", "set", "umask",
         "source", ".", "ulimit", "echo", "printf", "cat", "exit"}
SHELL_WORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "for", "{",
               "}", "!", "[[", "]]"}
SEPARATORS = {";", "&", "&&", "|", "||", "(", ")", ";;", "|&"}


def base_name(command):
    """A readable task name from a shell command: program basename and first real argument.

    >>> base_name("cd / && nice -n 10 /usr/local/bin/backup.sh --full /srv/db >/dev/null 2>&1")
    'backup.sh-db'
    """
    words = _simple_commands(command)
    chosen = next((w for w in words if _program(w)[0] not in MINOR), words[0] if words else [])
    prog, args = _program(chosen)
    if prog in ("sh", "bash", "dash", "zsh", "ksh") and args[:1] == ["-c"] and len(args) > 1:
        return base_name(args[1])
    arg = next((a for a in args
                if not a.startswith("-") and a != "/dev/null" and not a.isdigit()), "")
    parts = [sanitize(prog)] + ([sanitize(_last_component(arg))] if arg else [])
    parts = [p for p in parts if p]
    if len(parts) == 2 and parts[0] == parts[1]:
        parts.pop()
    return "-".join(p[:30] for p in parts) or "task"


def _simple_commands(command):
    """The command split into lists of words, one per simple command; redirections dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:   # an unbalanced quote: a plain split is good enough for a name
        tokens = command.split()
    commands, current, skip_next = [], [], False
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if skip_next or tok in SHELL_WORDS:
            skip_next = False
        elif tok in SEPARATORS:
            commands.append(current)
            current = []
        elif tok and set(tok) <= set("<>&"):
            skip_next = True    # a redirection: its target is no argument
        elif not (tok.isdigit() and nxt[:1] in ("<", ">")):
            current.append(tok)
    commands.append(current)
    return [c for c in commands if c]


def _program(words):
    """``(program basename, its arguments)`` after leading assignments and wrappers."""
    words = list(words)
    while words:
        if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words.pop(0)
            continue
        prog = os.path.basename(words[0].rstrip("/")) or words[0]
        if prog not in WRAPPERS:
            return prog, words[1:]
        valued, positional = WRAPPERS[prog]
        words.pop(0)
        while words and (words[0].startswith("-") or re.match(r"[A-Za-z_]\w*=", words[0])):
            opt = words.pop(0)
            if opt in valued and words:
                words.pop(0)
        del words[:positional]
    return "", []


def _last_component(arg):
    """``/etc/cron.daily`` -> ``cron.daily``; a URL -> its last path part (or its host)."""
    if "://" in arg:
        arg = arg.split("://", 1)[1].split("?", 1)[0]
    parts = [p for p in arg.split("/") if p]
    return parts[-1] if parts else arg


def sanitize(text):
    """Keep ``[A-Za-z0-9._-]`` (accents dropped: é -> e); other runs become one ``-``."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return _NAME_BAD.sub("-", text).strip("-._")


def assign_names(entries, prefix="", taken=()):
    """Give every entry a unique, stable name: the same crontab always gets the same names.

    A name derived from the command is used as is when no other entry (and nothing in
    ``taken``) shares it; entries that share one get a suffix from a short hash of their
    schedule, then of schedule and command; truly identical lines are numbered in order.
    """
    prefix = prefix + "-" if prefix and prefix[-1] not in "-._" else prefix
    room = NAME_MAX - len(prefix) - 7
    bases = [prefix + e.name[:room].rstrip("-._") for e in entries]
    used = set(taken)
    counts = {}
    for b in bases:
        counts[b] = counts.get(b, 0) + 1
    for entry, base in zip(entries, bases):
        reserved = base.lower() in RESERVED_NAMES     # torchcore.log is the daemon's own log
        candidates = [] if counts[base] > 1 or base in used or reserved else [base]
        candidates += [f"{base}-{_short_hash(entry.schedule)}",
                       f"{base}-{_short_hash(entry.schedule, repr(entry.command), entry.user)}"]
        name = next((c for c in candidates if c not in used), None)
        n = 2
        while name is None or name in used:
            name, n = f"{candidates[-1]}-{n}", n + 1
        used.add(name)
        entry.name = name
    return entries


def _short_hash(*parts):
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:6]


def _tz_zone(tz, notes):
    """``TZ`` as the task's zone when it names one; cron itself scheduled by local time."""
    if not tz:
        return None
    if check_zone(tz) is None:
        notes.append(f"TZ={tz} is not an IANA zone: kept in env only, the schedule stays in "
                     "local time as under cron")
        return None
    return tz


def _cwd(env, notes):
    """Cron starts a job in $HOME: an assigned HOME becomes the task's ``cwd``."""
    home = env.get("HOME")
    if home and not home.startswith("/"):
        notes.append(f"HOME={home} is not an absolute path: cron's start directory left out")
        return None
    return home or None
