"""Helpers shared by the engine benchmarks: task files, the daemon, percentiles, CPU.

Every benchmark runs only on this machine: the daemon is started as
``torchcore start --foreground`` on a task file in a temporary directory and
stopped with SIGTERM; nothing listens on a network.
"""

import os
import signal
import subprocess
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
TORCHCORE = [sys.executable, "-m", "torchcore"]
READY_LINE = "torchcore started"


def write_taskfile(path, tasks, max_running=5000, misfire_grace=60, watch=False, settings=()):
    """Write a task file; ``tasks`` is a list of (name, schedule, command) triples; ``settings``:
    more lines of the settings block (indented two spaces)."""
    lines = ["settings:", "  timezone: UTC", f"  max_running: {max_running}",
             f"  misfire_grace: {misfire_grace}", f"  watch: {'true' if watch else 'false'}",
             *settings, "tasks:"]
    for name, schedule, command in tasks:
        lines += [f"  - name: {name}", f"    schedule: {_quote(schedule)}",
                  f"    command: {_quote(command)}", "    max: 1"]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def idle_tasks(count):
    """(name, schedule, command) for ``count`` varied tasks that only fire on January 1st."""
    for i in range(count):
        yield (f"job-{i:06d}", f"{i % 60} {i // 60 % 60} {i // 3600 % 24} 1 1 *",
               f"/usr/local/bin/job.sh --shard {i}")


def _quote(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Daemon:
    """``torchcore start --foreground`` on a task file, with its stderr in a file."""

    def __init__(self, taskfile, ready_timeout=300.0, extra=()):
        self.taskfile = taskfile
        self.stderr_path = taskfile + ".stderr"
        self.stderr = open(self.stderr_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(TORCHCORE + ["start", "--foreground", "-c", taskfile, *extra],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr)
        self.ready_after = self._wait_ready(ready_timeout)
        self.pid = self.proc.pid
        self.process = psutil.Process(self.pid)

    def _wait_ready(self, timeout):
        """Seconds from exec to the ready log line (the whole load of the task file)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as handle:
                if READY_LINE in handle.read():
                    return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise RuntimeError(f"torchcore exited with {self.proc.returncode}:\n"
                                   + open(self.stderr_path).read()[-2000:])
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"torchcore not ready after {timeout}s")

    @property
    def state_dir(self):
        return os.path.join(os.path.dirname(self.taskfile), ".torchcore")

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def wait_line(proc, text, timeout=300.0):
    """Read a child's stdout until a line starting with ``text``; returns the line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child exited before printing {text!r}")
        if line.startswith(text):
            return line.strip()
    raise RuntimeError(f"no {text!r} from the child after {timeout}s")


def cpu_seconds(process):
    """User + system CPU of one process (not its children)."""
    times = process.cpu_times()
    return times.user + times.system


def cpu_precise(process):
    """User + system CPU of one process (not its children) to the nanosecond, where Linux says
    (the sum of /proc/PID/task/*/schedstat: its threads alive now, so compare over a window in
    which none ends, as a thread pool's), else psutil's figure (to the clock tick)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{process.pid}/task"):
            with open(f"/proc/{process.pid}/task/{task}/schedstat") as handle:
                total += int(handle.read().split()[0])
    except (OSError, ValueError):
        return cpu_seconds(process)
    return total / 1e9


def best_of(runs, func):
    """The fastest of ``runs`` timed calls of ``func``, in seconds (a shared machine is noisy)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def percentile(values, fraction):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def sleep_until(epoch):
    delay = epoch - time.time()
    if delay > 0:
        time.sleep(delay)


def ratio(a, b):
    if not b:
        return "n/a"
    return f"{a / b:.2f}x"


def machine():
    """A one-line description of this machine for the printed results."""
    import platform
    return (f"{os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}")


def apscheduler_load(count, cap_seconds):
    """Child side: add ``count`` CronTrigger jobs (the same schedules as idle_tasks) to a started,
    paused APScheduler 3; stop at ``cap_seconds`` and report how many were added, the time and
    the RSS.  Prints one line: ``aps <added> <seconds> <rss bytes>``."""
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.start(paused=True)
    start = time.perf_counter()
    added = 0
    for name, schedule, command in idle_tasks(count):
        sec, minute, hour, day, month, _ = schedule.split()
        trigger = CronTrigger(second=sec, minute=minute, hour=hour, day=day, month=month,
                              timezone="UTC")
        scheduler.add_job(print, trigger, args=[command], id=name, name=name)
        added += 1
        if added % 1000 == 0 and time.perf_counter() - start > cap_seconds:
            break
    elapsed = time.perf_counter() - start
    rss = psutil.Process().memory_info().rss
    print(f"aps {added} {elapsed:.3f} {rss}", flush=True)
    scheduler.shutdown(wait=False)


def measure_apscheduler_load(count, cap_seconds):
    """(jobs added, seconds, RSS bytes) of APScheduler adding ``count`` jobs, in a child."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "aps-load", str(count),
                          str(cap_seconds)], capture_output=True, text=True,
                         timeout=cap_seconds * 3 + 120)
    for line in out.stdout.splitlines():
        if line.startswith("aps "):
            _, added, seconds, rss = line.split()
            return int(added), float(seconds), int(rss)
    raise RuntimeError(f"APScheduler child failed: {out.stderr[-2000:]}")


if __name__ == "__main__" and sys.argv[1:2] == ["aps-load"]:
    apscheduler_load(int(sys.argv[2]), float(sys.argv[3]))
