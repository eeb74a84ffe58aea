"""The messages that cross a process boundary inside the daemon, named once.

Three channels carry JSON lines (docs/architecture.md, "The wire"):

- the supervisor's *orders* to a launcher, on their socketpair: a job (its ``Job`` fields),
  ``Go`` and ``Cancel``;
- a launcher's *answers*, on the same socketpair: ``Forked``, ``ForkFailed``, ``Exited``;
- the executors' *reports*, on the one report pipe they share: ``Gate``, ``Start``, ``End``;

and an executor whose supervisor is gone hands its ``OwnRecord`` to ``python -m
torchcore.records``.  Each message is a named tuple; ``encode`` makes its line (bytes, newline
included) and the ``decode_*`` functions read one back, so no other module spells a key.

It imports nothing from the package, and nothing heavier than ``json``: the launchers and the
executors, forked by the hundred, use it (see proctitle).
"""

import json
from collections import namedtuple


def _message(name, fields, defaults=(), doc=""):
    kind = namedtuple(name, fields, defaults=defaults)
    kind.__doc__ = doc
    return kind


# ---- supervisor -> launcher (socketpair) ---------------------------------------------------
# A job travels as its Job's fields (a JSON object without "go" or "cancel").

Go = _message("Go", "run_ids", doc="Start these prepared runs now: one byte on each go pipe.")
Cancel = _message("Cancel", "run_ids",
                  doc="Cancel these prepared runs: their go pipes are closed unwritten.")

# ---- launcher -> supervisor (socketpair) ---------------------------------------------------

Forked = _message("Forked", "run pid", doc="The run's executor was forked: its pid.")
ForkFailed = _message("ForkFailed", "run error", doc="The run's executor could not be forked.")
Exited = _message("Exited", "run pid status",
                  doc="The run's executor exited: its wait status, as os.waitpid gives it.")

# ---- executor -> supervisor (the report pipe) ------------------------------------------------

Gate = _message("Gate", "run pid", defaults=(None,),
                doc="A prepared run's command waits at the gate: its process group.")
Start = _message("Start", "run pid started", defaults=(None, None),
                 doc="The command started: its pid, when (epoch).")
End = _message(
    "End", "run started ended exit_code signal timed_out peak_rss error stopped log_problem",
    defaults=(None, None, None, None, False, None, None, False, None),
    doc="The run is over: how its command ended (``stopped``: a stop request ended it; the "
        "supervisor knows why), its peak memory, a problem with its log (text to append).")

# ---- executor -> python -m torchcore.records (argv) -----------------------------------------

OwnRecord = _message(
    "OwnRecord", "run_id task node scheduled started ended exit_code signal timed_out manual pid "
    "peak_rss error stopped",
    doc="The end record an executor writes itself when its supervisor is gone (its keys are "
        "those of records.RunRecord).")

_ORDERS = {Go: "go", Cancel: "cancel"}
_ANSWERS = {Forked: "forked", ForkFailed: "fork_failed", Exited: "exited"}
_REPORTS = {Gate: "gate", Start: "start", End: "end"}
_REPORT_KINDS = {name: kind for kind, name in _REPORTS.items()}
_compact = json.JSONEncoder(separators=(",", ":")).encode    # json.dumps's, made once


def fields(message):
    """A message as the JSON object it travels as."""
    kind = type(message)
    if kind in _ORDERS:
        return {_ORDERS[kind]: list(message.run_ids)}
    if kind in _ANSWERS:
        values = message._asdict()
        return {_ANSWERS[kind]: values.pop("run"), **values}
    if kind in _REPORTS:
        values = message._asdict()
        if kind is End and values["log_problem"] is None:
            del values["log_problem"]
        return {"e": _REPORTS[kind], **values}
    if kind is OwnRecord:
        return message._asdict()
    raise TypeError(f"not a wire message: {message!r}")


def encode(message):
    """The line of a message: compact JSON and a newline, as bytes."""
    return _line(fields(message))


def encode_job(job_fields):
    """The line of a job (the fields of a jobspec.Job)."""
    return _line(job_fields)


def _line(obj):
    return (_compact(obj) + "\n").encode()


def decode_order(line):
    """A line a launcher received: Go, Cancel, or the fields of a job (a dict).
    ValueError if it is not a JSON object."""
    obj = _object(line)
    if "go" in obj:
        return Go(obj["go"])
    if "cancel" in obj:
        return Cancel(obj["cancel"])
    return obj


def decode_answer(line):
    """A launcher's answer, or None for a line that is none (dropped)."""
    try:
        obj = _object(line)
        for kind, key in _ANSWERS.items():
            if key in obj:
                values = dict(obj)
                return kind(run=values.pop(key), **values)
    except (ValueError, TypeError):
        pass
    return None


def decode_report(line):
    """An executor's report: Gate, Start or End; None for an event of another kind.  ValueError
    for a line that is not a report (not JSON, no run id).  Fields an End leaves out take
    their defaults."""
    obj = _object(line)
    if "run" not in obj:
        raise ValueError("a report without its run id")
    kind = _REPORT_KINDS.get(obj.get("e"))
    if kind is None:
        return None
    known = {name: obj[name] for name in kind._fields if name in obj}
    try:
        return kind(**known)
    except TypeError as exc:
        raise ValueError(f"an incomplete {obj.get('e')} report: {exc}") from None


def encode_own_record(record):
    """An OwnRecord as the JSON text ``python -m torchcore.records`` takes as an argument."""
    return json.dumps(record._asdict())


def decode_own_record(text):
    return OwnRecord(**_object(text))


def _object(line):
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj
