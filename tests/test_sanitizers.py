"""The C core (match core; timerfd and inotify calls) and the gate under AddressSanitizer and
UndefinedBehaviorSanitizer (tests/asan.sh).

Runs as part of the normal test command where gcc and libasan are present, so the sanitized
build is checked wherever the suite runs, not only when someone remembers the script.
"""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.process, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))


def _libasan():
    if shutil.which("gcc") is None:
        return None
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(_libasan() is None, reason="gcc with libasan is not installed "
                    "(Debian: gcc; tests/setup-system.sh installs it)")
def test_schedule_tests_pass_under_asan_and_ubsan():
    result = subprocess.run(["bash", os.path.join(HERE, "asan.sh"), sys.executable],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "asan.sh: clean" in result.stdout
