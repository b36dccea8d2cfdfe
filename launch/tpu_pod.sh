#!/usr/bin/env bash
# Starts the same `unimm_jax.main` on every worker of a Cloud TPU pod slice.
#
# Each worker runs `python -m unimm_jax.main --multihost ...`; --multihost makes main call
# jax.distributed.initialize(), which on TPU VMs finds the coordinator, the process count
# and this process's id from the TPU metadata by itself. Every worker reads its own shard
# of the data; process 0 writes logs and images; all take part in checkpoints, so WORKDIR
# must be a path every worker sees (a gs:// bucket).
#
# Usage:
#   bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--repo_dir=~/unimm_jax] \
#       [--setup] [--dry_run] -- --config=configs/uniwetok.py:paper --workdir=gs://b/run
# --setup first installs the repository on every worker (git pull + pip install -e .).
# --dry_run prints the gcloud commands instead of running them.
set -euo pipefail
TPU="" ZONE="" PROJECT="" REPO_DIR="~/unimm_jax" SETUP=0 DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --repo_dir=*) REPO_DIR="${1#*=}" ;;
    --setup) SETUP=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (main's flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$TPU" ] || [ -z "$ZONE" ]; then
  echo "usage: $0 --tpu=NAME --zone=ZONE [--project=P] [--setup] [--dry_run] -- MAIN_FLAGS" >&2
  exit 2
fi
MAIN_FLAGS=$(printf ' %q' "$@")
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all)
[ -n "$PROJECT" ] && GCLOUD+=(--project="$PROJECT")

run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
if [ "$SETUP" = 1 ]; then
  run "${GCLOUD[@]}" --command="cd $REPO_DIR && git pull && pip install -e ."
fi
run "${GCLOUD[@]}" --command="cd $REPO_DIR && TF_CPP_MIN_LOG_LEVEL=2 python3 -m unimm_jax.main --multihost$MAIN_FLAGS"
