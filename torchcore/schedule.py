"""The schedule language: cron text -> per-field bitmasks -> the C match table.

A schedule has six fields, ``sec min hour dom month dow``; five fields are
classic cron with the second fixed at 0. Each field compiles to a bitmask
(bit ``v`` set = value ``v`` allowed), which is all :class:`Schedule` needs to
answer ``matches`` and ``next_after`` and all the C table needs to answer, for
one second, which of many schedules fire.

>>> s = Schedule("*/15 * * * * *")
>>> s.matches(datetime(2026, 1, 1, 12, 0, 30))
True
>>> s.next_after(datetime(2026, 1, 1, 12, 0, 30))
datetime.datetime(2026, 1, 1, 12, 0, 45)
>>> Schedule("0 61 * * * *")
Traceback (most recent call last):
...
torchcore.schedule.ScheduleError: minute: value 61 is out of range 0-59
"""

import calendar
import functools
import math
import re
import time
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from torchcore._core import ffi, lib
from torchcore.cronfields import (  # noqa: F401  (the field table, reached from here too)
    DAY_NAMES, DOM, DOW, FIELDS, HOUR, MACROS, MINUTE, MONTH, MONTH_NAMES, SECOND, Field, Macro)
from torchcore.errors import TorchcoreError
from torchcore.units import OutOfRange, parse_digits, parse_duration, shown


class ScheduleError(TorchcoreError, ValueError):
    """A schedule text (or zone) is invalid; the message starts with the field it is about."""


_MACRO_LIST = ", ".join(list(MACROS) + ["@every <duration>"])
_ELEMENT = re.compile(r"(\*|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)(?:/([0-9]+))?")
_LAST_WEEKDAY = re.compile(r"([A-Za-z0-9]+)[Ll]")
_NTH_WEEKDAY = re.compile(r"([A-Za-z0-9]+)#([0-9]+)")
_DAYS_IN_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_HORIZON_YEARS = 400          # the Gregorian calendar (dates and weekdays) repeats every 400 years
_WEEK = 7 * 86400
_LOOKBACK = 26 * 3600         # longer than any repeated (autumn) wall-time stretch
_NAIVE_EPOCH = datetime(1970, 1, 1)


class _Spec(NamedTuple):
    """A compiled schedule: one bitmask per field plus the day-matching extras."""

    sec: int = 0          # bit s: second s
    minute: int = 0       # bit m: minute m
    hour: int = 0         # bit h: hour h
    dom: int = 0          # bit d: day d (1-31); bit 0: L, the last day of the month
    month: int = 0        # bit m: month m (1-12)
    dow: int = 0          # bit w: weekday w (0 = Sunday)
    dow_last: int = 0     # bit w: the last weekday w of the month ("5L")
    dow_nth: int = 0      # bit 7*(k-1)+w: the k-th weekday w of the month ("5#2")
    day_or: bool = False  # neither dom nor dow starts with '*': either may match (Debian cron)
    every: int = 0        # > 0: "@every": fires when the epoch second is a multiple


def _fail(field, message):
    raise ScheduleError(f"{FIELDS[field].name}: {message}")


def _value(field, token):
    """Return the number a token stands for in a field (a number or a name), range-checked."""
    spec = FIELDS[field]
    if token.isascii() and token.isdigit():
        number = _bounded(field, token, spec.hi + 1)
        if not spec.lo <= number <= spec.hi:
            _fail(field, f"value {shown(token)} is out of range {spec.lo}-{spec.hi}")
        return number
    if token.upper() in spec.names:
        return spec.names[token.upper()]
    if token.upper() == "L" and field in (DOM, DOW):
        _fail(field, "'L' takes no range or step; write L alone" if field == DOM
              else "'L' needs a weekday before it, like 5L (the last Friday)")
    if spec.names and token.isascii() and token.isalpha():
        allowed = f"{next(iter(spec.names))}-{list(spec.names)[-1]}"
        _fail(field, f"unknown name {shown(token, 40)!r} (names are {allowed}, any case)")
    _fail(field, f"{shown(token, 40)!r} is not a number in {spec.lo}-{spec.hi}")


def _bounded(field, digits, maximum):
    """The value of an ASCII numeral, or ``maximum`` when larger: the caller reports the range
    (a numeral of thousands of digits never reaches ``int``)."""
    try:
        return parse_digits(digits, maximum)
    except OutOfRange:
        return maximum
    except ValueError as exc:
        _fail(field, str(exc))


def _step(field, text):
    """Return the step of ``a-b/n``; zero and steps longer than the field are errors."""
    spec = FIELDS[field]
    span = spec.hi - spec.lo + 1
    step = _bounded(field, text, span + 1)
    if step == 0:
        _fail(field, "step 0 is invalid; a step must be at least 1")
    if step > span:
        _fail(field, f"step {shown(text)} is out of range 1-{span}")
    return step


def _range_bits(field, element):
    """Return the bitmask of one plain list element: ``*``, ``a`` or ``a-b``, optionally ``/n``."""
    spec = FIELDS[field]
    match = _ELEMENT.fullmatch(element)
    if not match:
        _fail(field, f"cannot parse {shown(element, 40)!r}; expected a number, a range a-b, "
                     f"a step */n or a-b/n, or a list of these")
    base, step_text = match.groups()
    if base == "*":
        lo, hi = spec.lo, spec.hi
    elif "-" in base:
        lo, hi = (_value(field, part) for part in base.split("-"))
        if lo > hi:
            _fail(field, f"range {base} is reversed; write the smaller value first")
    else:
        lo = _value(field, base)
        hi = spec.hi if step_text else lo     # "a/n" means a-max/n, as cronie
    step = _step(field, step_text) if step_text else 1
    bits = 0
    for value in range(lo, hi + 1, step):
        bits |= 1 << value
    return bits


def _weekday(field, token):
    """Return the weekday (0-6, Sunday 0) of a number 0-7 or a name."""
    return _value(field, token) % 7


def _parse_field(field, text, parts):
    """Fold every list element of one field into ``parts`` (a dict of bitmasks by _Spec name)."""
    if text == "*":             # the commonest fields first: "*" and one number in range
        parts[_Spec._fields[field]] |= _STAR[field]
        return
    if len(text) <= 2 and text.isascii() and text.isdigit() and \
            FIELDS[field].lo <= int(text) <= FIELDS[field].hi:
        parts[_Spec._fields[field]] |= 1 << int(text)
        return
    for element in text.split(","):
        if not element:
            _fail(field, f"empty element in list {text!r}")
        if field == DOM and element.upper() == "L":
            parts["dom"] |= 1
            continue
        if field == DOW:
            last = _LAST_WEEKDAY.fullmatch(element)
            nth = _NTH_WEEKDAY.fullmatch(element)
            if last:
                parts["dow_last"] |= 1 << _weekday(field, last.group(1))
                continue
            if nth:
                occurrence = _bounded(field, nth.group(2), 6)
                if not 1 <= occurrence <= 5:
                    _fail(field, f"occurrence {shown(nth.group(2))} in {shown(element)!r} "
                                 "is out of range 1-5")
                parts["dow_nth"] |= 1 << (7 * (occurrence - 1) + _weekday(field, nth.group(1)))
                continue
        parts[_Spec._fields[field]] |= _range_bits(field, element)


@functools.lru_cache(maxsize=4096)
def _field_parts(field, text):
    """The (_Spec name, bits) one field's text contributes: the same field texts recur in
    many different schedules (a fleet's minutes and hours), so each is parsed once."""
    parts = dict.fromkeys(_Spec._fields, 0)
    _parse_field(field, text, parts)
    return tuple((name, bits) for name, bits in parts.items() if bits)


_STAR = tuple(sum(1 << value for value in range(spec.lo, spec.hi + 1)) for spec in FIELDS)


def _check_days_exist(parts):
    """Reject a day-of-month that no selected month has, when it must match (``0 0 30 2 *``)."""
    if parts["day_or"] or parts["dom"] & 1:
        return
    first_day = (parts["dom"] & -parts["dom"]).bit_length() - 1
    if first_day <= 29:
        return                  # every month has a day 29 (February in a leap year)
    months = [m for m in range(1, 13) if parts["month"] >> m & 1]
    if first_day > max(_DAYS_IN_MONTH[m] for m in months):
        names = ",".join(MONTH_NAMES[m - 1] for m in months)
        _fail(DOM, f"day {first_day} never occurs in the selected months ({names})")


def _compile_fields(fields):
    """Compile 5 or 6 field texts into a _Spec."""
    if len(fields) == 5:
        fields = ["0"] + fields
    if len(fields) != 6:
        raise ScheduleError("expected 5 or 6 fields (sec min hour dom month dow), "
                            f"got {len(fields)}")
    parts = dict.fromkeys(_Spec._fields, 0)
    for field, text in enumerate(fields):
        for name, bits in _field_parts(field, text):
            parts[name] |= bits
    if parts["dow"] & 1 << 7:
        parts["dow"] = (parts["dow"] | 1) & 0x7F      # 7 is Sunday too
    parts["day_or"] = not (fields[DOM].startswith("*") or fields[DOW].startswith("*"))
    _check_days_exist(parts)
    return _Spec(**parts)


def _compile_macro(words):
    """Compile ``@name [argument]``; return (spec or None, is_reboot)."""
    name, args = words[0].lower(), words[1:]
    if name == "@every":
        if len(args) != 1:
            raise ScheduleError("@every: expected one duration like 10s, 5m or 1h30m, "
                                f"got {' '.join(args) or 'nothing'}")
        try:
            every = parse_duration(args[0])
        except ValueError as exc:
            raise ScheduleError(f"@every: {exc}") from None
        if every <= 0:
            raise ScheduleError("@every: the interval must be at least 1 second")
        return _Spec(every=every), False
    if name not in MACROS:
        raise ScheduleError(f"unknown macro {words[0]!r}; expected one of {_MACRO_LIST}")
    if args:
        raise ScheduleError(f"{name}: unexpected text after the macro: {' '.join(args)!r}")
    if name == "@reboot":
        return _Spec(), True
    return _compile_fields(MACROS[name].fields.split()), False


@functools.lru_cache(maxsize=8192)
def _compile(words):
    """Compile the words of a schedule into (spec, is_reboot); cached, as fleets repeat texts."""
    if words[0].startswith("@"):
        return _compile_macro(list(words))
    return _compile_fields(list(words)), False


def check_zone(name):
    """The ZoneInfo of the IANA zone ``name``, or None if there is no such zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _resolve_zone(tz):
    """Return a tzinfo for an IANA name, the tzinfo itself, or None (system local time)."""
    if tz is None or isinstance(tz, tzinfo):
        return tz
    if isinstance(tz, str):
        zone = check_zone(tz)
        if zone is None:
            raise ScheduleError(f"time zone: unknown zone {tz!r}; "
                                "use an IANA name like Europe/Paris or UTC")
        return zone
    raise ScheduleError(f"time zone: expected an IANA name or a tzinfo, got {type(tz).__name__}")


def _next_bit(mask, start):
    """Return the lowest set bit >= start, or None."""
    rest = mask >> start
    if not rest:
        return None
    return start + (rest & -rest).bit_length() - 1


def _bit_count(mask):
    return mask.bit_count()


class _Zone:
    """Conversions between epoch seconds and wall time for one zone (None = system local)."""

    def __init__(self, tz):
        self.tz = tz

    def offset(self, epoch):
        """UTC offset in seconds in effect at an epoch second."""
        if self.tz is None:
            return time.localtime(epoch).tm_gmtoff
        return int(datetime.fromtimestamp(epoch, self.tz).utcoffset().total_seconds())

    def wall(self, dt):
        """Return (naive wall time floored to the second, epoch second) for a datetime.

        A naive datetime is wall time in this zone; its epoch respects ``fold``.
        """
        dt = dt.replace(microsecond=0)
        if dt.tzinfo is None:
            aware = dt if self.tz is None else dt.replace(tzinfo=self.tz)
            return dt, math.floor(aware.timestamp())
        local = dt.astimezone(self.tz) if self.tz is not None else dt.astimezone()
        return local.replace(tzinfo=None), math.floor(dt.timestamp())

    def aware(self, epoch):
        """The aware datetime (in this zone) of an epoch second."""
        utc = datetime.fromtimestamp(epoch, timezone.utc)
        return utc.astimezone(self.tz) if self.tz is not None else utc.astimezone()

    def naive(self, epoch):
        """The naive wall time of an epoch second."""
        return self.aware(epoch).replace(tzinfo=None)

    def change_in(self, lo, hi):
        """First epoch second in (lo, hi] whose offset differs from lo's, or None.

        Samples weekly, then bisects: zone transitions are assumed more than a week apart.
        """
        base, a = self.offset(lo), lo
        while a < hi:
            b = min(a + _WEEK, hi)
            if self.offset(b) != base:
                while b - a > 1:
                    mid = (a + b) // 2
                    a, b = (mid, b) if self.offset(mid) == base else (a, mid)
                return b
            a = b
        return None


def _wall_int(wall):
    return (wall - _NAIVE_EPOCH) // timedelta(seconds=1)


def _wall_dt(number):
    return _NAIVE_EPOCH + timedelta(seconds=number)


class Schedule:
    """One parsed schedule: ``Schedule("0 30 2 * * *", tz="Europe/Paris")``.

    ``text`` is the text as given; ``tz`` a tzinfo or None (system local time);
    ``is_reboot`` for ``@reboot`` (never matches a tick); ``every`` the interval in
    seconds of ``@every``; ``fixed_time`` is True when the second and minute fields
    each allow exactly one value (fires at most once an hour), which decides the
    DST rules: such a schedule whose wall time falls in a spring-forward gap fires
    at the first second after the gap, and fires once in an autumn overlap.
    """

    def __init__(self, text, tz=None, compiled=None):
        """``compiled``: the values of the _Spec of ``text`` as another process compiled them
        (tasktable.py): nothing is parsed again (@reboot has none)."""
        if not isinstance(text, str):
            raise ScheduleError(f"schedule: expected a string, got {type(text).__name__}")
        words = text.split()
        if not words:
            raise ScheduleError("schedule: empty; expected 5 or 6 fields "
                                "(sec min hour dom month dow) or a macro like @daily")
        self.text = text
        self.tz = _resolve_zone(tz)
        self._zone = _Zone(self.tz)
        self._spec, self.is_reboot = (_Spec(*compiled), False) if compiled else \
            _compile(tuple(words))
        self.every = self._spec.every or None
        self.fixed_time = (not self.is_reboot and self.every is None
                           and _bit_count(self._spec.sec) == 1
                           and _bit_count(self._spec.minute) == 1)

    def __repr__(self):
        zone = "" if self.tz is None else f", tz={str(self.tz)!r}"
        return f"Schedule({self.text!r}{zone})"

    def matches(self, dt):
        """True if the schedule fires at the second of ``dt`` (naive = wall time in ``tz``)."""
        if self.is_reboot:
            return False
        wall, epoch = self._zone.wall(dt)
        if self.every:
            return epoch % self.every == 0
        return self._wall_matches(wall)

    def next_after(self, dt):
        """The first second strictly after ``dt`` at which the schedule fires.

        Naive in, naive out (pure wall time); aware in, aware out in ``tz``, with the
        DST rules of the class docstring. None for ``@reboot``, for a schedule
        that never fires in the next 400 years (such as ``0 0 0 */20 * 0#5``) and
        when the next time is past the last year ``datetime`` holds (9999).
        """
        if self.is_reboot:
            return None
        try:
            return self._next_after(dt)
        except (OverflowError, ValueError):     # "year 10000 is out of range" and the like
            return None

    def _next_after(self, dt):
        if self.every:
            epoch = (self._zone.wall(dt)[1] // self.every + 1) * self.every
            return self._zone.naive(epoch) if dt.tzinfo is None else self._zone.aware(epoch)
        if dt.tzinfo is None:
            return self._next_wall(dt.replace(microsecond=0) + timedelta(seconds=1))
        epoch = self._next_epoch(math.floor(dt.timestamp()) + 1)
        return None if epoch is None else self._zone.aware(epoch)

    def _wall_matches(self, wall):
        spec = self._spec
        return bool(spec.sec >> wall.second & 1 and spec.minute >> wall.minute & 1
                    and spec.hour >> wall.hour & 1 and spec.month >> wall.month & 1
                    and self._day_matches(wall.year, wall.month, wall.day))

    def _day_matches(self, year, month, day):
        """Day rule of Debian cron: both dom and dow must match if either starts with '*'."""
        spec = self._spec
        month_days = calendar.monthrange(year, month)[1]
        if day > month_days:
            return False
        weekday = (date(year, month, day).weekday() + 1) % 7
        dom_ok = spec.dom >> day & 1 or (spec.dom & 1 and day == month_days)
        dow_ok = (spec.dow >> weekday & 1
                  or (spec.dow_last >> weekday & 1 and day + 7 > month_days)
                  or spec.dow_nth >> (7 * ((day - 1) // 7) + weekday) & 1)
        return bool(dom_ok or dow_ok) if spec.day_or else bool(dom_ok and dow_ok)

    def _next_wall(self, start, limit=None):
        """First matching wall time >= start (and < limit), field by field; None if none."""
        spec = self._spec
        y, mo, d = start.year, start.month, start.day
        h, mi, s = start.hour, start.minute, start.second
        stop = (start.year + _HORIZON_YEARS,) if limit is None else tuple(limit.timetuple()[:6])
        while (y, mo, d, h, mi, s) < stop:
            found = _next_bit(spec.month, mo)
            if found is None:
                y, mo, d, h, mi, s = y + 1, 1, 1, 0, 0, 0
            elif found != mo:
                mo, d, h, mi, s = found, 1, 0, 0, 0
            elif not self._day_matches(y, mo, d):
                d, h, mi, s = self._next_day(y, mo, d), 0, 0, 0
                if d is None:
                    y, mo, d = (y + 1, 1, 1) if mo == 12 else (y, mo + 1, 1)
            elif (found := _next_bit(spec.hour, h)) != h:
                d, h, mi, s = (d + 1, 0, 0, 0) if found is None else (d, found, 0, 0)
            elif (found := _next_bit(spec.minute, mi)) != mi:
                h, mi, s = (h + 1, 0, 0) if found is None else (h, found, 0)
            elif (found := _next_bit(spec.sec, s)) != s:
                mi, s = (mi + 1, 0) if found is None else (mi, found)
            else:
                return datetime(y, mo, d, h, mi, s)
        return None

    def _next_day(self, year, month, day):
        """The first day >= day of that month matching the day rule, or None."""
        for candidate in range(day, calendar.monthrange(year, month)[1] + 1):
            if self._day_matches(year, month, candidate):
                return candidate
        return None

    def _next_epoch(self, start):
        """First epoch second >= start at which the schedule fires, zone transitions included.

        Walks the zone's constant-offset segments; inside one, wall time is epoch + offset.
        """
        zone = self._zone
        for _ in range(4 * _HORIZON_YEARS):
            offset = zone.offset(start)
            wall_from = start + offset
            if self.fixed_time:
                wall_from = max(wall_from, self._repeat_end(start, offset))
            found = self._next_wall(_wall_dt(wall_from))
            if found is None:
                return None
            change = zone.change_in(start, _wall_int(found) - offset)
            if change is None:
                return _wall_int(found) - offset
            new_offset = zone.offset(change)
            if self.fixed_time and new_offset > offset and self._next_wall(
                    _wall_dt(change + offset), _wall_dt(change + new_offset)):
                return change        # a wall time in the spring-forward gap: first second after
            start = change
        return None

    def _repeat_end(self, start, offset):
        """The wall second ending an autumn overlap that ``start`` is in the second pass of.

        A fixed-time schedule fires only in the first pass; returns -inf when not in one.
        """
        before = start - _LOOKBACK
        if self._zone.offset(before) <= offset:
            return -math.inf
        change = self._zone.change_in(before, start)
        return change + self._zone.offset(change - 1)


class ScheduleTable:
    """Many schedules keyed by any hashable (the engine uses task names), matched in one C call.

    All schedules of a table are matched in the table's zone (``tz``: None = system
    local time). ``set`` and ``remove`` touch one slot of the C table; ``match``
    makes one call per second and maps the slots that fire back to keys.
    """

    def __init__(self, tz=None):
        self.tz = _resolve_zone(tz)
        self._zone = _Zone(self.tz)
        table = lib.tc_table_new(64)
        if table == ffi.NULL:
            raise MemoryError("cannot allocate the schedule table")
        self._table = ffi.gc(table, lib.tc_table_free)
        self._slots = {}          # key -> slot
        self._keys = []           # slot -> key (None for a free slot)
        self._spec = ffi.new("tc_spec *")
        self._filled = None       # the _Spec whose values self._spec holds
        self._tick = ffi.new("tc_tick *")
        self._out = ffi.new("const uint32_t **")
        self._count = ffi.new("size_t *")
        self._slot = ffi.new("uint32_t *")
        self._ahead = ffi.new("int64_t *")

    def __len__(self):
        return len(self._slots)

    def __contains__(self, key):
        return key in self._slots

    def set(self, key, schedule):
        """Add ``key`` or replace its schedule; touches only that key's slot."""
        if not isinstance(schedule, Schedule):
            raise TypeError(f"expected a Schedule, got {type(schedule).__name__}")
        if schedule._spec is not self._filled:     # schedules shared by many keys: once
            self._fill_spec(schedule._spec)
            self._filled = schedule._spec
        slot = self._slots.get(key)
        if slot is None:
            _check(lib.tc_table_add(self._table, self._spec, self._slot))
            slot = self._slot[0]
            if slot == len(self._keys):
                self._keys.append(None)
            self._slots[key], self._keys[slot] = slot, key
        else:
            _check(lib.tc_table_replace(self._table, slot, self._spec))

    def remove(self, key):
        """Remove ``key``; KeyError if it is not in the table."""
        slot = self._slots.pop(key)
        self._keys[slot] = None
        _check(lib.tc_table_remove(self._table, slot))

    def match(self, dt):
        """Keys of every schedule firing at the second of ``dt`` (naive = wall time in ``tz``)."""
        wall, epoch = self._zone.wall(dt)
        tick = self._tick
        tick.year, tick.month, tick.day = wall.year, wall.month, wall.day
        tick.hour, tick.minute, tick.second = wall.hour, wall.minute, wall.second
        tick.epoch = epoch
        _check(lib.tc_table_match(self._table, tick, self._out, self._count))
        slots = memoryview(ffi.buffer(self._out[0], 4 * self._count[0])).cast("I").tolist()
        return list(map(self._keys.__getitem__, slots))

    def first_match(self, dt, limit):
        """Seconds from ``dt`` (as for ``match``) to the first second at or after it at which
        any schedule fires, looking ``limit`` seconds ahead at most; None if none fires sooner.

        Wall time runs on from ``dt`` as a plain calendar: the caller stops the search at the
        zone's next change of UTC offset (``offset_change``).  An idle table is searched in a
        few rows: months, days, hours and minutes where nothing can fire are passed over whole.
        """
        wall, epoch = self._zone.wall(dt)
        tick = self._tick
        tick.year, tick.month, tick.day = wall.year, wall.month, wall.day
        tick.hour, tick.minute, tick.second = wall.hour, wall.minute, wall.second
        tick.epoch = epoch
        _check(lib.tc_table_next(self._table, tick, limit, self._ahead))
        ahead = self._ahead[0]
        return None if ahead >= limit else ahead

    def offset_change(self, lo, hi):
        """The first epoch second in (lo, hi] whose UTC offset in ``tz`` differs from lo's, or None."""
        if self.tz is timezone.utc or getattr(self.tz, "key", None) in ("UTC", "Etc/UTC"):
            return None
        return self._zone.change_in(lo, hi)

    def _fill_spec(self, spec):
        out = self._spec
        out.sec, out.min, out.hour, out.dom, out.mon = (
            spec.sec, spec.minute, spec.hour, spec.dom, spec.month)
        out.dow, out.dow_last, out.dow_nth = spec.dow, spec.dow_last, spec.dow_nth
        out.day_or, out.every = int(spec.day_or), spec.every


def _check(status):
    """Raise for a status code of the C core (its message from tc_strerror)."""
    if status == lib.TC_OK:
        return
    message = ffi.string(lib.tc_strerror(status)).decode()
    if status == lib.TC_ERR_NOMEM:
        raise MemoryError(message)
    raise TorchcoreError(f"match core: {message}")
