"""The chaos suite of `run: once` (issue 19): five real daemons as nodes n1..n5 on one real
PostgreSQL (tests/pgserver.py), each in a directory of its own (``--node-name``, ``--node-ip``),
registering themselves through their fleet agents, with ``fleet.lease: 6s``.

The tasks: ``tick`` (`once`, every second), ``pair`` (`once`, ``max: 2``, every 2 s, sleeps 3 s)
and ``single`` (a `once` daemon).  Every run writes its own output (its scheduled second, its
fencing token, its node, its pid; start and end stamps on the real clock) and the assertions read
only that and the nodes' records.  The faults, over about a minute:

- kill -9 of one node's supervisor alone (its claims process, launchers and runs live on);
- kill -9 of every process of the node holding the singleton (the node dies: its torchcore
  processes and its commands);
- SIGSTOP of the torchcore processes of the node holding the singleton then, past its lease
  (lease + 3 s), SIGCONT: its commands run on meanwhile, so the singleton runs on two nodes from
  the moment its lease ends and another node takes it until the stopped node, resumed, finds its
  lease gone and kills its instance (what ``TORCHCORE_FENCE`` is for): that overlap is the one
  allowed, bounded by the lease and by a second after SIGCONT;
- PostgreSQL stopped for 10 s, then started again on the same port and data directory;
- n5 under faketime +2 s all along (its clock ahead of the database's).

Which node gets the first kill is drawn from a seed, printed, and taken from
``TORCHCORE_CHAOS_SEED`` to replay a failure.
"""

import collections
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import psutil
import pytest
from daemon_harness import Daemon, wait_for

from torchcore import claims, fleetdb

pytestmark = [pytest.mark.process, pytest.mark.slow]

LEASE = 6                   # fleet.lease: the singleton is back within LEASE + 2 s of a loss
MARGIN = 2                  # seconds around each fault where a second may be missed
NOW = "$(env -u LD_PRELOAD -u FAKETIME date +%s.%N)"   # the real clock, even under faketime

TASKS = """\
tasks:
  - name: tick
    schedule: "* * * * * *"
    run: once
    max: 5                  # a second taken over late overlaps the next second's run
    command: echo "$TORCHCORE_SCHEDULED_AT $TORCHCORE_FENCE {node} {now} $$" >> {tick}
  - name: pair
    schedule: "*/2 * * * * *"
    run: once
    max: 2
    command: >-
      echo "s {now} $TORCHCORE_SCHEDULED_AT $TORCHCORE_FENCE {node} $$" >> {pair}; sleep 3;
      echo "e {now} $TORCHCORE_SCHEDULED_AT $TORCHCORE_FENCE {node} $$" >> {pair}
  - name: single
    type: daemon
    run: once
    kill_grace: 1s
    command: >-
      trap 'echo "e {now} 0 $TORCHCORE_FENCE {node} $$" >> {single}; exit 0' TERM;
      echo "s {now} 0 $TORCHCORE_FENCE {node} $$" >> {single};
      while true; do sleep 0.1; done
"""


def _faketime_env():
    """The environment that puts a process 2 s ahead (libfaketime), or None without it."""
    if shutil.which("faketime") is None:
        return None
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") +
                   glob.glob("/usr/lib/faketime/libfaketimeMT.so.1"))
    # (FAKETIME_DONT_FAKE_MONOTONIC would break Python's sleeps: EINVAL from clock_nanosleep)
    return {"LD_PRELOAD": found[0], "FAKETIME": "+2s"} if found else None


class Node(Daemon):
    """A daemon as node ``name``; ``env`` on top of the usual (faketime)."""

    def __init__(self, directory, body, settings, name, number, env=None):
        super().__init__(directory, body, settings)
        self.name, self.number, self.env = name, number, env or {}

    def start(self, wait=False):
        env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9", **self.env)
        with open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torchcore", "start", "--foreground", "-c", self.path,
                 "--node-name", self.name, "--node-ip", f"10.0.0.{self.number}"],
                stdout=subprocess.DEVNULL, stderr=err, cwd=self.dir, env=env)
        return self

    def tree(self):
        """The supervisor and every process under it (psutil), while it lives."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.Error:
            return []


def _torchcore(proc):
    """One of the node's own processes (titled ``torchcore: ...``), not a command."""
    try:
        return " ".join(proc.cmdline()).startswith("torchcore:")
    except psutil.Error:
        return False


def _signal_all(procs, signum):
    for proc in procs:
        try:
            proc.send_signal(signum)
        except psutil.Error:
            pass


def _stop_node(node, everything):
    """SIGSTOP the node's torchcore processes (``everything``: its commands too), again until no
    new one appears (a launcher may fork meanwhile); the processes stopped."""
    stopped = {}
    for _ in range(20):
        found = [p for p in node.tree() if p.pid not in stopped and (everything or _torchcore(p))]
        if not found:
            break
        _signal_all(found, signal.SIGSTOP)
        stopped.update((p.pid, p) for p in found)
    return list(stopped.values())


class Watch(threading.Thread):
    """Every 0.1 s: the pids in the stamp files, and when each was first seen gone (a run
    killed by SIGKILL writes no end stamp); every process of every node ever seen."""

    def __init__(self, nodes, files):
        super().__init__(daemon=True)
        self.nodes, self.files = nodes, files
        self.procs = {}             # pid -> psutil.Process (checked against pid reuse)
        self.gone = {}              # pid -> when first seen gone
        self.seen = {}              # pid -> psutil.Process of the nodes' trees
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            self.look()
            self.halt.wait(0.1)

    def look(self):
        for path in self.files:
            for row in _rows(path):
                pid = int(row[-1])
                if pid not in self.procs:
                    try:
                        self.procs[pid] = psutil.Process(pid)
                    except psutil.Error:
                        self.procs[pid] = None
                        self.gone[pid] = time.time()
        now = time.time()
        for pid, proc in self.procs.items():
            if pid not in self.gone and not _alive(proc):
                self.gone[pid] = now
        for node in self.nodes:
            for proc in node.tree():
                self.seen.setdefault(proc.pid, proc)


def _alive(proc):
    try:
        return proc is not None and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [line.split() for line in handle if line.strip()]


def _intervals(path, watch, deaths):
    """{pid: [start, end, second, fence, node]} of the runs stamped in ``path``; a run with no end
    stamp ended when its pid was seen gone (or when its node died)."""
    runs = {}
    for kind, at, second, fence, node, pid in _rows(path):
        entry = runs.setdefault(int(pid), [None, None, int(second), int(fence), node])
        entry[0 if kind == "s" else 1] = float(at)
    for pid, entry in runs.items():
        if entry[1] is None:
            entry[1] = min(watch.gone.get(pid, float("inf")), deaths.get(entry[4], float("inf")))
    return runs


def _most_at_once(intervals):
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda event: (event[0], event[1]))
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def _holder(path):
    """The node of the singleton's instance started last, and when."""
    starts = [(float(at), node) for kind, at, _, _, node, _ in _rows(path) if kind == "s"]
    return max(starts)[::-1] if starts else (None, None)


def test_five_nodes_through_kills_a_stop_an_outage_and_a_skewed_clock(pg, daemons, tmp_path,
                                                                       figures):
    seed = int(os.environ.get("TORCHCORE_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"chaos seed {seed} (TORCHCORE_CHAOS_SEED={seed} replays the draws)")
    rng = random.Random(seed)
    with fleetdb.connect(pg.url) as conn:
        fleetdb.migrate(conn, pg.url)
    files = {name: str(tmp_path / f"{name}.txt") for name in ("tick", "pair", "single")}
    skew = _faketime_env()
    if skew is None:
        warnings.warn("faketime is not installed (tests/setup-system.sh installs it): n5 runs on "
                      "the real clock, its skew is not tested")
    nodes = []
    for number in range(1, 6):
        name = f"n{number}"
        body = TASKS.format(node=name, now=NOW, **files)
        settings = f"  fleet:\n    database: {pg.url}\n    lease: {LEASE}s\n"
        nodes.append(daemons(body, settings, cls=lambda d, b, s, name=name, number=number: Node(
            d, b, s, name, number, skew if number == 5 else None)))
    watch = Watch(nodes, files.values())
    stopped = []
    try:
        _chaos(nodes, files, watch, rng, seed, figures, stopped, pg)
    finally:
        watch.halt.set()
        _signal_all(stopped, signal.SIGCONT)
        if pg.server.running is False:
            pg.server.start_again()
        for node in nodes:                  # whatever a failure left: this test's processes
            _signal_all(node.tree(), signal.SIGKILL)
        _signal_all([p for p in watch.seen.values() if _alive(p)], signal.SIGKILL)


def _chaos(nodes, files, watch, rng, seed, figures, stopped, pg):
    why = f"(chaos seed {seed})"
    for node in nodes:          # all at once (started one by one, they take 2-4 s each here)
        node.start()
    for node in nodes:
        node.wait_log("torchcore started", timeout=40)
    watch.start()
    by_name = {node.name: node for node in nodes}
    wait_for(lambda: _holder(files["single"])[1], 30, "the singleton's start")
    wait_for(lambda: len(_rows(files["tick"])) >= 3, 15, "the first ticks")
    t0 = time.time() + 1
    events = {}                 # what -> when (real clock)
    deaths = {}                 # node -> when all its processes died

    def sleep_until(at):
        time.sleep(max(0.0, at - time.time()))

    # 1. kill -9 of one node's supervisor alone (not the singleton's holder: its instance and
    #    lease would stay there, held by the orphaned claims process, and nothing would move)
    sleep_until(t0 + 4 + rng.uniform(0, 2))
    holder, _ = _holder(files["single"])
    first = by_name[rng.choice(sorted(n.name for n in nodes if n.name != holder))]
    watch.seen.update((p.pid, p) for p in first.tree())  # its orphans must end by themselves
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    events["kill supervisor"] = time.time()

    # 2. the singleton's node dies: every process of it, commands too
    sleep_until(events["kill supervisor"] + 6 + rng.uniform(0, 2))
    holder, _ = _holder(files["single"])
    second = by_name[holder]
    everything = _stop_node(second, everything=True)
    _signal_all(everything, signal.SIGKILL)
    second.proc.wait()
    events["kill node"] = deaths[second.name] = time.time()
    moved = wait_for(lambda: [s for s in _rows(files["single"])
                              if s[0] == "s" and float(s[1]) > events["kill node"]],
                     LEASE + 6, "the singleton to move after its node died")[0]

    # 3. SIGSTOP of the new holder's torchcore processes past its lease, then SIGCONT
    sleep_until(max(float(moved[1]) + 3, events["kill node"] + 10))
    third = by_name[moved[4]]
    stopped += _stop_node(third, everything=False)
    events["sigstop"] = time.time()
    time.sleep(LEASE + 3)
    _signal_all(stopped, signal.SIGCONT)
    events["sigcont"] = time.time()
    stopped.clear()

    # 4. PostgreSQL stopped for 10 s
    sleep_until(events["sigcont"] + 3)
    pg.server.stop()
    events["db stop"] = time.time()
    time.sleep(10)
    pg.server.start_again()
    events["db back"] = time.time()
    sleep_until(events["db back"] + LEASE + 4)
    end = time.time()

    # the end: a clean stop of the nodes still up; every process they started ends
    for node in nodes:
        if node.proc.poll() is None:
            node.stop()
    stopped_at = time.time()
    time.sleep(0.5)
    watch.halt.set()
    watch.join()
    watch.look()
    print(f"events {why}:", {what: round(at - t0, 2) for what, at in events.items()},
          f"t0 {t0:.2f}; first kill {first.name}, node death {second.name}, sigstop {third.name}")

    records = {node.name: node.runs() for node in nodes}
    with fleetdb.connect(pg.url) as conn:      # what the claims say, for the messages
        rows = conn.execute(f"SELECT task, second, fence, node, takeovers, started, ended "
                            f"FROM {fleetdb.SCHEMA}.claims").fetchall()
    records["claims"] = {(task, second): row for task, second, *row in rows}
    _check_ticks(files, records, events, t0, end, why, figures,
                 {n.name for n in nodes if n.env})
    _check_pairs(files, records, events, t0, end, watch, deaths, why)
    _check_single(files, events, watch, deaths, why, third.name, t0)
    # no process left behind: the commands' pids, and every process the nodes ever had
    deadline = time.time() + 10
    while time.time() < deadline:
        left = [p for p in list(watch.procs.values()) + list(watch.seen.values()) if _alive(p)]
        if not left:
            break
        time.sleep(0.2)
    assert not left, (f"processes left {time.time() - stopped_at:.1f} s after the stop {why}",
                      [(p.pid, p.cmdline()) for p in left])


def _excused(second, events):
    """May ``second`` not have run with the database and eligible nodes up?  Within MARGIN of a
    fault, or of the database's outage (its own check: the seconds skipped, with the reason)."""
    if any(at - MARGIN <= second <= at + MARGIN for what, at in events.items()
           if not what.startswith("db")):
        return True
    return events["db stop"] - MARGIN <= second <= events["db back"] + MARGIN


def _skips(records, task):
    """{second: {reason, ...}} of the skipped (or missed) seconds the nodes recorded, and of the
    runs stopped before their command could say anything (a run started as the database went
    away, its claim never confirmed: stopped at once, "its fleet lease could not be kept")."""
    found = collections.defaultdict(set)
    for name, rows in records.items():
        for row in rows if name != "claims" else ():
            if row["task"] != task or row["scheduled"] is None:
                continue
            if row["skipped"]:
                found[row["scheduled"]].add(row["skipped"])
            elif row["stopped"] and "fleet lease" in row["stopped"]:
                found[row["scheduled"]].add(f"stopped: {row['stopped']}")
    return found


def _check_ticks(files, records, events, t0, end, why, figures, skewed):
    runs = [(int(s), int(f), node) for s, f, node, _, _ in _rows(files["tick"])]
    started = {(int(s), int(f)): float(at) for s, f, _, at, _ in _rows(files["tick"])}
    per_second = collections.defaultdict(list)
    for second, fence, node in runs:
        per_second[second].append((fence, node))
    window = range(int(t0), int(end) - 2)
    doubled = {s: v for s, v in per_second.items() if len(v) > 1}
    skips = _skips(records, "tick")
    down = (events["db stop"], events["db back"])
    missed = [s for s in window if s not in per_second and
              not _excused(s, events)]
    unrecorded = [s for s in window if s not in per_second and not skips.get(s)]
    figures.add(faults=4 + ("n5" in skewed), runs=len(window), lost=len(missed),
                doubled=len(doubled))
    assert not doubled, (f"tick seconds run twice {why}", doubled)
    assert all(claims.fence_second(f) == s for s, f, _ in runs), why
    assert not missed, (f"tick seconds missed with the database up {why}", missed, events,
                        {s: (skips.get(s), records["claims"].get(("tick", s))) for s in missed})
    assert not unrecorded, (f"tick seconds neither run nor recorded as skipped {why}",
                            unrecorded)
    print("tick: seconds not run, by reason:", collections.Counter(
        reason for s in window if s not in per_second for reason in skips[s]))
    # the database's outage: once tasks fail closed (but for the runs claimed before it, up to
    # takeover + 1 s ahead, 2 s more on the skewed node), every second recorded unreachable
    assert not [key for key, at in started.items() if down[0] + 2 < at < down[1]], (why, down)
    quiet = [s for s in window if down[0] + 4 < s < down[1] - 1]
    assert quiet and all(claims.UNREACHABLE in skips[s] for s in quiet), (why, quiet)
    # the skewed node claims the nominal second: its runs count like any other's
    assert {node for _, _, node in runs} >= {"n5"}, why


def _check_pairs(files, records, events, t0, end, watch, deaths, why):
    runs = _intervals(files["pair"], watch, deaths)
    seconds = collections.Counter(second for _, _, second, _, _ in runs.values())
    assert not [s for s, count in seconds.items() if count > 1], (f"pair run twice {why}", runs)
    most = _most_at_once([(start, stop) for start, stop, *_ in runs.values()])
    assert most <= 2, (f"fleet max 2 exceeded {why}", sorted(runs.items()))
    print(f"pair: {len(runs)} runs, at most {most} at once; skipped:", collections.Counter(
        reason for s, reasons in _skips(records, "pair").items() if s not in seconds
        for reason in reasons))
    skips = _skips(records, "pair")
    window = [s for s in range(int(t0), int(end) - 4) if s % 2 == 0]
    unrecorded = [s for s in window if s not in seconds and not skips.get(s)]
    assert not unrecorded, (f"pair seconds neither run nor recorded as skipped {why}",
                            unrecorded, events)
    missed = [s for s in window if s not in seconds and "fleet max 2 reached" not in skips[s]
              and not _excused(s, events)]
    assert not missed, (f"pair seconds missed {why}", missed, events,
                        {s: (skips[s], records["claims"].get(("pair", s))) for s in missed})


def _check_single(files, events, watch, deaths, why, frozen, t0):
    runs = _intervals(files["single"], watch, deaths)
    spans = sorted((start, stop, node, fence) for start, stop, _, fence, node in runs.values())
    print("single: instances (start, end, node) from t0:",
          [(round(a - t0, 1), round(b - t0, 1), n) for a, b, n, _ in spans])
    assert all(start is not None for start, *_ in spans), why
    # never two at once, but for the stopped node's instance between its lease's end and its
    # resumption (+1 s): its commands ran on while it could not know
    for (s1, e1, n1, f1), (s2, e2, n2, f2) in zip(spans, spans[1:]):
        # a new holder, a new token; an instance restarted in its slot keeps its node's
        assert f2 > f1 or (f2 == f1 and n2 == n1), (f"fencing tokens not growing {why}", spans)
        if e1 > s2:
            assert n1 == frozen and events["sigstop"] < s2 and e1 <= events["sigcont"] + 1, \
                (f"the singleton ran on two nodes at once {why}", spans, events)
    # the stopped node, resumed, found its lease gone and killed its instance at once
    frozen_runs = [e for s, e, n, _ in spans if n == frozen and s < events["sigstop"] < e]
    assert frozen_runs and events["sigcont"] <= frozen_runs[0] <= events["sigcont"] + 1.5, \
        (f"the stopped node's instance {why}", spans, events)
    # back within lease + 2 s after each loss
    for what in ("kill node", "sigstop"):
        after = [s for s, *_ in spans if s > events[what]]
        assert after and after[0] - events[what] <= LEASE + 2, (what, why, spans, events)
    during = [e for s, e, *_ in spans if s < events["db stop"] < e]
    assert during and during[0] <= events["db stop"] + LEASE, (f"the instance outlived its "
                                                               f"lease in the outage {why}", spans)
    after = [s for s, *_ in spans if s > events["db back"] - 1]
    assert after and after[0] - events["db back"] <= LEASE + 2, (why, spans, events)
