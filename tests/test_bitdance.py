"""BitDance class-to-image end to end (`python -m unimm_jax.main
--config=configs/bitdance.py:tiny`): it trains on the built-in scene classes through a frozen
UniWeTok, evaluates with generated images, resumes bit-identically, matches on 8 devices and
writes PNGs of a class with --mode=generate."""
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import (REPO, assert_exact_losses_match, assert_resumes_bit_identically,
                      main_command, read_metrics, run_main, subprocess_env)
from unimm_jax import config_defaults

TINY = "configs/bitdance.py:tiny"
NO_GENERATION = ("--config.eval.num_generations=0",)


@pytest.fixture(scope="module")
def bitdance_run(tmp_path_factory):
  """Tiny BitDance, 4 steps, checkpoints at 2 and 4, evaluated with generations at 0 and 4."""
  workdir = tmp_path_factory.mktemp("bitdance_run")
  return workdir, run_main(workdir, config=TINY)


def test_run_trains_evaluates_with_generations_and_checkpoints(bitdance_run):
  workdir, proc = bitdance_run
  metrics = read_metrics(workdir)
  for step in (1, 2, 3, 4):
    assert np.isfinite(metrics[step]["loss"]) and 0 <= metrics[step]["bit_accuracy"] <= 1
  assert 0 <= metrics[4]["eval/class_check"] <= 1
  assert metrics[4]["eval/class_check_chance"] == pytest.approx(1 / 28)
  assert "class check" in proc.stdout
  grid = Image.open(os.path.join(workdir, "generations", "step_0000004.png"))
  assert grid.size[1] >= 32
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_resume_is_bit_identical(bitdance_run, tmp_path):
  assert_resumes_bit_identically(bitdance_run[0], tmp_path, *NO_GENERATION, config=TINY)


def test_eight_devices_match_one(bitdance_run, tmp_path):
  run_main(tmp_path, "--config.mesh.data=4", "--config.mesh.fsdp=2", *NO_GENERATION,
           devices=8, config=TINY)
  assert_exact_losses_match(read_metrics(tmp_path), read_metrics(bitdance_run[0]))


def test_generate_mode_writes_the_class(bitdance_run, tmp_path):
  workdir, _ = bitdance_run
  proc = run_main(workdir, "--class_id=3", f"--output={tmp_path / 'out'}", "--num_images=2",
                  config=None, mode="generate")
  assert "class 3 ('red cross')" in proc.stdout
  files = sorted(os.listdir(tmp_path / "out"))
  assert files == ["image_000.png", "image_001.png"]
  assert Image.open(tmp_path / "out" / files[0]).size == (32, 32)
  missing = subprocess.run(main_command(workdir, f"--output={tmp_path}", config=None,
                                        mode="generate"),
                           cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
  assert missing.returncode != 0 and "needs --class_id" in missing.stderr


def test_config_variants_build():
  for variant in ("b", "l", "h", "b,p4", "b,p16", "demo"):
    config = config_defaults.load_config(f"configs/bitdance.py:{variant}")
    config_defaults.validate(config)
  with pytest.raises(ValueError, match="divide"):
    from unimm_jax.systems import bitdance  # pylint: disable=g-import-not-at-top
    config = config_defaults.load_config("configs/bitdance.py:tiny")
    config.model.parallel = 3
    bitdance.generator_config(config)


def test_eval_reports_a_frechet_distance_with_inception_weights(bitdance_run,
                                                               inception_weights_file):
  workdir, _ = bitdance_run
  proc = run_main(workdir, f"--config.eval.inception_path={inception_weights_file}",
                  config=TINY, mode="eval")
  assert "FID" in proc.stdout
  with open(os.path.join(workdir, "eval_4.json")) as f:
    results = json.load(f)
  assert np.isfinite(results["fid"]) and results["fid"] > 0
  assert 0 <= results["class_check"] <= 1
