"""Scheduler CPU with 200 tasks due once a minute: torchcore against APScheduler 3, same run.

Each system runs the same 200 tasks (``0 * * * * *``: second 0 of every minute; the command
appends its name to a file) for whole minutes, one system after the other:
  torchcore    ``torchcore start --foreground`` (the file watched, the default)
  apscheduler  APScheduler 3, BackgroundScheduler, one CronTrigger(second=0) per task, its
               ThreadPoolExecutor (10 threads) running each command with subprocess
CPU = user+system time of the scheduling process alone (torchcore: the supervisor; its
launchers, which fork the executors, are shown apart, and added in a second ratio: APScheduler's
figure includes its threads' forks of the commands), to the nanosecond (schedstat of every
thread), from 5 s before the first minute of the window to 5 s before the one after it; the
load average is shown at the start and the end of each system's window (the machine may be
shared).  Target: the supervisor's CPU no more than APScheduler's in the same run.

With --together both run over the same minutes (APScheduler's runs at second 30, torchcore's at
second 0): on a shared machine whose load swings from minute to minute, both then see the same.

Usage: python benchmarks/bench_minute.py [--quick] [--together] [--tasks N] [--minutes M]
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib


def tasks(count, out):
    return [(f"m{i:04d}", "0 * * * * *", f"echo m{i:04d} >> {out}") for i in range(count)]


def start_torchcore(workdir, jobs):
    path = os.path.join(workdir, "tasks.yaml")
    benchlib.write_taskfile(path, jobs, watch=True)
    daemon = benchlib.Daemon(path)
    return daemon.stop, daemon.process


def start_apscheduler(workdir, jobs, second=0):
    spec = os.path.join(workdir, "jobs.txt")
    with open(spec, "w") as handle:
        handle.writelines(f"{name}\t{command}\n" for name, _, command in jobs)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--run-apscheduler", spec,
                             "--second", str(second)], stdout=subprocess.PIPE, text=True)
    benchlib.wait_line(proc, "ready")

    def stop():
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return stop, psutil.Process(proc.pid)


def run_apscheduler(spec, second=0):
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    scheduler = BackgroundScheduler(
        timezone="UTC", executors={"default": ThreadPoolExecutor(10)},
        job_defaults={"misfire_grace_time": 60, "coalesce": False, "max_instances": 1})
    with open(spec) as handle:
        for line in handle:
            name, command = line.rstrip("\n").split("\t")
            scheduler.add_job(subprocess.run, CronTrigger(second=second, timezone="UTC"),
                              args=[["/bin/sh", "-c", command]], id=name, name=name)
    scheduler.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    scheduler.shutdown(wait=False)
    os._exit(0)


def launchers_of(process):
    return [child for child in process.children() if "launcher" in " ".join(child.cmdline())]


def measure(system, count, minutes):
    """(supervisor CPU s, launchers' CPU s or None, span s, runs seen, runs due)."""
    with tempfile.TemporaryDirectory(prefix="tc-minute-") as workdir:
        out = os.path.join(workdir, "out.txt")
        jobs = tasks(count, out)
        starter = start_torchcore if system == "torchcore" else start_apscheduler
        stop, process = starter(workdir, jobs)
        try:
            first = (int(time.time()) // 60 + 1) * 60        # the next whole minute
            if first - time.time() < 10:
                first += 60
            benchlib.sleep_until(first - 5)
            helpers = launchers_of(process) if system == "torchcore" else []
            cpu0 = benchlib.cpu_precise(process)
            help0 = sum(benchlib.cpu_precise(p) for p in helpers)
            wall0 = time.monotonic()
            benchlib.sleep_until(first + 60 * minutes - 5)
            cpu = benchlib.cpu_precise(process) - cpu0
            helper_cpu = sum(benchlib.cpu_precise(p) for p in helpers) - help0
            span = time.monotonic() - wall0
        finally:
            stop()
        runs = 0
        if os.path.exists(out):
            with open(out) as handle:
                runs = sum(1 for _ in handle)
    return cpu, (helper_cpu if helpers else None), span, runs, count * minutes


def together(count, minutes):
    """Both systems at once over the same minutes: torchcore's runs at second 0, APScheduler's
    at second 30 (neither burst meets the other's), the same window measured for both."""
    print(f"  {count} tasks each, torchcore's due at second 0 and APScheduler's at second 30 of "
          f"every minute, both over the same {minutes} minute(s)")
    with tempfile.TemporaryDirectory(prefix="tc-minute-") as workdir:
        outs = {name: os.path.join(workdir, f"{name}.out") for name in ("torchcore", "apscheduler")}
        os.mkdir(os.path.join(workdir, "tc"))
        os.mkdir(os.path.join(workdir, "aps"))
        stop_tc, tc_proc = start_torchcore(os.path.join(workdir, "tc"),
                                           tasks(count, outs["torchcore"]))
        try:
            stop_aps, aps_proc = start_apscheduler(os.path.join(workdir, "aps"),
                                                   tasks(count, outs["apscheduler"]), second=30)
            try:
                first = (int(time.time()) // 60 + 1) * 60
                if first - time.time() < 10:
                    first += 60
                benchlib.sleep_until(first - 5)
                helpers = launchers_of(tc_proc)
                load = os.getloadavg()[0]
                before = [benchlib.cpu_precise(p) for p in (tc_proc, aps_proc, *helpers)]
                wall0 = time.monotonic()
                benchlib.sleep_until(first + 60 * minutes - 5)
                after = [benchlib.cpu_precise(p) for p in (tc_proc, aps_proc, *helpers)]
                span = time.monotonic() - wall0
                end_load = os.getloadavg()[0]
            finally:
                stop_aps()
        finally:
            stop_tc()
        runs = {}
        for name, out in outs.items():
            with open(out) if os.path.exists(out) else open(os.devnull) as handle:
                runs[name] = sum(1 for _ in handle)
    tc, aps = after[0] - before[0], after[1] - before[1]
    launchers = sum(after[2:]) - sum(before[2:])
    due = count * minutes
    print(f"  torchcore    CPU {tc:.3f} s over {span:.0f} s (+ launchers {launchers:.3f} s); "
          f"{1e6 * tc / due:.0f} us a run; runs {runs['torchcore']}")
    print(f"  apscheduler  CPU {aps:.3f} s over {span:.0f} s; {1e6 * aps / due:.0f} us a run; "
          f"runs {runs['apscheduler']}  (load {load:.1f} -> {end_load:.1f})")
    print(f"  torchcore supervisor against APScheduler 3: {benchlib.ratio(tc, aps)} "
          f"(target <= 1x: {'MET' if tc <= aps else 'NOT MET'})")
    print(f"  with its launchers (which fork the executors, as APScheduler's threads fork its "
          f"commands): {benchlib.ratio(tc + launchers, aps)}")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one minute each (default two)")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--minutes", type=int, default=None)
    parser.add_argument("--together", action="store_true",
                        help="both systems in the same minutes (APScheduler's runs at second 30), "
                             "so a shared machine's load weighs on both alike")
    parser.add_argument("--run-apscheduler", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--second", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_apscheduler:
        return run_apscheduler(args.run_apscheduler, args.second)
    minutes = args.minutes or (1 if args.quick else 2)
    print(f"bench_minute {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {benchlib.machine()}")
    if args.together:
        return together(args.tasks, minutes)
    print(f"  {args.tasks} tasks due at second 0 of every minute, {minutes} minute(s) each")
    results, launchers = {}, 0.0
    for system in ("torchcore", "apscheduler"):
        load = os.getloadavg()[0]
        cpu, helpers, span, runs, due = measure(system, args.tasks, minutes)
        results[system] = cpu
        launchers = helpers or launchers
        extra = "" if helpers is None else f"  (+ launchers {helpers:.3f} s)"
        print(f"  {system:<12} CPU {cpu:.3f} s over {span:.0f} s = {1000 * cpu / span:.2f} ms/s"
              f"{extra}; {1e6 * cpu / due:.0f} us a run; runs {runs} of {due} due (the window's "
              f"edges may add or drop a minute); load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    tc, aps = results["torchcore"], results["apscheduler"]
    print(f"  torchcore supervisor against APScheduler 3: {benchlib.ratio(tc, aps)} "
          f"(target <= 1x: {'MET' if tc <= aps else 'NOT MET'})")
    print(f"  with its launchers (which fork the executors, as APScheduler's threads fork its "
          f"commands): {benchlib.ratio(tc + launchers, aps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
