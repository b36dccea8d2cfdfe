"""The MLLM task end to end on UniToken's tiny config: `python -m unimm_jax.main
--config=configs/unitoken.py:tiny` (built-in scenes, a random tiny VQ)."""
import json
import os

import numpy as np
import pytest

from unimm_jax import config_defaults

from conftest import (assert_exact_losses_match, assert_same_saved_state,
                      check_chat_and_generate, read_metrics, run_main)

pytestmark = pytest.mark.e2e

TINY = "configs/unitoken.py:tiny"
# Runs that only compare losses or saved states skip the answer and image generation evals.
NO_GENERATION = ("--config.eval.num_answers=0", "--config.eval.num_generations=0")


@pytest.fixture(scope="module")
def mllm_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mllm_run")
  return workdir, run_main(workdir, config=TINY)


def test_mllm_run_logs_evaluates_and_checkpoints(mllm_run):
  workdir, proc = mllm_run
  metrics = read_metrics(workdir)
  assert sorted(metrics) == [0, 1, 2, 3, 4]
  for key in ("loss", "loss/ce", "loss/z_loss", "ce_text", "ce_image", "accuracy",
              "target_tokens", "grad_norm", "lr", "tokens_per_sec", "eval/loss",
              "eval/accuracy/all", "eval/chance/all", "eval/generation_check"):
    assert key in metrics[4], key
  # A freshly initialised LLM is near uniform over the tiny vocabulary.
  vocab = config_defaults.load_config(TINY).model.vocab_size
  assert metrics[1]["target_tokens"] > 0
  assert abs(metrics[1]["loss/ce"] - np.log(vocab)) < 0.5
  assert sorted(os.listdir(os.path.join(workdir, "generations"))) == [
      "step_0000002.png", "step_0000004.png"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert "held-out answer accuracy / generation check at step 4" in proc.stdout


def test_mllm_eight_devices_match_one(mllm_run, tmp_path):
  """data 4 x fsdp 2: the same global batches give the same losses and updates."""
  workdir, _ = mllm_run
  run_main(tmp_path, "--config.mesh.data=4", "--config.mesh.fsdp=2", *NO_GENERATION,
           config=TINY, devices=8)
  one, eight = read_metrics(workdir), read_metrics(tmp_path)
  assert_exact_losses_match(eight, one)
  np.testing.assert_allclose(eight[4]["eval/loss"], one[4]["eval/loss"], rtol=2e-5)


def test_mllm_resume_is_bit_identical(mllm_run, tmp_path):
  """Stop after 2 steps, start again in the same workdir: step 4 equals the straight run."""
  workdir, _ = mllm_run
  run_main(tmp_path, "--config.train.steps=2", *NO_GENERATION, config=TINY)
  resumed = run_main(tmp_path, *NO_GENERATION, config=TINY)
  assert "resumed from step 2" in resumed.stderr
  assert_same_saved_state(tmp_path, workdir, 4)


def test_chat_and_generate_modes(mllm_run, tmp_path):
  # On 8 devices: the 2 prompts are padded to the mesh's 8 batch shards.
  check_chat_and_generate(mllm_run[0], tmp_path, "--cfg_scale=2", devices=8)


def test_eval_mode_reports_answers_and_generation_checks(mllm_run):
  workdir, train_proc = mllm_run
  proc = run_main(workdir, config=None, mode="eval")
  with open(os.path.join(workdir, "eval_4.json")) as f:
    results = json.load(f)
  assert results["step"] == 4
  for key in ("loss", "accuracy/all", "chance/all", "generation_check"):
    assert key in results, key
  trained = read_metrics(workdir)[4]
  np.testing.assert_allclose(results["loss"], trained["eval/loss"], rtol=1e-5)
  assert results["accuracy/all"] == trained["eval/accuracy/all"]
  assert "eval of step 4: answers" in proc.stdout
