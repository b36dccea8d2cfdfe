#!/usr/bin/env bash
# UniWeTok's three-stage curriculum at demo size on the built-in data (about 20 minutes on
# 2 CPU cores): stage 1 at 64 px on the photos, stage 2 at 64 and 128 px together, stage 3
# annealing on the face and text images; each stage starts from the previous one. Then the
# held-out photos are encoded and decoded at two resolutions (longer side 128 and 256) with
# the stage-1 and the stage-3 tokenizer, and side-by-side pictures with PSNR are written.
# Usage: bash launch/curriculum_demo.sh [ROOT]   (default ./workdir_curriculum)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
source launch/setup_env.sh ""  # no extras (and not this script's own arguments)
ROOT="${1:-$REPO/workdir_curriculum}"
export TF_CPP_MIN_LOG_LEVEL=2
CONFIG=configs/uniwetok.py
python -m unimm_jax.main --config=$CONFIG:demo,stage1 --workdir="$ROOT/stage1"
python -m unimm_jax.main --config=$CONFIG:demo,stage2 --workdir="$ROOT/stage2" \
    --config.train.init_from="$ROOT/stage1" --config.train.steps=200
python -m unimm_jax.main --config=$CONFIG:demo,stage3 --workdir="$ROOT/stage3" \
    --config.train.init_from="$ROOT/stage2" --config.train.steps=200 --config.optim.lr=3e-4
for side in 128 256; do
  python -m unimm_jax.data.export_builtin --output="$ROOT/heldout_$side" --names=eval \
      --max_side=$side
  for stage in stage1 stage3; do
    python -m unimm_jax.main --mode=encode --workdir="$ROOT/$stage" \
        --input="$ROOT/heldout_$side" --output="$ROOT/$stage/codes_$side.npz"
    python -m unimm_jax.main --mode=decode --workdir="$ROOT/$stage" \
        --input="$ROOT/$stage/codes_$side.npz" --output="$ROOT/$stage/decoded_$side"
    python -m unimm_jax.inference.compare_folders --originals="$ROOT/heldout_$side" \
        --decoded="$ROOT/$stage/decoded_$side" --output="$ROOT/${stage}_heldout_$side.png"
  done
done
echo "pictures: $ROOT/stage{1,3}_heldout_{128,256}.png"
