#!/usr/bin/env bash
# Sets up .venv (first time), generates a GTEx-like mirror and materialises every asset on CPU.
# Extra arguments go to `gtex-assets demo` (e.g. --source DIR, --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPLBACKEND=Agg
exec .venv/bin/gtex-assets demo "$@"
