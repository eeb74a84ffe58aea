"""``torchcore import``: turn crontabs into task-file entries, or merge them into a task file."""

import ipaddress
import os
import re
import sys
import tempfile

from torchcore import crontab, taskwriter
from torchcore.config import suggest_zone
from torchcore.crontab import CrontabError
from torchcore.errors import TorchcoreError
from torchcore.schedule import check_zone

SYSTEM_CRONTAB = "/etc/crontab"
SYSTEM_CRON_DIR = "/etc/cron.d"
# cron.d files cron itself reads (Debian's rule): others are backups, editor files, disabled.
CRON_D_NAME = re.compile(r"[A-Za-z0-9_-]+")


def register(subparsers):
    p = subparsers.add_parser(
        "import", help="convert crontabs into task-file entries",
        description="Convert crontabs (`crontab -l` output, or with --system /etc/crontab and "
                    "/etc/cron.d files) into torchcore tasks. Lines that cannot be converted are "
                    "reported on stderr and kept as comments; the exit status is then 1.")
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="crontab files, '-' for stdin (default: stdin; with --system: "
                        "/etc/crontab and /etc/cron.d/*)")
    p.add_argument("--system", action="store_true",
                   help="system crontab format: a user column before the command")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR",
                   help="the machine's address or network, written as the tasks' ips (repeatable)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="hostname (glob) written as the tasks' hosts (repeatable)")
    p.add_argument("--prefix", default="", metavar="P", help="start every task name with P-")
    p.add_argument("--user", default=None, metavar="NAME",
                   help="user: for the tasks of a user crontab (cron ran them as its owner)")
    p.add_argument("--timezone", default=None, metavar="ZONE",
                   help="the machine's time zone (IANA), for lines without CRON_TZ/TZ: cron ran "
                        "them in the machine's local time")
    p.add_argument("--smtp", metavar="HOST:PORT", default=crontab.DEFAULT_SMTP,
                   help="the SMTP server that mails the output of jobs under MAILTO "
                        f"(default {crontab.DEFAULT_SMTP}, the local MTA cron used)")
    p.add_argument("--merge", metavar="TASKS", default=None,
                   help="merge into this task file (identical tasks get the union of their ips)")
    p.add_argument("-o", "--output", metavar="OUT", default=None,
                   help="write here, atomically (default: stdout)")
    p.set_defaults(func=run)


def run(args):
    """Read, convert, report, write; exit 1 if any line was left unconverted."""
    check_prefix(args.prefix)
    timezone_option(args.timezone)
    ips, hosts = targeting(args.ip, args.host)
    if args.merge and not (ips or hosts):
        raise TorchcoreError("--merge needs --ip or --host: without them the imported tasks "
                             "would run on every node of the fleet")
    sources = source_files(args.files, args.system)
    result = crontab.ImportResult()
    for source in sources:
        part = crontab.convert(read_source(source), source, args.system, args.user)
        result.items += part.items
        result.warnings += part.warnings
    if not args.system and args.user is None and result.entries:
        result.warnings += [user_warning(source, result.entries) for source in sources]
    smtp = smtp_option(args.smtp)
    for entry in result.entries:
        entry.ips, entry.hosts = list(ips), list(hosts)
        entry.smtp = smtp
        entry.timezone = entry.timezone or args.timezone
    text = merged_text(args.merge, result, args.prefix, bool(args.timezone)) if args.merge \
        else fresh_text(result, sources, args.prefix)
    report(result)
    write_output(text, args.output)
    return 1 if result.problems else 0


# ---- the options -----------------------------------------------------------------------

def check_prefix(prefix):
    """Raise CrontabError unless ``prefix`` can start a task name."""
    if prefix and (not re.fullmatch(r"[A-Za-z0-9._-]+", prefix) or len(prefix) > 40):
        raise CrontabError(f"--prefix {prefix!r}: use at most 40 of A-Z a-z 0-9 . _ -")


def smtp_option(server):
    """``HOST[:PORT]`` (``--smtp``), or CrontabError."""
    if not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", server or ""):
        raise CrontabError(f"--smtp {server!r}: expected HOST or HOST:PORT, e.g. localhost:25")
    return server


def timezone_option(zone):
    """Raise CrontabError unless ``zone`` (``--timezone``) is None or a known IANA time zone."""
    if zone is not None and check_zone(zone) is None:
        raise CrontabError(f"--timezone {zone!r} is not a known IANA time zone"
                           f"{suggest_zone(zone) or ' (e.g. Europe/Paris, UTC)'}")


def targeting(ips=(), hosts=()):
    """Normalized ``(ips, hosts)`` for ``--ip``/``--host``; CrontabError on a bad address."""
    out = []
    for text in ips:
        try:
            out.append(str(ipaddress.ip_address(text)) if "/" not in text
                       else str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise CrontabError(f"--ip {text!r} is not an IP address or CIDR network") from None
    for host in hosts:
        if not host or any(c.isspace() for c in host):
            raise CrontabError(f"--host {host!r} is not a hostname pattern")
    return out, list(hosts)


# ---- reading, converting, writing --------------------------------------------------------

def user_warning(source, entries):
    """A per-user crontab imported without --user: its jobs would run as the daemon's user."""
    count = sum(entry.source == source for entry in entries)
    owner = os.path.basename(source) if "/spool/cron" in os.path.abspath(source) else "OWNER"
    return (f"{'stdin' if source == '-' else source}: a per-user crontab imported without "
            f"--user: its {count} task(s) would run as the daemon's user (root on a system "
            f"install), not as the crontab's owner; give --user {owner}")


def fresh_text(result, sources, prefix):
    crontab.assign_names(result.entries, prefix)
    taskwriter.validate(result)
    return taskwriter.render(result, [s if s != "-" else "stdin" for s in sources])


def merged_text(path, result, prefix, zone_given):
    try:
        with open(path, encoding="utf-8-sig") as f:
            existing = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise TorchcoreError(f"cannot read {path}: {exc}") from None
    merged = taskwriter.merge(existing, path, result, prefix)
    if merged.zone and not zone_given:
        print(f"warning: {path} sets settings.timezone {merged.zone}: imported lines without "
              "CRON_TZ now follow it, not the machine's local time (see --timezone)",
              file=sys.stderr)
    for entry, name, added in merged.collapsed:
        what = f"added {', '.join(added)}" if added else "nothing to add"
        print(f"{entry.source}:{entry.lineno}: same job as task '{name}' ({what})",
              file=sys.stderr)
    return merged.text


def source_files(files, system):
    """The files to read: as given, else stdin, else (--system) the system crontabs."""
    if files:
        return list(files)
    if not system:
        return ["-"]
    found = [SYSTEM_CRONTAB] if os.path.exists(SYSTEM_CRONTAB) else []
    try:
        names = sorted(os.listdir(SYSTEM_CRON_DIR))
    except OSError:
        names = []
    for name in names:
        if CRON_D_NAME.fullmatch(name):
            found.append(os.path.join(SYSTEM_CRON_DIR, name))
        else:
            print(f"{SYSTEM_CRON_DIR}/{name}: skipped (cron ignores files named like this)",
                  file=sys.stderr)
    if not found:
        raise TorchcoreError(f"no system crontabs found ({SYSTEM_CRONTAB}, {SYSTEM_CRON_DIR}/*)")
    return found


def read_source(source):
    """A crontab's text; bytes that are not UTF-8 survive as surrogates and are reported."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(source, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise TorchcoreError(f"cannot read {source}: {exc.strerror}") from None
    return data.decode("utf-8", errors="surrogateescape")


def report(result):
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in result.problems:
        print(problem, file=sys.stderr)
    print(f"{len(result.entries)} task(s) converted, {len(result.problems)} line(s) not "
          "converted (kept as comments)", file=sys.stderr)


def write_output(text, path):
    """Write to stdout, or atomically to ``path`` (a temporary file renamed over it)."""
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        _write_atomically(text, path)
    except OSError as exc:
        raise TorchcoreError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_atomically(text, path):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".import-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
