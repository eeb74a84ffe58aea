"""The validated-load cache: an unchanged big file is streamed again, anything else parsed."""

import gc
import os
import signal
import stat
import sys
from types import SimpleNamespace

import pytest

from torchcore import config, loadcache, loadchild, paths
from torchcore.node import Node

NODE = Node.detect(["10.0.0.5"], hostname="web-1")
ME = config._user_name(os.geteuid())
BODY = f"""settings:
  timezone: UTC
  state_dir: state
tasks:
  - {{name: plain, schedule: "*/5 * * * * *", command: "echo hi"}}
  - {{name: mine, schedule: "0 30 2 * * *", command: "true", user: {ME}, timezone: Europe/Berlin}}
  - {{name: elsewhere, schedule: "* * * * * *", command: "true", hosts: [db-*]}}
  - {{name: boot, schedule: "@reboot", command: "true"}}
"""


@pytest.fixture
def path(tmp_path, monkeypatch):
    monkeypatch.setattr(loadcache, "CACHE_MIN_BYTES", 0)     # this small file is "big"
    path = tmp_path / "tasks.yaml"
    path.write_text(BODY)
    return str(path)


def child(path, tmp_path, monkeypatch, node=NODE):
    """Run the loading child's main here; (verdict, Collector) of what it streamed."""
    out = tmp_path / "stream"
    with open(out, "wb") as handle, monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", SimpleNamespace(fileno=handle.fileno))
        try:
            assert loadchild.main([path, loadchild.node_argument(node)]) == 0
        finally:
            gc.enable()
            signal.signal(signal.SIGINT, signal.default_int_handler)
    stream, collect = loadchild.Stream(), loadchild.Collector()
    stream.feed(out.read_bytes())
    for kind, value in stream.frames():
        collect.take(kind, value)
    stream.finish()
    return stream.verdict, collect


def cache_file(tmp_path):
    return tmp_path / "state" / paths.LOAD_CACHE


def test_an_accepted_load_is_kept_and_the_unchanged_file_streamed_again(path, tmp_path, monkeypatch):
    first, fresh = child(path, tmp_path, monkeypatch)
    assert first["ok"] and not first.get("cached")
    kept = cache_file(tmp_path)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    again, cached = child(path, tmp_path, monkeypatch)
    assert again["ok"] and again["cached"]
    assert again["digest"] == first["digest"]
    assert cached.table.records == fresh.table.records
    assert cached.others == fresh.others
    assert loadchild.settings_of(again) == loadchild.settings_of(first)
    assert {k: v for k, v in again.items() if k not in ("parse", "cached")} == \
        {k: v for k, v in first.items() if k != "parse"}


def test_a_changed_file_is_parsed_and_replaces_what_was_kept(path, tmp_path, monkeypatch):
    child(path, tmp_path, monkeypatch)
    with open(path, "a") as handle:
        handle.write('  - {name: added, schedule: "@daily", command: "true"}\n')
    verdict, loaded = child(path, tmp_path, monkeypatch)
    assert not verdict.get("cached") and "added" in loaded.table
    verdict, loaded = child(path, tmp_path, monkeypatch)
    assert verdict["cached"] and "added" in loaded.table


@pytest.mark.parametrize("spoil", ["flip", "truncate", "other-node", "link"])
def test_a_cache_that_does_not_match_or_is_not_whole_is_a_normal_load(path, tmp_path, monkeypatch,
                                                                      spoil):
    child(path, tmp_path, monkeypatch)
    kept = cache_file(tmp_path)
    node = NODE
    if spoil == "flip":
        data = bytearray(kept.read_bytes())
        data[len(data) // 2] ^= 1
        kept.write_bytes(bytes(data))
    elif spoil == "truncate":
        kept.write_bytes(kept.read_bytes()[:-10])
    elif spoil == "other-node":
        node = Node.detect(["10.0.0.6"], hostname="web-2")
    else:
        os.link(kept, tmp_path / "state" / "second-name")     # two links: not trusted
    verdict, _ = child(path, tmp_path, monkeypatch, node)
    assert verdict["ok"] and not verdict.get("cached")


def test_what_the_node_says_is_asked_again_on_every_load(path, tmp_path, monkeypatch):
    child(path, tmp_path, monkeypatch)

    def gone(name):
        raise KeyError(name)
    monkeypatch.setattr(config.pwd, "getpwnam", gone)      # the user is gone since
    verdict, _ = child(path, tmp_path, monkeypatch)
    assert not verdict["ok"] and not verdict.get("cached")
    assert any(f"task 'mine': user: no user {ME!r}" in problem for problem in verdict["problems"])


def test_small_files_and_rejected_files_are_not_kept(tmp_path, monkeypatch):
    path = tmp_path / "tasks.yaml"
    path.write_text(BODY)
    child(str(path), tmp_path, monkeypatch)           # under CACHE_MIN_BYTES
    assert not cache_file(tmp_path).exists()
    monkeypatch.setattr(loadcache, "CACHE_MIN_BYTES", 0)
    path.write_text(BODY + "  - {name: bad, schedule: 'no', command: x}\n")
    verdict, _ = child(str(path), tmp_path, monkeypatch)
    assert not verdict["ok"] and not cache_file(tmp_path).exists()
