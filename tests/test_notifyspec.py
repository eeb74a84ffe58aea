"""The notify and ping fields of a task file (torchcore/notifyspec.py), and their errors."""

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from torchcore import notifyspec
from torchcore.yamlread import Bad


def parse(text, parser=notifyspec.notify_list):
    return parser(None, yaml.compose(text))


def bad(text, parser=notifyspec.notify_list):
    with pytest.raises(Bad) as info:
        parse(text, parser)
    return str(info.value)


def test_targets_with_defaults_and_with_everything_set():
    mail, hook = parse("""
- to: mailto://ops@example.com
- webhook: https://hooks.internal/cron
  on: [missed, failure]
  every: 10m
  tail: 50
""")
    assert (mail.kind, mail.url, mail.on, mail.every, mail.tail, mail.line) == (
        "to", "mailto://ops@example.com", notifyspec.DEFAULT_ON, 300, 20, 2)
    assert (hook.kind, hook.on, hook.every, hook.tail) == ("webhook", ("failure", "missed"), 600, 50)
    assert parse("[{webhook: 'http://127.0.0.1:8080/x', on: output, every: 0}]")[0].on == ("output",)
    assert parse("[]") == ()


def test_a_ping_is_an_http_url():
    target = parse("https://hc-ping.com/5f0c", notifyspec.ping)
    assert (target.kind, target.url, target.on) == ("ping", "https://hc-ping.com/5f0c", ())
    assert bad("mailto://x@y", notifyspec.ping).startswith("expected an http:// or https:// URL")


@pytest.mark.parametrize("text, message", [
    ("- to: mailtoo://ops@example.com", "#1: to: unknown Apprise scheme 'mailtoo' (did you mean 'mailto'?)"),
    ("- to: https://x.example/hook", "for a plain http(s) endpoint use webhook: instead"),
    ("- webhook: slack://T/B/C", "for an Apprise service use to: instead of webhook:"),
    ("- webhook: htps://example.com/", "(did you mean 'https'?)"),
    ("- webhook: https:///path", "the URL names no host"),
    ("- webhook: 'https://example.com:99999/'", "port is not a number"),
    ("- webhook: 'https://exa mple.com/'", "no spaces or control characters"),
    ("- webhook: example.com/hook", "without '://'"),
    ("- to: 'mailto://'", "nothing after mailto://"),
    ("- {to: 'mailto://a@b', on: [failure, timout]}", "unknown event 'timout' (did you mean 'timeout'?)"),
    ("- {to: 'mailto://a@b', on: []}", "name at least one event"),
    ("- {to: 'mailto://a@b', evry: 5m}", "evry: unknown key (did you mean 'every'?)"),
    ("- {to: 'mailto://a@b', every: soon}", "every:"),
    ("- {to: 'mailto://a@b', tail: 5000}", "tail: 5000 is out of range 0-1000"),
    ("- {to: 'mailto://a@b', webhook: 'https://x.y/'}", "give exactly one of to:"),
    ("- on: [failure]", "give exactly one of to:"),
    ("- mailto://ops@example.com", "#1: expected a mapping with to:"),
    ("to: mailto://a@b", "expected a list of targets"),
    ("- {to: 'mailto://a@b'}\n- {to: 'mailto://a@b', to: 'x'}", "#2: to: duplicate key"),
])
def test_mistakes_are_named(text, message):
    assert message in bad(text)


def test_errors_never_echo_a_url_and_shown_hides_secrets():
    assert "s3cret" not in bad("- to: 'mailtoo://me:s3cret@example.com'")
    assert "s3cret" not in bad("- webhook: 'https://me:s3cret@exa mple.com/'")
    target = parse("- webhook: 'https://me:s3cret@hooks.example.com:8443/T/s3cret?k=s3cret'")[0]
    assert target.shown == "webhook https://hooks.example.com:8443/…"
    assert "s3cret" not in repr(target) and "s3cret" not in target.key
    assert notifyspec.shown_url("tgram://bot:s3cret/chat") == "tgram://…"


def test_the_key_is_stable_and_tells_targets_apart():
    a, b, c = parse("[{to: 'mailto://a@b'}, {to: 'mailto://a@b', on: [output]}, {to: 'mailto://c@d'}]")
    assert a.key == b.key != c.key and len(a.key) == 16


def test_through_the_loader_errors_name_file_line_task_and_field():
    from torchcore import config
    from torchcore.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config.loads("""settings:
  notify: [{to: "mailtoo://ops@example.com"}]
tasks:
  - name: backup
    schedule: "0 30 2 * * *"
    command: /bin/true
    notify:
      - webhook: https://hooks.internal/cron
        on: [failure, timout]
    ping: ftp://hc-ping.com/x
""", "tasks.yaml")
    assert info.value.problems == [
        ("tasks.yaml:2: settings: notify: #1: to: unknown Apprise scheme 'mailtoo' (did you mean "
         "'mailto'?) (see Apprise's list of services)"),
        ("tasks.yaml:9: task 'backup': notify: #1: on: unknown event 'timout' (did you mean "
         "'timeout'?) (known: failure, timeout, crash-loop, skipped, missed, recovered, output)"),
        "tasks.yaml:10: task 'backup': ping: expected an http:// or https:// URL, got scheme 'ftp'"]


def test_a_tasks_notify_replaces_the_settings_and_is_not_a_change_of_the_task():
    from torchcore import config

    text = """settings:
  notify: [{to: "mailto://ops@example.com"}]
tasks:
  - {name: a, schedule: "0 * * * * *", command: "true"}
  - {name: b, schedule: "0 * * * * *", command: "true", notify: []}
  - {name: c, schedule: "0 * * * * *", command: "true", ping: "https://hc.example/x",
     notify: [{webhook: "https://hooks.example/y", on: output}]}
"""
    taskfile = config.loads(text)
    a, b, c = taskfile.tasks
    assert [t.kind for t in notifyspec.targets_of(a, taskfile.settings)] == ["to"]
    assert notifyspec.targets_of(b, taskfile.settings) == ()
    assert [t.on for t in notifyspec.targets_of(c, taskfile.settings)] == [("output",)]
    assert c.ping.url == "https://hc.example/x" and notifyspec.asks_for_notifier(taskfile)
    assert len(notifyspec.all_targets(taskfile)) == 3
    quiet = config.loads(text.replace('ping: "https://hc.example/x",', "").replace("output", "failure"))
    assert quiet.tasks[2] == c                  # a reload changing only these keeps the task
    assert not notifyspec.asks_for_notifier(config.loads("tasks: [{name: a, command: x, type: daemon}]"))


def test_the_notifier_runs_only_for_this_node_s_tasks():
    """A task aimed at another machine asks nothing of this node's notifier."""
    from torchcore import config
    from torchcore.node import Node
    text = """tasks:
  - {name: there, schedule: "0 * * * * *", command: "true", ips: [10.9.9.9],
     notify: [{webhook: "https://hooks.example/y"}]}
  - {name: here, schedule: "0 * * * * *", command: "true"}
"""
    node = Node.detect(["10.0.0.5"], hostname="web-1")
    assert not notifyspec.asks_for_notifier(config.loads(text), node)
    assert notifyspec.asks_for_notifier(config.loads(text))      # the file as a whole does
    aimed_here = config.loads(text.replace("10.9.9.9", "10.0.0.0/24"))
    assert notifyspec.asks_for_notifier(aimed_here, node)


URL_CHARS = "abcxyz019:/@[]%?#.-_~!$&'()*+,;=|\\^`{}<> "


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(["http://", "https://", "json://", "mailto://", ""]),
       st.text(alphabet=URL_CHARS, max_size=30))
def test_any_url_in_a_target_is_taken_or_refused_by_name_never_raised(scheme, rest):
    """Whatever the URL (an unclosed "[" made urlsplit raise ValueError: a traceback), the
    field is taken or refused with the field's name, and shown_url never raises either."""
    url = scheme + rest
    text = json.dumps(url)
    for item in (f"- webhook: {text}", f"- to: {text}"):
        try:
            targets = parse(item)
        except Bad as exc:
            assert str(exc).partition(": ")[2].startswith(("webhook:", "to:")), str(exc)
        else:
            assert all(isinstance(t.shown, str) for t in targets)
    assert isinstance(notifyspec.shown_url(url), str)
