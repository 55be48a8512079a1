#!/usr/bin/env bash
# Set up a virtual environment and run the whole test suite (slow tests included) plus the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0 -e ".[test]"
ruff check src tests benchmarks
# The web chat page is tested in headless Chromium (Debian's package; no browser download).
if ! [ -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
        >/dev/null 2>&1 || echo "could not install chromium; the web page test will be skipped" >&2
fi
# pytest exits 5 when it collects nothing; that is a failure here, as is any other non-zero code.
set +e
python -m pytest -q --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
