"""Launchers' dry runs: the TPU pod's gcloud commands for all workers, the SLURM script."""
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tpu_pod_dry_run_prints_commands():
  out = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--tpu=pod", "--zone=z1", "--setup", "--dry_run", "--",
       "--config=configs/uniwetok.py:paper", "--workdir=gs://b/run"],
      cwd=REPO, capture_output=True, text=True, check=True).stdout.strip().splitlines()
  assert len(out) == 2
  assert all(line.startswith("gcloud compute tpus tpu-vm ssh pod --zone=z1 --worker=all")
             for line in out)
  assert "pip\\ install\\ -e" in out[0]
  assert "unimm_jax.main\\ --multihost\\ --config=configs/uniwetok.py:paper" in out[1]
  assert "--workdir=gs://b/run" in out[1]
  assert "JAX_COORDINATOR_ADDRESS" not in out[1]  # detected from the TPU metadata


def test_tpu_pod_dry_run_exports_a_given_coordinator():
  out = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--tpu=pod", "--zone=z1", "--coordinator=10.0.0.2:8476",
       "--dry_run", "--", "--workdir=gs://b/run"],
      cwd=REPO, capture_output=True, text=True, check=True).stdout.strip().splitlines()
  assert len(out) == 1
  assert r"JAX_COORDINATOR_ADDRESS=10.0.0.2:8476\ python3\ -m\ unimm_jax.main" in out[0]


def test_tpu_pod_requires_name_and_zone():
  proc = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry_run"], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "usage" in proc.stderr


def test_slurm_dry_run_prints_one_task_per_gpu_batch_script():
  out = subprocess.run(
      ["bash", "launch/slurm.sh", "--nodes=4", "--gpus_per_node=8", "--partition=gpu",
       "--requeue", "--venv=/opt/venv", "--dry_run", "--",
       "--config=configs/uniwetok.py:paper", "--workdir=/shared/run one"],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  lines = out.splitlines()
  assert lines[0] == "#!/usr/bin/env bash"
  directives = {line for line in lines if line.startswith("#SBATCH")}
  for expected in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                   "--signal=TERM@120", "--partition=gpu", "--requeue"):
    assert f"#SBATCH {expected}" in directives, expected
  assert "source /opt/venv/bin/activate" in lines
  srun = [line for line in lines if line.startswith("srun ")]
  assert srun == ["srun --kill-on-bad-exit=1 python -m unimm_jax.main --multihost "
                  "--config=configs/uniwetok.py:paper --workdir=/shared/run\\ one"]


def test_slurm_dry_run_script_is_valid_bash():
  script = subprocess.run(
      ["bash", "launch/slurm.sh", "--nodes=1", "--dry_run", "--", "--workdir=/w"],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  script = "\n".join(line for line in script.splitlines() if not line.startswith("# submit"))
  assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize("args", [["--dry_run", "--", "--workdir=/w"],
                                  ["--nodes=2", "--dry_run"],
                                  ["--nodes=two", "--dry_run", "--", "--workdir=/w"]])
def test_slurm_rejects_missing_or_bad_arguments(args):
  proc = subprocess.run(["bash", "launch/slurm.sh", *args], cwd=REPO, capture_output=True,
                        text=True)
  assert proc.returncode == 2 and ("usage" in proc.stderr or "positive" in proc.stderr)
