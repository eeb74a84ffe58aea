"""Sending one message to one target: a webhook POST, a ping, or an Apprise notification.

Each ``send`` returns a :class:`Sent`: delivered, to be retried later, or rejected for good
(a 4xx answer other than 408/425/429; an Apprise URL Apprise cannot read).  Nothing here
raises for a network problem, and no detail holds a URL (the caller names the target as
notifyspec.shown_url prints it).

Webhooks and pings use the standard library's HTTP client (the project has no other);
Apprise, which speaks to ~100 services in one URL syntax, mail included, is imported the
first time a ``to:`` target is sent to: only the notifier process (and ``notify test``)
ever loads it, and it is an optional dependency (``pip install 'torchcore[notify]'``).
"""

import base64
import contextlib
import dataclasses
import http.client
import json
import logging
import signal
import threading
import urllib.error
import urllib.parse
import urllib.request

from torchcore import __version__
from torchcore.notifyrules import rejected, text, title

TIMEOUT = 10.0              # seconds one try may take, all of it (a receiver answering a byte at a time too)
APPRISE_TRIES = 6          # an Apprise send may take this many TIMEOUTs (a mail's dialogue is long)
MAX_ANSWER = 64 << 10       # bytes of an answer read (and thrown away)
USER_AGENT = f"torchcore/{__version__}"


@dataclasses.dataclass(frozen=True)
class Sent:
    """How one try went: ``state`` is sent, retry or rejected; ``detail`` says why."""

    state: str
    detail: str = ""


def send(target, event, body, timeout=TIMEOUT):
    """Send ``body`` (the webhook's JSON body; for a ping, the run's) to ``target``."""
    if target.kind == "webhook":
        return post(target.url, json.dumps(body).encode(), "application/json", timeout,
                    {"Idempotency-Key": body["id"]})
    if target.kind == "ping":
        url = target.url.rstrip("/") + {"start": "/start", "fail": "/fail"}.get(event, "")
        return post(url, (body.get("output_tail") or "").encode(), "text/plain; charset=utf-8",
                    timeout, {})
    return apprise_send(target.url, title(body), text(body), timeout * APPRISE_TRIES)


def post(url, data, content_type, timeout, headers):
    """POST ``data``; 2xx is sent, a "never" 4xx rejected, anything else retried.  The whole
    try (connecting, sending, the answer) ends after ``timeout`` seconds."""
    url, auth = _credentials(url)
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": content_type, "User-Agent": USER_AGENT, **auth, **headers})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with _deadline(timeout), opener.open(request, timeout=timeout) as answer:
            answer.read(MAX_ANSWER)
            return Sent("sent", f"HTTP {answer.status}")
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
        return Sent("rejected" if rejected(status) else "retry", f"HTTP {status}")
    except _Overdue:
        return Sent("retry", f"no complete answer within {timeout:g}s")
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        return Sent("retry", _safe(getattr(exc, "reason", exc)))


def _credentials(url):
    """``(url, headers)``: a user and password written in the URL (``https://user:pw@host/``)
    sent as HTTP Basic authentication, which is what they mean (the standard library's client
    would take them for part of the host name)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return (urllib.parse.urlunsplit(parts._replace(netloc=host)),
            {"Authorization": "Basic " + base64.b64encode(token).decode()})


class _Overdue(BaseException):
    """A try went on past its timeout (a BaseException: a plugin's ``except Exception`` lets it
    through)."""


@contextlib.contextmanager
def _deadline(seconds):
    """Raise _Overdue in the block after ``seconds`` (SIGALRM; in the main thread only, where
    the notifier and ``notify test`` send): a socket's timeout bounds each wait, not the try."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def overdue(signum, frame):
        raise _Overdue

    before = signal.signal(signal.SIGALRM, overdue)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (3xx: retried), not a move of a POST elsewhere."""

    def redirect_request(self, *args, **kwargs):
        return None


def _safe(reason):
    """An error's text without the URL it may quote."""
    text = str(reason) or type(reason).__name__
    return text if "://" not in text else type(reason).__name__


def apprise_send(url, subject, body, timeout=TIMEOUT * APPRISE_TRIES):
    """Notify through Apprise; False from Apprise is retried (it gives no reason beyond its log),
    as is a send still going on after ``timeout`` seconds (a mail server answering a line at a
    time would otherwise hold the notifier and every other target)."""
    try:
        import apprise
    except ImportError:
        return Sent("retry", "Apprise is not installed: pip install 'torchcore[notify]' "
                             "(to: targets need it; messages wait until it is there)")
    _quiet_apprise()
    sender = apprise.Apprise()
    if not sender.add(url):
        return Sent("rejected", "Apprise cannot read this URL (see Apprise's page for the service)")
    try:
        with _deadline(timeout):
            ok = sender.notify(title=subject, body=body, body_format=apprise.NotifyFormat.TEXT)
    except _Overdue:
        return Sent("retry", f"Apprise did not finish within {timeout:g}s")
    except Exception as exc:        # a plugin's bug must not stop the notifier
        return Sent("retry", f"Apprise failed: {type(exc).__name__}")
    return Sent("sent", "") if ok else Sent("retry", "Apprise could not deliver it (its log says why)")


def _quiet_apprise():
    """Apprise logs what it sends at INFO, addresses included: warnings only."""
    logging.getLogger("apprise").setLevel(logging.WARNING)
