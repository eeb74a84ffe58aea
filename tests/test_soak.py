"""The short CI variant of benchmarks/soak.py: 30 s of 100 runs a second on a real daemon."""

import importlib.util
import os

import pytest

pytestmark = [pytest.mark.process, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", os.path.join(ROOT, "benchmarks", "soak.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_30s_of_100_runs_a_second_is_stable(figures):
    result = load_soak().soak(seconds=30, tasks=100, every=3, rss_slack=8)
    figures.add(runs=result["runs"] + result["skipped"], lost=result["lost"],
                doubled=result["doubled"])
    assert result["problems"] == [], result
    assert result["runs"] >= 100 * 20              # most seconds ran every task on a loaded machine
