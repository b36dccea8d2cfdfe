"""The TPU pod launcher's dry run prints one gcloud command per step, for all workers."""
import os
import subprocess

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


def test_tpu_pod_requires_name_and_zone():
  proc = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry_run"], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "usage" in proc.stderr
