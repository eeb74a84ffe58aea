"""``torchcore notify test TARGET`` and ``torchcore alerts``: try a target, list what was sent."""

import json
import sys
import time

import yaml

from torchcore import config, notifyrules, notifysend, notifyspec, notifystore
from torchcore.commands import common
from torchcore.errors import ConfigError, TorchcoreError
from torchcore.runrecord import RunRecord
from torchcore.textfmt import format_relative, format_table
from torchcore.yamlread import Bad


def register(subparsers):
    notify = subparsers.add_parser(
        "notify", help="notifications: send a test message to a target",
        description="Send a test message to a notification target and say how it went.")
    actions = notify.add_subparsers(dest="action", metavar="ACTION")
    test = actions.add_parser(
        "test", help="send a test message to TARGET",
        description="Send a test message to TARGET: an Apprise URL (mailto://, slack://, ...), "
                    "or an http(s) URL (a webhook: torchcore's JSON body, POSTed).")
    test.add_argument("target", metavar="TARGET", help="an Apprise URL or an http(s) webhook URL")
    test.add_argument("--timeout", type=float, default=notifysend.TIMEOUT, metavar="SECONDS",
                      help=f"how long to wait for the target (default {notifysend.TIMEOUT:g})")
    test.set_defaults(func=cmd_notify_test)
    notify.set_defaults(func=lambda args: _usage(notify))

    alerts = subparsers.add_parser(
        "alerts", help="recent notifications and their delivery state",
        description="List recent notifications (newest first): event, task, target, whether it was "
                    "sent, is queued for a retry, was rejected, held back for a digest or given up.")
    alerts.add_argument("task", nargs="?", metavar="TASK", help="only this task's")
    common.add_config_option(alerts)
    alerts.add_argument("--limit", "-l", type=int, default=50, metavar="N", help="at most N (default 50)")
    common.add_json_option(alerts)
    alerts.set_defaults(func=cmd_alerts)


def _usage(parser):
    parser.print_help(sys.stderr)
    return common.EXIT_USAGE


# -- notify test --------------------------------------------------------------------------------

def test_target(url):
    """The Target a URL on the command line stands for: http(s) is a webhook, the rest Apprise."""
    kind = "webhook" if url.split("://", 1)[0].lower() in ("http", "https") else "to"
    try:
        return notifyspec.notify_list(None, yaml.compose(json.dumps([{kind: url}])))[0]
    except Bad as bad:
        raise TorchcoreError(f"notify test: {str(bad).removeprefix('#1: ')}") from None


def test_body(now=None):
    """The message ``notify test`` sends: a made-up run of a task named ``torchcore-test``."""
    now = time.time() if now is None else now
    record = RunRecord(run_id=0, task="torchcore-test", node=_hostname(), scheduled=int(now),
                               started=now, ended=now, exit_code=0, signal=None)
    body = notifyrules.payload(record, "test", record.node, "a test message from torchcore notify test",
                               "this is what the last lines of a run's output look like")
    body["id"] = f"{record.node}-test-{int(now)}"
    return body


def _hostname():
    import socket
    return socket.gethostname()


def cmd_notify_test(args):
    target = test_target(args.target)
    print(f"sending a test message to {notifyspec.shown_url(target.url)} ...")
    sent = notifysend.send(target, "test", test_body(), timeout=args.timeout)
    if sent.state == "sent":
        print(f"sent{': ' + sent.detail if sent.detail else ''}")
        return common.EXIT_OK
    how = "rejected (the daemon would not retry it)" if sent.state == "rejected" else \
        "not delivered (the daemon would retry it)"
    print(f"{how}: {sent.detail}", file=sys.stderr)
    return common.EXIT_ERROR


# -- alerts -------------------------------------------------------------------------------------

def _state_dir(args):
    """The state directory the task file names (its settings block, if the file is invalid)."""
    path = common.task_file_path(args)
    try:
        return config.load(path).settings.state_dir
    except ConfigError as exc:
        print(f"note: the task file does not validate ({exc.problems[0]}); notifications are "
              "read from the state directory its settings name", file=sys.stderr)
        return config.peek_settings(path).state_dir


def alert_json(message):
    out = message.as_dict()
    for key in ("created", "next_try", "done"):
        out[key] = notifyrules.iso(out[key])
    if out["state"] != "queued":
        out["next_try"] = None
    out["target_key"] = out.pop("target")
    out["target"] = out.pop("shown")
    del out["seq"]
    return out


def cmd_alerts(args):
    messages = notifystore.recent_in(_state_dir(args), max(args.limit, 1), args.task)
    if args.json:
        print(json.dumps([alert_json(m) for m in messages], indent=2))
        return common.EXIT_OK
    if not messages:
        print("no notifications yet")
        return common.EXIT_OK
    now = time.time()
    rows = [[format_relative(m.created, now), m.task, m.event, m.shown, _state(m, now), m.attempts,
             m.error or ""] for m in messages]
    print(format_table(["WHEN", "TASK", "EVENT", "TARGET", "STATE", "TRIES", "LAST ERROR"], rows))
    return common.EXIT_OK


def _state(message, now):
    if message.state == "queued" and message.attempts:
        return f"retry in {max(0, round(message.next_try - now))}s"
    return message.state
