"""The text LM task end to end: `python -m unimm_jax.main --config=configs/lm.py:tiny`."""
import json
import os
import re
import subprocess

import numpy as np
import pytest

from conftest import (REPO, assert_same_saved_state, main_command, read_metrics, run_main,
                      subprocess_env)

pytestmark = pytest.mark.e2e

LM_TINY = "configs/lm.py:tiny"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lm_run")
  return workdir, run_main(workdir, config=LM_TINY)


def test_lm_run_logs_samples_and_checkpoints(lm_run):
  workdir, proc = lm_run
  metrics = read_metrics(workdir)
  assert sorted(metrics) == [0, 1, 2, 3, 4]
  for key in ("loss", "perplexity", "accuracy", "target_tokens", "grad_norm", "lr",
              "tokens_per_sec", "eval/loss", "eval/perplexity", "eval/accuracy"):
    assert key in metrics[4], key
  # A byte model starts near uniform over its 261 ids: CE ~ log(261) = 5.56.
  assert abs(metrics[1]["loss"] - np.log(261)) < 0.3
  assert metrics[4]["eval/loss"] < metrics[0]["eval/loss"]
  np.testing.assert_allclose(metrics[4]["perplexity"], np.exp(metrics[4]["loss"]), rtol=1e-5)
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_0000002.txt",
                                                                  "step_0000004.txt"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert "held-out loss at step 0" in proc.stdout and "held-out loss at step 4" in proc.stdout


def test_lm_eight_devices_match_one(lm_run, tmp_path):
  """data 4 x fsdp 2: the same global batches give the same losses and updates."""
  workdir, _ = lm_run
  run_main(tmp_path, "--config.mesh.data=4", "--config.mesh.fsdp=2", config=LM_TINY, devices=8)
  one, eight = read_metrics(workdir), read_metrics(tmp_path)
  for step in (1, 2, 3, 4):
    np.testing.assert_allclose(eight[step]["loss"], one[step]["loss"], rtol=2e-5)
    np.testing.assert_allclose(eight[step]["grad_norm"], one[step]["grad_norm"], rtol=2e-4)
  np.testing.assert_allclose(eight[4]["eval/loss"], one[4]["eval/loss"], rtol=2e-5)


def test_lm_resume_is_bit_identical(lm_run, tmp_path):
  """Stop after 2 steps, start again in the same workdir: step 4 equals the straight run."""
  workdir, _ = lm_run
  run_main(tmp_path, "--config.train.steps=2", config=LM_TINY)
  resumed = run_main(tmp_path, config=LM_TINY)
  assert "resumed from step 2" in resumed.stderr
  assert_same_saved_state(tmp_path, workdir, 4)


def test_generate_mode_continues_a_prompt(lm_run):
  workdir, _ = lm_run
  proc = run_main(workdir, "--prompt=The assert statement", "--max_new_tokens=6",
                  config=None, mode="generate")
  # Byte model: 6 new ids decode to at most 6 characters (fewer where ids are specials).
  assert len(proc.stdout.rstrip("\n").split("\n")[-1]) <= 6


def test_eval_mode_reports_held_out_loss_and_perplexity(lm_run):
  """`--mode=eval` restores the params alone and gives the training run's last eval."""
  workdir, train_proc = lm_run
  proc = run_main(workdir, config=None, mode="eval")
  with open(os.path.join(workdir, "eval_4.json")) as f:
    results = json.load(f)
  assert results["step"] == 4 and results["num_tokens"] > 0
  np.testing.assert_allclose(results["perplexity"], np.exp(results["loss"]), rtol=1e-6)
  trained = re.search(r"held-out loss at step 4: ([0-9.]+)", train_proc.stdout)
  assert abs(results["loss"] - float(trained.group(1))) < 1e-4
  assert f"eval of step 4 on {results['num_tokens']} target tokens: loss" in proc.stdout


def test_encode_mode_says_a_language_model_has_no_image_codes(lm_run):
  workdir, _ = lm_run
  proc = subprocess.run(main_command(workdir, "--input=photos", "--output=codes.npz",
                                     config=None, mode="encode"),
                        cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  assert ("--mode=encode: a language model (config.task='lm') has no image codes; its modes "
          "are train, eval, generate, plan") in proc.stderr
  assert "Traceback" not in proc.stderr
