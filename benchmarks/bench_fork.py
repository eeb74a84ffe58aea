"""The cost of os.fork() in the supervisor: a small Python process against one holding the
supervisor loaded with 100,000 tasks (after gc.freeze(), as the supervisor does).

Each fork's child calls os._exit(0) at once; the parent waits for it.  Both sides run in
fresh child processes, one after the other; prints ms per fork (median and mean) and the ratio.

Usage: python benchmarks/bench_fork.py [--quick] [--tasks N] [--forks N]
"""

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib


def time_forks(count):
    """Per-fork times in ms (fork + the child's exit + waitpid)."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        times.append((time.perf_counter() - start) * 1000)
    return times


def load_supervisor(path):
    """A Supervisor with the task file applied (tables built, gc frozen), not started."""
    from torchcore import config
    from torchcore.node import Node
    from torchcore.supervisor import Supervisor

    taskfile = config.load(path)
    supervisor = Supervisor(taskfile, Node(addresses=(), hostname="bench"))
    supervisor._apply(taskfile, first=True)
    return supervisor


def child(mode, path, forks):
    """Child side: set up, fork ``forks`` times, print one result line."""
    keep = load_supervisor(path) if mode == "loaded" else None
    gc.freeze()
    time_forks(5)       # warm up
    times = time_forks(forks)
    rss = psutil.Process().memory_info().rss
    tasks = len(keep.tasks) if keep else 0
    print(f"fork {statistics.median(times):.3f} {statistics.mean(times):.3f} {rss} {tasks}")


def run_child(mode, path, forks):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, path,
                          str(forks)], capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("fork "):
            _, median, mean, rss, tasks = line.split()
            return float(median), float(mean), int(rss), int(tasks)
    raise RuntimeError(f"{mode} child failed: {out.stderr[-2000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 tasks, 100 forks")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--forks", type=int, default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path, forks = args.child
        return child(mode, path, int(forks))
    count = args.tasks or (20_000 if args.quick else 100_000)
    forks = args.forks or (100 if args.quick else 500)
    print(f"bench_fork {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {benchlib.machine()}")
    with tempfile.TemporaryDirectory(prefix="tc-fork-") as tmp:
        path = os.path.join(tmp, "tasks.yaml")
        benchlib.write_taskfile(path, benchlib.idle_tasks(count))
        small = run_child("small", path, forks)
        loaded = run_child("loaded", path, forks)
    print(f"  {'process':<40} {'RSS MB':>7} {'median ms':>10} {'mean ms':>8}")
    print(f"  {'small Python process':<40} {small[2] / 2**20:>7.1f} {small[0]:>10.3f} "
          f"{small[1]:>8.3f}")
    print(f"  {f'supervisor with {loaded[3]:,} tasks loaded':<40} {loaded[2] / 2**20:>7.1f} "
          f"{loaded[0]:>10.3f} {loaded[1]:>8.3f}")
    print(f"  loaded / small: median {benchlib.ratio(loaded[0], small[0])}, "
          f"mean {benchlib.ratio(loaded[1], small[1])} ({forks} forks each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
