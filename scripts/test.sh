#!/usr/bin/env bash
# Runs the test suite; pytest's exit code 5 (no tests collected) is not a failure of the project.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MPLBACKEND=Agg
# the search page's test drives Debian's chromium (tests/test_search_service.py); nothing downloads a browser
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "test: installing Debian package chromium (the search page's browser test)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "test: /usr/bin/chromium is missing, so the browser test will skip (sudo apt-get install chromium)" >&2
    fi
fi
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "pytest: no tests collected"; exit 0; fi
exit "$rc"
