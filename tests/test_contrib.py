"""The systemd unit and the logrotate snippet shipped in torchcore/contrib: syntax and content."""

import configparser
import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.process

CONTRIB = os.path.join(os.path.dirname(__file__), "..", "torchcore", "contrib")


def read(name):
    with open(os.path.join(CONTRIB, name)) as handle:
        return handle.read()


def test_systemd_unit_parses_and_runs_torchcore_in_the_foreground():
    unit = configparser.ConfigParser(strict=True, interpolation=None, comment_prefixes=("#", ";"))
    unit.optionxform = str
    unit.read_string(read("torchcore.service"))
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert " start --foreground " in service["ExecStart"]
    assert service["ExecReload"] == "/bin/kill -USR2 $MAINPID"
    assert service["KillMode"] == "mixed"
    assert service["RestartPreventExitStatus"] == "78"
    assert int(service["TimeoutStopSec"]) > 30          # above the default shutdown_grace


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_unit_passes_systemd_analyze(tmp_path):
    unit = tmp_path / "torchcore.service"
    unit.write_text(read("torchcore.service").replace("/usr/local/bin/torchcore", shutil.which("true")))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert "torchcore.service" not in out.stderr, out.stderr


def test_logrotate_snippet_is_balanced_and_names_the_daemon_log():
    text = read("torchcore.logrotate")
    body = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert body[0].endswith("{") and body[-1] == "}"
    assert body[0].split()[0].endswith("/torchcore.log")
    assert "copytruncate" not in body
    known = {"weekly", "daily", "monthly", "compress", "delaycompress", "missingok", "notifempty"}
    for directive in body[1:-1]:
        assert directive.split()[0] in known | {"rotate"}, directive


@pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate is not installed")
def test_logrotate_accepts_the_snippet(tmp_path):
    log = tmp_path / "torchcore.log"
    log.write_text("x\n")
    conf = tmp_path / "conf"
    conf.write_text(read("torchcore.logrotate").replace("/var/lib/torchcore/logs/torchcore.log", str(log)))
    out = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "error" not in out.stderr.lower(), out.stderr
