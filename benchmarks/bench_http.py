"""The HTTP service at 10,000 tasks: latency of ``/metrics`` and of the dashboard's task list.

A task file of N tasks and a records database of R runs are made in a temporary directory; the
service (torchcore/web) serves them on a loopback port in this process, with no daemon behind it
(the supervisor's part, one status request a second at most, is the supervisor's cost, not the
service's). One client asks, one request after the other on a kept-alive connection, for
``/metrics`` and for ``/api/v1/tasks?limit=100`` (the dashboard's first page) for S seconds each,
after one warm-up request (the only one that waits for the figures to be made); p50, p99 and
the worst are printed.

    python benchmarks/bench_http.py [--tasks 10000] [--runs 100000] [--seconds 10] [--quick]
"""

import argparse
import http.client
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchcore.records import Records, RunRecord, db_path
from torchcore.web import server
from torchcore.web.store import Backend


def make_site(directory, tasks, runs):
    path = os.path.join(directory, "tasks.yaml")
    with open(path, "w") as handle:
        handle.write("settings:\n  timezone: UTC\n  state_dir: state\ntasks:\n")
        for i in range(tasks):
            handle.write(f"  - {{name: task-{i}, schedule: '{i % 60} */{1 + i % 15} * * * *', "
                         f"command: 'true'}}\n")
    backend = Backend(path)
    rng = random.Random(1)
    now = time.time()
    with Records(db_path(backend.state_dir)) as store:
        for run_id in range(1, runs + 1):
            at = now - rng.uniform(0, 7 * 86400)
            code = 0 if rng.random() < 0.9 else 1
            store.add(RunRecord(run_id, f"task-{rng.randrange(tasks)}", "bench", int(at),
                                at + rng.uniform(0, 0.05), at + rng.uniform(0.1, 30), code, None))
            if run_id % 10_000 == 0:
                store.flush()
    backend.live = lambda: None
    return backend


def measure(port, path, seconds):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    conn.getresponse().read()       # warm-up: makes the figures once
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        times.append(time.perf_counter() - start)
        assert response.status == 200, response.status
    conn.close()
    times.sort()
    return {"requests": len(times), "p50": times[len(times) // 2],
            "p99": times[min(len(times) - 1, int(len(times) * 0.99))], "max": times[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="1,000 tasks, 10,000 runs, 3 s each")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.runs, args.seconds = 1000, 10_000, 3.0
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        backend = make_site(directory, args.tasks, args.runs)
        print(f"{args.tasks:,} tasks, {args.runs:,} runs recorded "
              f"(set up in {time.perf_counter() - started:.1f}s)")
        srv, thread = server.serve(backend, ("127.0.0.1", 0))
        try:
            for path in ("/metrics", "/api/v1/tasks?limit=100"):
                figures = measure(srv.server_address[1], path, args.seconds)
                print(f"{path:28} {figures['requests']:6,} requests  p50 {figures['p50'] * 1000:7.2f} ms  "
                      f"p99 {figures['p99'] * 1000:7.2f} ms  max {figures['max'] * 1000:7.1f} ms")
        finally:
            server.stop(srv, thread)


if __name__ == "__main__":
    main()
