"""Durations and sizes as a task file writes them.

>>> parse_duration("1h30m")
5400
>>> parse_duration(90)
90
>>> parse_size("512M")
536870912
>>> format_duration(5400)
'1h30m'
"""

import re

_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_PART = re.compile(r"(\d+)([dhms])")
_DURATION_FULL = re.compile(r"(?:\d+[dhms])+")
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_duration(value):
    """Return whole seconds for ``45``, ``"45"``, ``"45s"``, ``"15m"``, ``"2h"``, ``"1d"``, ``"1h30m"``.

    Raises ValueError with a message naming the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 45s, 15m, 2h, 1d or 1h30m, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return int(text)
        if _DURATION_FULL.fullmatch(text):
            return sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
    raise ValueError(f"expected a duration like 45s, 15m, 2h, 1d or 1h30m, got {value!r}")


def parse_size(value):
    """Return bytes for ``1048576``, ``"512K"``, ``"512M"``, ``"2G"`` (also ``512MB``, ``512MiB``).

    Raises ValueError with a message naming the accepted forms.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    raise ValueError(f"expected a size like 512K, 512M or 2G, got {value!r}")


def format_duration(seconds):
    """Render whole seconds compactly: 0s, 45s, 3m12s, 1h30m, 2d4h."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        count, seconds = divmod(seconds, _DURATION_UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts[:2])
