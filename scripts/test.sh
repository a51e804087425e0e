#!/usr/bin/env bash
# Sets up .venv (first time) and runs the whole test suite, offline, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser check of the UI needs Chromium: install Debian's when we can (root + apt), else
# that one test is skipped with the reason. GTEX_SKIP_BROWSER_INSTALL=1 opts out.
if ! command -v chromium >/dev/null 2>&1 && [ "${GTEX_SKIP_BROWSER_INSTALL:-0}" != 1 ] \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test: installing chromium for the UI browser check (apt-get)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "test: could not install chromium; the browser check will be skipped" >&2
fi
export DAGSTER_DISABLE_TELEMETRY=1 MPLBACKEND=Agg
# Test files run in parallel, one file per worker at a time (module fixtures built once);
# GTEX_TEST_WORKERS=0 runs serially.
exec .venv/bin/python -m pytest -n "${GTEX_TEST_WORKERS:-auto}" --dist loadfile "$@"
