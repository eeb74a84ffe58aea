"""Idle cost and load time with 100,000 tasks that do not fire.

- Load (interleaved, best of two each): the daemon's time from exec to its ready log line
  (imports, parsing, validation, the
  match tables, the records database), and ``config.load`` alone in this process, against
  PyYAML's C loader (``yaml.load(..., Loader=CSafeLoader)``) parsing the same file.
  Target: within 2x the C loader.
- Idle: the supervisor's own CPU (user+system, to the nanosecond: /proc/PID/schedstat) over
  60 s with every task loaded and none due (each fires only on January 1st), the file watched
  (``watch: true``, the default), at 1,000 tasks and at the full count in the same run.
  Targets: at most 0.1% of one core at the full count, and within 2x of the 1,000-task figure
  (idle means idle: the loop sleeps until a second has work, whatever the tasks loaded).
- APScheduler 3: the time to add the same 100,000 schedules as CronTrigger jobs (in a child,
  capped; when the cap is hit the figure is extrapolated linearly and marked so).

Usage: python benchmarks/bench_idle.py [--quick] [--tasks N] [--small N] [--seconds S] [--idle-only]
"""

import argparse
import os
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib


def measure_load(path):
    """(C loader seconds, config.load seconds)."""
    from torchcore import config
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    bare = benchlib.best_of(1, lambda: yaml.load(text, Loader=yaml.CSafeLoader))
    ours = benchlib.best_of(1, lambda: config.load(path))
    return bare, ours


def measure_idle(path, seconds):
    """(seconds to ready, CPU seconds over ``seconds``, span, RSS bytes) of the daemon."""
    daemon = benchlib.Daemon(path)
    try:
        time.sleep(2)       # let the first ticks and the first records flush pass
        cpu0, wall0 = benchlib.cpu_precise(daemon.process), time.monotonic()
        time.sleep(seconds)
        cpu = benchlib.cpu_precise(daemon.process) - cpu0
        span = time.monotonic() - wall0
        rss = daemon.process.memory_info().rss
    finally:
        daemon.stop()
    return daemon.ready_after, cpu, span, rss


def measure_ready(path):
    """Seconds from exec to ready of a daemon started on ``path`` (stopped at once)."""
    daemon = benchlib.Daemon(path)
    daemon.stop()
    return daemon.ready_after


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 tasks, 10 s idle, APS capped")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--small", type=int, default=1000, help="the small file's tasks (1,000)")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--idle-only", action="store_true",
                        help="only the idle CPU (no load times, no APScheduler)")
    parser.add_argument("--aps-cap", type=float, default=None,
                        help="seconds APScheduler may spend adding jobs (default 60; quick 5)")
    args = parser.parse_args()
    count = args.tasks or (20_000 if args.quick else 100_000)
    seconds = args.seconds or (10 if args.quick else 60)
    cap = args.aps_cap or (5 if args.quick else 60)
    print(f"bench_idle {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {benchlib.machine()}")
    with tempfile.TemporaryDirectory(prefix="tc-idle-") as tmp:
        path = os.path.join(tmp, "tasks.yaml")
        small_path = os.path.join(tmp, "small", "tasks.yaml")
        os.mkdir(os.path.dirname(small_path))
        benchlib.write_taskfile(path, benchlib.idle_tasks(count), watch=True)
        benchlib.write_taskfile(small_path, benchlib.idle_tasks(args.small), watch=True)
        size = os.path.getsize(path)
        # interleaved and best of two each: the machine is shared and its load drifts
        if not args.idle_only:
            bare, ours = measure_load(path)
        _, small_cpu, small_span, _ = measure_idle(small_path, seconds)
        ready, cpu, span, rss = measure_idle(path, seconds)
        if not args.idle_only:
            bare2, ours2 = measure_load(path)
            ready = min(ready, measure_ready(path))
            bare, ours = min(bare, bare2), min(ours, ours2)
    pct, small_pct = 100 * cpu / span, 100 * small_cpu / small_span
    print(f"  file: {count:,} tasks, {size / 2**20:.1f} MB")
    if not args.idle_only:
        added, aps_time, _ = benchlib.measure_apscheduler_load(count, cap)
        aps_full = aps_time * count / added
        print(f"  PyYAML C loader (yaml.load, CSafeLoader)     {bare:7.2f} s")
        print(f"  torchcore config.load                        {ours:7.2f} s  "
              f"= {benchlib.ratio(ours, bare)} the C loader")
        print(f"  torchcore start: exec to ready               {ready:7.2f} s  "
              f"= {benchlib.ratio(ready, bare)} the C loader  "
              f"(target <= 2x: {'MET' if ready <= 2 * bare else 'NOT MET'})")
        note = "" if added == count else f"  (extrapolated from {added:,} jobs in {aps_time:.1f} s)"
        print(f"  APScheduler 3 add_job x {count:,} CronTrigger  {aps_full:7.2f} s{note}  "
              f"-> torchcore start is {benchlib.ratio(aps_full, ready)} faster")
    print(f"  idle supervisor CPU, {args.small:,} tasks, over {small_span:.0f} s: "
          f"{small_cpu * 1000:.1f} ms = {1000 * small_cpu / small_span:.3f} ms/s "
          f"= {small_pct:.3f}% of one core")
    print(f"  idle supervisor CPU, {count:,} tasks, over {span:.0f} s: {cpu * 1000:.1f} ms "
          f"= {1000 * cpu / span:.3f} ms/s = {pct:.3f}% of one core "
          f"(target <= 0.1%: {'MET' if pct <= 0.1 else 'NOT MET'}); RSS {rss / 2**20:.0f} MB")
    ratio = pct / small_pct if small_pct else float("inf")
    print(f"  {count:,} tasks against {args.small:,}: {ratio:.2f}x "
          f"(target <= 2x: {'MET' if ratio <= 2 else 'NOT MET'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
