"""The messages between supervisor, launchers and executors (wire.py): each travels and comes
back unchanged, and what is not one is told apart."""

import ast
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torchcore
from torchcore import wire
from torchcore.jobspec import Job
from torchcore.outcome import RunResult
from torchcore.records import RunRecord

_RUN_IDS = st.lists(st.integers(1, 2**53), max_size=20)
_TEXT = st.text(max_size=40)
_TIME = st.one_of(st.none(), st.floats(0, 4e9, allow_nan=False))
_CODE = st.one_of(st.none(), st.integers(0, 255))
_SIGNAL = st.one_of(st.none(), st.integers(1, 64))

MESSAGES = {
    wire.Go: st.builds(wire.Go, _RUN_IDS),
    wire.Cancel: st.builds(wire.Cancel, _RUN_IDS),
    wire.Forked: st.builds(wire.Forked, st.integers(1), st.integers(1, 2**22)),
    wire.ForkFailed: st.builds(wire.ForkFailed, st.integers(1), _TEXT),
    wire.Exited: st.builds(wire.Exited, st.integers(1), st.integers(1, 2**22), st.integers(0, 65535)),
    wire.Gate: st.builds(wire.Gate, st.integers(1), st.integers(1, 2**22)),
    wire.Start: st.builds(wire.Start, st.integers(1), st.integers(1, 2**22), _TIME),
    wire.End: st.builds(wire.End, st.integers(1), _TIME, _TIME, _CODE, _SIGNAL, st.booleans(),
                        st.one_of(st.none(), st.integers(0)), st.one_of(st.none(), _TEXT),
                        st.booleans(), st.one_of(st.none(), _TEXT)),
    wire.OwnRecord: st.builds(wire.OwnRecord, st.integers(1), _TEXT, _TEXT,
                              st.one_of(st.none(), st.integers(0)), _TIME, _TIME, _CODE, _SIGNAL,
                              st.booleans(), st.booleans(), st.one_of(st.none(), st.integers(1)),
                              st.one_of(st.none(), st.integers(0)), st.one_of(st.none(), _TEXT),
                              st.one_of(st.none(), _TEXT)),
}
_DECODE = {wire.Go: wire.decode_order, wire.Cancel: wire.decode_order,
           wire.Forked: wire.decode_answer, wire.ForkFailed: wire.decode_answer,
           wire.Exited: wire.decode_answer, wire.Gate: wire.decode_report,
           wire.Start: wire.decode_report, wire.End: wire.decode_report}


@pytest.mark.parametrize("kind", list(MESSAGES), ids=lambda kind: kind.__name__)
@settings(derandomize=True, max_examples=50, deadline=None)
@given(data=st.data())
def test_every_message_comes_back_as_it_was_sent(kind, data):
    message = data.draw(MESSAGES[kind])
    if kind is wire.OwnRecord:
        assert wire.decode_own_record(wire.encode_own_record(message)) == message
        return
    line = wire.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1       # one line, however it reads
    back = _DECODE[kind](line)
    assert type(back) is kind and back == message


def test_a_job_travels_as_its_fields_and_comes_back_equal():
    job = Job(run_id=3, name="n", argv=("sh", "-c", "true"), env=(("A", "1"),), timeout=5,
              scheduled=1_767_225_600, prepared=True, hold_until=1_767_225_600.4)
    fields = wire.decode_order(wire.encode_job(job.fields()))
    assert isinstance(fields, dict) and Job.from_fields(fields) == job
    assert wire.encode_job(job.fields()) == job.to_json().encode() + b"\n"


def test_the_lines_keep_the_shapes_the_docs_give():
    """docs/architecture.md, "The wire": the keys each message travels with."""
    assert json.loads(wire.encode(wire.Go([1, 2]))) == {"go": [1, 2]}
    assert json.loads(wire.encode(wire.Cancel([3]))) == {"cancel": [3]}
    assert json.loads(wire.encode(wire.Forked(7, 70))) == {"forked": 7, "pid": 70}
    assert json.loads(wire.encode(wire.ForkFailed(7, "EAGAIN"))) == {"fork_failed": 7,
                                                                    "error": "EAGAIN"}
    assert json.loads(wire.encode(wire.Exited(7, 70, 256))) == {"exited": 7, "pid": 70,
                                                               "status": 256}
    assert json.loads(wire.encode(wire.Gate(7, 71))) == {"e": "gate", "run": 7, "pid": 71}
    assert json.loads(wire.encode(wire.Start(7, 71, 5.5))) == {"e": "start", "run": 7, "pid": 71,
                                                               "started": 5.5}
    end = json.loads(wire.encode(wire.End(7, 5.5, 6.5, 3, None, False, 1024, None, False)))
    assert end == {"e": "end", "run": 7, "started": 5.5, "ended": 6.5, "exit_code": 3,
                   "signal": None, "timed_out": False, "peak_rss": 1024, "error": None,
                   "stopped": False}      # log_problem only when there is one
    assert set(wire.OwnRecord._fields) <= set(RunRecord.__dataclass_fields__)


def test_what_is_no_message_is_told_apart():
    for junk in (b"[1, 2]", b"not json", b'{"pid": 3}', b'{"forked": 1}', b"\xff"):
        assert wire.decode_answer(junk) is None
    for junk in (b"[1]", b"{", b'{"e": "end"}', b'"run"'):
        with pytest.raises(ValueError):
            wire.decode_report(junk)
    assert wire.decode_report(b'{"e": "later", "run": 4}') is None      # a kind not known here
    end = wire.decode_report(b'{"e": "end", "run": 4, "exit_code": 0}')  # the rest: defaults
    assert end == wire.End(run=4, exit_code=0) and end.timed_out is False and not end.stopped
    with pytest.raises(ValueError):
        wire.decode_order(b"[]")
    with pytest.raises(TypeError):
        wire.encode({"go": [1]})


def test_an_end_report_becomes_the_result_and_the_record_of_its_run():
    end = wire.End(run=9, started=10.0, ended=12.5, exit_code=None, signal=15, timed_out=False,
                   peak_rss=4096, error=None, stopped=True)
    result = RunResult.from_report(end, "shutdown")
    assert result == RunResult(signal=15, stopped="shutdown", started=10.0, ended=12.5,
                               peak_rss=4096)
    assert not result.failed and result.describe() == "stopped: shutdown"
    assert RunResult.from_report(end._replace(stopped=False), "shutdown").describe() == \
        "killed by SIGTERM"
    record = RunRecord.of_end(9, "t", "n", 10, False, 77, result)
    assert record.result == result and record.duration == 2.5 and record.pid == 77
    # SIGKILL to the command's group from the supervisor (a lease lost, a shutdown's grace over):
    # the executor may report its command killed before it is killed itself: still the stop
    killed = end._replace(signal=9, stopped=False)
    assert RunResult.from_report(killed, "its fleet lease could not be kept", True).describe() \
        == "stopped: its fleet lease could not be kept"
    assert RunResult.from_report(killed, "shutdown").failed         # not killed by the supervisor
    assert RunResult.from_report(end._replace(signal=None, exit_code=3, stopped=False),
                                 "shutdown", True).failed           # ended of itself first


def test_wire_imports_nothing_from_the_package():
    """The launchers and executors load it: it stays outside the package's import graph."""
    path = os.path.join(os.path.dirname(torchcore.__file__), "wire.py")
    with open(path) as handle:
        tree = ast.parse(handle.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or ".")
    assert imported == {"json", "collections"}


def test_an_answer_is_its_key_and_its_fields_nothing_more_nothing_less():
    assert wire.decode_answer(b'{"forked": 1, "pid": 2}') == wire.Forked(1, 2)
    assert wire.decode_answer(b'{"pid": 2, "forked": 1}') == wire.Forked(1, 2)
    assert wire.decode_answer('{"exited": 1, "pid": 2, "status": 9}') == wire.Exited(1, 2, 9)
    for junk in (b'{"forked": 1, "pid": 2, "x": 3}', b'{"forked": 1, "run": 2}',
                 b'{"forked": 1, "run": 2, "pid": 3}', b'{"exited": 1, "pid": 2}',
                 b'{"fork_failed": 1}', b'{"fork_failed": 1, "error": "e", "pid": 2}'):
        assert wire.decode_answer(junk) is None
    assert wire.decode_report(b'{"e": "gate", "run": 3, "x": 1}') == wire.Gate(3, None)
