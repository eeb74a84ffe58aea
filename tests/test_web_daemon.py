"""The HTTP service of a real daemon: /metrics and the API agree with `history --json` and
`status --json`, run now and disable through the control socket, SIGHUP, the token file's mode."""

import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("prometheus_client")

from daemon_harness import wait_for
from prometheus_client.parser import text_string_to_metric_families
from web_harness import TOKEN, WebDaemon

pytestmark = [pytest.mark.process, pytest.mark.slow]

BODY = """tasks:
  - name: good
    schedule: "* * * * * *"
    command: "echo fine"
  - name: bad
    schedule: "*/2 * * * * *"
    command: "echo oops; exit 3"
  - name: later
    schedule: "0 0 3 * * *"
    command: "true"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    directory = tmp_path_factory.mktemp("web")
    daemon = WebDaemon(directory, BODY, base_path="/cron/").start()
    yield daemon
    daemon.kill()


def samples(daemon, family, label="task"):
    status, body = daemon.request("metrics")
    assert status == 200
    for found in text_string_to_metric_families(body.decode()):
        if found.name == family:
            return {(s.labels[label], *(v for k, v in s.labels.items() if k != label))
                    if len(s.labels) > 1 else s.labels.get(label): s.value
                    for s in found.samples if not s.name.endswith("_created")}
    return {}


def test_status_and_tasks_agree_with_status_json(daemon):
    wait_for(lambda: daemon.runs("bad") and daemon.runs("bad")[0]["ended"], 15, "a run of bad")
    code, out = daemon.cli("status", "--json")
    assert code == 0
    cli_states = {t["name"]: t["state"] for t in json.loads(out)["tasks"]}
    def api_states():       # the service reuses the daemon's status for a second
        status, page = daemon.json("api/v1/tasks")
        assert status == 200
        return {t["name"]: t["state"] for t in page["tasks"]}
    wait_for(lambda: api_states() == cli_states, 5, "the API's states to be status's")
    # later runs only by hand: the run-now test may have come first on this xdist worker
    assert cli_states["bad"] == "failing"
    assert cli_states["later"] == ("ok" if daemon.runs("later") else "never ran")
    status, body = daemon.json("api/v1/status")
    assert body["daemon"]["answering"] and body["daemon"]["pid"] == daemon.proc.pid
    http = [s for s in json.loads(out)["daemon"]["services"] if s["name"] == "http"]
    assert http[0]["auth"] == "changes" and http[0]["listen"] == f"127.0.0.1:{daemon.port}"
    code, text = daemon.cli("status")        # which mode the service runs in
    assert f"service http: pid {http[0]['pid']}, running, on 127.0.0.1:{daemon.port}, auth changes " \
           "(the token for actions only; anyone on the machine may read)" in text


def test_run_now_disable_and_counts_agree_with_history(daemon):
    assert daemon.json("api/v1/tasks/later/run", "POST")[0] == 401
    assert daemon.request("api/v1/tasks/later/run", "POST", token="not-the-token")[0] == 401
    status, reply = daemon.json("api/v1/tasks/later/run", "POST", token=TOKEN)
    assert status == 202
    wait_for(lambda: any(r["run_id"] == reply["run_id"] and r["ended"] for r in daemon.runs("later")),
             15, "the manual run to end")
    # this test may be the first of the module on its xdist worker: let good and bad end a run
    # before they are disabled, or the counts below have nothing to agree on
    for name in ("good", "bad"):
        wait_for(lambda: any(r["ended"] and not r["skipped"] for r in daemon.runs(name)), 15,
                 f"a run of {name} to end")
    for name in ("good", "bad"):
        assert daemon.json(f"api/v1/tasks/{name}/disable", "POST", token=TOKEN)[1]["changed"]
    assert daemon.json("api/v1/tasks/good/disable", "POST", token=TOKEN)[1]["changed"] is False
    wait_for(lambda: all(r["ended"] or r["skipped"] or r["missed"] for r in daemon.runs()), 15,
             "every run to end")
    before = len(daemon.runs())
    code, out = daemon.cli("history", "--json", "--limit", "0")
    history = json.loads(out)
    assert code == 0 and len(history) == before
    status, api_history = daemon.json("api/v1/history?limit=10000")
    assert api_history == history
    expected = {}
    for name in ("good", "bad", "later"):
        finished = [r for r in history if r["task"] == name and r["ended"] and not r["skipped"]]
        expected[(name, "failure")] = sum(r["failed"] for r in finished)
        expected[(name, "success")] = sum(not r["failed"] for r in finished)
    # the service reuses its aggregates for a few seconds
    runs = wait_for(lambda: (got := samples(daemon, "torchcore_task_runs")) == expected and got, 10,
                    "the metrics to agree with history:\n{}", lambda: samples(daemon, "torchcore_task_runs"))
    assert runs[("bad", "failure")] >= 1 and runs[("good", "success")] >= 1
    code, out = daemon.cli("status", "--json")
    assert {t["name"]: t["state"] for t in json.loads(out)["tasks"]}["good"] == "disabled"
    assert len(daemon.runs()) == before, "a disabled task ran"
    daemon.signal(signal.SIGHUP)        # a reload ends the disables
    wait_for(lambda: len(daemon.runs("good")) > len([r for r in history if r["task"] == "good"]),
             10, "good to run again after the reload")


def test_metrics_of_the_node(daemon):
    assert samples(daemon, "torchcore_up") == {None: 1.0}
    info = samples(daemon, "torchcore_task_file_info", label="file")
    (file, version), = info
    assert file == daemon.path and len(version) == 12 and list(info.values()) == [1.0]
    assert samples(daemon, "torchcore_task_next_run_timestamp_seconds").keys() >= {"later"}
    # first on its xdist worker, the test may come before the daemon's first launch
    wait_for(lambda: samples(daemon, "torchcore_launch_lateness_seconds", label="le")
             .get("+Inf", 0) >= 1, 15, "a launch counted in the lateness histogram")
    daemon.signal(signal.SIGHUP)    # its own reload: under xdist the tests above may have run
    wait_for(lambda: (got := samples(daemon, "torchcore_reloads", label="result"))  # elsewhere
             .get("accepted", 0) >= 1 and got.get("rejected") == 0, 10, "the reload counted")
    ticks = samples(daemon, "torchcore_tick_duration_seconds", label="le")
    assert ticks["+Inf"] >= 1 and ticks["1.0"] == ticks["+Inf"]


def test_log_follow_streams_new_lines(daemon):
    import urllib.request

    with urllib.request.urlopen(daemon.base + "api/v1/tasks/good/log/follow?lines=1", timeout=10) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        events = [stream.readline() + stream.readline() for _ in range(6)]
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    assert any(b"out| fine" in e for e in events[1:]), events     # written after we asked


def test_token_file_readable_by_others_is_refused_at_start(tmp_path):
    with open(tmp_path / "token", "w") as handle:
        handle.write(TOKEN)
    os.chmod(tmp_path / "token", 0o644)
    path = tmp_path / "tasks.yaml"
    path.write_text("settings:\n  state_dir: state\n  http:\n    listen: 127.0.0.1:9\n"
                    "    token_file: token\n" + BODY)
    done = subprocess.run([sys.executable, "-m", "torchcore", "start", "--foreground", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"{path}:5: settings: http: token_file: {tmp_path}/token has mode 0644" in done.stderr
    assert "Traceback" not in done.stderr


def test_http_flag_serves_without_settings(daemons):
    from web_harness import free_port

    port = free_port()
    daemon = daemons(BODY).start("--http", f"127.0.0.1:{port}")
    wait_for(lambda: _answers(f"http://127.0.0.1:{port}/metrics"), 20, "the service on --http's port")
    done = subprocess.run([sys.executable, "-m", "torchcore", "start", "--http", "nonsense:0",
                           "-c", daemon.path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--http: port '0' is not a number in 1-65535" in done.stderr


def _answers(url):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def test_the_service_is_restarted_and_goes_with_the_daemon(tmp_path):
    import psutil

    daemon = WebDaemon(tmp_path, BODY, base_path="/cron/").start()     # its own: it is killed

    def service():
        for child in psutil.Process(daemon.proc.pid).children():
            try:
                if "torchcore: http" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:        # a run's process ending meanwhile (a zombie, gone)
                pass
        return None

    first = wait_for(service, 10, "the torchcore: http child")
    first.kill()
    second = wait_for(lambda: (s := service()) and s.pid != first.pid and s, 15, "a restarted service")
    wait_for(daemon.answers, 15, "the restarted service to answer")
    try:
        daemon.kill()                   # SIGKILL: the service sees its parent pipe end
        psutil.wait_procs([second], timeout=10)
        assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE
    finally:
        daemon.kill()


def test_a_daemon_in_the_background_serves_and_logs_to_its_file(tmp_path):
    """Gone to the background (working directory /, stderr /dev/null) with a relative task file:
    the service still finds the file, and says where it serves in the daemon's log."""
    from web_harness import free_port

    port = free_port()
    (tmp_path / "tasks.yaml").write_text(f"settings:\n  state_dir: state\n  http:\n    listen: {port}\n"
                                         + BODY)
    run = [sys.executable, "-m", "torchcore"]
    subprocess.run(run + ["start", "-c", "tasks.yaml"], cwd=tmp_path, check=True, timeout=60,
                   capture_output=True)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/api/v1/status"), 20, "the service")
        log = (tmp_path / "state" / "logs" / "torchcore.log").read_text()
        assert f"http: serving on 127.0.0.1:{port}" in log
    finally:
        subprocess.run(run + ["stop", "-c", "tasks.yaml"], cwd=tmp_path, timeout=60, capture_output=True)
