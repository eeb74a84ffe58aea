import subprocess
import sys

import pytest

from torchcore import __version__
from torchcore.commands import main

pytestmark = pytest.mark.process


def test_version_flag(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help_and_usage_status(capsys):
    assert main([]) == 2
    assert "usage: torchcore" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "torchcore", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "torchcore" in out
