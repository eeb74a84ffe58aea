"""``/metrics``: the node's runs in Prometheus's text format, built with prometheus-client.

A custom collector reads, at each scrape, the records' aggregates (store.Backend, cached
for two seconds) and the supervisor's status (cached for one): no state of its own, so a
restarted service reports the same numbers.  The counters count what the records hold
(``history`` agrees with them; records older than ``history_days`` are pruned, which
Prometheus sees as a counter reset).  Every per-task series is labelled only by the task
name (and a fixed set of results or reasons), for the tasks of the task file: the label
cardinality is bounded by the number of tasks.
"""

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import choose_encoder

from torchcore.ledger import TICK_BUCKETS

EXPOSITION_TTL = 1.0
RESULTS = ("success", "failure")        # always there (0 until the first); "stopped" once seen
SKIP_REASONS = ("max", "max_running", "fork_failed", "other")


class Metrics:
    def __init__(self, backend):
        self.backend = backend
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(backend))

    def exposition(self, accept=None):
        """(body, content type) for an Accept header (OpenMetrics when asked for); made at most
        every EXPOSITION_TTL seconds, however often it is scraped."""
        encoder, content_type = choose_encoder(accept or "")
        body = self.backend._cached(("metrics", content_type), EXPOSITION_TTL,
                                    lambda: encoder(self.registry))
        return body, content_type


class _Collector:
    def __init__(self, backend):
        self.backend = backend

    def describe(self):
        return []

    def collect(self):
        backend = self.backend
        document = backend.status()
        counts, lateness = backend.aggregates()
        live = backend.live()
        names = list(backend.tasks)

        runs = CounterMetricFamily("torchcore_task_runs", "Finished runs of a task, by result "
                                   "(stopped: ended by a planned stop)", labels=["task", "result"])
        skipped = CounterMetricFamily("torchcore_task_skipped", "Due runs not started, by reason",
                                      labels=["task", "reason"])
        missed = CounterMetricFamily("torchcore_task_missed", "Due times missed (beyond "
                                     "misfire_grace), as recorded", labels=["task"])
        success = GaugeMetricFamily("torchcore_task_last_success_timestamp_seconds",
                                    "When the task's last successful run ended", labels=["task"])
        failure = GaugeMetricFamily("torchcore_task_last_failure_timestamp_seconds",
                                    "When the task's last failed run ended", labels=["task"])
        for name in names:
            kinds = counts.get(name, {})
            for result in RESULTS:
                runs.add_metric([name, result], kinds.get(result, (0, None))[0])
            if "stopped" in kinds:
                runs.add_metric([name, "stopped"], kinds["stopped"][0])
            for reason in SKIP_REASONS:         # only the reasons seen: 10,000 tasks times four
                if f"skipped:{reason}" in kinds:    # zeros would be most of a scrape
                    skipped.add_metric([name, reason], kinds[f"skipped:{reason}"][0])
            missed.add_metric([name], kinds.get("missed", (0, None))[0])
            if kinds.get("success", (0, None))[1] is not None:
                success.add_metric([name], kinds["success"][1])
            if kinds.get("failure", (0, None))[1] is not None:
                failure.add_metric([name], kinds["failure"][1])
        yield from (runs, skipped, missed, success, failure)
        yield from self.task_gauges(document)
        yield from self.node_metrics(document, live, lateness)

    def task_gauges(self, document):
        duration = GaugeMetricFamily("torchcore_task_last_duration_seconds",
                                     "How long the task's last finished run took", labels=["task"])
        running = GaugeMetricFamily("torchcore_task_running", "Instances of the task running now",
                                    labels=["task"])
        next_run = GaugeMetricFamily("torchcore_task_next_run_timestamp_seconds",
                                     "When the task is next due", labels=["task"])
        restarts = CounterMetricFamily("torchcore_task_daemon_restarts",
                                       "Restarts of a daemon task since the daemon started or "
                                       "the task was last changed, disabled or enabled",
                                       labels=["task"])
        for task in document["tasks"]:
            name = task["name"]
            last = task["last"]
            if last is not None and last["duration"] is not None:
                duration.add_metric([name], last["duration"])
            running.add_metric([name], len(task["running"]))
            if task["next_run"] is not None:
                next_run.add_metric([name], _epoch(task["next_run"]))
            if "daemon" in task:
                restarts.add_metric([name], task["daemon"]["restarts"])
        return duration, running, next_run, restarts

    def node_metrics(self, document, live, lateness):
        daemon = document["daemon"]
        up = GaugeMetricFamily("torchcore_up", "1 when the daemon answers on its control socket")
        up.add_metric([], 1 if live else 0)
        yield up
        tasks = GaugeMetricFamily("torchcore_tasks", "Tasks in the task file, by state",
                                  labels=["state"])
        states = {}
        for task in document["tasks"]:
            states[task["state"]] = states.get(task["state"], 0) + 1
        for state, count in sorted(states.items()):
            tasks.add_metric([state], count)
        yield tasks
        if live:
            started = GaugeMetricFamily("torchcore_start_time_seconds",
                                        "When the daemon started (Unix time)")
            started.add_metric([], live["started"])
            yield started
            info = InfoMetricFamily("torchcore_task_file", "The task file the daemon runs",
                                    labels=["file", "version"])
            info.add_metric([live["file"], daemon["version"][:12]], {})
            yield info
            stats = live["stats"]
            for key, help_text in (("started", "Runs started since the daemon started"),
                                   ("failed", "Runs failed since the daemon started"),
                                   ("fork_failures", "Executors that could not be forked"),
                                   ("errors", "Contained failures of the supervisor's own work")):
                family = CounterMetricFamily(f"torchcore_daemon_{key}", help_text)
                family.add_metric([], stats.get(key, 0))
                yield family
            yield from _reloads(live)
        if lateness is not None:
            buckets, count, total = lateness
            hist = HistogramMetricFamily(
                "torchcore_launch_lateness_seconds",
                "How late scheduled runs started after their second (recorded runs)")
            hist.add_metric([], [(_le(b), c) for b, c in buckets] + [("+Inf", count)], total)
            yield hist


def _reloads(live):
    """Reloads by result, and the ticks' durations, from the daemon's stats."""
    stats = live["stats"]
    family = CounterMetricFamily("torchcore_reloads", "Reloads of the task file since the daemon "
                                 "started, by result", labels=["result"])
    for result in ("accepted", "rejected"):
        family.add_metric([result], stats.get(f"reloads_{result}", 0))
    yield family
    buckets = stats.get("tick_buckets")
    if buckets:
        hist = HistogramMetricFamily("torchcore_tick_duration_seconds",
                                     "How long the supervisor's ticks took (since it started)")
        cumulative, total = [], 0
        for bound, count in zip((*TICK_BUCKETS, "+Inf"), buckets):
            total += count
            cumulative.append((bound if bound == "+Inf" else _le(bound), total))
        hist.add_metric([], cumulative, stats.get("tick_seconds", 0.0))
        yield hist


def _le(bound):
    return repr(float(bound))


def _epoch(iso_text):
    from datetime import datetime

    return datetime.fromisoformat(iso_text).timestamp()
