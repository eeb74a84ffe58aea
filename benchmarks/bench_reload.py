"""Reload of a big task file: does the clock keep ticking?

A daemon holds N idle tasks (benchlib.idle_tasks: they fire only on January 1st) and one task
every second that appends ``$EPOCHREALTIME`` to a file.  After a few seconds, one line of the
file changes (one idle task's command) and ``torchcore reload`` is timed.  Printed:

- the every-second task's lateness (its start time past its second) p50 / p99 / max over the
  seconds around the reload, and the seconds with no run (missed or coalesced) or two;
- the reload command's answer time against the child's parse time (from the daemon's log), and
  how long after the daemon got the request it had the file applied;
- before that, start to ready (exec of ``torchcore start --foreground`` to its ready line),
  cold (no load cache: the file parsed) and warm (a restart of the unchanged file, streamed
  from ``state_dir/load.cache``), interleaved, best of ``--starts`` each, on issue 15's file
  (every idle task ``0 0 3 1 1 *``) and on this benchmark's varied schedules, each against
  PyYAML's C loader (``yaml.load`` with CSafeLoader, Python's cycle collector off) on the same
  file in the same run.

Targets (issue 15, at 100,000 tasks): lateness p99 under 20 ms, no coalesced seconds, the
answer within the parse time + 1 s; start to ready at most 3 s, and within 2x of the C loader.

Usage: python benchmarks/bench_reload.py [--quick] [--tasks N] [--reloads N] [--starts N]
(``--reloads 0``: the starts alone)
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib

BEFORE = 4          # seconds of ticks before the first reload
AFTER = 8           # seconds of ticks after the last one
ISSUE_SCHEDULE = "0 0 3 1 1 *"


def write_file(path, count, changed=None, same=None):
    """The file: a task every second and ``count`` idle ones (``same``: every idle task on
    that one schedule, as issue 15's file has it, instead of benchlib's varied ones)."""
    lines = ["settings:", "  timezone: UTC", "  shell: /bin/bash", "  watch: false", "tasks:",
             "  - name: tick", "    schedule: '* * * * * *'",
             f"    command: {benchlib._quote('echo $EPOCHREALTIME >> ' + path + '.ticks')}"]
    for name, schedule, command in benchlib.idle_tasks(count):
        if name == changed:
            command += " --changed"
        lines += [f"  - name: {name}", f"    schedule: {benchlib._quote(same or schedule)}",
                  f"    command: {benchlib._quote(command)}"]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def reload_once(path, count, number):
    """Change one line, run `torchcore reload`; (seconds to its answer, its output)."""
    write_file(path, count, changed=f"job-{number * 7 % count:06d}")
    start = time.monotonic()
    out = subprocess.run(benchlib.TORCHCORE + ["reload", "-c", path], capture_output=True,
                         text=True, timeout=300)
    return time.monotonic() - start, (out.stdout + out.stderr).strip()


def ticks(path):
    with open(path + ".ticks", encoding="utf-8") as handle:
        return [float(line) for line in handle if line.strip()]


def c_loader(path):
    """Seconds PyYAML's C loader takes to load the file (best of two), with Python's cycle
    collector off (the stricter baseline: with it on, as a program calls it, its passes over
    the millions of objects made take longer than the parse at 100,000 tasks); and on."""
    import gc

    import yaml
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    gc.disable()
    try:
        off = benchlib.best_of(2, lambda: yaml.load(text, Loader=yaml.CSafeLoader))
    finally:
        gc.enable()
    return off, benchlib.best_of(1, lambda: yaml.load(text, Loader=yaml.CSafeLoader))


def starts(path, count, rounds, label=""):
    """Start to ready, cold and warm (see the module docstring), best of ``rounds`` each,
    and the cold one against PyYAML's C loader on the same file."""
    cache = os.path.join(os.path.dirname(path), ".torchcore", "load.cache")
    cold, warm = [], []
    for _ in range(rounds):
        for figures in (cold, warm):
            if figures is cold and os.path.exists(cache):
                os.unlink(cache)
            daemon = benchlib.Daemon(path)
            daemon.stop()
            with open(daemon.stderr_path, encoding="utf-8", errors="replace") as handle:
                cached = "read from the load cache" in handle.read()
            if cached == (figures is warm):
                figures.append(daemon.ready_after)
    bare, with_gc = c_loader(path)
    for name, figures in (("cold (parsed)", cold), ("warm (unchanged file, load cache)", warm)):
        if not figures:
            print(f"  start to ready at {count:,} tasks{label}, {name}: no such start seen")
            continue
        best = min(figures)
        print(f"  start to ready at {count:,} tasks{label}, {name}: {best:.2f} s (best of "
              f"{len(figures)}: {', '.join(f'{x:.2f}' for x in figures)}; target <= 3 s: "
              f"{'MET' if best <= 3 else 'NOT MET'}); {best / bare:.2f}x PyYAML's C loader "
              f"on the file ({bare:.2f} s, collector off; {with_gc:.2f} s on; target within 2x: "
              f"{'MET' if best <= 2 * bare else 'NOT MET'})")
    if os.path.exists(cache):
        os.unlink(cache)        # the reload below starts cold, as before the cache


def run(count, reloads, rounds):
    with tempfile.TemporaryDirectory(prefix="tc-reload-") as tmp:
        path = os.path.join(tmp, "tasks.yaml")
        if rounds:
            write_file(path, count, same=ISSUE_SCHEDULE)
            starts(path, count, rounds, f" (every task {ISSUE_SCHEDULE!r}, issue 15's file)")
        write_file(path, count)
        if rounds:
            starts(path, count, rounds, " (varied schedules)")
        if not reloads:
            return 0
        daemon = benchlib.Daemon(path)
        try:
            time.sleep(BEFORE)
            first = int(time.time())
            answers = []
            for number in range(reloads):
                answers.append(reload_once(path, count, number + 1))
                time.sleep(2)
            time.sleep(AFTER)
            last = int(time.time()) - 1
            with open(daemon.stderr_path, encoding="utf-8", errors="replace") as handle:
                log = handle.read()
        finally:
            daemon.stop()
        seen = ticks(path)
    parses = [float(x) for x in re.findall(r"parsed in ([0-9.]+)s", log)]
    applied = [float(x) for x in re.findall(r"applied ([0-9.]+)s after the request", log)]
    per_second = {}
    for stamp in seen:
        per_second.setdefault(int(stamp), []).append(stamp - int(stamp))
    window = range(first - 2, last)
    late = [min(per_second[s]) for s in window if s in per_second]
    missing = [s for s in window if s not in per_second]
    doubled = [s for s in window if len(per_second.get(s, ())) > 1]
    print(f"  {count:,} tasks, ready in {daemon.ready_after:.1f} s (cold); {reloads} reload(s) of a "
          f"one-line change, {len(window)} seconds watched")
    print(f"  every-second task lateness: p50 {benchlib.percentile(late, 0.5) * 1000:.1f} ms, "
          f"p99 {benchlib.percentile(late, 0.99) * 1000:.1f} ms, max {max(late) * 1000:.1f} ms; "
          f"seconds without a run {len(missing)}, with two {len(doubled)} "
          f"(target: p99 < 20 ms, none missed: "
          f"{'MET' if benchlib.percentile(late, 0.99) < 0.02 and not missing else 'NOT MET'})")
    worst = sorted(((min(per_second[s]), s - first) for s in window if s in per_second),
                   reverse=True)[:3]
    print("  latest seconds (lateness, seconds after the first reload): "
          + ", ".join(f"{late * 1000:.1f} ms at {offset:+d} s" for late, offset in worst))
    for number, (seconds, text) in enumerate(answers):
        parse = parses[number] if number < len(parses) else None
        target = "" if parse is None else (
            f" (parse {parse:.2f} s; target answer < parse + 1 s: "
            f"{'MET' if seconds < parse + 1 else 'NOT MET'})")
        inside = f", the daemon applied it {applied[number]:.2f} s after its request" \
            if number < len(applied) else ""
        print(f"  reload {number + 1}: answered in {seconds:.2f} s{target}{inside}: {text[:100]}")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 tasks, one reload")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--reloads", type=int, default=None)
    parser.add_argument("--starts", type=int, default=None,
                        help="cold and warm starts measured first, each (default 2; quick 1)")
    args = parser.parse_args()
    count = args.tasks or (20_000 if args.quick else 100_000)
    reloads = args.reloads if args.reloads is not None else (1 if args.quick else 3)
    print(f"bench_reload {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {benchlib.machine()}")
    rounds = args.starts if args.starts is not None else (1 if args.quick else 2)
    return run(count, reloads, rounds)


if __name__ == "__main__":
    sys.exit(main())
