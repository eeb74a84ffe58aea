"""The notifier service (``torchcore: notifier``): alerts, webhooks and pings, delivered from a
durable queue.

The supervisor never talks to the network; it writes run records, and the records database
journals each write (its ``changes`` table, read by notifystore).  This process follows that
journal: each run that ended, was skipped or was missed becomes its events
(notifyrules.run_events), each event a message per target that asks for it, rate-limited (at
most one per ``every`` per task, target and event, then a digest), queued in the outbox
(notifystore) in the same transaction that moves its cursor.  Then it sends what is due,
oldest first per target, retrying with a backoff of 1 s doubling to 5 minutes for up to 24
hours.  Killed at any point, it starts where its last transaction left off: each event is
queued once and sent at least once; the message id (the webhook's ``id`` and
Idempotency-Key) lets a receiver drop a repeat.

It runs as ``python -m torchcore.notifier`` with the services' arguments (services.py):
SIGTERM stops it, SIGHUP re-reads the task file, end of file on the parent pipe (the
supervisor is gone) ends it.  ``wanted`` tells the supervisor when to run it.
"""

import logging
import os
import select
import signal
import sys
import time

from torchcore import notifyrules, notifyspec, paths, tasklog
from torchcore.notifystore import DROPPED, EXPIRED, KEEP_DONE, REJECTED, SENT, Store

# The supervisor imports this module for wanted(): what sends (the HTTP client, Apprise) is
# imported by the notifier process alone (notifysend, in Notifier).

log = logging.getLogger("torchcore")

POLL = 0.5                  # seconds between looks at the journal
PRUNE_EVERY = 3600.0
LOAD_RETRY = 30.0           # seconds between tries of a task file that did not validate at start
TAIL_BYTES = 256 << 10      # how far back in a task's log its run's output is looked for
MAX_AGE = notifyrules.GIVE_UP_AFTER     # a record written longer ago (the notifier was off) is not announced


def wanted(taskfile, node=None, options=None):
    """The supervisor runs the notifier when a task of this node has a ``notify`` target or a
    ``ping``."""
    return notifyspec.asks_for_notifier(taskfile, node)


class Batch:
    """What handling some journal entries decided, written in one transaction."""

    def __init__(self):
        self.messages = []
        self.unheld = []            # (message id, target): held messages a later one replaces
        self.windows = {}           # (task, target, event) -> Window
        self.failing = {}           # task -> bool


class Notifier:
    """Derives, queues and sends (see the module's docstring); ``clock`` gives epoch seconds."""

    def __init__(self, store, taskfile, node, clock=time.time, sender=None, stopping=lambda: False):
        if sender is None:
            from torchcore import notifysend
            sender = notifysend.send
        self.store = store
        self.node = node
        self.clock = clock
        self.sender = sender
        self.stopping = stopping    # asked between tries: SIGTERM ends a long round early
        self.reload(taskfile)

    def reload(self, taskfile):
        self.taskfile = taskfile
        self.targets = {}           # key -> Target, every target of the file
        for target in notifyspec.all_targets(taskfile):
            self.targets.setdefault(target.key, target)

    # -- deriving -------------------------------------------------------------------------------

    def derive(self, limit=500):
        """Queue the messages of the journal's next entries; returns how many entries."""
        now = self.clock()
        self._digests(now)
        changes = self.store.changes(limit)
        if not changes:
            return 0
        batch = Batch()
        for _seq, ended, written, record in changes:
            if record is not None and written >= now - MAX_AGE:
                self._record(batch, record, ended, now)
        self.store.commit(batch, cursor=changes[-1][0])
        return len(changes)

    def _record(self, batch, record, ended, now):
        task = self.taskfile.index.get(record.task)
        if task is None:
            return
        targets = notifyspec.targets_of(task, self.taskfile.settings)
        if task.ping is not None:
            self._pings(batch, task, record, ended, now)
        if not targets or not ended:
            return
        failing = batch.failing.get(task.name, self.store.failing(task.name))
        is_daemon = task.type == "daemon"
        events, now_failing = notifyrules.run_events(record, is_daemon, failing, False)
        wanted_events = {event for target in targets for event in target.on}
        lines = []
        if wanted_events & {*events, "output"}:     # the log is read only for a message
            lines = run_output(self.taskfile.settings.log_dir, task.name, record.run_id)
            if any(stream in ("out", "err") for stream, _ in lines):
                events, now_failing = notifyrules.run_events(record, is_daemon, failing, True)
        batch.failing[task.name] = now_failing
        for event in events:
            for target in targets:
                if event in target.on:
                    self._event(batch, target, record, event, lines, now)

    def _event(self, batch, target, record, event, lines, now):
        key = (record.task, target.key, event)
        message_id = notifyrules.message_id(self.node, record.run_id, event)
        if self.store.was_queued(message_id, target.key) or any(
                m["id"] == message_id and m["target"] == target.key for m in batch.messages):
            return      # the run's end row written again (an executor and its supervisor both)
        window = batch.windows.get(key) or self.store.window(*key)
        if notifyrules.digest_due(window, now, target.every):
            window = self._digest(batch, key, window, target, now)
        send, window = notifyrules.admit(window, now, target.every)
        if send:
            self._queue(batch, target, record, event, lines, now)
        else:
            # the details of the latest event held back, kept for its digest (not sent on its
            # own); the one before it is dropped: a task failing every second keeps one row
            self._unhold(batch, window.last, target.key)
            window = notifyrules.hold(window, message_id)
            batch.messages.append(self._message(target, record, event, lines, now, held=True))
        batch.windows[key] = window

    @staticmethod
    def _unhold(batch, message_id, target_key):
        if message_id is None:
            return
        kept = [m for m in batch.messages if not (m["id"] == message_id and m["target"] == target_key)]
        if len(kept) == len(batch.messages):
            batch.unheld.append((message_id, target_key))
        batch.messages = kept

    def _pings(self, batch, task, record, ended, now):
        if not ended:
            kinds = ["start"] if record.started is not None and record.skipped is None else []
        else:
            start_id = notifyrules.message_id(self.node, record.run_id, "start")
            start_sent = self.store.was_queued(start_id, task.ping.key) or any(
                m["id"] == start_id and m["target"] == task.ping.key for m in batch.messages)
            kinds = notifyrules.run_pings(record, start_sent)
        lines = run_output(self.taskfile.settings.log_dir, task.name, record.run_id) \
            if "fail" in kinds else []
        for kind in kinds:
            self._queue(batch, task.ping, record, kind, lines, now)

    def _message(self, target, record, event, lines, now, held=False, digest=None):
        body = notifyrules.payload(record, event, self.node, notifyrules.result_of(record),
                                   tail_text(lines, target.tail), digest)
        return {"id": body["id"], "target": target.key, "shown": target.shown, "task": record.task,
                "event": event, "body": body, "created": now, "held": held}

    def _queue(self, batch, target, record, event, lines, now, digest=None):
        batch.messages.append(self._message(target, record, event, lines, now, digest=digest))

    def _digests(self, now):
        """Queue the digests whose window is over (events held back, nothing sent since)."""
        batch = Batch()
        for task, key, event, window in self.store.windows_holding():
            target = self.targets.get(key)
            if target is None:
                batch.windows[(task, key, event)] = notifyrules.Window()
            elif notifyrules.digest_due(window, now, target.every):
                self._digest(batch, (task, key, event), window, target, now)
        if batch.windows:
            self.store.commit(batch)

    def _digest(self, batch, key, window, target, now):
        body = None
        if window.last:
            held = self.store.find(window.last, target.key)
            body = held.payload if held is not None else next(
                (dict(m["body"]) for m in batch.messages
                 if m["id"] == window.last and m["target"] == target.key), None)
        if body is not None:
            body["id"] += "-digest"
            body["digest"] = notifyrules.digest(key[2], window.held, window.since)
            batch.messages.append({"id": body["id"], "target": target.key, "shown": target.shown,
                                   "task": key[0], "event": key[2], "body": body, "created": now,
                                   "held": False})
        window = notifyrules.Window(sent_at=now)
        batch.windows[key] = window
        return window

    # -- sending --------------------------------------------------------------------------------

    def deliver(self, rounds=100):
        """Try every message that is due, the oldest queued one of each target first, until
        none is due (or ``rounds`` messages per target were tried: the journal is looked at
        again in between)."""
        for _ in range(rounds):
            tried = 0
            for message in self.store.heads():
                if self.stopping():
                    return
                now = self.clock()
                if message.next_try <= now:
                    self._try(message, now)
                    tried += 1
            if not tried:
                return

    def _try(self, message, now):
        target = self.targets.get(message.target)
        if target is None:
            self.store.finish(message, DROPPED, now, "the target is no longer in the task file")
            return
        if notifyrules.expired(message.created, now):
            log.error("notifier: %s: %s of %s given up after 24 hours of trying: %s", target.shown,
                      message.event, message.task, message.error)
            self.store.finish(message, EXPIRED, now, message.error)
            return
        try:
            sent = self.sender(target, message.event, message.payload)
        except Exception as exc:    # a sender's bug: this message waits, the other targets go on
            sent = _send_failed(exc)
        now = self.clock()
        if sent.state == "sent":
            self.store.finish(message, SENT, now)
        elif sent.state == "rejected":
            log.error("notifier: %s rejected %s of %s (not retried): %s", target.shown,
                      message.event, message.task, sent.detail)
            self.store.finish(message, REJECTED, now, sent.detail)
        else:
            delay = notifyrules.retry_delay(message.attempts + 1)
            if message.attempts == 0:
                log.warning("notifier: %s: cannot send %s of %s (retrying with backoff): %s",
                            target.shown, message.event, message.task, sent.detail)
            self.store.retry(message, now + delay, sent.detail)

    def prune(self):
        return self.store.prune(self.clock() - KEEP_DONE)


def _send_failed(exc):
    from torchcore.notifysend import Sent
    return Sent("retry", f"the send failed: {type(exc).__name__}")


# -- a run's output, from its task log ----------------------------------------------------------


def run_output(log_dir, task, run_id, max_bytes=TAIL_BYTES):
    """``[(stream, text)]`` of run ``run_id``'s lines in the last ``max_bytes`` of its task's log."""
    path = tasklog.log_path(log_dir, task)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
    except OSError:
        return []
    wanted_id = str(run_id).encode()
    lines = []
    for raw in data.split(b"\n"):     # "<stamp> run <id> <stream>| <text>" (see tasklog.py)
        parts = raw.split(b" ", 3)
        if len(parts) == 4 and parts[1] == b"run" and parts[2] == wanted_id:
            stream, sep, text = parts[3].partition(b"| ")
            if sep and stream in (b"out", b"err", b"sys"):
                lines.append((stream.decode(), text.decode("utf-8", "replace")))
    return lines


def tail_text(lines, count):
    """The last ``count`` lines as one text; torchcore's own lines marked ``[torchcore]``."""
    if count <= 0:
        return ""
    return "\n".join(text if stream != "sys" else f"[torchcore] {text}"
                     for stream, text in lines[-count:])


# -- the process --------------------------------------------------------------------------------


class _Flags:
    stop = False
    reload = False
    sending = False     # inside a try, which may wait on the network for TIMEOUT seconds


class _Stopping(BaseException):
    """SIGTERM during a try: the try is abandoned (its message stays queued: at least once)."""


def _handle(signum, frame):
    if signum == signal.SIGHUP:
        _Flags.reload = True
        return
    _Flags.stop = True
    if _Flags.sending:
        _Flags.sending = False
        raise _Stopping


def _sending(send):
    """``send`` marked as a try that SIGTERM may cut short."""
    def marked(*args):
        _Flags.sending = True
        try:
            return send(*args)
        finally:
            _Flags.sending = False
    return marked


def main(argv=None):
    from torchcore import config, services

    args = services.child_args(argv, "torchcore's notifier service")
    services.set_title("notifier")
    services.setup_logging(args)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _handle)
    taskfile = _first_load(args, config, services, wake_r)
    if taskfile is None:
        return 0
    try:
        store = Store(paths.records_db(args.state_dir))
    except Exception as exc:        # RecordsError: said once, then the services' restart backoff
        log.error("notifier: cannot start: %s", exc)
        return 1
    from torchcore import notifysend

    notifier = Notifier(store, taskfile, args.node, sender=_sending(notifysend.send),
                        stopping=lambda: _Flags.stop or services.parent_gone(args.parent_fd))
    log.info("notifier: started, %d target(s)", len(notifier.targets))
    try:
        _loop(notifier, args, config, services, wake_r)
    except _Stopping:
        pass
    notifier.store.close()
    return 0


def _first_load(args, config, services, wake_r):
    """The task file, once it validates: the daemon runs its last valid version, and the one on
    disk may be broken when the notifier (re)starts.  Then it waits (a restart would not help),
    trying again on SIGHUP and every LOAD_RETRY seconds; None if told to stop meanwhile."""
    said = None
    while not _Flags.stop:
        try:
            return config.load(args.taskfile)
        except Exception as exc:        # ConfigError (or the file gone): said once
            if str(exc) != said:
                said = str(exc)
                log.error("notifier: the task file does not validate; waiting for a valid one "
                          "(queued messages wait too): %s", exc)
        _Flags.reload = False
        readable, _, _ = select.select([args.parent_fd, wake_r], [], [], LOAD_RETRY)
        if wake_r in readable:
            services.drain(wake_r)
        if args.parent_fd in readable and services.parent_gone(args.parent_fd):
            return None
    return None


def _loop(notifier, args, config, services, wake_r):
    last_prune = time.monotonic()
    said = (None, 0.0)
    while not _Flags.stop:
        if _Flags.reload:
            _Flags.reload = False
            _reload(notifier, args.taskfile, config)
        try:
            if notifier.store.replaced():
                log.warning("notifier: %s was removed or replaced; opening it again",
                            notifier.store.path)
                notifier.store.close()
                notifier.store = Store(notifier.store.path)
            while not _Flags.stop and notifier.derive():
                pass
            notifier.deliver()
            if time.monotonic() - last_prune >= PRUNE_EVERY:
                last_prune = time.monotonic()
                notifier.prune()
        except Exception as exc:    # a locked database, a full disk: tried again next time
            said = services.warn_once_a_minute("notifier", f"{type(exc).__name__}: {exc}", said)
        readable, _, _ = select.select([args.parent_fd, wake_r], [], [], POLL)
        if wake_r in readable:
            services.drain(wake_r)
        if args.parent_fd in readable and services.parent_gone(args.parent_fd):
            log.info("notifier: the supervisor is gone; exiting")
            return




def _reload(notifier, path, config):
    try:
        notifier.reload(config.load(path))
        log.info("notifier: task file re-read, %d target(s)", len(notifier.targets))
    except Exception as exc:
        log.error("notifier: cannot re-read the task file (keeping the one before): %s", exc)




def _run_and_exit():
    """main(), then exit without waiting for other threads: Apprise may have left a worker
    talking to a server that keeps it busy (a try abandoned by SIGTERM or its deadline), and
    the interpreter's exit would wait for it as long as that server likes."""
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _run_and_exit()
