#!/usr/bin/env bash
# Submits `unimm_jax.main` to a SLURM GPU cluster: one process per GPU on every node.
#
# The batch script runs `srun python -m unimm_jax.main --multihost ...`; srun starts
# nodes x gpus_per_node tasks, and JAX's SLURM detection takes the coordinator (first node
# of the step, a port derived from the job id), the process count (SLURM_NTASKS), this
# process's id (SLURM_PROCID) and its one GPU (SLURM_LOCALID) from the environment srun
# sets. Every process reads its own rows of each global batch; process 0 writes logs and
# images; all take part in checkpoints, so WORKDIR must be on a shared filesystem.
#
# Preemption and time limits: `--signal=TERM@120` has SLURM send SIGTERM to every task two
# minutes before the limit; the trainer then saves one coordinated checkpoint and all
# processes exit 0. With --requeue the job goes back in the queue and resumes from it.
#
# Usage:
#   bash launch/slurm.sh --nodes=N [--gpus_per_node=8] [--partition=P] [--account=A] \
#       [--time=24:00:00] [--job_name=unimm] [--cpus_per_task=12] [--requeue] \
#       [--repo_dir=DIR] [--venv=DIR/.venv] [--dry_run] -- --config=... --workdir=/shared/run
# --dry_run prints the batch script and the sbatch command instead of submitting.
set -euo pipefail
NODES="" GPUS_PER_NODE=8 PARTITION="" ACCOUNT="" TIME="24:00:00" JOB_NAME="unimm"
CPUS_PER_TASK=12 REQUEUE=0 DRY_RUN=0
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS_PER_NODE="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --job_name=*) JOB_NAME="${1#*=}" ;;
    --cpus_per_task=*) CPUS_PER_TASK="${1#*=}" ;;
    --requeue) REQUEUE=1 ;;
    --repo_dir=*) REPO_DIR="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (main's flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$NODES" ] || [ $# -eq 0 ]; then
  echo "usage: $0 --nodes=N [--gpus_per_node=G] [--partition=P] [--account=A] [--time=T]" \
       "[--requeue] [--dry_run] -- MAIN_FLAGS" >&2
  exit 2
fi
for n in "$NODES" "$GPUS_PER_NODE" "$CPUS_PER_TASK"; do
  case "$n" in ''|*[!0-9]*|0) echo "--nodes, --gpus_per_node and --cpus_per_task must be" \
                                   "positive integers, got '$n'" >&2; exit 2 ;; esac
done
VENV="${VENV:-$REPO_DIR/.venv}"
MAIN_FLAGS=$(printf ' %q' "$@")

SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS_PER_NODE
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --cpus-per-task=$CPUS_PER_TASK
#SBATCH --time=$TIME
#SBATCH --signal=TERM@120
#SBATCH --open-mode=append
#SBATCH --output=$JOB_NAME-%j.out"
[ -n "$PARTITION" ] && SCRIPT+=$'\n'"#SBATCH --partition=$PARTITION"
[ -n "$ACCOUNT" ] && SCRIPT+=$'\n'"#SBATCH --account=$ACCOUNT"
[ "$REQUEUE" = 1 ] && SCRIPT+=$'\n'"#SBATCH --requeue"
SCRIPT+="
set -euo pipefail
cd $(printf '%q' "$REPO_DIR")
source $(printf '%q' "$VENV")/bin/activate
export TF_CPP_MIN_LOG_LEVEL=2
srun --kill-on-bad-exit=1 python -m unimm_jax.main --multihost$MAIN_FLAGS"

if [ "$DRY_RUN" = 1 ]; then
  echo "$SCRIPT"
  echo "# submit with: sbatch <<'EOF' ... EOF (the script above)"
else
  sbatch <<<"$SCRIPT"
fi
