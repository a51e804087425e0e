#!/usr/bin/env bash
# Sets up .venv (first time) and runs the whole test suite, offline, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_DISABLE_TELEMETRY=1 MPLBACKEND=Agg
exec .venv/bin/python -m pytest "$@"
