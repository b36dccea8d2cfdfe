#!/usr/bin/env bash
# Installs unimm_jax with its test and torch extras into ./.venv and runs the test suite.
# Usage: bash launch/test.sh [--fast] [pytest args]
#   --fast  leaves out the parity tests (PyTorch references) and the end-to-end subprocess
#           runs: the rest takes a few minutes on 2 CPU cores.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
MARKERS=()
if [ "${1:-}" = "--fast" ]; then
  MARKERS=(-m "not parity and not e2e")
  shift
fi
source launch/setup_env.sh "test,torch"
export TF_CPP_MIN_LOG_LEVEL=2
python -m pytest -q tests "${MARKERS[@]}" "$@"
