#!/usr/bin/env bash
# Creates ./.venv if absent and installs unimm_jax into it with the given extras.
# Usage: source launch/setup_env.sh [extras]   (e.g. "test,torch")
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UNIMM_VENV:-$REPO/.venv}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
SPEC="$REPO"
[ -n "$EXTRAS" ] && SPEC="$REPO[$EXTRAS]"
# torch is pinned by name (the CPU build on this project's machines); see setup.py.
"$VENV/bin/pip" install -q -e "$SPEC"
export PATH="$VENV/bin:$PATH"
