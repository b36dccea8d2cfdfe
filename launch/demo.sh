#!/usr/bin/env bash
# The README demo.
#   bash launch/demo.sh [unified] [WORKDIR] [extra --config.* overrides for the MLLM]
#     The unified demo (about 20 minutes on 2 CPU cores): trains the demo VQ tokenizer
#     (configs/chameleon_vqgan.py:demo) on built-in procedural scenes, then the demo UniToken
#     MLLM (configs/unitoken.py:demo) on questions, captions and text-to-image prompts about
#     such scenes; prints held-out answer accuracy (per question type, with chance) and the
#     rate of generated images that satisfy their prompt, answers a question with
#     --mode=chat and writes images with --mode=generate.
#   bash launch/demo.sh evotok [WORKDIR] [extra --config.* overrides for the MLLM]
#     The same on EvoTok: a 32 px EvoTok tokenizer (configs/evotok.py:scenes) on the scenes,
#     then one EvoTok MLLM (configs/evotok_mllm.py:demo) that reads the semantic decoder's
#     features and writes images with its depth-transformer head.
#   bash launch/demo.sh ming_univision [WORKDIR] [extra --config.* overrides for the MLLM]
#     Ming-UniVision on the scenes: a 32 px MingTok (configs/mingtok.py:scenes), its latents'
#     normalisation measured by --mode=eval, then the MLLM (configs/ming_univision.py:demo)
#     that answers, draws with its per-token flow head and edits in context; ends with a
#     two-round edit of a held-out scene (--mode=edit).
#   bash launch/demo.sh bitdance_mllm [WORKDIR] [extra --config.* overrides for the MLLM]
#     BitDance's unified MLLM on UniWeTok's binary tokens: a 32 px UniWeTok
#     (configs/uniwetok.py:scenes) on the scenes, then the MLLM (configs/bitdance_mllm.py:demo)
#     that reads images as bits, writes them 4 tokens at a time with its parallel binary
#     diffusion head and edits in context; ends with a two-round edit (--mode=edit).
#   bash launch/demo.sh bitdance [WORKDIR] [extra --config.* overrides for the generator]
#     BitDance class-to-image on UniWeTok's binary codes: a 32 px UniWeTok
#     (configs/uniwetok.py:scene_classes) on the built-in scene classes (28 = colour x shape),
#     then the generator (configs/bitdance.py:demo); prints the classifier check of its
#     generations per evaluation and writes 8 images of one class with --mode=generate.
#   bash launch/demo.sh uniwetok [WORKDIR] [extra --config.* overrides]
#     The UniWeTok tokenizer demo (about 10 minutes): trains on scikit-image's photos, prints
#     held-out PSNR at the start and end, then encodes and decodes the held-out photos.
#   bash launch/demo.sh mingtok [WORKDIR] [extra --config.* overrides]
#     The same for the continuous MingTok tokenizer (configs/mingtok.py:demo): the held-out
#     photos' normalised latents go to a .npz and are rendered back.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DEMO="unified"
if [[ "${1:-}" =~ ^(uniwetok|mingtok|unified|evotok|ming_univision|bitdance|bitdance_mllm)$ ]]; then
  DEMO="$1"
  shift
fi
source launch/setup_env.sh ""  # no extras (and not this script's own arguments)
export TF_CPP_MIN_LOG_LEVEL=2

if [[ "$DEMO" == "uniwetok" || "$DEMO" == "mingtok" ]]; then
  WORKDIR="${1:-$REPO/workdir_demo_$DEMO}"
  shift || true
  STEPS=()
  [[ "$DEMO" == "uniwetok" ]] && STEPS=(--config.train.steps=500)
  python -m unimm_jax.main --config="configs/$DEMO.py:demo" --workdir="$WORKDIR" \
      "${STEPS[@]}" "$@"
  python -m unimm_jax.data.export_builtin --output="$WORKDIR/heldout_photos" --names=eval
  python -m unimm_jax.main --mode=encode --workdir="$WORKDIR" \
      --input="$WORKDIR/heldout_photos" --output="$WORKDIR/heldout_tokens.npz"
  python -m unimm_jax.main --mode=decode --workdir="$WORKDIR" \
      --input="$WORKDIR/heldout_tokens.npz" --output="$WORKDIR/heldout_decoded"
  echo "TensorBoard logs, reconstructions/*.png and checkpoints/ are in $WORKDIR"
  echo "  tensorboard --logdir $WORKDIR"
  exit 0
fi

if [[ "$DEMO" == "bitdance" ]]; then
  WORKDIR="${1:-$REPO/workdir_demo_bitdance}"
  shift || true
  mkdir -p "$WORKDIR"
  echo "== 1/3 the UniWeTok tokenizer on the built-in scene classes -> $WORKDIR/vq"
  python -m unimm_jax.main --config=configs/uniwetok.py:scene_classes --workdir="$WORKDIR/vq"
  echo "== 2/3 the BitDance generator (configs/bitdance.py:demo) -> $WORKDIR/generator"
  python -m unimm_jax.main --config=configs/bitdance.py:demo --workdir="$WORKDIR/generator" \
      --config.system.tokenizer_path="$WORKDIR/vq" "$@"
  echo "== 3/3 eight images of class 0 (a red circle)"
  python -m unimm_jax.main --mode=generate --workdir="$WORKDIR/generator" --class_id=0 \
      --output="$WORKDIR/generated" --num_images=8
  echo "Generation grids (one class per column): $WORKDIR/generator/generations/*.png;" \
       "class 0: $WORKDIR/generated/*.png; TensorBoard: tensorboard --logdir $WORKDIR"
  exit 0
fi

NORMALIZATION=()
if [[ "$DEMO" == "evotok" ]]; then
  WORKDIR="${1:-$REPO/workdir_demo_evotok}"
  TOKENIZER_CONFIG="configs/evotok.py:scenes" MLLM_CONFIG="configs/evotok_mllm.py:demo"
elif [[ "$DEMO" == "ming_univision" ]]; then
  WORKDIR="${1:-$REPO/workdir_demo_ming_univision}"
  TOKENIZER_CONFIG="configs/mingtok.py:scenes" MLLM_CONFIG="configs/ming_univision.py:demo"
elif [[ "$DEMO" == "bitdance_mllm" ]]; then
  WORKDIR="${1:-$REPO/workdir_demo_bitdance_mllm}"
  TOKENIZER_CONFIG="configs/uniwetok.py:scenes" MLLM_CONFIG="configs/bitdance_mllm.py:demo"
else
  WORKDIR="${1:-$REPO/workdir_demo}"
  TOKENIZER_CONFIG="configs/chameleon_vqgan.py:demo" MLLM_CONFIG="configs/unitoken.py:demo"
fi
shift || true
mkdir -p "$WORKDIR"
echo "== 1/3 the demo tokenizer ($TOKENIZER_CONFIG) on built-in scenes -> $WORKDIR/vq"
python -m unimm_jax.main --config="$TOKENIZER_CONFIG" --workdir="$WORKDIR/vq"
if [[ "$DEMO" == "ming_univision" ]]; then
  # The flow head samples N(0, 1) noise: give it latents of unit scale, measured on the
  # tokenizer just trained (the authors' constants are their tokenizer's).
  python -m unimm_jax.main --mode=eval --workdir="$WORKDIR/vq"
  read -r -a NORMALIZATION < <(python - "$WORKDIR/vq" <<'PY'
import glob, json, os, sys
path = max(glob.glob(os.path.join(sys.argv[1], "eval_*.json")),
           key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
print(" ".join(f"--config.vq.{k}={v!r}"
               for k, v in json.load(open(path))["latent_normalization"].items()))
PY
)
fi
echo "== 2/3 the demo MLLM ($MLLM_CONFIG) -> $WORKDIR/mllm"
python -m unimm_jax.main --config="$MLLM_CONFIG" --workdir="$WORKDIR/mllm" \
    --config.system.tokenizer_path="$WORKDIR/vq" "${NORMALIZATION[@]}" "$@"
echo "== 3/3 chat and generate with the trained MLLM"
python -m unimm_jax.data.scenes --output="$WORKDIR/heldout_scene.png" --split=eval --index=0
python -m unimm_jax.main --mode=chat --workdir="$WORKDIR/mllm" \
    --image="$WORKDIR/heldout_scene.png" --prompt="How many objects are there?"
python -m unimm_jax.main --mode=generate --workdir="$WORKDIR/mllm" \
    --prompt="a red circle on the left" --output="$WORKDIR/generated" --num_images=8
if [[ "$DEMO" == "ming_univision" || "$DEMO" == "bitdance_mllm" ]]; then
  python -m unimm_jax.data.scene_edits --output="$WORKDIR/edit_example" --edits=2 --size=32
  mapfile -t INSTRUCTIONS < "$WORKDIR/edit_example/instructions.txt"
  python -m unimm_jax.main --mode=edit --workdir="$WORKDIR/mllm" \
      --image="$WORKDIR/edit_example/start.png" --prompt="${INSTRUCTIONS[0]}" \
      --prompt="${INSTRUCTIONS[1]}" --output="$WORKDIR/edited"
  echo "Edit rounds: $WORKDIR/edited/round_*.png (expected: $WORKDIR/edit_example/);" \
       "edit grids: $WORKDIR/mllm/edits/*.png"
fi
echo "Generated grids: $WORKDIR/mllm/generations/*.png and $WORKDIR/generated/*.png;"
echo "answers: $WORKDIR/mllm/answers/*.txt; TensorBoard: tensorboard --logdir $WORKDIR"
