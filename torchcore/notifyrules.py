"""The notifier's rules, without I/O: which events a run record makes, the rate limit with its
digest, the retry backoff, and what a message says.

Everything here is a pure function of its arguments (the time included), so the rules are
tested on made-up sequences of events and clocks (tests/test_notifyrules.py); notifier.py
applies them to the records database and the network.

Events of an ended run: ``timeout`` (it timed out), else ``failure`` (any other failure, see
outcome.run_failed); ``crash-loop`` (a daemon instance that lived less than a second: a failed
start, which the supervisor backs off); ``recovered`` (the first run that did not fail after
one that did); ``output`` (it printed anything).  A due time not run makes ``skipped`` (max or
max_running) or ``missed`` (beyond misfire_grace, replaced by a later second, or lost while the
daemon was down).  A run stopped by a planned stop (shutdown, reload) makes none.
"""

import dataclasses
import datetime

from torchcore.daemons import FAILED_START_UNDER

RETRY_FIRST = 1.0           # seconds before the first retry of a failed delivery ...
RETRY_MAX = 300.0           # ... doubling up to this ...
GIVE_UP_AFTER = 24 * 3600   # ... for this long after the event; then it expires
PING_KINDS = ("start", "success", "fail")


def run_events(record, is_daemon, was_failing, has_output):
    """``(events, failing)`` for one run record (a RunRecord, as stored).

    ``was_failing``: the task's last ended run failed (for ``recovered``); ``failing`` is the
    new value of it (unchanged by a start, a skip, a miss or a planned stop).  A record of a
    run that has only started makes no event.
    """
    if record.missed:
        return ["missed"], was_failing
    if record.skipped is not None:
        return ["skipped"], was_failing
    if record.ended is None or record.stopped is not None:
        return [], was_failing
    events = []
    if record.failed:
        events.append("timeout" if record.timed_out else "failure")
    elif was_failing:
        events.append("recovered")
    if is_daemon and record.duration is not None and record.duration < FAILED_START_UNDER:
        events.append("crash-loop")
    if has_output:
        events.append("output")
    return events, record.failed


def run_pings(record, start_sent):
    """The pings a record makes: ``start`` for a run that started (if not sent already), then
    ``success`` or ``fail`` once it ended.  Skips, misses and planned stops ping nothing."""
    if record.started is None or record.skipped is not None or record.missed:
        return []
    pings = [] if start_sent else ["start"]
    if record.ended is not None and record.stopped is None:
        pings.append("fail" if record.failed else "success")
    elif record.ended is not None:
        pings = []
    return pings


# -- the rate limit: per (task, target, event), at most one message per ``every`` seconds ------


@dataclasses.dataclass(frozen=True)
class Window:
    """The rate limit's state for one (task, target, event)."""

    sent_at: float | None = None    # when the last message went out (queued, that is)
    held: int = 0                   # events held back since then
    since: float | None = None      # when the first of them happened
    last: str | None = None         # the message id of the latest one held back (its details)


def admit(window, now, every):
    """``(send, window)``: send this event now, or hold it back for the digest.

    A message goes out when none went out in the last ``every`` seconds.  Call digest_due
    first: events held back go out as their digest before a later event is admitted, so
    there is never more than one message per ``every`` (a clock stepped back opens the window).
    """
    if every <= 0 or window.sent_at is None or now - window.sent_at >= every or now < window.sent_at:
        return True, Window(sent_at=now)
    return False, Window(window.sent_at, window.held + 1,
                         window.since if window.since is not None else now, window.last)


def hold(window, message_id):
    """The window after holding back the event ``message_id`` (see admit)."""
    return dataclasses.replace(window, last=message_id)


def digest_due(window, now, every):
    """True if events were held back and ``every`` has passed since the last message."""
    return window.held > 0 and window.sent_at is not None and (
        now - window.sent_at >= every or now < window.sent_at)


# -- retries -----------------------------------------------------------------------------------


def retry_delay(attempts):
    """Seconds to wait after the ``attempts``-th failed try: 1, 2, 4, ... 300 at most."""
    return min(RETRY_MAX, RETRY_FIRST * 2.0 ** min(max(attempts - 1, 0), 30))


def expired(created, now):
    """A message queued at ``created`` is given up at ``now`` (24 hours of trying)."""
    return now - created >= GIVE_UP_AFTER


def rejected(status):
    """An HTTP status that says "never", so the message is not retried (4xx but timeouts and
    rate limits, which say "later")."""
    return 400 <= status < 500 and status not in (408, 425, 429)


# -- what a message says -----------------------------------------------------------------------


def result_of(record):
    """How the run went, in a few words: ``exit 3``, ``timed out (killed by SIGTERM)``,
    ``skipped: max 1 running``, ``missed 3 run(s)``."""
    if record.missed:
        return record.skipped or "missed"
    return record.describe()


def message_id(node, run_id, event):
    """The stable id of an event of a run (the webhook's ``id`` and Idempotency-Key)."""
    return f"{node}-{run_id}-{event}"


def iso(epoch):
    """RFC 3339 UTC time of an epoch, or None: ``2026-12-01T03:10:00Z``."""
    if epoch is None:
        return None
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return stamp.isoformat(timespec="milliseconds" if epoch % 1 else "seconds").replace("+00:00", "Z")


def payload(record, event, node, result, output_tail, digest=None):
    """The webhook's JSON body of one event (documented in docs/notifications.md)."""
    return {
        "id": message_id(node, record.run_id, event) + ("-digest" if digest else ""),
        "event": event,
        "task": record.task,
        "node": node,
        "run_id": record.run_id,
        "scheduled": iso(record.scheduled),
        "started": iso(record.started),
        "ended": iso(record.ended),
        "exit_code": record.exit_code,
        "signal": record.signal,
        "timed_out": bool(record.timed_out),
        "duration": None if record.duration is None else round(record.duration, 3),
        "result": result,
        "output_tail": output_tail,
        "digest": digest,
    }


_VERBS = {"failure": "failed", "timeout": "timed out", "crash-loop": "failed to start",
          "skipped": "was skipped", "missed": "missed a run", "recovered": "recovered",
          "output": "printed output", "test": "says this is a test"}


def digest(event, count, since, tz=None):
    """The ``digest`` field of a message that stands for ``count`` events held back."""
    return {"count": count, "since": iso(since), "text": digest_text(event, count, since, tz)}


def digest_text(event, count, since, tz=None):
    """``failed 12 times since 03:10`` (local time of day; the date too if not today)."""
    verb = _VERBS.get(event, event)
    when = datetime.datetime.fromtimestamp(since, tz).astimezone(tz)
    now = datetime.datetime.now(tz).astimezone(tz)
    stamp = when.strftime("%H:%M" if when.date() == now.date() else "%Y-%m-%d %H:%M")
    return f"{verb} {count} time{'s' if count != 1 else ''} since {stamp}"


def title(body):
    """A message's subject line: ``torchcore: backup failed on web1 (run 17)``, or for a digest
    ``torchcore: backup failed 12 times since 03:10 on web1 (latest: run 31)``."""
    if body.get("digest"):
        return (f"torchcore: {body['task']} {body['digest']['text']} on {body['node']} "
                f"(latest: run {body['run_id']})")
    verb = _VERBS.get(body["event"], body["event"])
    return f"torchcore: {body['task']} {verb} on {body['node']} (run {body['run_id']})"


def text(body):
    """A message's text for people: the facts, one per line, then the output's last lines."""
    lines = [title(body).removeprefix("torchcore: "), ""]
    for label, key in (("task", "task"), ("node", "node"), ("run", "run_id"), ("result", "result"),
                       ("scheduled", "scheduled"), ("started", "started"), ("ended", "ended"),
                       ("duration", "duration")):
        if body.get(key) is not None:
            value = f"{body[key]}s" if key == "duration" else body[key]
            lines.append(f"{label}: {value}")
    if body.get("output_tail"):
        lines += ["", "last lines of output:", body["output_tail"]]
    return "\n".join(lines)
