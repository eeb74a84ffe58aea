"""Durations, sizes and counts as a task file writes them, each kind bounded in one place.

Every number a task file holds is parsed here, from ASCII digits only (``str.isdigit``
also accepts ``²`` and ``١``, which ``int`` then refuses or reads differently), and is
held to the range of its kind, so no value reaches the C match core, ``datetime`` or a
system call that it cannot hold, and no numeral of thousands of digits reaches ``int``.

>>> parse_duration("1h30m")
5400
>>> parse_duration(90)
90
>>> parse_size("512M")
536870912
>>> format_duration(5400)
'1h30m'
>>> parse_duration("99999999999d")
Traceback (most recent call last):
...
torchcore.units.OutOfRange: 99999999999d is out of range: a duration is at most 36500d (100 years)
"""

import re

from torchcore.errors import TorchcoreError

MAX_DURATION = 36500 * 86400    # 100 years: @every, timeouts, graces, limits.cpu
MAX_SIZE = 1 << 50              # 1024T: limits.memory, log_max_bytes
MAX_COUNT = 1 << 30             # max, max_running, limits.nofile (tighter maxima where a count drives work)

_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_PART = re.compile(r"([0-9]+)([dhms])")
_DURATION_FULL = re.compile(r"(?:[0-9]+[dhms])+")
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"([0-9]+)[ \t]*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_DURATION_FORMS = "expected a duration like 45s, 15m, 2h, 1d or 1h30m"


class OutOfRange(TorchcoreError, ValueError):
    """A well-formed number outside the range of its kind."""


def shown(text, limit=24):
    """``text`` as a message shows it: a numeral of thousands of digits is abbreviated."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:12]}...({len(text)} characters)"


def parse_digits(text, maximum):
    """The value of an ASCII decimal numeral (leading zeros allowed) that is at most ``maximum``.

    ValueError if ``text`` is not ASCII digits; OutOfRange above ``maximum``, decided from
    the number of digits before ``int`` sees a long numeral.
    """
    if not (isinstance(text, str) and text.isascii() and text.isdigit()):
        raise ValueError(f"{shown(text)!r} is not a whole number (digits 0-9)")
    significant = text.lstrip("0") or "0"
    if len(significant) > len(str(maximum)) or int(significant) > maximum:
        raise OutOfRange(f"{shown(text)} is out of range: at most {maximum}")
    return int(significant)


def parse_duration(value, maximum=MAX_DURATION):
    """Return whole seconds for ``45``, ``"45"``, ``"45s"``, ``"15m"``, ``"2h"``, ``"1d"``, ``"1h30m"``.

    Raises ValueError with a message naming the accepted forms, OutOfRange above ``maximum``.
    """
    if isinstance(value, bool):
        raise ValueError(f"{_DURATION_FORMS}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return _bounded_duration(value, str(value), maximum)
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isascii() and text.isdigit():
            return _bounded_duration(_digits(text, maximum), text, maximum)
        if text.isascii() and _DURATION_FULL.fullmatch(text):
            total = sum(_digits(n, maximum) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
            return _bounded_duration(total, text, maximum)
    raise ValueError(f"{_DURATION_FORMS}, got {shown(value, 40)!r}")


def _digits(text, maximum):
    """A numeral's value, or ``maximum + 1`` when it is larger (the caller reports the range)."""
    try:
        return parse_digits(text, maximum)
    except OutOfRange:
        return maximum + 1


def _bounded_duration(seconds, text, maximum):
    if seconds > maximum:
        years = f" ({maximum // (365 * 86400)} years)" if maximum >= 365 * 86400 else ""
        raise OutOfRange(f"{shown(text)} is out of range: a duration is at most "
                         f"{format_duration(maximum, parts=4)}{years}")
    return seconds


def parse_size(value, maximum=MAX_SIZE):
    """Return bytes for ``1048576``, ``"512K"``, ``"512M"``, ``"2G"`` (also ``512MB``, ``512MiB``).

    Raises ValueError with a message naming the accepted forms, OutOfRange above ``maximum``.
    """
    size = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    elif isinstance(value, str) and value.isascii():
        match = _SIZE.fullmatch(value.strip())
        if match:
            size = _digits(match.group(1), maximum) * _SIZE_UNITS[match.group(2).upper()]
    if size is None:
        raise ValueError(f"expected a size like 512K, 512M or 2G, got {shown(value, 40)!r}")
    if size > maximum:
        raise OutOfRange(f"{shown(value)} is out of range: a size is at most {maximum >> 40}T")
    return size


def format_duration(seconds, parts=2):
    """Render whole seconds compactly: 0s, 45s, 3m12s, 1h30m, 2d4h."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    out = []
    for unit in ("d", "h", "m", "s"):
        count, seconds = divmod(seconds, _DURATION_UNITS[unit])
        if count:
            out.append(f"{count}{unit}")
    return "".join(out[:parts])
