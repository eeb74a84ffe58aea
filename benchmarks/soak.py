"""Soak: a real daemon running N tasks every second (default 100 runs a second) for a while.

Samples the supervisor every few seconds: resident memory, open descriptors, children, zombies.
At the end it reads the records and counts lost and doubled (task, second) runs.  Stable means:
RSS grows less than --rss-slack MB after the first fifth of the run, descriptors and children do
not drift, no zombie lives across two samples, nothing lost or doubled.  Exit status 0 if stable.

With ``--idle N`` the file also holds N tasks that never fire in the run (``0 0 3 1 1 *``), and
with ``--reload-every S`` one of their commands changes every S seconds and the daemon is told
to reload (SIGHUP); then a run recorded as missed is a problem too, and the reloads accepted
and rejected are counted from the daemon's log (issue 15: 100,000 tasks, a reload every 10 s,
10 minutes: nothing missed, doubled or coalesced, RSS flat).

Usage: python benchmarks/soak.py [--seconds 600] [--tasks 100] [--every 5] [--idle N]
                                 [--reload-every S] [--json]
"""

import argparse
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import psutil


def write_tasks(directory, count, idle=0, version=0):
    lines = ["settings:", "  timezone: UTC", "  state_dir: state"]
    lines += ["  watch: false"] if idle else []     # reloads: by SIGHUP, one each
    lines += ["tasks:"]
    lines += [f'  - {{name: soak{i}, schedule: "* * * * * *", command: "true", max: 2}}'
              for i in range(count)]
    changed = version % idle if idle else None
    lines += [f'  - {{name: idle{i}, schedule: "0 0 3 1 1 *", command: "/bin/true {i}'
              f'{" v%d" % version if i == changed else ""}"}}' for i in range(idle)]
    path = os.path.join(directory, "tasks.yaml")
    with open(path + ".tmp", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


def start_daemon(directory, path):
    env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9")
    err = open(os.path.join(directory, "daemon.err"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "torchcore", "start", "--foreground", "-c", path],
                            stdout=subprocess.DEVNULL, stderr=err, cwd=directory, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with open(err.name, errors="replace") as handle:
            if "torchcore started" in handle.read():
                return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"soak: the daemon did not start; see {err.name}")


def sample(proc):
    """(rss bytes, open fds, children, zombie pids) of the supervisor now."""
    children = proc.children()
    zombies = set()
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return proc.memory_info().rss, proc.num_fds(), len(children), zombies


def count_runs(directory, first, last):
    """Lost and doubled (task, second) pairs among seconds [first, last] of every task."""
    conn = sqlite3.connect(os.path.join(directory, "state", "torchcore.db"), timeout=30)
    try:
        rows = conn.execute("SELECT task, scheduled, started, skipped, missed FROM runs "
                            "WHERE scheduled BETWEEN ? AND ? AND task LIKE 'soak%'",
                            (first, last)).fetchall()
    finally:
        conn.close()
    tasks = {row[0] for row in rows}
    started = [(t, s) for t, s, st, sk, m in rows if st is not None and not sk]
    accounted = {(t, s) for t, s, *_ in rows}
    expected = {(t, s) for t in tasks for s in range(first, last + 1)}
    skipped = sum(1 for row in rows if row[3] and not row[4])
    return {"runs": len(started), "skipped": skipped, "lost": len(expected - accounted),
            "doubled": len(started) - len(set(started)),
            "missed": sum(1 for row in rows if row[4])}


def judge(samples, rss_slack, runs):
    """Problems found in the samples and run counts (an empty list: stable)."""
    problems = []
    settled = samples[len(samples) // 5:] or samples
    rss = [s[1] for s in settled]
    if max(rss) - rss[0] > rss_slack << 20:
        problems.append(f"RSS grew {(max(rss) - rss[0]) / 2**20:.1f} MB after warm-up")
    fds = [s[2] for s in samples]
    if max(fds) - min(fds) > 8:
        problems.append(f"open descriptors drifted {min(fds)}..{max(fds)}")
    children = [s[3] for s in settled]
    if max(children) > 3 * (sum(children) / len(children)) + 50:
        problems.append(f"children spiked to {max(children)}")
    persistent = {pid for a, b in itertools.pairwise(samples) for pid in a[4] & b[4]}
    if persistent:
        problems.append(f"zombies lived across samples: {sorted(persistent)}")
    if runs["lost"] or runs["doubled"]:
        problems.append(f"{runs['lost']} runs lost, {runs['doubled']} doubled")
    return problems


def soak(seconds, tasks, every, rss_slack, idle=0, reload_every=0):
    with tempfile.TemporaryDirectory(prefix="torchcore-soak-") as directory:
        proc = start_daemon(directory, write_tasks(directory, tasks, idle))
        supervisor = psutil.Process(proc.pid)
        samples = []
        began = time.time()
        first = int(began) + 2
        reloads, next_reload = 0, began + reload_every
        try:
            while time.time() - began < seconds:
                time.sleep(every if not reload_every else
                           max(0.0, min(every, next_reload - time.time())))
                if reload_every and time.time() >= next_reload:
                    reloads += 1
                    write_tasks(directory, tasks, idle, reloads)
                    proc.send_signal(signal.SIGHUP)
                    next_reload += reload_every
                if not samples or time.time() - began - samples[-1][0] >= every - 0.5:
                    samples.append((round(time.time() - began), *sample(supervisor)))
            last = int(time.time()) - 3
            cpu = sum(supervisor.cpu_times()[:2])
        finally:
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(60)
        runs = count_runs(directory, first, last)
        problems = judge(samples, rss_slack, runs)
        if status != 0:
            problems.append(f"the daemon exited {status}")
        with open(os.path.join(directory, "daemon.err"), errors="replace") as handle:
            log = handle.read()
        applied = {"asked": reloads, "accepted": log.count("INFO reloaded ("),
                   "rejected": log.count(") rejected, the running tasks")}
        if reload_every:
            if runs["missed"]:
                problems.append(f"{runs['missed']} runs missed")
            if applied["rejected"] or not applied["accepted"]:
                problems.append(f"reloads: {applied}")
        return {"seconds": seconds, "tasks": tasks, "idle": idle, "reloads": applied,
                "supervisor_cpu_s": round(cpu, 2),
                "rss_mb": [round(s[1] / 2**20, 1) for s in samples],
                "fds": [s[2] for s in samples], "children": [s[3] for s in samples],
                "zombies_seen": sum(len(s[4]) for s in samples), **runs, "problems": problems}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=600, help="how long to run (default 600)")
    parser.add_argument("--tasks", type=int, default=100, help="tasks firing every second")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--rss-slack", type=int, default=8, help="MB of RSS growth allowed")
    parser.add_argument("--idle", type=int, default=0, help="tasks that do not fire in the run")
    parser.add_argument("--reload-every", type=float, default=0,
                        help="seconds between reloads of a one-line change (default: none)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = soak(args.seconds, args.tasks, args.every, args.rss_slack, args.idle,
                  args.reload_every)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"soak: {args.tasks} tasks every second for {args.seconds}s"
              + (f", {args.idle:,} more that do not fire" if args.idle else "")
              + (f", a reload every {args.reload_every:g}s" if args.reload_every else ""))
        print(f"  runs {result['runs']}  skipped (max) {result['skipped']}  lost {result['lost']}  "
              f"doubled {result['doubled']}  missed {result['missed']}  "
              f"supervisor CPU {result['supervisor_cpu_s']}s")
        if args.reload_every:
            print(f"  reloads {result['reloads']}")
        print(f"  RSS MB   {result['rss_mb'][0]} .. {max(result['rss_mb'])} (last {result['rss_mb'][-1]})")
        print(f"  fds      {min(result['fds'])} .. {max(result['fds'])}")
        print(f"  children {min(result['children'])} .. {max(result['children'])}; "
              f"zombies seen in samples {result['zombies_seen']}, none across two samples"
              if not result["problems"] else "")
        print("  stable" if not result["problems"] else "  UNSTABLE: " + "; ".join(result["problems"]))
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
