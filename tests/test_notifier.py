"""The notifier in process: the records journal -> events -> the outbox -> tries, on a real
database with a fake clock and a fake sender (torchcore/notifier.py, notifystore.py)."""

import sqlite3
import types

import pytest
import yaml

from torchcore import notifyspec, records
from torchcore.notifier import Notifier, run_output, tail_text, wanted
from torchcore.notifysend import Sent
from torchcore.notifystore import Store


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


class Sender:
    """Answers with the states given (then "sent"), and keeps what it was given."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []

    def __call__(self, target, event, body):
        self.calls.append((target.kind, event, body))
        return Sent(self.answers.pop(0) if self.answers else "sent", "HTTP 500")


def targets(text):
    return notifyspec.notify_list(None, yaml.compose(text))


def taskfile(tmp_path, notify=None, task_notify=None, ping=None, kind="common"):
    task = types.SimpleNamespace(name="backup", type=kind, notify=task_notify, ping=ping, enabled=True)
    settings = types.SimpleNamespace(notify=notify or (), log_dir=str(tmp_path / "logs"))
    return types.SimpleNamespace(settings=settings, tasks=(task,), index={"backup": task})


class World:
    def __init__(self, tmp_path, tf, answers=()):
        self.path = str(tmp_path / "torchcore.db")
        self.records = records.Records(self.path)
        self.clock = Clock()
        self.sender = Sender(*answers)
        self.tf = tf
        self.open()
        self.next_id = 1

    def open(self):
        self.store = Store(self.path, clock=self.clock)
        self.notifier = Notifier(self.store, self.tf, "web1", clock=self.clock, sender=self.sender)

    def restart(self):
        self.store.close()
        self.open()

    def run(self, exit_code=0, duration=2.0, **kw):
        run_id, self.next_id = self.next_id, self.next_id + 1
        now = self.clock.now
        fields = dict(run_id=run_id, task="backup", node="web1", scheduled=int(now), started=now,
                      ended=None, exit_code=None, signal=None)
        self.records.add(records.RunRecord(**fields))
        self.records.flush()
        fields.update(ended=now + duration, exit_code=exit_code, **kw)
        self.records.add(records.RunRecord(**fields))
        self.records.flush()
        return run_id

    def step(self, seconds=0.0):
        self.clock.now += seconds
        while self.notifier.derive():
            pass
        self.notifier.deliver()

    def states(self):
        return [(m.event, m.state) for m in reversed(self.store.recent())]


HOOK = "[{webhook: 'http://127.0.0.1:9/hook', on: [failure, timeout, recovered, missed]}]"


def test_a_failed_run_queues_one_webhook_message_with_the_documented_body(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, notify=targets(HOOK)))
    run_id = world.run(exit_code=3)
    world.step()
    [(kind, event, body)] = world.sender.calls
    assert (kind, event) == ("webhook", "failure")
    assert body["id"] == f"web1-{run_id}-failure" and body["exit_code"] == 3
    assert body["task"] == "backup" and body["node"] == "web1" and body["result"] == "exit 3"
    assert world.states() == [("failure", "sent")]


def test_a_refusing_receiver_is_retried_with_backoff_then_delivered_once(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, notify=targets(HOOK)),
                  answers=["retry", "retry", "retry"])
    world.run(exit_code=1)
    world.step()
    [message] = world.store.recent()
    assert (message.state, message.attempts) == ("queued", 1)
    assert message.next_try == pytest.approx(world.clock.now + 1)
    world.step(0.5)
    assert len(world.sender.calls) == 1            # not before its time
    world.step(0.6)
    world.step(2.0)
    assert len(world.sender.calls) == 3
    world.restart()                                 # the queue outlives the process
    world.step(4.0)
    assert world.states() == [("failure", "sent")] and len(world.sender.calls) == 4
    world.step(600)
    assert len(world.sender.calls) == 4


def test_a_rejected_message_is_not_retried_and_the_next_one_goes(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, notify=targets(HOOK)), answers=["rejected"])
    world.run(exit_code=1)
    world.step()
    world.run(exit_code=0)
    world.step(1)
    assert world.states() == [("failure", "rejected"), ("recovered", "sent")]


def test_messages_to_one_target_keep_their_order_through_retries(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, notify=targets(HOOK.replace("]}", "], every: 0}"))),
                  answers=["retry"])
    world.run(exit_code=1)
    world.run(exit_code=0)
    world.run(exit_code=2)
    world.step()
    assert [c[1] for c in world.sender.calls] == ["failure"]
    world.step(1)
    assert [c[1] for c in world.sender.calls] == ["failure", "failure", "recovered", "failure"]


def test_messages_expire_after_a_day_of_trying(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, notify=targets(HOOK)), answers=["retry"] * 1000)
    world.run(exit_code=1)
    world.step()
    for _ in range(300):
        world.step(300)
    [message] = world.store.recent()
    assert message.state == "expired" and 280 < message.attempts < 300


def test_the_rate_limit_holds_back_and_sends_a_digest(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, notify=targets(
        "[{webhook: 'http://127.0.0.1:9/hook', every: 5m}]")))
    for _ in range(60):
        world.run(exit_code=1)
        world.step(1)
    assert len(world.sender.calls) == 1
    assert world.states() == [("failure", "sent"), ("failure", "held")]     # the latest held only
    world.restart()
    world.step(300)
    assert len(world.sender.calls) == 2
    body = world.sender.calls[1][2]
    assert body["digest"]["count"] == 59 and body["run_id"] == 60
    assert body["id"] == "web1-60-failure-digest"
    world.step(600)
    assert len(world.sender.calls) == 2


def test_recovered_survives_a_restart_and_a_planned_stop_changes_nothing(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, notify=targets(HOOK.replace("]}", "], every: 0}"))))
    world.run(exit_code=1)
    world.step()
    world.restart()
    world.run(exit_code=None, signal=15, stopped="shutdown")
    world.run(exit_code=0)
    world.run(exit_code=0)
    world.step()
    assert world.states() == [("failure", "sent"), ("recovered", "sent")]


def written_at(path, run_id, when):
    """Say the journal entries of a run were written at ``when`` (the fake clock's time)."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE changes SET written = ? WHERE run_id = ?", (when, run_id))
    conn.close()


def test_a_first_start_announces_the_last_minutes_not_older_runs(tmp_path):
    path = str(tmp_path / "torchcore.db")
    now = Clock().now
    with records.Records(path) as old:
        for run_id, ended in ((1, now - 3600), (2, now - 60)):
            old.add(records.RunRecord(run_id=run_id, task="backup", node="web1", scheduled=1,
                                      started=ended - 1, ended=ended, exit_code=1, signal=None))
            old.flush()
    written_at(path, 1, now - 3600)
    written_at(path, 2, now - 60)
    world = World(tmp_path, taskfile(tmp_path, notify=targets(HOOK.replace("]}", "], every: 0}"))))
    world.step()
    assert [body["run_id"] for _, _, body in world.sender.calls] == [2]
    world.restart()                 # a later start goes on from its cursor ...
    world.next_id = 3
    world.run(exit_code=1)
    written_at(path, 3, world.clock.now - 25 * 3600)    # ... but what waited a day is not news
    world.run(exit_code=2)
    world.step()
    assert [body["run_id"] for _, _, body in world.sender.calls] == [2, 4]


def test_skipped_and_missed_runs(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, task_notify=targets(
        "[{webhook: 'http://127.0.0.1:9/hook', on: [skipped, missed], every: 0}]")))
    for run_id, extra in ((50, {"skipped": "max 1 running"}),
                          (51, {"missed": True, "skipped": "missed 3 run(s)"})):
        world.records.add(records.RunRecord(run_id=run_id, task="backup", node="web1",
                                            scheduled=int(world.clock.now), started=None, ended=None,
                                            exit_code=None, signal=None, **extra))
    world.records.flush()
    world.step()
    assert [(c[1], c[2]["result"]) for c in world.sender.calls] == [
        ("skipped", "skipped: max 1 running"), ("missed", "missed 3 run(s)")]


def test_a_crash_looping_daemon(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, kind="daemon", notify=targets(
        "[{webhook: 'http://127.0.0.1:9/hook', on: [crash-loop]}]")))
    world.run(exit_code=1, duration=0.1)
    world.run(exit_code=1, duration=30)
    world.step()
    assert [c[1] for c in world.sender.calls] == ["crash-loop"]


def test_output_events_carry_the_runs_last_lines(tmp_path):
    (tmp_path / "logs").mkdir()
    world = World(tmp_path, taskfile(tmp_path, notify=targets(
        "[{to: 'mailto://ops@example.com', on: [output], tail: 2}]")))
    first = world.run()
    second = world.run()
    (tmp_path / "logs" / "backup.log").write_text(
        f"2026-12-01T10:00:00.000+00:00 run {first} sys| run ended: ok after 0.1s\n"
        f"2026-12-01T10:00:00.000+00:00 run {second} out| one\n"
        f"2026-12-01T10:00:00.000+00:00 run {second} err| two\n"
        f"2026-12-01T10:00:00.000+00:00 run {second} out| three\n"
        f"2026-12-01T10:00:01.000+00:00 run {second} sys| run ended: ok after 0.1s\n")
    world.step()
    [(kind, event, body)] = world.sender.calls
    assert (kind, event, body["run_id"]) == ("to", "output", second)
    assert body["output_tail"] == "three\n[torchcore] run ended: ok after 0.1s"


def test_pings_go_in_order_start_then_the_end(tmp_path):
    ping = notifyspec.ping(None, yaml.compose("https://hc.example/ping/abc"))
    world = World(tmp_path, taskfile(tmp_path, ping=ping))
    world.run(exit_code=0)
    world.run(exit_code=4)
    world.step()
    assert [(c[0], c[1]) for c in world.sender.calls] == [
        ("ping", "start"), ("ping", "success"), ("ping", "start"), ("ping", "fail")]


def test_a_target_removed_from_the_file_drops_its_messages(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, notify=targets(HOOK)), answers=["retry"])
    world.run(exit_code=1)
    world.step()
    world.notifier.reload(taskfile(tmp_path))
    world.step(10)
    assert world.states() == [("failure", "dropped")]


def test_wanted_and_the_log_reader(tmp_path):
    assert not wanted(taskfile(tmp_path))
    assert wanted(taskfile(tmp_path, notify=targets(HOOK)))
    assert wanted(taskfile(tmp_path, task_notify=targets(HOOK)))
    assert not wanted(taskfile(tmp_path, notify=targets(HOOK), task_notify=()))
    off = taskfile(tmp_path, task_notify=targets(HOOK))
    off.tasks[0].enabled = False
    assert not wanted(off)
    assert run_output(str(tmp_path), "nothing", 1) == []
    assert tail_text([("out", "a"), ("out", "b")], 0) == ""


def test_alerts_and_the_status_line_read_the_outbox(tmp_path):
    from torchcore import notifystore
    from torchcore.commands.notify import alert_json

    assert notifystore.recent_in(str(tmp_path / "none")) == []
    assert notifystore.overview_in(str(tmp_path)) == {"states": {}, "rejected_by": []}
    world = World(tmp_path, taskfile(tmp_path, notify=targets(HOOK)), answers=["rejected", "retry"])
    world.run(exit_code=1)
    world.run(exit_code=0)
    world.step()
    overview = notifystore.overview_in(str(tmp_path))
    assert overview == {"states": {"rejected": 1, "queued": 1}, "rejected_by": [
        {"target": "webhook http://127.0.0.1:9/…", "error": "HTTP 500", "at": world.clock.now}]}
    assert notifystore.summary(overview) == [
        "notifications: 1 queued, 1 rejected (torchcore alerts lists them)",
        "  webhook http://127.0.0.1:9/… rejected them: HTTP 500"]
    newest, oldest = notifystore.recent_in(str(tmp_path))
    assert alert_json(oldest) == {
        "id": "web1-1-failure", "target": "webhook http://127.0.0.1:9/…", "target_key": oldest.target,
        "task": "backup", "event": "failure", "created": "1970-01-12T13:46:40Z", "next_try": None,
        "attempts": 1, "state": "rejected", "error": "HTTP 500", "done": "1970-01-12T13:46:40Z"}
    assert alert_json(newest)["next_try"] == "1970-01-12T13:46:41Z"
    assert notifystore.summary({"states": {"sent": 4}, "rejected_by": []}) == []


def test_the_log_reader_takes_only_the_runs_own_stamped_lines(tmp_path):
    (tmp_path / "backup.log").write_bytes(
        b"2026-12-01T10:00:00.000+00:00 run 5 out| see run 7 out| not this one\n"
        b"2026-12-01T10:00:00.000+00:00 run 7 err| \xff broken utf-8\n"
        b"2026-12-01T10:00:00.000+00:00 run 7 out| \n"
        b"2026-12-01T10:00:00.000+00:00 run 70 out| other run\n")
    assert run_output(str(tmp_path), "backup", 7) == [("err", "\ufffd broken utf-8"), ("out", "")]
    assert run_output(str(tmp_path), "backup", 7, max_bytes=40) == []


def test_events_held_back_within_one_batch_keep_one_row_and_count_in_the_digest(tmp_path):
    world = World(tmp_path, taskfile(tmp_path, notify=targets(
        "[{webhook: 'http://127.0.0.1:9/hook', every: 1m}]")))
    for _ in range(10):
        world.run(exit_code=1)
    world.step()                        # all ten in one pass over the journal
    assert world.states() == [("failure", "sent"), ("failure", "held")]
    world.step(60)
    digest = world.sender.calls[-1][2]["digest"]
    assert len(world.sender.calls) == 2 and digest["count"] == 9 and world.sender.calls[-1][2]["run_id"] == 10


def test_a_sender_that_raises_delays_its_message_not_the_other_targets(tmp_path):
    two = targets("[{webhook: 'http://127.0.0.1:9/a'}, {webhook: 'http://127.0.0.1:9/b'}]")
    world = World(tmp_path, taskfile(tmp_path, notify=two))

    def sender(target, event, body):
        if target.url.endswith("/a"):
            raise RuntimeError("a plugin's bug")
        world.sender.calls.append((target.url, event, body))
        return Sent("sent", "HTTP 200")

    world.notifier.sender = sender
    world.run(exit_code=1)
    world.step()
    assert [call[0] for call in world.sender.calls] == ["http://127.0.0.1:9/b"]
    [queued] = [m for m in world.store.recent() if m.state == "queued"]
    assert queued.attempts == 1 and "RuntimeError" in queued.error


def test_a_finished_message_keeps_no_output(tmp_path):
    """The outbox lists finished messages for a week: their output (up to 256 KiB each, and
    whatever secrets a job printed) is not kept with them, only what alerts shows."""
    (tmp_path / "logs").mkdir()
    world = World(tmp_path, taskfile(tmp_path, notify=targets(
        "[{webhook: 'http://127.0.0.1:9/a', on: [failure], every: 0},"
        " {webhook: 'http://127.0.0.1:9/b', on: [failure], every: 0}]")), answers=["sent", "rejected"])
    run_id = world.run(exit_code=1)
    (tmp_path / "logs" / "backup.log").write_text(
        f"2026-12-01T10:00:00.000+00:00 run {run_id} out| password=hunter2\n")
    world.step()
    assert all("hunter2" in body["output_tail"] for _, _, body in world.sender.calls)
    rows = world.store.recent()
    assert sorted(m.state for m in rows) == ["rejected", "sent"]
    assert all(m.payload["output_tail"] == "" and m.payload["id"] for m in rows)
    world.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert b"hunter2" not in (tmp_path / "torchcore.db").read_bytes()


def test_a_held_event_outlives_the_week_finished_messages_are_kept_for(tmp_path):
    """every: 30d holds events back longer than pruning keeps finished messages: the held
    one (its details make the digest) is kept until its digest goes."""
    world = World(tmp_path, taskfile(tmp_path, notify=targets(
        "[{webhook: 'http://127.0.0.1:9/hook', every: 30d}]")))
    world.run(exit_code=1)
    world.step(1)
    world.run(exit_code=1)
    world.step(1)
    assert world.states() == [("failure", "sent"), ("failure", "held")]
    world.step(8 * 86400)
    world.notifier.prune()
    world.step(23 * 86400)
    assert len(world.sender.calls) == 2
    body = world.sender.calls[1][2]
    assert body["digest"]["count"] == 1 and body["run_id"] == 2
    world.step(8 * 86400)
    world.notifier.prune()
    assert [state for _, state in world.states()] == []     # once its digest went, it goes too
