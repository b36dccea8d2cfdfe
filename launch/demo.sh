#!/usr/bin/env bash
# The README demo: trains the demo UniWeTok on scikit-image's photos (about 10 minutes on
# 2 CPU cores), prints the held-out PSNR at the start and the end, then encodes and decodes
# the held-out photos through the trained tokenizer.
# Usage: bash launch/demo.sh [WORKDIR] [extra --config.* overrides]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
source launch/setup_env.sh ""  # no extras (and not this script's own arguments)
WORKDIR="${1:-$REPO/workdir_demo}"
shift || true
export TF_CPP_MIN_LOG_LEVEL=2
python -m unimm_jax.main --config=configs/uniwetok.py:demo --workdir="$WORKDIR" \
    --config.train.steps=500 "$@"
python -m unimm_jax.data.export_builtin --output="$WORKDIR/heldout_photos" --names=eval
python -m unimm_jax.main --mode=encode --workdir="$WORKDIR" \
    --input="$WORKDIR/heldout_photos" --output="$WORKDIR/heldout_codes.npz"
python -m unimm_jax.main --mode=decode --workdir="$WORKDIR" \
    --input="$WORKDIR/heldout_codes.npz" --output="$WORKDIR/heldout_decoded"
echo "TensorBoard logs, reconstructions/*.png and checkpoints/ are in $WORKDIR"
echo "  tensorboard --logdir $WORKDIR"
