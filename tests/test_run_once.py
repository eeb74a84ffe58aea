"""`run: once` in the task file, and the pure logic of the fleet's claims (claims.py): the
rendezvous choice of a preferred node, eligibility, fencing tokens.  No database here; the
claims against a real PostgreSQL and real daemons are in test_fleet_once.py."""

import collections
import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from torchcore import claims, config, fleetspec, tasktable
from torchcore.errors import ConfigError
from torchcore.node import Node
from torchcore.taskspec import Task

FLEET = "settings:\n  fleet:\n    database: postgresql://tc@db.internal/fleet\n"


def _load(tmp_path, text):
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    return str(path), lambda: config.load(str(path))


def test_run_once_and_each_load_and_survive_the_compact_record(tmp_path):
    _, load = _load(tmp_path, FLEET + "tasks:\n"
                    "  - {name: a, schedule: '* * * * * *', command: 'true', run: once}\n"
                    "  - {name: b, schedule: '* * * * * *', command: 'true', run: each}\n"
                    "  - {name: c, schedule: '* * * * * *', command: 'true'}\n"
                    "  - {name: d, type: daemon, command: 'sleep 9', run: once}\n")
    tasks = load().tasks
    assert [t.run for t in tasks] == ["once", "each", "each", "once"]
    table = tasktable.TaskTable.of_tasks(tasks)
    assert [table[t.name].run for t in tasks] == ["once", "each", "each", "once"]
    assert table.once == {"a", "d"} and table.daemons == {"d"}
    assert table["a"] == tasks[0]
    assert tasktable.record(tasks[0]) != tasktable.record(tasks[1].__class__(
        **{**{f: getattr(tasks[0], f) for f in tasks[0].__slots__}, "run": "each"}))


def test_on_node_loss_loads_on_a_once_task_and_survives_the_compact_record(tmp_path):
    _, load = _load(tmp_path, FLEET + "tasks:\n"
                    "  - {name: a, schedule: '* * * * * *', command: 'true', run: once,"
                    " on_node_loss: rerun}\n"
                    "  - {name: b, schedule: '* * * * * *', command: 'true', run: once,"
                    " on_node_loss: none}\n")
    tasks = load().tasks
    assert [t.on_node_loss for t in tasks] == ["rerun", "none"]
    table = tasktable.TaskTable.of_tasks(tasks)
    assert table["a"] == tasks[0] and table["a"].on_node_loss == "rerun"
    assert table.once == {"a", "b"}
    assert tasktable.record(tasks[0]) != tasktable.record(tasks[1].__class__(
        **{**{f: getattr(tasks[0], f) for f in tasks[0].__slots__}, "on_node_loss": "none"}))


def test_run_once_without_settings_fleet_is_an_error_at_its_line_naming_the_setting(tmp_path):
    path, load = _load(tmp_path, "tasks:\n  - name: report\n    schedule: '0 30 2 * * *'\n"
                       "    command: 'true'\n    run: once\n")
    with pytest.raises(ConfigError) as error:
        load()
    assert f"{path}:5: task 'report': run: once needs settings.fleet" in str(error.value)


@pytest.mark.parametrize("task, problem", [
    ("{name: x, schedule: '* * * * * *', command: 'true', run: twice}",
     ":5: task 'x': run: expected each or once, got 'twice'"),
    ("{name: x, schedule: '@reboot', command: 'true', run: once}",
     ":5: task 'x': run: once cannot be used with @reboot"),
    ("{name: x, schedule: '* * * * * *', command: 'true', on_node_loss: rerun}",
     ":5: task 'x': on_node_loss: only a run: once task can be re-run on another node"),
    ("{name: x, type: daemon, command: 'sleep 9', run: once, on_node_loss: rerun}",
     ":5: task 'x': on_node_loss: a daemon task moves to another node when its node dies"),
    ("{name: x, schedule: '* * * * * *', command: 'true', run: once, on_node_loss: sometimes}",
     ":5: task 'x': on_node_loss: expected none or rerun, got 'sometimes'"),
])
def test_bad_run_values_name_file_line_task_and_field(tmp_path, task, problem):
    path, load = _load(tmp_path, FLEET + "tasks:\n  - " + task + "\n")
    with pytest.raises(ConfigError) as error:
        load()
    assert f"{path}{problem}" in str(error.value)


def test_takeover_and_lease_defaults_and_forms(tmp_path):
    _, load = _load(tmp_path, FLEET + "tasks: []\n")
    fleet = load().settings.fleet
    assert (fleet.takeover, fleet.lease) == (fleetspec.DEFAULT_TAKEOVER, fleetspec.DEFAULT_LEASE) \
        == (0.5, 15)
    for text, seconds in (("0.25s", 0.25), ("750ms", 0.75), ("1", 1.0), (".3", 0.3)):
        _, load = _load(tmp_path, FLEET + f"    takeover: {text}\n    lease: 1m\ntasks: []\n")
        assert (load().settings.fleet.takeover, load().settings.fleet.lease) == (seconds, 60)


@pytest.mark.parametrize("body, problem", [
    ("    takeover: 5s\n", ":4: settings: fleet: takeover: expected 0.1s to 3s, got 5s"),
    ("    takeover: soon\n", ":4: settings: fleet: takeover: expected seconds like 0.5s"),
    ("    lease: 5s\n", ":4: settings: fleet: lease: expected a duration of at least 6s"),
    ("    lease: 2h\n", ":4: settings: fleet: lease: at most 1h"),
])
def test_bad_takeover_and_lease_name_their_line(tmp_path, body, problem):
    path, load = _load(tmp_path, FLEET + body + "tasks: []\n")
    with pytest.raises(ConfigError) as error:
        load()
    assert f"{path}{problem}" in str(error.value)


# ---- the pure logic of the claims (claims.py), on generated inputs ------------------------------

NAMES = st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), min_size=1, max_size=12,
                 unique=True)
SECONDS = st.integers(0, 2**40)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(NAMES, st.text(min_size=1, max_size=20), SECONDS, st.randoms(use_true_random=False))
def test_the_preferred_node_is_one_choice_whatever_the_order_and_moves_only_with_its_node(
        nodes, task, second, rnd):
    chosen = claims.preferred(task, second, nodes)
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert chosen in nodes and claims.preferred(task, second, shuffled) == chosen
    others = [n for n in nodes if n != chosen]
    if others:          # another node gone: the choice stays; the chosen one gone: another
        gone = rnd.choice(others)
        assert claims.preferred(task, second, [n for n in nodes if n != gone]) == chosen
        assert claims.preferred(task, second, others) in others
    added = claims.preferred(task, second, nodes + ["zz-new"])
    assert added in (chosen, "zz-new")      # a node joining takes only its own share


@settings(derandomize=True, max_examples=20, deadline=None)
@given(st.integers(2, 6), st.text(min_size=1, max_size=10), SECONDS)
def test_the_seconds_spread_over_the_pool(count, task, start):
    nodes = [f"n{i}" for i in range(count)]
    seconds = 3000
    share = collections.Counter(claims.preferred(task, start + s, nodes) for s in range(seconds))
    assert set(share) == set(nodes)
    assert all(abs(n - seconds / count) < 0.25 * seconds / count for n in share.values()), share


NETWORKS = st.lists(st.builds(
    lambda a, p: str(ipaddress.ip_network(f"10.{a}.0.0/{p}", strict=False)),
    st.integers(0, 3), st.sampled_from([8, 16, 24, 32])), max_size=3)
HOSTS = st.lists(st.sampled_from(["web-*", "db1", "n?", "*.example.com"]), max_size=2)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(NETWORKS, HOSTS, st.lists(st.builds(lambda a, b: f"10.{a}.0.{b}", st.integers(0, 3),
                                           st.integers(0, 3)), max_size=3),
       st.sampled_from(["web-1", "db1", "n3", "x.example.com", "other"]))
def test_eligibility_from_the_registry_is_task_runs_on(ips, hosts, addresses, hostname):
    task = Task(name="t", command="true", ips=tuple(ipaddress.ip_network(n) for n in ips),
                hosts=tuple(hosts))
    node = Node(claims.node_addresses(addresses + ["not-an-address"]), hostname)
    assert claims.eligible(ips, hosts, node.addresses, hostname) == task.runs_on(node)
    live = [("a", hostname, node.addresses), ("b", "nowhere", ())]
    assert ("a" in claims.pool(ips, hosts, live)) == task.runs_on(node)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.lists(st.tuples(SECONDS, st.integers(0, claims.FENCE_STEP - 1)), min_size=2, max_size=20,
                unique_by=lambda item: item[0]))
def test_fences_grow_with_the_second_and_the_takeovers(items):
    items.sort()
    fences = [claims.first_fence(second) + takeovers for second, takeovers in items]
    assert fences == sorted(set(fences))
    assert [claims.fence_second(fence) for fence in fences] == [second for second, _ in items]
