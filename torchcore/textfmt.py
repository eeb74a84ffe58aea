"""Human output: aligned tables and relative times ("in 3m12s", "2h ago")."""

from torchcore.units import format_duration


def format_table(headers, rows):
    """Return the rows as text columns aligned under the headers (no trailing spaces).

    >>> print(format_table(["NAME", "N"], [["a", 1], ["bb", 22]]))
    NAME  N
    a     1
    bb    22
    """
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


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
