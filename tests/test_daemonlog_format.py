"""The daemon log's line format: the fast path (a plain line, the stamp worked out once a
second) gives the same text as logging.Formatter with the ISO stamp it replaced."""

import datetime
import logging
import os
import sys
import time

import pytest

from torchcore import daemonlog


class Reference(logging.Formatter):
    """The line as it was made before the fast path: logging's own format, an ISO stamp."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def formatTime(self, record, datefmt=None):
        stamp = datetime.datetime.fromtimestamp(record.created).astimezone()
        return stamp.isoformat(timespec="milliseconds")


def _record(created, level=logging.INFO, msg="%s run %d ended: %s", args=("t", 7, "exit 0"),
            exc_info=None):
    record = logging.LogRecord("torchcore", level, __file__, 1, msg, args, exc_info)
    record.created = created
    return record


# whole seconds, rounding edges (to the next second, halves), DST changes in Europe/Paris
SECONDS = [1_767_225_600.0, 1_767_225_600.0004999, 1_767_225_600.0005, 1_767_225_600.9994999,
           1_767_225_600.9995, 1_767_225_600.9999995, 1_767_225_600.9999994, 1_767_225_601.123456,
           1_774_746_000.0 - 0.0001, 1_774_746_000.0, 1_792_890_000.0 - 0.5, 1_792_890_000.5,
           1_792_886_400.25, 1_792_893_600.75, 0.5, 1_000_000_000.000001]


@pytest.fixture(params=["UTC", "Europe/Paris", "America/St_Johns", "Asia/Kolkata"])
def zone(request, monkeypatch):
    if not hasattr(time, "tzset"):
        pytest.skip("no tzset")
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def test_a_plain_line_is_the_text_logging_made(zone):
    fast, reference = daemonlog.Formatter(), Reference()
    for created in SECONDS + [s + step / 7 for s in SECONDS[:4] for step in range(1, 30)]:
        for level in (logging.INFO, logging.WARNING, logging.ERROR):
            assert fast.format(_record(created, level)) == reference.format(_record(created, level))


def test_a_line_with_a_traceback_is_the_text_logging_made(zone):
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info()
    fast, reference = daemonlog.Formatter(), Reference()
    one, two = _record(1_767_225_600.25, exc_info=info), _record(1_767_225_600.25, exc_info=info)
    assert fast.format(one) == reference.format(two)
    assert "ValueError: boom" in fast.format(one)


def test_the_stamp_follows_the_clock_across_seconds():
    fast = daemonlog.Formatter()
    now = time.time()
    for created in (now, now + 1, now - 3600, now + 86400 * 200):
        expected = datetime.datetime.fromtimestamp(created).astimezone().isoformat(
            timespec="milliseconds")
        assert fast.format(_record(created)).startswith(expected + " INFO ")


def test_a_zone_changed_within_a_second_is_the_new_zone(monkeypatch):
    """The zone set again (TZ and time.tzset) between two lines of one second: the second
    line has the new zone's offset, as logging's own format gives it."""
    if not hasattr(time, "tzset"):
        pytest.skip("no tzset")
    fast = daemonlog.Formatter()
    try:
        for zone, created in (("UTC", 1_767_225_600.25), ("Asia/Kolkata", 1_767_225_600.5),
                              ("America/St_Johns", 1_767_225_600.75), ("UTC", 1_767_225_600.9)):
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            assert fast.format(_record(created)) == Reference().format(_record(created)), zone
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.process
def test_the_fleet_claims_process_writes_the_daemons_line_format():
    """Its lines go to the daemon's log beside the supervisor's: the same format (the ISO
    stamp), not logging's default (``2026-12-01 17:33:59,164``)."""
    import re
    import socket
    import subprocess

    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-m", "torchcore.claimer"], stdin=theirs.fileno(),
                            stderr=subprocess.PIPE, text=True)
    theirs.close()
    ours.close()                    # the supervisor is gone: it says so, and exits
    _, err = proc.communicate(timeout=30)
    line = next(line for line in err.splitlines() if "the supervisor is gone" in line)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO fleet claims: ",
                    line), line
