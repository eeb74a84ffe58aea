"""Launch precision and capacity: torchcore against a bare spawn loop and APScheduler 3.

Three scenarios, each run by three systems one after the other on the same commands:
  a  light: 20 tasks on spread-out seconds (one each 3 s), 60 s
  b  200 tasks every second, 30 s
  c  a burst of 1,000 tasks due in the same second, 5 times (every 10 s)
Systems:
  torchcore  ``torchcore start --foreground`` on a generated task file
  floor      a bare Python loop: waits for each second boundary, ``os.posix_spawn``s the due
             commands one after another and reaps them (the launch path's lower bound)
  apscheduler  APScheduler 3, BackgroundScheduler, one CronTrigger (second precision) per task,
             its default ThreadPoolExecutor (10 threads) running each command with subprocess
  torchcore+http  torchcore with its HTTP service (``--http``), while a client scrapes ``/metrics``
             10 times a second and another follows a task's log (not in the default systems)
  torchcore+fleet  torchcore with ``settings.fleet`` (its fleet agent shipping every run) to the
             database at ``$TORCHCORE_DATABASE_URL``, its schema applied (not in the default
             systems; bench_fleet.py runs it on a throw-away PostgreSQL)
Every command is ``/bin/sh -c 'date +%s.%N\\ <task> >> <file>'``: the task records its own start
time; lateness = that time minus the second it was due for.  Missed = due seconds with no run,
doubled = due seconds with more than one.  CPU = the scheduling process's own user+system time
(not its children's) from the window's start until every run of the window has started.

Usage: python benchmarks/bench_launch.py [--quick] [--scenarios abc] [--systems torchcore,floor,apscheduler]
"""

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib

FULL = {    # name: (title, tasks, step s, offset of task i, window s)
    "a": ("light: 20 tasks, one each 3 s, 60 s", 20, 60, lambda i: 3 * i, 60),
    "b": ("200 tasks every second, 30 s", 200, 1, lambda i: 0, 30),
    "c": ("1,000 tasks due in the same second, 5 bursts 10 s apart", 1000, 10, lambda i: 0, 50),
}
QUICK = {
    "a": ("light (quick): 3 tasks, one each second, 3 s", 3, 3, lambda i: i, 3),
    "b": ("quick: 50 tasks every second, 3 s", 50, 1, lambda i: 0, 3),
    "c": ("quick: 100 tasks in the same second, 2 bursts 3 s apart", 100, 3, lambda i: 0, 6),
}
SYSTEMS = ("torchcore", "floor", "apscheduler")
APS_THREADS = 10


def build_tasks(count, step, offset, out):
    """[(name, seconds of the minute, shell command)] for one scenario."""
    tasks = []
    for i in range(count):
        name = f"t{i:04d}"
        secs = sorted({(offset(i) + k * step) % 60 for k in range(60 // step)})
        tasks.append((name, secs, f"date +%s.%N\\ {name} >> {out}"))
    return tasks


def cron_seconds(secs):
    return "*" if len(secs) == 60 else ",".join(map(str, secs))


def expected_set(tasks, first, last):
    return {(name, s) for name, secs, _ in tasks for s in range(first, last + 1) if s % 60 in secs}


def read_stamps(out):
    """{task: sorted start times} from the shared output file."""
    stamps = {}
    if not os.path.exists(out):
        return stamps
    with open(out) as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 2:
                stamps.setdefault(parts[1], []).append(float(parts[0]))
    for values in stamps.values():
        values.sort()
    return stamps


def attribute_by_schedule(tasks, stamps):
    """[(task, due second, start)]: each start belongs to the task's latest due second <= it."""
    secs_of = {name: set(secs) for name, secs, _ in tasks}
    runs = []
    for name, values in stamps.items():
        for ts in values:
            s = int(ts)
            while s % 60 not in secs_of[name]:
                s -= 1
            runs.append((name, s, ts))
    return runs


def attribute_by_records(db_path, stamps):
    """[(task, due second, start)] pairing the daemon's records (the second each run was due
    for) with the starts in the output file, in order, per task.  Also returns a list of
    problems (a count mismatch) and the number of runs recorded as skipped or missed."""
    con = sqlite3.connect(db_path)
    rows = con.execute("SELECT task, scheduled, skipped, missed FROM runs "
                       "WHERE scheduled IS NOT NULL ORDER BY task, scheduled, run_id").fetchall()
    con.close()
    started, not_run = {}, []
    for task, scheduled, skipped, missed in rows:
        if skipped or missed:
            not_run.append((task, scheduled))
        else:
            started.setdefault(task, []).append(scheduled)
    runs, problems = [], []
    for task, seconds in started.items():
        values = stamps.get(task, [])
        if len(values) > len(seconds) or len(values) < len(seconds) - 1:
            problems.append(f"{task}: {len(seconds)} runs recorded, {len(values)} started")
        runs += [(task, s, ts) for s, ts in zip(seconds, values)]
    return runs, problems, not_run


def summarize(runs, expected, first, last):
    """Lateness percentiles (ms), missed and doubled over the window's due seconds."""
    counts = {}
    late = []
    for name, s, ts in runs:
        if first <= s <= last:
            counts[(name, s)] = counts.get((name, s), 0) + 1
            late.append((ts - s) * 1000)
    missed = len(expected - set(counts))
    doubled = sum(n - 1 for n in counts.values() if n > 1)
    extra = len(set(counts) - expected)
    if not late:
        return dict(runs=0, missed=missed, doubled=doubled, extra=extra)
    return dict(runs=len(late), missed=missed, doubled=doubled, extra=extra,
                p50=benchlib.percentile(late, 0.50), p99=benchlib.percentile(late, 0.99),
                max=max(late))


# ---- the systems ----------------------------------------------------------------------------

def start_system(system, tasks, workdir):
    """Start one system on ``tasks``; returns (stop function, psutil.Process, db path or None)."""
    if system in ("torchcore", "torchcore+http", "torchcore+fleet"):
        path = os.path.join(workdir, "tasks.yaml")
        benchlib.write_taskfile(path, [(n, cron_seconds(s) + " * * * * *", c) for n, s, c in tasks])
        if system == "torchcore":
            daemon = benchlib.Daemon(path)
            return daemon.stop, daemon.process, os.path.join(daemon.state_dir, "torchcore.db")
        if system == "torchcore+fleet":
            url = os.environ.get("TORCHCORE_DATABASE_URL")
            if not url:
                raise SystemExit("torchcore+fleet needs $TORCHCORE_DATABASE_URL (bench_fleet.py sets it)")
            benchlib.write_taskfile(path, [(n, cron_seconds(s) + " * * * * *", c) for n, s, c in tasks],
                                    settings=["  fleet:", f"    database: '{url}'",
                                              "    node: bench-launch"])
            daemon = benchlib.Daemon(path)
            return daemon.stop, daemon.process, os.path.join(daemon.state_dir, "torchcore.db")
        port = _free_port()
        daemon = benchlib.Daemon(path, extra=["--http", f"127.0.0.1:{port}"])
        clients = _HttpClients(port, tasks[0][0])

        def stop_both():
            clients.stop()
            daemon.stop()
        return stop_both, daemon.process, os.path.join(daemon.state_dir, "torchcore.db")
    spec = os.path.join(workdir, "spec.json")
    with open(spec, "w") as handle:
        json.dump(tasks, handle)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--run-{system}", spec],
                            stdout=subprocess.PIPE, text=True)
    benchlib.wait_line(proc, "ready")

    def stop():
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return stop, psutil.Process(proc.pid), None


def _free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _HttpClients:
    """A scraper of /metrics (10 a second) and a follower of one task's log, in threads."""

    def __init__(self, port, task):
        import threading
        import urllib.request

        self.base, self.done = f"http://127.0.0.1:{port}/", threading.Event()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:      # the service is up
            try:
                urllib.request.urlopen(self.base + "metrics", timeout=5).read()
                break
            except OSError:
                time.sleep(0.1)
        self.scrapes = self.lines = 0
        self.threads = [threading.Thread(target=self._scrape, daemon=True),
                        threading.Thread(target=self._follow, args=(task,), daemon=True)]
        for thread in self.threads:
            thread.start()

    def _scrape(self):
        import urllib.request

        while not self.done.wait(0.1):
            try:
                urllib.request.urlopen(self.base + "metrics", timeout=5).read()
                self.scrapes += 1
            except OSError:
                pass

    def _follow(self, task):
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.base}api/v1/tasks/{task}/log/follow", timeout=5) as s:
                while not self.done.is_set():
                    if s.readline().startswith(b"data:"):
                        self.lines += 1
        except OSError:
            pass

    def stop(self):
        self.done.set()
        print(f"  (http clients: {self.scrapes} scrapes of /metrics, {self.lines} log lines followed)")


def run_floor(spec):
    """The floor: wait for each second, posix_spawn its commands in turn, reap."""
    by_sec = {}
    for _name, secs, command in json.load(open(spec)):
        for s in secs:
            by_sec.setdefault(s, []).append(["/bin/sh", "-c", command])
    env = dict(os.environ)
    print("ready", flush=True)
    second = int(time.time()) + 1
    while True:
        delay = second - time.time()
        if delay > 0:
            time.sleep(delay)
        for argv in by_sec.get(second % 60, ()):
            os.posix_spawn(argv[0], argv, env)
            _reap()
        _reap()
        second += 1


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run_apscheduler(spec):
    """APScheduler 3 with CronTrigger(second=...) jobs and a ThreadPoolExecutor."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    scheduler = BackgroundScheduler(
        timezone="UTC", executors={"default": ThreadPoolExecutor(APS_THREADS)},
        job_defaults={"misfire_grace_time": 60, "coalesce": False, "max_instances": 1})
    for name, secs, command in json.load(open(spec)):
        scheduler.add_job(subprocess.run, CronTrigger(second=cron_seconds(secs), timezone="UTC"),
                          args=[["/bin/sh", "-c", command]], id=name, name=name)
    scheduler.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    scheduler.shutdown(wait=False)
    os._exit(0)


# ---- one measurement ------------------------------------------------------------------------

def measure(system, params):
    """Run one system through one scenario; returns its summary dict."""
    _title, count, step, offset, window = params
    with tempfile.TemporaryDirectory(prefix="tc-launch-") as workdir:
        out = os.path.join(workdir, "starts.txt")
        tasks = build_tasks(count, step, offset, out)
        stop, process, db_path = start_system(system, tasks, workdir)
        try:
            align = step if count >= 100 and step > 1 else 1
            first = int(time.time() + 0.6) + 1
            first += (-first) % align
            last = first + window - 1
            expected = expected_set(tasks, first, last)
            benchlib.sleep_until(first - 0.5)
            cpu0, wall0 = benchlib.cpu_seconds(process), time.time()
            _wait_for_runs(tasks, out, expected, first, last, timeout=60 if count >= 500 else 15)
            cpu = benchlib.cpu_seconds(process) - cpu0
            span = time.time() - wall0
            time.sleep(0.5)     # a late double would show up here
        finally:
            stop()
        stamps = read_stamps(out)
        problems, not_run = [], []
        if db_path:
            runs, problems, not_run = attribute_by_records(db_path, stamps)
        else:
            runs = attribute_by_schedule(tasks, stamps)
        result = summarize(runs, expected, first, last)
        result.update(expected=len(expected), cpu=cpu, cpu_pct=100 * cpu / span, span=span,
                      problems=problems,
                      recorded_not_run=sum(1 for _, s in not_run if first <= s <= last))
        return result


def _wait_for_runs(tasks, out, expected, first, last, timeout):
    """Return once every due second of the window has a start in the file (or at timeout)."""
    benchlib.sleep_until(last + 1)
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = {(n, s) for n, s, _ in attribute_by_schedule(tasks, read_stamps(out))}
        if expected <= done:
            return
        time.sleep(0.2)


# ---- output ---------------------------------------------------------------------------------

def print_scenario(key, title, results):
    print(f"\n({key}) {title}")
    print(f"  {'system':<15} {'due':>6} {'ran':>6} {'missed':>6} {'doubled':>7} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU s':>7} {'CPU %':>6}")
    for system, r in results.items():
        print(f"  {system:<15} {r['expected']:>6} {r['runs']:>6} {r['missed']:>6} "
              f"{r['doubled']:>7} {r.get('p50', float('nan')):>8.1f} "
              f"{r.get('p99', float('nan')):>8.1f} {r.get('max', float('nan')):>8.1f} "
              f"{r['cpu']:>7.2f} {r['cpu_pct']:>6.1f}")
        for problem in r["problems"][:5]:
            print(f"    note: {problem}")
        if r["recorded_not_run"]:
            print(f"    note: {r['recorded_not_run']} due runs recorded as skipped or missed")
    for name in ("torchcore", "torchcore+http", "torchcore+fleet"):
        tc = results.get(name)
        if not tc or "p99" not in tc:
            continue
        for base in ("floor", "apscheduler"):
            if base in results and "p99" in results[base]:
                b = results[base]
                print(f"  {name} vs {base}: p50 {benchlib.ratio(tc['p50'], b['p50'])}, "
                      f"p99 {benchlib.ratio(tc['p99'], b['p99'])}, "
                      f"CPU {benchlib.ratio(tc['cpu'], b['cpu'])}")
    print_target(key, results)


def print_target(key, results):
    tc = results.get("torchcore")
    if not tc or "p99" not in tc:
        return
    clean = tc["missed"] == 0 and tc["doubled"] == 0
    if key == "a":
        met = tc["p99"] <= 10 and clean
        print(f"  target p99 <= 10 ms, none missed or doubled: {'MET' if met else 'NOT MET'}")
        return
    floor, aps = results.get("floor", {}), results.get("apscheduler", {})
    label = "  target p99 <= 1.5x floor and < APScheduler, none missed or doubled: "
    if "p99" not in floor or "p99" not in aps:
        print(label + "not judged (the floor and APScheduler were not both measured in this run)")
        return
    met = clean and tc["p99"] <= 1.5 * floor["p99"] and tc["p99"] < aps["p99"]
    print(label + ("MET" if met else "NOT MET"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke version (< 1 min)")
    parser.add_argument("--scenarios", default="abc")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--run-floor", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--run-apscheduler", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_floor:
        return run_floor(args.run_floor)
    if args.run_apscheduler:
        return run_apscheduler(args.run_apscheduler)
    table = QUICK if args.quick else FULL
    print(f"bench_launch {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {benchlib.machine()}")
    for key in args.scenarios:
        results = {}
        for system in args.systems.split(","):
            results[system] = measure(system, table[key])
        print_scenario(key, table[key][0], results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
