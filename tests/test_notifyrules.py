"""The notifier's rules without I/O: events of a record, the rate limit and its digest, the
retry backoff, what a message says (torchcore/notifyrules.py)."""

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from torchcore import notifyrules as rules
from torchcore.runrecord import RunRecord


def rec(run_id=7, **kw):
    fields = dict(run_id=run_id, task="backup", node="web1", scheduled=1000, started=1000.5,
                  ended=1003.0, exit_code=0, signal=None)
    fields.update(kw)
    return RunRecord(**fields)


def test_failure_and_timeout_are_distinct_events():
    assert rules.run_events(rec(exit_code=3), False, False, False) == (["failure"], True)
    assert rules.run_events(rec(exit_code=None, signal=9), False, False, False) == (["failure"], True)
    assert rules.run_events(rec(exit_code=None, signal=15, timed_out=True), False, False, False) == \
        (["timeout"], True)


def test_recovered_is_the_first_success_after_a_failure():
    assert rules.run_events(rec(), False, True, False) == (["recovered"], False)
    assert rules.run_events(rec(), False, False, False) == ([], False)


def test_skips_misses_starts_and_planned_stops_leave_failing_as_it_was():
    for record in (rec(ended=None, started=None, skipped="max 1 running"),
                   rec(ended=None, started=None, missed=True, skipped="missed 2 run(s)"),
                   rec(ended=None), rec(exit_code=None, signal=15, stopped="shutdown")):
        for failing in (False, True):
            assert rules.run_events(record, False, failing, True)[1] is failing
    assert rules.run_events(rec(ended=None, started=None, skipped="max"), False, False, False)[0] == \
        ["skipped"]
    assert rules.run_events(rec(ended=None, started=None, missed=True, skipped="missed 1 run(s)"),
                            False, False, False)[0] == ["missed"]
    assert rules.run_events(rec(exit_code=None, signal=15, stopped="shutdown"), False, True, True)[0] == []


def test_a_daemon_that_lived_under_a_second_is_a_crash_loop():
    quick = rec(started=1000.0, ended=1000.2, exit_code=1)
    assert rules.run_events(quick, True, False, False)[0] == ["failure", "crash-loop"]
    assert rules.run_events(quick, False, False, False)[0] == ["failure"]
    assert rules.run_events(rec(started=1000.0, ended=1005.0, exit_code=1), True, False, False)[0] == \
        ["failure"]


def test_output_is_an_event_of_its_own():
    assert rules.run_events(rec(), False, False, True)[0] == ["output"]
    assert rules.run_events(rec(exit_code=2), False, False, True)[0] == ["failure", "output"]


def test_pings_start_then_success_or_fail():
    assert rules.run_pings(rec(ended=None), start_sent=False) == ["start"]
    assert rules.run_pings(rec(), start_sent=True) == ["success"]
    assert rules.run_pings(rec(exit_code=1), start_sent=False) == ["start", "fail"]
    assert rules.run_pings(rec(started=None, ended=None, skipped="max"), start_sent=False) == []
    assert rules.run_pings(rec(stopped="reload", exit_code=None, signal=15), start_sent=True) == []


def test_backoff_doubles_from_one_second_to_five_minutes():
    assert [rules.retry_delay(n) for n in range(1, 12)] == \
        [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert rules.retry_delay(10_000) == 300
    assert not rules.expired(0, 24 * 3600 - 1) and rules.expired(0, 24 * 3600)


def test_which_http_answers_are_final():
    assert rules.rejected(400) and rules.rejected(404) and rules.rejected(410)
    assert not any(rules.rejected(s) for s in (408, 425, 429, 500, 502, 503, 200, 302))


def test_the_payload_has_the_documented_fields_and_a_stable_id():
    body = rules.payload(rec(exit_code=3), "failure", "web1", "exit 3", "boom")
    assert set(body) == {"id", "event", "task", "node", "run_id", "scheduled", "started", "ended",
                         "exit_code", "signal", "timed_out", "duration", "result", "output_tail",
                         "digest"}
    assert body["id"] == "web1-7-failure" == rules.payload(rec(), "failure", "web1", "", "")["id"]
    assert body["scheduled"] == "1970-01-01T00:16:40Z" and body["started"] == "1970-01-01T00:16:40.500Z"
    assert body["duration"] == 2.5 and body["exit_code"] == 3 and body["timed_out"] is False
    json.dumps(body)
    assert "backup failed on web1 (run 7)" in rules.title(body)
    assert "boom" in rules.text(body) and "result: exit 3" in rules.text(body)


def test_a_digest_says_how_many_since_when():
    digest = rules.digest("failure", 12, 1000.0)
    assert digest["count"] == 12 and digest["since"] == "1970-01-01T00:16:40Z"
    assert digest["text"].startswith("failed 12 times since ")
    body = rules.payload(rec(run_id=31), "failure", "web1", "exit 1", "", digest)
    assert body["id"] == "web1-31-failure-digest"
    assert "backup failed 12 times since" in rules.title(body) and "latest: run 31" in rules.title(body)


# -- the rate limit, on made-up event times --------------------------------------------------


def run_limit(times, every, ticks=()):
    """Feed event times (and digest checks at ``ticks``) through the rules as the notifier does;
    returns the messages: (time, "event" or ("digest", count))."""
    window, sent, held_total = rules.Window(), [], 0
    moments = sorted([(t, "event") for t in times] + [(t, "tick") for t in ticks])
    for now, what in moments:
        if rules.digest_due(window, now, every):
            sent.append((now, ("digest", window.held)))
            held_total += window.held
            window = rules.Window(sent_at=now)
        if what == "event":
            send, window = rules.admit(window, now, every)
            if send:
                sent.append((now, "event"))
            else:
                window = rules.hold(window, f"id{now}")
    return sent, window


def test_a_task_failing_every_second_for_a_minute_sends_one_message_then_a_digest():
    sent, window = run_limit(range(60), every=300, ticks=range(0, 400, 1))
    assert sent == [(0, "event"), (300, ("digest", 59))]
    assert window.held == 0


@settings(max_examples=300)
@given(st.lists(st.floats(0, 3600, allow_nan=False), max_size=80),
       st.sampled_from([0, 1, 30, 300]), st.lists(st.floats(0, 4000, allow_nan=False), max_size=40))
def test_the_rate_limit_never_sends_more_than_one_per_window_and_loses_no_count(times, every, ticks):
    sent, window = run_limit(times, every, ticks)
    moments = [t for t, _ in sent]
    assert all(b - a >= every for a, b in itertools.pairwise(moments))
    counted = sum(1 if what == "event" else what[1] for _, what in sent) + window.held
    assert counted == len(times)
    if times:
        assert sent[0] == (min(times), "event")


@given(st.integers(1, 10_000))
def test_the_backoff_is_capped_and_never_shrinks(attempts):
    assert 1 <= rules.retry_delay(attempts) <= 300
    assert rules.retry_delay(attempts + 1) >= rules.retry_delay(attempts)
