"""Differential tests: Schedule against independent cron implementations on random expressions.

The main oracle is cronsim: like Debian cron (and unlike croniter's ``day_or``),
it decides the dom/dow rule by whether either field *starts with* ``*``, so
``*/2`` in the day-of-month still means "both must match"; it also has seconds,
``L``, ``nL`` and ``n#k``. croniter is a second oracle on the expressions where
both agree on the day rule (each day field either exactly ``*`` or not starting
with ``*``).
"""

import random
from datetime import datetime, timedelta

import cronsim
import pytest
from croniter import croniter

from torchcore.schedule import Schedule, ScheduleError

FIELDS = [(0, 59, None), (0, 59, None), (0, 23, None), (1, 31, None),
          (1, 12, "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()),
          (0, 7, "SUN MON TUE WED THU FRI SAT".split())]
SECOND = timedelta(seconds=1)


def token(rng, field, value):
    """A number, or sometimes its name in random case."""
    names = FIELDS[field][2]
    if names and value < len(names) + FIELDS[field][0] and rng.random() < 0.3:
        name = names[value - FIELDS[field][0]]
        return rng.choice([name, name.lower(), name.title()])
    return str(value)


def element(rng, field):
    """One list element of a field: *, n, a-b, */s, a-b/s (a < b), a/s, L, nL, n#k."""
    lo, hi, _ = FIELDS[field]
    a, b = sorted(rng.sample(range(lo, hi + 1), 2))
    step = rng.randint(1, hi - lo + 1)
    kind = rng.random()
    if field == 3 and kind < 0.08:
        return "L"
    if field == 5 and kind < 0.08:
        return f"{rng.randint(0, 7)}L"
    if field == 5 and kind < 0.16:
        return f"{token(rng, field, rng.randint(0, 6))}#{rng.randint(1, 5)}"
    if kind < 0.35:
        return token(rng, field, rng.randint(lo, hi))
    if kind < 0.55:
        return f"{token(rng, field, a)}-{token(rng, field, b)}"
    if kind < 0.7:
        return f"*/{step}"
    if kind < 0.85:       # a < b: cronsim reads "5-5/2" as "5/2"
        return f"{token(rng, field, a)}-{token(rng, field, b)}/{step}"
    return f"{token(rng, field, a)}/{step}"


def field_text(rng, field):
    if rng.random() < (0.5 if field >= 3 else 0.25):
        return "*"
    return ",".join(element(rng, field) for _ in range(rng.choice([1, 1, 1, 2, 3])))


def random_expression(rng):
    """A random 5- or 6-field expression using every construct of the language."""
    fields = [field_text(rng, field) for field in range(6)]
    if rng.random() < 0.2:
        fields = fields[1:]
    return " ".join(fields)


def random_time(rng):
    return datetime(1990, 1, 1) + timedelta(seconds=rng.randrange(70 * 365 * 86400))


def cronsim_next(text, start):
    """cronsim's first firing strictly after `start`, or None when it gives up (50 years)."""
    try:
        return next(cronsim.CronSim(text, start))
    except StopIteration:
        return None


@pytest.mark.slow
def test_against_cronsim():
    rng = random.Random(2026)
    checked = 0
    for _ in range(4000):
        text = random_expression(rng)
        try:
            schedule = Schedule(text)
        except ScheduleError:
            with pytest.raises(cronsim.CronSimError):
                cronsim.CronSim(text, datetime(2026, 1, 1))
            continue
        start = random_time(rng)
        expected, found = cronsim_next(text, start), schedule.next_after(start)
        if expected is None:
            assert found is None or found > start.replace(year=start.year + 50), text
            continue
        assert found == expected, (text, start)
        assert schedule.matches(found)
        before = found - SECOND
        assert schedule.matches(before) == (cronsim_next(text, before - SECOND) == before), text
        checked += 1
    assert checked > 3000


def test_matches_against_cronsim_at_random_seconds():
    rng = random.Random(99)
    for _ in range(3000):
        text = random_expression(rng)
        try:
            schedule = Schedule(text)
        except ScheduleError:
            continue
        when = random_time(rng)
        assert schedule.matches(when) == (cronsim_next(text, when - SECOND) == when), (text, when)


def croniter_compatible(text):
    """True if croniter reads this expression as Debian cron does.

    croniter's day_or treats ``*/2`` in a day field as restricted, reads a day field
    that covers every value as ``*``, and its ``a/n`` in the day-of-week stops at 6
    where cronie (and cronsim) run on to 7 (Sunday).
    """
    fields = text.split()
    dom, dow = fields[-3], fields[-1]
    plain = all(f == "*" or not any(c in f for c in "L#*") for f in (dom, dow))
    a_step = any("/" in e and "-" not in e for e in dow.split(","))
    spec = Schedule(text)._spec
    full = spec.dom == (1 << 32) - 2 or spec.dow == 0x7F
    return plain and not a_step and not (full and "*" not in (dom + dow))


@pytest.mark.slow
def test_against_croniter():
    rng = random.Random(17)
    checked = 0
    while checked < 2000:
        text = random_expression(rng)
        try:
            schedule = Schedule(text)
        except ScheduleError:
            continue
        if not croniter_compatible(text):
            continue
        six = text if len(text.split()) == 6 else "0 " + text
        for when in (random_time(rng), schedule.next_after(random_time(rng))):
            if when is None:
                continue
            assert schedule.matches(when) == croniter.match(
                six, when, day_or=True, second_at_beginning=True), (text, when)
        checked += 1
