"""Notifications end to end, on real processes and local receivers (no network): the notifier
child on its own (killed with -9 between queueing and sending), and through the daemon (a
failing task mails and posts, a receiver down then up, the rate limit, pings, imported MAILTO)."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from notify_receivers import HttpReceiver, SmtpReceiver, wait_until

from torchcore import records

pytestmark = pytest.mark.process


@pytest.fixture
def http():
    made = []

    def factory(status=200):
        made.append(HttpReceiver(status))
        return made[-1]

    yield factory
    for receiver in made:
        receiver.close()


@pytest.fixture
def smtp():
    receiver = SmtpReceiver()
    yield receiver
    receiver.close()


def mail_url(smtp):
    return f"mailto://127.0.0.1:{smtp.port}?to=ops@example.com&from=torchcore@example.com"


def start_notifier(directory):
    """``python -m torchcore.notifier`` as the supervisor starts it; returns (proc, parent pipe)."""
    read_end, write_end = os.pipe()
    with open(os.path.join(directory, "notifier.err"), "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torchcore.notifier", "--taskfile",
             os.path.join(directory, "tasks.yaml"), "--state-dir", os.path.join(directory, "state"),
             "--node", "web1", "--parent-fd", str(read_end)],
            pass_fds=(read_end,), stdout=subprocess.DEVNULL, stderr=err)
    os.close(read_end)
    return proc, write_end


def write_run(directory, run_id, exit_code):
    path = records.db_path(os.path.join(directory, "state"))
    now = time.time()
    assert records.write_record_now(path, records.RunRecord(
        run_id=run_id, task="backup", node="web1", scheduled=int(now), started=now - 1, ended=now,
        exit_code=exit_code, signal=None))


def test_the_notifier_killed_before_sending_delivers_after_a_restart(tmp_path, http):
    receiver = http(status=503)
    (tmp_path / "tasks.yaml").write_text(f"""
settings: {{state_dir: state}}
tasks:
  - name: backup
    schedule: "0 0 3 * * *"
    command: "true"
    notify: [{{webhook: "{receiver.url}/hook", every: 0}}]
""")
    records.Records(records.db_path(str(tmp_path / "state"))).close()
    proc, parent = start_notifier(str(tmp_path))
    try:
        wait_until(lambda: "notifier: started" in (tmp_path / "notifier.err").read_text(), 10,
                   "the notifier to start")
        write_run(str(tmp_path), 1, 3)
        wait_until(lambda: receiver.answered, 10, "a first try")
        proc.send_signal(signal.SIGKILL)        # queued, tried, not delivered: killed
        proc.wait(10)
        receiver.status = 200
        write_run(str(tmp_path), 2, 0)          # while no notifier runs
        proc, parent2 = start_notifier(str(tmp_path))
        os.close(parent)
        parent = parent2
        wait_until(lambda: len(receiver.bodies()) >= 2, 15, "both messages after the restart")
        bodies = receiver.bodies()
        assert [(b["event"], b["run_id"], b["exit_code"]) for b in bodies] == \
            [("failure", 1, 3), ("recovered", 2, 0)]
        path, headers, _ = receiver.requests[0]
        assert path == "/hook" and headers["Idempotency-Key"] == bodies[0]["id"] == "web1-1-failure"
        os.close(parent)                        # the supervisor is gone: the notifier ends
        parent = None
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if parent is not None:
            os.close(parent)


def test_sigterm_stops_the_notifier_and_sighup_rereads_the_file(tmp_path, http):
    receiver = http()
    task = """tasks:
  - name: backup
    schedule: "0 0 3 * * *"
    command: "true"
"""
    (tmp_path / "tasks.yaml").write_text(
        f"settings: {{state_dir: state, notify: [{{webhook: '{receiver.url}/a'}}]}}\n" + task)
    proc, parent = start_notifier(str(tmp_path))
    try:
        wait_until(lambda: "notifier: started" in (tmp_path / "notifier.err").read_text(), 10,
                   "the notifier to start")
        (tmp_path / "tasks.yaml").write_text(
            f"settings: {{state_dir: state, notify: [{{webhook: '{receiver.url}/b'}}]}}\n" + task)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "task file re-read" in (tmp_path / "notifier.err").read_text(), 10,
                   "the reload")
        write_run(str(tmp_path), 1, 1)
        wait_until(lambda: receiver.requests, 10, "the message")
        assert receiver.paths() == ["/b"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(parent)


def test_sigterm_cuts_a_slow_try_short_and_the_message_stays_queued(tmp_path, http):
    receiver = http(status=lambda: time.sleep(8) or 200)       # answers after 8 s
    (tmp_path / "tasks.yaml").write_text(f"""settings: {{state_dir: state}}
tasks:
  - name: backup
    schedule: "0 0 3 * * *"
    command: "true"
    notify: [{{webhook: "{receiver.url}/hook"}}]
""")
    proc, parent = start_notifier(str(tmp_path))
    try:
        wait_until(lambda: "notifier: started" in (tmp_path / "notifier.err").read_text(), 10,
                   "the notifier to start")
        write_run(str(tmp_path), 1, 1)
        time.sleep(1.5)                             # its try is under way
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0 and time.monotonic() - began < 2
        path = records.db_path(str(tmp_path / "state"))
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT state FROM notify_outbox").fetchall() == [("queued",)]
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(parent)


def test_sigterm_stops_the_notifier_while_apprise_talks_to_a_mail_server_forever(tmp_path):
    """Apprise sends from a worker thread the notifier cannot stop: it exits without waiting
    for it (it waited as long as the mail server kept answering a line at a time)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def greet_forever():
        conn, _ = server.accept()
        with conn:
            while not stop.wait(0.2):
                conn.sendall(b"220-still greeting\r\n")

    talker = threading.Thread(target=greet_forever, daemon=True)
    talker.start()
    port = server.getsockname()[1]
    (tmp_path / "tasks.yaml").write_text(f"""settings: {{state_dir: state}}
tasks:
  - name: backup
    schedule: "0 0 3 * * *"
    command: "true"
    notify: [{{to: "mailto://127.0.0.1:{port}?to=ops@example.com&from=tc@example.com"}}]
""")
    proc, parent = start_notifier(str(tmp_path))
    try:
        wait_until(lambda: "notifier: started" in (tmp_path / "notifier.err").read_text(), 10,
                   "the notifier to start")
        write_run(str(tmp_path), 1, 1)
        time.sleep(2.5)                             # its try is under way
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0 and time.monotonic() - began < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(parent)
        stop.set()
        talker.join(5)
        server.close()


def test_a_notifier_started_on_a_broken_file_waits_for_a_good_one(tmp_path, http):
    receiver = http()
    (tmp_path / "tasks.yaml").write_text("settings: {state_dir: state}\ntasks: [oops\n")
    proc, parent = start_notifier(str(tmp_path))
    try:
        wait_until(lambda: "waiting for a valid one" in (tmp_path / "notifier.err").read_text(), 10,
                   "the notifier to say it waits")
        assert proc.poll() is None                  # waiting, not exiting into a restart loop
        (tmp_path / "tasks.yaml").write_text(f"""settings: {{state_dir: state}}
tasks:
  - name: backup
    schedule: "0 0 3 * * *"
    command: "true"
    notify: [{{webhook: "{receiver.url}/hook"}}]
""")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "notifier: started" in (tmp_path / "notifier.err").read_text(), 10,
                   "the notifier to start")
        write_run(str(tmp_path), 1, 1)
        wait_until(lambda: receiver.requests, 10, "the message")
    finally:
        proc.kill()
        proc.wait()
        os.close(parent)


def test_a_failing_task_sends_one_mail_and_one_webhook_within_5s(daemons, http, smtp):
    receiver = http()
    d = daemons("""tasks:
  - name: flaky
    schedule: "* * * * * *"
    command: "echo starting; echo broken >&2; exit 3"
""", settings=f"""  notify:
    - to: "{mail_url(smtp)}"
    - webhook: "{receiver.url}/hook"
""").start()
    started = time.monotonic()
    wait_until(lambda: receiver.bodies() and smtp.messages, 6, "a webhook and a mail")
    assert time.monotonic() - started < 6     # its first run ends within 1 s of the start, then 5 s
    body = receiver.bodies()[0]
    assert (body["event"], body["task"], body["exit_code"], body["result"]) == \
        ("failure", "flaky", 3, "exit 3")
    assert body["output_tail"].splitlines()[:2] == ["starting", "broken"]
    assert body["scheduled"].endswith("Z") and body["duration"] >= 0
    assert body["id"] == f"{body['node']}-{body['run_id']}-failure"
    sender, recipients, text = smtp.messages[0]
    assert recipients == ["ops@example.com"] and "flaky failed on" in text
    time.sleep(3)                                   # it fails every second: the rate limit holds
    assert len(receiver.bodies()) == 1 and len(smtp.messages) == 1
    assert "notifier" in d.log


@pytest.mark.slow
def test_a_receiver_down_for_a_while_gets_every_event_once_it_is_back(daemons, http):
    down_until = time.monotonic() + 20
    receiver = http(status=lambda: 500 if time.monotonic() < down_until else 200)
    d = daemons(f"""tasks:
  - name: flaky
    schedule: "*/2 * * * * *"
    command: "exit 1"
    notify: [{{webhook: "{receiver.url}/hook", every: 0}}]
""").start()
    time.sleep(max(0.0, down_until - time.monotonic()) + 1)
    failed = [run["run_id"] for run in d.runs("flaky") if run["ended"] is not None]
    assert len(failed) >= 8
    # the retries back off (1, 2, 4, 8, 16 s): the next try after the outage is at most 16 s away
    wait_until(lambda: {b["run_id"] for b in receiver.bodies()} >= set(failed), 40,
               "every failure delivered")
    d.stop()
    assert sum(status == 500 for status, _ in receiver.answered) >= 4
    node = receiver.bodies()[0]["node"]
    delivered = [b["id"] for b in receiver.bodies() if b["run_id"] in failed]
    assert set(delivered) == {f"{node}-{r}-failure" for r in failed}   # by id: each once
    assert [b["run_id"] for b in receiver.bodies()] == sorted(b["run_id"] for b in receiver.bodies())


@pytest.mark.slow
def test_a_task_failing_every_second_sends_the_rate_limit_and_digests(daemons, http):
    receiver = http()
    d = daemons(f"""tasks:
  - name: flaky
    schedule: "* * * * * *"
    command: "exit 1"
    notify: [{{webhook: "{receiver.url}/hook", every: 4s}}]
""").start()
    began = time.monotonic()
    time.sleep(10)
    failures = len([run for run in d.runs("flaky") if run["ended"] is not None])
    def told():
        return sum(b["digest"]["count"] if b["digest"] else 1 for b in receiver.bodies())

    wait_until(lambda: told() >= failures, 10, "the digest of the failures so far")
    elapsed = time.monotonic() - began
    d.stop()
    bodies = receiver.bodies()
    assert failures >= 8 and bodies[0]["digest"] is None and all(b["digest"] for b in bodies[1:])
    assert len(bodies) <= elapsed // 4 + 1      # at most one per 4 s window
    assert len({b["id"] for b in bodies}) == len(bodies)


def test_the_daemon_killed_between_queueing_and_sending_delivers_after_a_restart(daemons, http):
    receiver = http(status=503)
    d = daemons(f"""tasks:
  - name: once
    schedule: "@reboot"
    command: "exit 5"
    notify: [{{webhook: "{receiver.url}/hook"}}]
""").start()
    wait_until(lambda: receiver.answered, 10, "a first try")
    d.proc.kill()                   # the notifier goes with it (its parent pipe ends)
    d.proc.wait()
    receiver.status = 200
    d.start()
    body = wait_until(receiver.bodies, 10, "the message after the restart")[0]
    assert (body["event"], body["task"], body["exit_code"]) == ("failure", "once", 5)


def test_a_daemon_down_for_a_few_seconds_sends_one_missed_webhook_at_its_restart(daemons, http):
    receiver = http()
    d = daemons(f"""tasks:
  - name: tick
    schedule: "* * * * * *"
    command: "true"
    notify: [{{webhook: "{receiver.url}/hook", on: [missed]}}]
""").start()
    wait_until(lambda: len(d.runs("tick")) >= 2, 10, "runs of tick")
    stopping = time.monotonic()
    assert d.stop() == 0
    stopped = time.monotonic()
    time.sleep(4)
    starting = time.monotonic()
    d.start()
    started = time.monotonic()
    body = wait_until(receiver.bodies, 10, "the missed webhook")[0]
    count = int(body["result"].split()[1])
    assert (body["event"], body["task"]) == ("missed", "tick")
    # the seconds surely missed lie between the stop's end and the start's beginning; those maybe
    # missed, between the stop asked and the start done (a loaded machine stops and starts slowly)
    surely, maybe = starting - stopped, started - stopping
    assert int(surely) - 2 <= count <= int(maybe) + 2, (body["result"], surely, maybe)
    assert "while torchcore was not running" in body["result"]
    time.sleep(2)
    assert len(receiver.bodies()) == 1


def test_pings_go_start_then_success_or_fail_in_order(daemons, http):
    receiver = http()
    daemons(f"""tasks:
  - name: good
    schedule: "* * * * * *"
    command: "true"
    ping: "{receiver.url}/ping/good"
  - name: bad
    schedule: "* * * * * *"
    command: "exit 2"
    ping: "{receiver.url}/ping/bad"
""").start()
    wait_until(lambda: len([p for p in receiver.paths() if "/bad" in p]) >= 4 and
               len([p for p in receiver.paths() if "/good" in p]) >= 4, 10, "pings of two runs each")
    for name, end in (("good", "/ping/good"), ("bad", "/ping/bad/fail")):
        paths = [p for p in receiver.paths() if f"/{name}" in p]
        assert paths[:4] == [f"/ping/{name}/start", end, f"/ping/{name}/start", end]


def test_an_imported_mailto_crontab_mails_its_output(tmp_path, smtp):
    crontab = tmp_path / "web1.cron"
    crontab.write_text("MAILTO=ops@example.com\n* * * * * echo hello from cron\n")
    out = tmp_path / "tasks.yaml"
    done = subprocess.run([sys.executable, "-m", "torchcore", "import", str(crontab), "--smtp",
                           f"127.0.0.1:{smtp.port}", "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "on: [output]" in text
    # every minute is too slow for a test: the same task, every second
    out.write_text("settings: {state_dir: state, timezone: UTC}\n" +
                   text.replace('schedule: "* * * * *"', 'schedule: "* * * * * *"'))
    env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9")
    with open(tmp_path / "daemon.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "torchcore", "start", "--foreground", "-c",
                                 str(out)], stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        wait_until(lambda: smtp.messages, 10, "the mail")
        sender, recipients, message = smtp.messages[0]
        assert recipients == ["ops@example.com"] and "hello from cron" in message
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_notify_test_and_alerts(tmp_path, http):
    receiver = http()
    (tmp_path / "tasks.yaml").write_text("settings: {state_dir: state}\ntasks: []\n")
    cli = [sys.executable, "-m", "torchcore"]
    done = subprocess.run(cli + ["notify", "test", f"{receiver.url}/x"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0 and "sent: HTTP 200" in done.stdout
    [body] = receiver.bodies()
    assert body["event"] == "test" and body["task"] == "torchcore-test"
    receiver.status = 404
    done = subprocess.run(cli + ["notify", "test", f"{receiver.url}/x"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 1 and "rejected" in done.stderr and "HTTP 404" in done.stderr
    done = subprocess.run(cli + ["notify", "test", "mailtoo://x@y"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 1 and "did you mean 'mailto'" in done.stderr
    done = subprocess.run(cli + ["alerts", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout) == []


def test_a_daemon_started_in_the_background_notifies_and_its_notifier_logs(tmp_path, http):
    """`torchcore start -c tasks.yaml` (a relative path; the daemon detaches into /): the
    notifier reads the same file and writes to the daemon's log, not to /dev/null."""
    receiver = http()
    (tmp_path / "tasks.yaml").write_text(f"""settings:
  state_dir: state
  notify: [{{webhook: "{receiver.url}/hook"}}]
tasks:
  - {{name: flaky, schedule: "* * * * * *", command: "exit 3"}}
""")
    env = dict(os.environ, TORCHCORE_NODE_IP="10.9.9.9")

    def tc(*args):
        return subprocess.run([sys.executable, "-m", "torchcore", *args, "-c", "tasks.yaml"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=30)

    out = tc("start")
    assert out.returncode == 0, out.stderr
    try:
        body = wait_until(receiver.bodies, 10, "the failure's webhook")[0]
        assert (body["event"], body["task"]) == ("failure", "flaky")
        log = tmp_path / "state" / "logs" / "torchcore.log"
        wait_until(lambda: "notifier: started" in log.read_text(), 5, "the notifier's log line")
    finally:
        assert tc("stop").returncode == 0
