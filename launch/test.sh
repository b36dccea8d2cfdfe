#!/usr/bin/env bash
# Installs unimm_jax with its test and torch extras into ./.venv and runs the test suite.
# Usage: bash launch/test.sh [pytest args]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
source launch/setup_env.sh "test,torch"
export TF_CPP_MIN_LOG_LEVEL=2
python -m pytest -q tests "$@"
