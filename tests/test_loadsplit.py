"""The two-core load (loadsplit.py) gives exactly the one-piece load's verdict and tasks.

Generated task files (seeded: ``@seed`` below, so a failure is the same failure on every run)
of every shape the cut must either handle or refuse: items at indentations 0, 2 and 4,
comments and blank lines between and inside items, block scalars (kept, stripped, folded),
quoted strings over several lines, flow and block lists, anchors, aliases and merge keys
(within an item, across items, from the settings), tags, duplicate names, bad fields.  Each
is loaded both ways (the split forced at any size) and the verdicts (problems included, in
order), the streamed frames and the load cache's checks must be equal.  And the quick depth
walk a file without anchors gets (yamlread._deepest) refuses exactly what the budget's walk does.
"""

import ipaddress

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from torchcore import loadchild, loadsplit
from torchcore.node import Node

NODE = Node(addresses=(ipaddress.ip_address("127.0.0.1"),), hostname="vm")
NEVER = 1 << 62


def _load(path, data, split_min):
    verdict, settings_, part = loadchild.load_parts(path, NODE, data, split_min=split_min)
    verdict.pop("parse", None)
    frames = list(loadchild.frames_of(verdict, part)) if part is not None else None
    return verdict, frames, None if part is None else part.checks(settings_)


def _both(tmp_path, text):
    path = str(tmp_path / "tasks.yaml")
    data = text.encode()
    with open(path, "wb") as handle:
        handle.write(data)
    one = _load(path, data, NEVER)
    two = _load(path, data, 0)
    assert one == two, text
    return one


SCHEDULES = ["0 0 3 1 1 *", "'*/5 * * * * *'", '"@every 10s"', "0 30 2 * * *", "'@daily'",
             "!!str 0 0 4 * * *"]
BAD_SCHEDULES = ["0 61 * * * *", "'* * *'", "0 0 30 2 *"]
COMMANDS = [
    "echo hi",
    "'echo ''quoted'' && true'",
    '"echo \\"two\\"\n{f}  lines"',
    "|\n{f}  echo one\n\n{f}  echo two",
    "|+\n{f}  echo kept\n\n",
    "|-\n{f}  echo stripped",
    ">\n{f}  folded\n{f}  text\n",
    "[/bin/echo, a, 'b c']",
    "\n{f}- /bin/echo\n{f}- x",
    "!!str 42",
    "'# not a comment'",
    "echo a # a comment",
]
BAD_COMMANDS = ["- not a command", "", "{a: 1}"]
EXTRAS = {"timeout": ["15m", "1h30m"], "max": ["2"], "env": ["{MODE: batch, N: 3}", "\n{f}  A: '1'"],
          "description": ['"multi\n{f}  line"', "|\n{f}  text"], "enabled": ["false"],
          "hosts": ["[other-*]", "['*']"], "ips": ["[10.9.0.0/16]"],
          "timezone": ["Europe/Paris", "UTC"], "type": ["common"],
          "notify": ['[{webhook: "https://hooks.example.com/a", on: [failure]}]'],
          "ping": ["https://hc-ping.com/x"]}
BAD_EXTRAS = ["bogus: 1", "timeout: 0s", "max: -1", "timezone: Mars/Base", "type: daemon"]


@st.composite
def task_files(draw):
    """Task files, most of them valid (to be cut), with one thing wrong in a few."""
    indent = draw(st.sampled_from([0, 2, 4]))
    pad, field = " " * indent, " " * (indent + 2)
    head = ["# generated", "settings:", "  timezone: UTC"]
    anchored_shell = draw(st.booleans())
    if anchored_shell:
        head.append("  shell: &sh /bin/sh")
    lines = head + ["tasks:"]
    count = draw(st.integers(2, 16))
    wrong = draw(st.integers(0, 9)) == 0       # one thing wrong somewhere (maybe)
    wrong_at = draw(st.integers(0, count - 1))
    bases, commands = [], []
    for number in range(count):
        bad = wrong and number == wrong_at
        kind = draw(st.integers(0, 4)) if bad else None
        name = f"job-{draw(st.integers(0, number - 1))}" if kind == 0 and number else \
            f"job-{number}"
        header = draw(st.sampled_from(["plain", "plain", "plain", "alone", "anchor"]))
        if header == "plain":
            item = [f"{pad}- name: {name}"]
        elif header == "alone":
            item = [f"{pad}-", f"{field}name: {name}"]
        else:
            item = [f"{pad}- &base{number}", f"{field}name: {name}"]
            bases.append(number)
        schedule = draw(st.sampled_from(BAD_SCHEDULES if kind == 1 else SCHEDULES))
        if kind == 2:
            command = draw(st.sampled_from(BAD_COMMANDS))
        elif commands and draw(st.integers(0, 9)) == 0:
            command = f"*c{draw(st.sampled_from(commands))}"
        else:
            command = draw(st.sampled_from(COMMANDS)).replace("{f}", field)
            if draw(st.integers(0, 5)) == 0 and not command.startswith(("\n", "|", ">")):
                command = f"&c{number} {command}"
                commands.append(number)
        item += [f"{field}schedule: {schedule}", f"{field}command: {command}"]
        for key in draw(st.lists(st.sampled_from(sorted(EXTRAS)), max_size=3, unique=True)):
            value = draw(st.sampled_from(EXTRAS[key])).replace("{f}", field)
            item.append(f"{field}{key}: {value}")
        if kind == 3:
            item.append(f"{field}{draw(st.sampled_from(BAD_EXTRAS))}")
        if bases and draw(st.integers(0, 11)) == 0:
            item.append(f"{field}<<: *base{draw(st.sampled_from(bases))}")
        if anchored_shell and draw(st.integers(0, 14)) == 0:
            item.append(f"{field}cwd: *sh")
        if kind == 4:
            item.append(f"{field}<<: *nowhere")
        lines += item
        lines += draw(st.sampled_from([[], [], [""], ["# between"], [f"{pad}  # indented"]]))
    if wrong and draw(st.booleans()):
        lines.append("extra: 1")
    return "\n".join(lines) + "\n"


@seed(1515)
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(task_files())
def test_the_split_load_is_the_one_piece_load(tmp_path, text):
    _both(tmp_path, text)


@seed(1516)
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["\n", "  ", "- ", "tasks:\n", "#", "'", '"', "|\n", "[", "]",
                                 "&a ", "*a", "name: x\n", "\t", "---\n", ":", "\r"]),
                max_size=8), st.integers(0, 400))
def test_any_insertion_splits_to_the_same(tmp_path, pieces, at):
    base = _plain(30)
    at = at * len(base) // 400
    _both(tmp_path, base[:at] + "".join(pieces) + base[at:])


def _plain(count, indent=2):
    pad = " " * indent
    lines = ["settings:", "  timezone: UTC", "tasks:"]
    for i in range(count):
        lines += [f"{pad}- name: job-{i}", f"{pad}  schedule: '0 0 3 1 1 *'",
                  f"{pad}  command: /usr/local/bin/job.sh --shard {i}"]
    return "\n".join(lines) + "\n"


def test_a_plain_file_is_cut_at_an_item_and_loaded_in_two_halves(tmp_path):
    for indent in (0, 2, 4):
        text = _plain(40, indent)
        where = loadsplit.cut(text, 0)
        assert where is not None
        tasks_line, offset, line, found = where
        assert (tasks_line, found) == (2, indent)
        assert text[offset:].startswith(" " * indent + "- name: job-")
        assert loadsplit.load(str(tmp_path / "t.yaml"), NODE, text, 0) is not None
        verdict, frames, checks = _both(tmp_path, text)
        assert verdict["ok"] and checks == {"zones": ["UTC"], "switches": []}


def test_what_the_cut_cannot_vouch_for_is_loaded_in_one_piece(tmp_path):
    plain = _plain(40)
    refused = [plain.replace("\n", "\r\n"), "---\n" + plain, plain + "other: 1\n",
               plain.replace("tasks:", "tasks: &t"), plain.replace("tasks:", "tasks: # c")
               .replace("settings:", "tasks:\nsettings:"), plain[:100]]
    for text in refused[:-1]:
        assert loadsplit.cut(text, 0) is None or \
            loadsplit.load(str(tmp_path / "t.yaml"), NODE, text, 0) is None
    assert loadsplit.cut(refused[-1], 1 << 20) is None      # small: one piece


def test_an_alias_across_the_cut_or_a_name_in_both_halves_is_loaded_in_one_piece(tmp_path):
    anchored = _plain(40).replace("command: /usr/local/bin/job.sh --shard 1\n",
                                  "command: &c /usr/local/bin/job.sh --shard 1\n")
    across = anchored.replace("command: /usr/local/bin/job.sh --shard 39", "command: *c")
    twice = _plain(40).replace("name: job-39", "name: job-1")
    for text in (across, twice):
        assert loadsplit.load(str(tmp_path / "t.yaml"), NODE, text, 0) is None
        verdict, _, _ = _both(tmp_path, text)
    assert not verdict["ok"] and "duplicate task name" in verdict["problems"][0]


@st.composite
def nested(draw, level=0):
    """A document of lists and mappings, some of them near MAX_DEPTH deep."""
    if level > 5 or draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(["1", "x", None, [], {}]))
    children = [draw(nested(level + 1)) for _ in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        return children
    return {f"k{number}": child for number, child in enumerate(children)}


@seed(1517)
@settings(max_examples=300, deadline=None, database=None)
@given(nested(), st.sampled_from([0, 30, 60, 61, 62, 63, 64, 65]), st.booleans())
def test_the_quick_depth_walk_refuses_what_the_budget_refuses(doc, wrap, flow):
    import yaml

    from torchcore import yamlread
    from torchcore.errors import ConfigError
    for number in range(wrap):
        doc = [doc] if number % 2 else {"a": doc}
    root = yaml.compose(yaml.safe_dump(doc, default_flow_style=flow), Loader=yaml.CSafeLoader)
    try:
        yamlread._budget(root, "f")
        refused = False
    except ConfigError:
        refused = True
    assert (yamlread._deepest(root) > yamlread.MAX_DEPTH) == refused


def test_a_worker_that_cannot_be_forked_leaves_no_descriptor_open(tmp_path, monkeypatch):
    """fork failing (EAGAIN at a process limit): the one-piece load, and the two pipes made
    for the worker closed (a load that cannot fork is not a descriptor leak)."""
    import errno
    import os

    text = _plain(40)
    path = str(tmp_path / "t.yaml")

    def no_fork():
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    before = sorted(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(3):
        try:
            loadsplit.load(path, NODE, text, 0)
        except OSError:
            pass
    if before is not None:
        assert sorted(os.listdir("/proc/self/fd")) == before
    monkeypatch.undo()
    verdict, _, _ = _both(tmp_path, text)
    assert verdict["ok"]


class Hung(Exception):
    """Raised by the alarm of a test whose load waits for a hung worker (not an OSError,
    which the load takes for a worker gone)."""


def _hang(*args):
    """A worker's second half that never comes: the worker stops itself."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSTOP)


def _load_with_a_hung_worker(tmp_path):
    """loadsplit.load of a plain file, failed with Hung if it waits 30 s for its worker."""
    import signal

    def waited_too_long(*args):
        raise Hung("the load waited 30 s for a worker that hangs")

    previous = signal.signal(signal.SIGALRM, waited_too_long)
    signal.alarm(30)
    try:
        return loadsplit.load(str(tmp_path / "t.yaml"), NODE, _plain(40), 0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_worker_that_hangs_is_given_up_for_the_one_piece_load(tmp_path, monkeypatch):
    """A worker stopped or stuck (its half never comes): the load does not wait for it
    forever (a reload would wait out its whole timeout and fail) but kills it and returns
    None, for the one-piece load, within the grace it gives the worker."""
    monkeypatch.setattr(loadsplit, "_second", _hang)       # the forked worker inherits it
    monkeypatch.setattr(loadsplit, "WORKER_GRACE", 0.5, raising=False)
    assert _load_with_a_hung_worker(tmp_path) is None


def test_big_settings_for_a_worker_that_hangs_are_not_waited_for(tmp_path, monkeypatch):
    """Settings larger than a pipe holds (a long notify list, say), sent to a worker that
    hangs before it reads them: the write is given up as the answer is, for the one-piece
    load (padded here: pickle.loads ignores what follows a pickle's end)."""
    import pickle
    from types import SimpleNamespace

    padded = SimpleNamespace(dumps=lambda obj, protocol: pickle.dumps(obj, protocol) + bytes(4 << 20),
                             loads=pickle.loads, HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL)
    monkeypatch.setattr(loadsplit, "_second", _hang)
    monkeypatch.setattr(loadsplit, "pickle", padded)
    monkeypatch.setattr(loadsplit, "WORKER_GRACE", 0.5)
    assert _load_with_a_hung_worker(tmp_path) is None
