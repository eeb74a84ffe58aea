#!/usr/bin/env bash
# Build the C core (the match core; the loop's timerfd and inotify calls) and the gate with
# AddressSanitizer and UndefinedBehaviorSanitizer into a temporary directory and run the schedule,
# gate and watch tests against that build. Exits non-zero on any report.
# Usage: tests/asan.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${1:-$( [ -x .venv/bin/python ] && echo "$root/.venv/bin/python" || echo python3 )}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

export TC_EXTRA_CFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
export TC_EXTRA_LDFLAGS="-fsanitize=address,undefined"
"$PY" setup.py -q build_ext --force --build-lib "$work/lib" --build-temp "$work/tmp" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log"; exit 1; }
if grep -i "warning:" "$work/build.log"; then echo "asan.sh: compiler warnings" >&2; exit 1; fi
# A C host first: there leak detection works too.
gcc -O1 -g -Wall -Wextra -Werror -fsanitize=address,undefined -fno-sanitize-recover=all \
    -Icsrc csrc/tc_match.c tests/tc_match_check.c -o "$work/tc_match_check"
ASAN_OPTIONS=detect_leaks=1 "$work/tc_match_check"

# The pure-Python modules come from the source tree, the sanitized _core from the build.
cp -r torchcore/*.py "$work/lib/torchcore/"

# A Python host is not built with ASan: the runtime must be loaded first, and the interpreter's
# own allocations would be reported as leaks, so leak detection is off.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$work/lib"
cd "$work"      # not the source tree, whose torchcore/ would shadow the sanitized build
"$PY" -c 'import torchcore._core as c, sys; assert sys.argv[1] in c.__file__, c.__file__' "$work/lib"
"$PY" -c 'import torchcore.spawn as e, sys; assert e.GATE.startswith(sys.argv[1]), e.GATE' "$work/lib"
"$PY" -m pytest -q --capture=sys -p no:cacheprovider "$root/tests/test_schedule.py" \
    "$root/tests/test_schedule_differential.py" "$root/tests/test_schedule_fuzz.py" "$root/tests/test_gate.py" \
    "$root/tests/test_watch.py"
echo "asan.sh: clean (address, undefined; leaks checked in the C host, off for the Python host)"
