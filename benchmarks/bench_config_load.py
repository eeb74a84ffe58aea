"""Load time of a 100,000-task file: torchcore.config.load against the bare pyyaml C loader.

Prints the C loader's time (``yaml.load`` with CSafeLoader, and ``yaml.compose``, which
config builds on) and config.load's, and the ratio. Usage: python benchmarks/bench_config_load.py [N]
"""

import os
import sys
import tempfile

import yaml

from torchcore import config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib


def write_file(path, count):
    """A fleet-like file: varied schedules, some targeting, env, timeouts."""
    lines = ["settings:", "  timezone: UTC", "tasks:"]
    for i in range(count):
        lines += [f"  - name: task-{i}",
                  f"    schedule: \"{i % 60} {i // 60 % 60} {i % 24} * * *\"",
                  f"    command: /usr/local/bin/job.sh --shard {i}",
                  f"    ips: [10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}, 10.9.0.0/16]",
                  "    timeout: 15m",
                  "    env: {MODE: batch}"]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tasks.yaml")
        write_file(path, count)
        text = open(path, encoding="utf-8").read()
        bare = benchlib.best_of(2, lambda: yaml.load(text, Loader=yaml.CSafeLoader))
        compose = benchlib.best_of(2, lambda: yaml.compose(text, Loader=yaml.CSafeLoader))
        ours = benchlib.best_of(2, lambda: config.load(path))
    print(f"{count} tasks: yaml.load(CSafeLoader) {bare:.2f}s, yaml.compose {compose:.2f}s, "
          f"config.load {ours:.2f}s = {ours / bare:.2f}x the C loader")


if __name__ == "__main__":
    main()
