"""Plain-English readings of schedules, for ``torchcore check`` and ``status``.

Cron fields are read by cron-descriptor (given all seven of its fields, so a
6-field torchcore schedule is never mistaken for 5 fields plus a year);
``@every`` gets a reading of our own, ``@reboot`` and the macros theirs from schedule.MACROS.

>>> describe_schedule("0 30 2 * * MON-FRI")
'At 02:30, Monday through Friday'
>>> describe_schedule("@every 90s")
'Every 1 minute 30 seconds'
"""

import functools

from torchcore.schedule import MACROS
from torchcore.units import parse_duration

_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


@functools.lru_cache(maxsize=4096)
def describe_schedule(text):
    """A one-line reading of ``text``; "" when there is none (never raises)."""
    words = text.split()
    if not words:
        return ""
    if words[0].startswith("@"):
        return _describe_macro(words)
    if len(words) == 5:
        words = ["0"] + words
    if len(words) != 6:
        return ""
    return _describe_cron(" ".join(words + ["*"]))


def _describe_macro(words):
    if words[0] == "@every" and len(words) == 2:
        try:
            return "Every " + plain_duration(parse_duration(words[1]))
        except ValueError:
            return ""
    return MACROS[words[0]].reading if len(words) == 1 and words[0] in MACROS else ""


def _describe_cron(expression):
    """cron-descriptor's reading of a 7-field expression (sec min hour dom month dow year)."""
    try:
        from cron_descriptor import ExpressionDescriptor, Options

        options = Options(locale_code="en_US", use_24hour_time_format=True)
        return ExpressionDescriptor(expression, options).get_description()
    except Exception:  # a reading is a courtesy: never let it break a command
        return ""


def plain_duration(seconds):
    """``90`` -> ``1 minute 30 seconds``; ``7200`` -> ``2 hours``."""
    parts = []
    for unit, size in _UNITS:
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}{'s' if count != 1 else ''}")
    return " ".join(parts) or "0 seconds"
