#!/usr/bin/env bash
# Starts the same `unimm_jax.main` on every worker of a Cloud TPU pod slice.
#
# Each worker runs `python -m unimm_jax.main --multihost ...`; --multihost makes main call
# jax.distributed.initialize(), which on TPU VMs finds the coordinator (worker 0), the
# process count and this process's id from the TPU metadata by itself. --coordinator=IP:PORT
# exports JAX_COORDINATOR_ADDRESS on every worker instead, for set-ups where the metadata
# does not name worker 0. Every worker reads its own rows of each global batch; process 0
# writes logs and images; all take part in checkpoints, so WORKDIR must be a path every
# worker sees (a gs:// bucket). A preempted worker gets SIGTERM; all workers then save one
# checkpoint together and exit, and rerunning the same command resumes from it.
#
# Usage:
#   bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--repo_dir=~/unimm_jax] \
#       [--coordinator=IP:PORT] [--setup] [--dry_run] \
#       -- --config=configs/uniwetok.py:paper --workdir=gs://b/run
# --setup first installs the repository on every worker (git pull + pip install -e .).
# --dry_run prints the gcloud commands instead of running them.
set -euo pipefail
TPU="" ZONE="" PROJECT="" REPO_DIR="~/unimm_jax" COORDINATOR="" SETUP=0 DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --repo_dir=*) REPO_DIR="${1#*=}" ;;
    --coordinator=*) COORDINATOR="${1#*=}" ;;
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
ENV="TF_CPP_MIN_LOG_LEVEL=2"
[ -n "$COORDINATOR" ] && ENV+=" JAX_COORDINATOR_ADDRESS=$COORDINATOR"
run "${GCLOUD[@]}" --command="cd $REPO_DIR && $ENV python3 -m unimm_jax.main --multihost$MAIN_FLAGS"
