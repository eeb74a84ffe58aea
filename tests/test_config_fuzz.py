"""Property: any mutation of a valid task file either loads or raises ConfigError, never anything else."""

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchcore.config import TaskFile, loads
from torchcore.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "tasks.yaml"), "rb") as _handle:
    VALID = _handle.read()

# Pieces that mean something to YAML, to cron, or to the validator.
TOKENS = [b":", b"- ", b"[", b"]", b"{", b"}", b",", b"&a ", b"*a", b"<<: ", b"<<: *a", b"&a {<<: *a}",
          b"!!str ", b"!!binary ",
          b"? ", b"|", b">", b"'", b'"', b"#", b"\t", b"\n", b"\n  ", b"    ", b"~", b"yes", b"1.5",
          b"2026-01-01", b"0x1F", b"-1", b"99999999999999999999", b"@every 0s", b"@reboot", b"*/0",
          b"L", b"5#9", b"MON-SUN", b"type: daemon", b"max: ", b"ips: [", b"::1", b"10.0.0.0/33",
          b"timezone: ", b"name: ", b"tasks:", b"settings:", b"\x00", b"\xff", b"\xc3", b"\xe2\x80\xa8",
          b"\xef\xbb\xbf", "\u00e9".encode(), b"%YAML 1.1\n", b"---\n", b"...\n"]


def mutation():
    position = st.integers(0, len(VALID))
    insert = st.tuples(st.just("insert"), position,
                       st.one_of(st.sampled_from(TOKENS), st.binary(max_size=8)))
    delete = st.tuples(st.just("delete"), position, st.integers(1, 40))
    swap = st.tuples(st.just("swap_lines"), st.integers(0, 200), st.integers(0, 200))
    dup = st.tuples(st.just("dup_line"), st.integers(0, 200), st.integers(0, 200))
    return st.one_of(insert, delete, swap, dup)


def apply(data, change):
    kind, a, b = change
    if kind == "insert":
        return data[:a] + b + data[a:]
    if kind == "delete":
        return data[:a] + data[a + b:]
    lines = data.split(b"\n")
    a, b = a % len(lines), b % len(lines)
    if kind == "swap_lines":
        lines[a], lines[b] = lines[b], lines[a]
    else:
        lines.insert(b, lines[a])
    return b"\n".join(lines)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation(), min_size=1, max_size=6))
def test_mutations_load_or_raise_config_error(changes):
    data = VALID
    for change in changes:
        data = apply(data, change)
    try:
        result = loads(data)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        assert all(p.startswith("tasks.yaml") for p in exc.problems), exc.problems
    else:
        assert isinstance(result, TaskFile)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_loads_or_raises_config_error(text):
    try:
        loads(text)
    except ConfigError:
        pass
