"""Who is told what: the ``notify`` and ``ping`` fields of a task file, validated.

    settings:
      notify:                               # every task's targets, unless it names its own
        - to: mailto://ops@example.com      # an Apprise URL (people: mail, Slack, ntfy, ...)
          on: [failure, timeout, crash-loop, recovered]
    tasks:
      - name: backup
        notify:
          - webhook: https://hooks.internal/cron    # torchcore's own JSON body, POSTed
            on: [failure, missed]
            every: 10m                      # at most one message per 10 minutes, then a digest
        ping: https://hc-ping.com/UUID      # dead-man pings: /start, then success or /fail

A target is checked here without importing Apprise (the supervisor validates the file and
must stay small): a ``to:`` URL's scheme against the schemes Apprise knows, a webhook or ping
URL as http(s) with a host.  Secrets are often part of a URL (a token in the path, a password
before the host), so a URL is never echoed in a message: :func:`shown_url` is what logs and
errors print.  This module imports nothing from the package but the YAML readers.
"""

import dataclasses
import hashlib
import re
import urllib.parse

import yaml

from torchcore.yamlread import STR, Bad, got, suggest, want_duration, want_int, want_list, want_str

EVENTS = ("failure", "timeout", "crash-loop", "skipped", "missed", "recovered", "output")
DEFAULT_ON = ("failure", "timeout", "crash-loop", "missed", "recovered")
DEFAULT_EVERY = 300         # seconds: at most one message per task, target and event, then a digest
DEFAULT_TAIL = 20           # lines of output in a message
MAX_TAIL = 1000
MAX_URL = 4096
TARGET_KEYS = ("to", "webhook", "on", "every", "tail")

# The URL schemes of Apprise's services (Apprise 1.9 - 2.3); `to:` takes these.
APPRISE_SCHEMES = frozenset("""
46elks acs amqp amqps apprise apprises aprs atalk awswhatsapp azure bale bark barks betterstack
bluesky brevo bsky bulksms bulkvs burstsms chanify clickatell clicksend cliq cm d7sms dapnet
deltachat deltachats dingtalk discord dot eight00com elks emby embys enigma2 enigma2s evolution
evolutions exotel feishu firehydrant flock flowtriq flowtriqs fluxer fluxers form forms freemobile
gchat github goalert goalerts gorush gorushs gotify gotifys groundmail groupme guilded gupshup
hassio hassios httpsms humhub humhubs ifttt ilert incidentio infobip instagram irc ircs jellyfin
jellyfins jira join json jsons kakao kakaotalk kaleyra kavenegar klr kodi kodis kook kudosity
kumulos lametric lametrics lark lauther lfg line mailersend mailgun mailto mailtos mastodon
mastodons matrix matrixs misskey misskeys mmost mmosts mobilemessage mobilemsg msg91 msgbird
msteams ncloud nclouds nctalk nctalks nexmo nostr notica noticas notifiarr notifico notificos
notifyapp notifyre ntfy ntfys o365 octopush onebot onebots onesignal opsgenie opsimate opsimates
pagerduty pagertree parsep parseps pbul pinglet pinglets pingram pjet pjets plivo popcorn
postmark pover prowl psafer psafers push pushbullet pushdeer pushdeers pushed pushme pushover
pushplus pushward pushy qq reddit resend revolt ringc rocket rockets rsyslog ryver schan sendgrid
sendpulse serwersms ses seven sfr signal signalgrid signals signl4 simplepush sinch slack smsc
smseagle smseagles smsmanager smsmgr smstunnel smtp2go sns sparkpost spike splunk spugpush
spush squadcast stackfield strmlabs synology synologys syslog telegram telesign telnyx tgram
threema toot toots trigv trigvs tweet twilio twist twitter viber victorops voipms vonage webex
wechat wecom wecombot whapi whatsapp workflow workflows wpush wxpusher wxteams x xbmc xbmcs
xmatters xml xmls youlmk zalo zcliq zohocliq zoom zulip
""".split())
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One place messages go: ``kind`` is ``to`` (Apprise), ``webhook`` or ``ping``."""

    kind: str
    url: str = dataclasses.field(repr=False)
    on: tuple = DEFAULT_ON
    every: int = DEFAULT_EVERY
    tail: int = DEFAULT_TAIL
    line: int = dataclasses.field(default=0, compare=False)

    @property
    def key(self):
        """A short stable name of the target (its kind and URL hashed): what the outbox stores
        instead of the URL, so no secret lands in the database or a log."""
        return hashlib.sha256(f"{self.kind} {self.url}".encode()).hexdigest()[:16]

    @property
    def shown(self):
        """The target as logs print it: ``webhook https://hooks.internal/…``."""
        return f"{self.kind} {shown_url(self.url)}"


def shown_url(url):
    """A URL with what may be secret left out: the scheme and, for http(s), the host.

    >>> shown_url("https://user:pw@hooks.example.com/T0/B0/xyz?token=1")
    'https://hooks.example.com/…'
    >>> shown_url("tgram://123456:bottoken/chat")
    'tgram://…'
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return f"{url.partition(':')[0][:20] or '?'}://…"
    if parts.scheme in ("http", "https") and parts.hostname:
        port = f":{parts.port}" if _port(parts) else ""
        rest = "/…" if (parts.path not in ("", "/") or parts.query) else ""
        return f"{parts.scheme}://{parts.hostname}{port}{rest}"
    return f"{parts.scheme or '?'}://…"


def _port(parts):
    try:
        return parts.port
    except ValueError:
        return None


# -- field parsers: (loader, value node) -> value, or raise Bad (see validate.py) -------------


def notify_list(loader, node):
    """``notify:``: a list of targets (an empty list: nobody is told)."""
    items = want_list(node, "targets, e.g. [{to: mailto://ops@example.com}]")
    targets = []
    for number, item in enumerate(items, 1):
        try:
            targets.append(_target(loader, item))
        except Bad as bad:
            raise Bad(f"#{number}: {bad}", bad.node or item) from None
    return tuple(targets)


def ping(loader, node):
    """``ping:``: a healthchecks-style URL; /start, /fail are added to it."""
    try:
        url = _http_url(node, "ping")
    except Bad as bad:      # the loader names the field already
        raise Bad(str(bad).removeprefix("ping: "), bad.node) from None
    return Target(kind="ping", url=url, on=(), every=0, line=node.start_mark.line + 1)


def _target(loader, node):
    if not isinstance(node, yaml.MappingNode):
        raise Bad("expected a mapping with to: (an Apprise URL) or webhook: (an http(s) URL), "
                  f"{got(node)}", node)
    from torchcore.validate import Loader, raise_bad      # validate imports this module

    loader = loader or Loader("<target>")    # one given on the command line (notify test)
    pairs = {key: value for key, (_, value) in loader.mapping(
        node, "", TARGET_KEYS, fail=raise_bad, listing=" (known: to, webhook, on, every, tail)").items()}
    if ("to" in pairs) == ("webhook" in pairs):
        raise Bad("give exactly one of to: (an Apprise URL: mailto://, slack://, ntfy://, ...) "
                  "and webhook: (an http(s) URL torchcore POSTs its JSON to)", node)
    if "to" in pairs:
        kind, url = "to", _apprise_url(pairs["to"])
    else:
        kind, url = "webhook", _http_url(pairs["webhook"], "webhook")
    values = {"kind": kind, "url": url, "line": node.start_mark.line + 1}
    if "on" in pairs:
        values["on"] = _events(pairs["on"])
    if "every" in pairs:
        values["every"] = _field("every", lambda n: want_duration(n, 0), pairs["every"])
    if "tail" in pairs:
        values["tail"] = _field("tail", lambda n: want_int(n, 0, MAX_TAIL), pairs["tail"])
    return Target(**values)


def _field(name, parse, node):
    try:
        return parse(node)
    except Bad as bad:
        raise Bad(f"{name}: {bad}", bad.node or node) from None


def _events(node):
    """``on: [failure, missed]`` (or one event as a string) -> a sorted tuple of events."""
    items = [node] if node.tag == STR else \
        _field("on", lambda n: want_list(n, f"events ({', '.join(EVENTS)})"), node)
    events = set()
    for item in items:
        name = _field("on", lambda n: want_str(n, "an event name"), item)
        if name not in EVENTS:
            raise Bad(f"on: unknown event {name[:40]!r}{suggest(name[:100], EVENTS)} "
                      f"(known: {', '.join(EVENTS)})", item)
        events.add(name)
    if not events:
        raise Bad(f"on: an empty list: name at least one event ({', '.join(EVENTS)})", node)
    return tuple(e for e in EVENTS if e in events)


def _url(node, field):
    url = _field(field, lambda n: want_str(n, "a URL", MAX_URL), node)
    if _SPACE_OR_CONTROL.search(url):
        raise Bad(f"{field}: a URL holds no spaces or control characters "
                  "(percent-encode them: %20)", node)
    match = _SCHEME_RE.match(url)
    if not match:
        raise Bad(f"{field}: expected a URL like scheme://..., got text without '://'", node)
    return url, match.group(1).lower()


def _http_url(node, field):
    url, scheme = _url(node, field)
    if scheme not in ("http", "https"):
        hint = (" (for an Apprise service use to: instead of webhook:)"
                if scheme in APPRISE_SCHEMES and field == "webhook" else suggest(scheme, ("http", "https")))
        raise Bad(f"{field}: expected an http:// or https:// URL, got scheme {scheme[:20]!r}{hint}", node)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:      # "Invalid IPv6 URL": a [ without its ], and the like
        raise Bad(f"{field}: the URL cannot be read ({exc})", node) from None
    if not parts.hostname:
        raise Bad(f"{field}: the URL names no host ({scheme}://HOST/...)", node)
    try:
        _ = parts.port
    except ValueError:
        raise Bad(f"{field}: the URL's port is not a number from 0 to 65535", node) from None
    return url


def _apprise_url(node):
    url, scheme = _url(node, "to")
    if scheme in ("http", "https"):
        raise Bad("to: takes an Apprise URL (mailto://, slack://, json://, ...); "
                  "for a plain http(s) endpoint use webhook: instead", node)
    if scheme not in APPRISE_SCHEMES:
        raise Bad(f"to: unknown Apprise scheme {scheme[:20]!r}{suggest(scheme, sorted(APPRISE_SCHEMES))} "
                  "(see Apprise's list of services)", node)
    if len(url) <= len(scheme) + 3:
        raise Bad(f"to: the URL has nothing after {scheme}://", node)
    return url


# -- what a task file asks for ------------------------------------------------------------------


def targets_of(task, settings):
    """The notify targets of ``task``: its own ``notify`` if it has one, else the settings'."""
    own = getattr(task, "notify", None)
    return own if own is not None else getattr(settings, "notify", ())


def all_targets(taskfile):
    """Every target and ping of the file (a target named twice, twice)."""
    targets = list(getattr(taskfile.settings, "notify", ()))
    for task in taskfile.tasks:
        targets += getattr(task, "notify", None) or ()
        if getattr(task, "ping", None) is not None:
            targets.append(task.ping)
    return targets


def asks_for_notifier(taskfile, node=None):
    """True if an enabled task (of those that run on ``node``, when given) has a target (its own
    or the settings') or a ping: then the notifier service runs."""
    tasks = taskfile.tasks if node is None else taskfile.local_tasks(node)
    return any(t.enabled and (targets_of(t, taskfile.settings) or getattr(t, "ping", None))
               for t in tasks)
