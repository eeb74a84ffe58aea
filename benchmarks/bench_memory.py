"""Memory: the supervisor's RSS with 100,000 tasks loaded (against APScheduler 3 holding the
same 100,000 CronTrigger jobs), and each executor's unique memory while 200 runs execute at
once (against a fresh small Python process).

- Supervisor: RSS and USS of ``torchcore start --foreground`` a few seconds after it is ready
  on 100,000 tasks that do not fire.  APScheduler: RSS of a child that added the same jobs to a
  started, paused scheduler (when its add time passes the cap, the RSS is scaled linearly from
  the jobs it added and marked so).
- Executors: 200 tasks due in the same second (every 20 s), each ``sleep 10``, in a file alone and
  beside the 100,000 idle tasks; once 200 executors are alive,
  the USS (psutil memory_full_info) of every executor (found by title under the launchers; the
  ``sleep`` commands are not counted).  Target: at most 4 MB each.

Usage: python benchmarks/bench_memory.py [--quick] [--tasks N] [--runs N]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib

MB = 2 ** 20


def supervisor_memory(count):
    """(RSS, USS) of the daemon holding ``count`` idle tasks, and its time to ready."""
    with tempfile.TemporaryDirectory(prefix="tc-mem-") as tmp:
        path = os.path.join(tmp, "tasks.yaml")
        benchlib.write_taskfile(path, benchlib.idle_tasks(count))
        daemon = benchlib.Daemon(path)
        try:
            time.sleep(3)
            info = daemon.process.memory_full_info()
        finally:
            daemon.stop()
    return info.rss, info.uss, daemon.ready_after


def executor_memory(runs, idle=0, hold=10):
    """USS of each executor while ``runs`` runs of ``sleep hold`` execute at once; the file also
    holds ``idle`` tasks that do not fire (the executors are forks of a supervisor that big)."""
    with tempfile.TemporaryDirectory(prefix="tc-mem-") as tmp:
        path = os.path.join(tmp, "tasks.yaml")
        tasks = [(f"sleeper-{i:03d}", "*/20 * * * * *", f"sleep {hold}") for i in range(runs)]
        benchlib.write_taskfile(path, tasks + list(benchlib.idle_tasks(idle)))
        daemon = benchlib.Daemon(path)
        try:
            executors = _wait_for_executors(daemon.process, runs, time.time() + 20 + hold)
            uss = []
            for proc in executors:
                try:
                    uss.append(proc.memory_full_info().uss)
                except psutil.Error:
                    pass
            sup = daemon.process.memory_full_info()
        finally:
            daemon.stop()
    return uss, sup


def _executors(process):
    """The live executors of a supervisor: its launchers' children titled `torchcore: <task> [run N]`."""
    found = []
    for proc in process.children(recursive=True):
        try:
            title = " ".join(part for part in proc.cmdline() if part)
            if proc.status() != psutil.STATUS_ZOMBIE and " [run " in title:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _wait_for_executors(process, runs, deadline):
    """The supervisor's executors, once ``runs`` of them are alive (or at ``deadline``)."""
    children = []
    while time.time() < deadline:
        children = _executors(process)
        if len(children) >= runs:
            break
        time.sleep(0.1)
    return children


def small_python_uss():
    """USS of a fresh Python process that only sleeps (the baseline an executor is set against)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(1.0)
        return psutil.Process(proc.pid).memory_full_info().uss
    finally:
        proc.kill()
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 tasks, 50 runs, APS capped")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--aps-cap", type=float, default=None,
                        help="seconds APScheduler may spend adding jobs (default 60; quick 5)")
    args = parser.parse_args()
    count = args.tasks or (20_000 if args.quick else 100_000)
    runs = args.runs or (50 if args.quick else 200)
    cap = args.aps_cap or (5 if args.quick else 60)
    print(f"bench_memory {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {benchlib.machine()}")
    rss, uss, ready = supervisor_memory(count)
    added, _aps_time, aps_rss = benchlib.measure_apscheduler_load(count, cap)
    base = _empty_python_rss()
    aps_full = base + (aps_rss - base) * count / added
    note = "" if added == count else f" (scaled from {added:,} jobs: {aps_rss / MB:.0f} MB)"
    print(f"  supervisor, {count:,} tasks loaded: RSS {rss / MB:.0f} MB, USS {uss / MB:.0f} MB "
          f"(ready in {ready:.1f} s)")
    print(f"  APScheduler 3, {count:,} CronTrigger jobs: RSS {aps_full / MB:.0f} MB{note}")
    print(f"  torchcore / APScheduler RSS: {benchlib.ratio(rss, aps_full)} (target <= 0.40x: "
          f"{'MET' if rss <= 0.4 * aps_full else 'NOT MET'}); "
          f"per task: torchcore {(rss - base) / count:.0f} B, APScheduler "
          f"{(aps_full - base) / count:.0f} B (above a bare Python's {base / MB:.0f} MB)")
    small = small_python_uss()
    print(f"  a fresh small Python process (the baseline): USS {small / MB:.2f} MB")
    for idle in (0, count):
        sizes, sup = executor_memory(runs, idle)
        if not sizes:
            print(f"  executors beside {idle:,} idle tasks: none measured")
            continue
        top = max(sizes)
        print(f"  {len(sizes)} of {runs} executors alive at once, supervisor holding "
              f"{runs + idle:,} tasks: USS median {statistics.median(sizes) / MB:.2f} MB, "
              f"max {top / MB:.2f} MB, total {sum(sizes) / MB:.0f} MB; median / fresh "
              f"{benchlib.ratio(statistics.median(sizes), small)} (target <= 4 MB each: "
              f"{'MET' if top <= 4 * MB and len(sizes) >= runs else 'NOT MET'}); "
              f"supervisor RSS {sup.rss / MB:.0f} MB, USS {sup.uss / MB:.0f} MB")
    return 0


def _empty_python_rss():
    out = subprocess.run([sys.executable, "-c",
                          "import psutil; print(psutil.Process().memory_info().rss)"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


if __name__ == "__main__":
    sys.exit(main())
