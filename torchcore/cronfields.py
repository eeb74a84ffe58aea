"""The one table of cron's fields, names and macros in torchcore.

The schedule parser (schedule.py), the crontab import and the readings of describe.py all take
theirs from here.  Plain data; it imports nothing from the package.
"""

from typing import NamedTuple


class Field(NamedTuple):
    """One cron field: its name in messages, its range and its names (upper case -> value)."""

    name: str
    lo: int
    hi: int
    names: dict


class Macro(NamedTuple):
    """An ``@name`` schedule: the six fields it stands for (None: ``@reboot``) and its reading."""

    fields: str | None
    reading: str


# The one table of cron's fields, names and macros in torchcore: the crontab import and the
# readings of describe.py take theirs from here.
MONTH_NAMES = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
DAY_NAMES = "SUN MON TUE WED THU FRI SAT".split()
SECOND, MINUTE, HOUR, DOM, MONTH, DOW = range(6)
FIELDS = (
    Field("second", 0, 59, {}),
    Field("minute", 0, 59, {}),
    Field("hour", 0, 23, {}),
    Field("day-of-month", 1, 31, {}),
    Field("month", 1, 12, {name: i + 1 for i, name in enumerate(MONTH_NAMES)}),
    Field("day-of-week", 0, 7, {name: i for i, name in enumerate(DAY_NAMES)}),
)
MACROS = {      # the first name of each meaning is the one the crontab import writes
    "@yearly": Macro("0 0 0 1 1 *", "At 00:00 on January 1"),
    "@annually": Macro("0 0 0 1 1 *", "At 00:00 on January 1"),
    "@monthly": Macro("0 0 0 1 * *", "At 00:00 on day 1 of every month"),
    "@weekly": Macro("0 0 0 * * 0", "Every Sunday at 00:00"),
    "@daily": Macro("0 0 0 * * *", "Every day at 00:00"),
    "@midnight": Macro("0 0 0 * * *", "Every day at 00:00"),
    "@hourly": Macro("0 0 * * * *", "Every hour, at minute 0"),
    "@reboot": Macro(None, "Once, when torchcore starts"),
}
