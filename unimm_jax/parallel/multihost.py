"""Joining a multi-process JAX job: one process per host (TPU VM) or per GPU (SLURM).

Where the coordinator, the process count and this process's id come from, first found wins:
1. the arguments (main's --coordinator_address, --num_processes, --process_id);
2. the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
   (what a hand-written launcher or a Kubernetes manifest sets); in a Kubernetes Indexed
   Job (or JobSet) without JAX_PROCESS_ID, the pod's JOB_COMPLETION_INDEX is the id;
3. JAX's cluster detection: Cloud TPU VM metadata, SLURM (SLURM_PROCID, SLURM_NTASKS,
   SLURM_STEP_NODELIST), Open MPI and Kubernetes.
"""
import os

from absl import logging
import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_K8S_INDEX = "JOB_COMPLETION_INDEX"


def _int_from_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """jax.distributed.initialize with values from the arguments, the environment or JAX.

  Also selects gloo for cross-process collectives on CPU devices (a no-op for the
  accelerators' own collectives), so the same command runs as several CPU processes on one
  machine, which is how the tests exercise this path.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _int_from_env(
      ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _int_from_env(ENV_PROCESS_ID)
  if process_id is None and coordinator_address and num_processes is not None:
    process_id = _int_from_env(ENV_K8S_INDEX)
  if num_processes is not None and process_id is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"process id {process_id} is not in [0, {num_processes}) "
                     f"(--process_id / {ENV_PROCESS_ID}, --num_processes / "
                     f"{ENV_NUM_PROCESSES})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("joined the job as process %d of %d (coordinator %s)", jax.process_index(),
               jax.process_count(), coordinator_address or "detected")


def wanted(coordinator_address: str | None, num_processes: int | None) -> bool:
  """Whether a multi-process start was asked for by flags or environment variables."""
  return bool(coordinator_address or num_processes or os.environ.get(ENV_COORDINATOR)
              or _int_from_env(ENV_NUM_PROCESSES))
