"""Human output: aligned tables and relative times ("in 3m12s", "2h ago").

Tables fit the terminal: on a terminal narrower than a table, the widest columns are cut
(marked with "~") until the lines fit. Result words (``ok``, ``failing``, ``exit 3``) are
coloured, only when the output is a terminal and ``NO_COLOR`` is not set (no-color.org);
``--json`` output never goes through here, so it is never coloured. Piped output is neither
cut nor coloured, so ``grep`` and scripts see every character.
"""

import os
import re
import shutil
import sys

from torchcore.units import format_duration

AUTO = object()
CUT = "~"
MIN_COLUMN = 6              # a column is never cut narrower than this (or its header)
GREEN, YELLOW, RED = "32", "33", "31"
COLOURED_COLUMNS = {"STATE", "RESULT", "LAST RESULT"}
_COLOURS = [(re.compile(r"(ok|exit 0)\b"), GREEN),          # the first that matches wins
            (re.compile(r"(failing|crash-looping|exit \d|killed|timed out|signal|lost)"), RED),
            (re.compile(r"(skipped|missed|never ran|not on this node|disabled|stopped)"), YELLOW)]


_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]}


def printable(text):
    """``text`` with its control characters (C0, DEL, C1: a newline, an escape sequence, a bell)
    written as ``\\xNN``: text from elsewhere (the fleet database) shown, never obeyed.

    >>> printable("web-1\\x1b]0;pwned\\x07")
    'web-1\\\\x1b]0;pwned\\\\x07'
    """
    return str(text).translate(_CONTROLS)


def colour_wanted(stream=None):
    """Colour only on a terminal, and never with NO_COLOR set to anything but ""."""
    stream = stream or sys.stdout
    return not os.environ.get("NO_COLOR") and _isatty(stream)


def terminal_width(stream=None):
    """The terminal's width for output to a terminal (honours $COLUMNS); None when piped."""
    stream = stream or sys.stdout
    return shutil.get_terminal_size().columns if _isatty(stream) else None


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def format_table(headers, rows, width=AUTO, colour=AUTO):
    """Return the rows as text columns aligned under the headers (no trailing spaces); a
    control character in a cell is shown escaped (``printable``).

    ``width``: the widest a line may be (None: no limit; AUTO: the terminal's, if any);
    ``colour``: whether to colour result words (AUTO: on a terminal without NO_COLOR).

    >>> print(format_table(["NAME", "N"], [["a", 1], ["bb", 22]]))
    NAME  N
    a     1
    bb    22
    >>> print(format_table(["NAME", "WHAT"], [["a", "a long description"]], width=16, colour=False))
    NAME  WHAT
    a     a long de~
    """
    width = terminal_width() if width is AUTO else width
    colour = colour_wanted() if colour is AUTO else colour
    cells = [[str(h) for h in headers]] + [["" if c is None else printable(c).rstrip() for c in r]
                                           for r in rows]
    widths = fit_widths([max(len(row[i]) for row in cells) for i in range(len(headers))],
                        [len(str(h)) for h in headers], width)
    painted = [i for i, header in enumerate(headers) if colour and header in COLOURED_COLUMNS]
    lines = []
    for number, row in enumerate(cells):
        padded = [cut(cell, w).ljust(w) for cell, w in zip(row, widths)]
        for i in painted if number else ():
            padded[i] = paint(padded[i])
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def fit_widths(widths, floors, limit):
    """Column widths whose table (2 spaces between columns) fits ``limit``: the widest shrink first."""
    widths = list(widths)
    if limit is None:
        return widths
    floors = [max(floor, MIN_COLUMN) for floor in floors]
    excess = sum(widths) + 2 * (len(widths) - 1) - limit
    while excess > 0:
        shrinkable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        others = max([widths[i] for i in shrinkable if i != widest] + [floors[widest]])
        step = min(excess, widths[widest] - max(others, floors[widest]) or 1)
        widths[widest] -= step
        excess -= step
    return widths


def cut(text, width):
    """``text`` cut to ``width`` characters, the last one a "~" when anything was dropped."""
    return text if len(text) <= width else text[:max(width - 1, 0)] + CUT


def paint(cell):
    """A padded cell with its result word coloured (SGR), the padding left outside."""
    text = cell.rstrip()
    for pattern, code in _COLOURS:
        if pattern.match(text):
            return f"\x1b[{code}m{text}\x1b[0m" + cell[len(text):]
    return cell


def targets_text(task):
    """Where a task runs: "ips 10.1.0.0/16; hosts web*" (no targeting: "every node")."""
    parts = []
    if task.ips:
        parts.append("ips " + ", ".join(str(network) for network in task.ips))
    if task.hosts:
        parts.append("hosts " + ", ".join(task.hosts))
    return "; ".join(parts) or "every node"


def format_relative(when, now):
    """Epoch seconds ``when`` relative to ``now``: "in 3m12s", "2h ago", "now".

    >>> format_relative(1000, 808)
    'in 3m12s'
    >>> format_relative(1000, 8200)
    '2h ago'
    """
    delta = when - now
    if abs(delta) < 1:
        return "now"
    text = format_duration(abs(delta))
    return f"in {text}" if delta > 0 else f"{text} ago"
