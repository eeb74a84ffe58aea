"""The cost of looking for a killed supervisor's executors by title and mark (procscan.find).

A restarted supervisor scans /proc once when an open run was not found at its recorded pid (or
has none).  This starts N unrelated processes (``sleep``) and one process titled and marked as
the executor of an open run without a pid, then times ``find`` over that run: one pass over
/proc (every process's command line read), the executor's owner, descriptors and start time
read.  Prints the median and the worst of the repeats, with the number of processes seen.

Usage: python benchmarks/bench_adopt_scan.py [--quick] [--processes N] [--repeats N]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from torchcore import procscan, records

EXECUTOR = ("import os, sys, time, setproctitle\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
            "setproctitle.setproctitle(sys.argv[2])\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    count = 100 if args.quick else args.processes
    started = []
    with tempfile.TemporaryDirectory() as state:
        try:
            for _ in range(count):
                started.append(subprocess.Popen(["sleep", "600"]))
            run_id = 10**9 + os.getpid()
            executor = subprocess.Popen([sys.executable, "-c", EXECUTOR, state,
                                         procscan.executor_title("bench", run_id)],
                                        stdout=subprocess.PIPE, text=True)
            started.append(executor)
            assert executor.stdout.readline().strip() == "ready"
            fd = procscan.open_mark(state)
            mark = procscan.mark_of(fd)
            os.close(fd)
            record = records.RunRecord(run_id=run_id, task="bench", node="n", scheduled=None,
                                       started=time.time(), pid=None)
            times = []
            for _ in range(args.repeats):
                began = time.perf_counter()
                found, _ = procscan.find([record], mark)
                times.append((time.perf_counter() - began) * 1000)
                assert found == {run_id: executor.pid}, found
            seen = sum(name.isdigit() for name in os.listdir("/proc"))
            print(f"procscan.find, one open run without a pid, {seen} processes on the machine "
                  f"({count} started here): median {statistics.median(times):.1f} ms, "
                  f"worst {max(times):.1f} ms over {args.repeats} scans")
        finally:
            for proc in started:
                proc.kill()
            for proc in started:
                proc.wait()


if __name__ == "__main__":
    main()
