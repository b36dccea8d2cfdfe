#!/usr/bin/env bash
# Installs unimm_jax with its test and torch extras into ./.venv and runs the test suite.
# Usage: bash launch/test.sh [--fast] [pytest args]   (e.g. `-n 0` runs in one process)
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
# Two workers, one per core of CI's machine; a test file stays on one worker, so its
# module fixtures (a shared training run) are made once. They share one compilation cache.
python -m pytest -q tests -n 2 --dist loadfile "${MARKERS[@]}" "$@"
