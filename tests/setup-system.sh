#!/usr/bin/env bash
# System packages the test suite uses, installed when missing (Debian/Ubuntu, as root).
# - faketime: libfaketime, for the real-daemon clock-step tests.
# - logrotate: to check the shipped logrotate snippet.
# - chromium, chromium-driver: the dashboard's browser tests (headless, through selenium).
# - postgresql-15: the fleet tests start throw-away servers of their own (tests/pgserver.py).
set -u
need=()
command -v faketime >/dev/null 2>&1 || need+=(faketime)
command -v logrotate >/dev/null 2>&1 || need+=(logrotate)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql-15)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
    echo "tests/setup-system.sh: missing ${need[*]}; install them (tests that need them are skipped)" >&2
fi
exit 0
