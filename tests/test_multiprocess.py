"""Two CPU processes with 4 fake devices each form one 8-device mesh, as the hosts of a pod do.

They train the tiny UniWeTok; SIGTERM to one of them makes both save the same step and exit
0; started again, they resume from that checkpoint. Their losses equal those of one process
with 8 devices, because each process reads its own rows of the same global batches. Only
process 0 writes logs and images; both write their part of every checkpoint.
"""
import glob
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import REPO, assert_losses_match, main_command, read_metrics, subprocess_env
from unimm_jax.parallel import multihost

pytestmark = pytest.mark.e2e

# JAX's preemption sync point is agreed through the coordination service; a run that got
# SIGTERM before training stops at one of the first steps, long before this.
STEPS = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_job(workdir, logdir, tag: str) -> list[subprocess.Popen]:
  """Both processes of one job; process i logs to logdir/<tag>_<i>.log."""
  port = _free_port()
  procs = []
  for process_id in range(2):
    env = subprocess_env(devices=4)
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id))
    log = open(os.path.join(logdir, f"{tag}_{process_id}.log"), "w")
    procs.append(subprocess.Popen(
        main_command(workdir, f"--config.train.steps={STEPS}",
                     "--config.train.checkpoint_every=1000"),
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(procs, logdir, tag, timeout=600) -> list[str]:
  deadline = time.time() + timeout
  for p in procs:
    p.wait(timeout=max(1, deadline - time.time()))
  logs = [open(os.path.join(logdir, f"{tag}_{i}.log")).read() for i in range(2)]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log[-6000:]}"
  return logs


def test_two_processes_preempt_resume_and_match_one_eight_device_process(
    tmp_path, eight_device_run):
  workdir, logdir = tmp_path / "run", tmp_path
  procs = _start_job(workdir, logdir, "first")
  # SIGTERM to process 1 alone, once it has built its state (before its first step).
  deadline = time.time() + 300
  while "starting from scratch" not in open(logdir / "first_1.log").read():
    assert all(p.poll() is None for p in procs), open(logdir / "first_1.log").read()[-4000:]
    assert time.time() < deadline, "process 1 did not start within 300 s"
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  logs = _wait(procs, logdir, "first")
  checkpoints = os.path.join(workdir, "checkpoints")
  saved = sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit())
  assert len(saved) == 1 and 1 <= saved[0] < STEPS, saved
  preempted_at = saved[0]
  for log in logs:  # both stopped at the same agreed step
    assert f"all processes save step {preempted_at} and exit" in log
  # Each process wrote its own data-iterator state into the one checkpoint.
  iterator_files = sorted(os.listdir(os.path.join(checkpoints, str(preempted_at), "data_iter")))
  assert [f for f in iterator_files if f.endswith(".json")] == [
      "process_0-of-2.json", "process_1-of-2.json"]

  logs = _wait(_start_job(workdir, logdir, "resumed"), logdir, "resumed")
  assert all(f"resumed from step {preempted_at}" in log for log in logs)
  assert sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit())[-1] == STEPS

  metrics = read_metrics(workdir)
  assert_losses_match(metrics, read_metrics(eight_device_run))
  # Only process 0 writes logs: one line per trained step, one TensorBoard file per start.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    trained = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert trained == list(range(1, STEPS + 1)), trained
  assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 2
  assert sorted(os.listdir(os.path.join(workdir, "reconstructions"))) == [
      f"step_{s:07d}.png" for s in range(2, STEPS + 1, 2)]


def test_job_values_come_from_flags_then_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(multihost.jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(multihost.jax.config, "update", lambda *args: None)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "JOB_COMPLETION_INDEX"):
    monkeypatch.delenv(name, raising=False)
  assert not multihost.wanted(None, None)
  multihost.initialize("h0:1234", 4, 2)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h1:99")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "8")
  monkeypatch.setenv("JOB_COMPLETION_INDEX", "5")  # a Kubernetes Indexed Job's pod index
  assert multihost.wanted(None, None)
  multihost.initialize()
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  multihost.initialize(process_id=None)
  assert calls == [dict(coordinator_address="h0:1234", num_processes=4, process_id=2),
                   dict(coordinator_address="h1:99", num_processes=8, process_id=5),
                   dict(coordinator_address="h1:99", num_processes=8, process_id=3)]
  monkeypatch.setenv("JAX_PROCESS_ID", "8")
  with pytest.raises(ValueError, match=r"process id 8 is not in \[0, 8\)"):
    multihost.initialize()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    multihost.initialize()
