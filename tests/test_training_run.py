"""End-to-end runs of `python -m unimm_jax.main` on the tiny UniWeTok config."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import (REPO, assert_losses_match, assert_same_saved_state, main_command,
                      read_metrics, run_main, subprocess_env)

pytestmark = pytest.mark.e2e


def test_run_leaves_logs_images_checkpoints(full_run):
  workdir, proc = full_run
  metrics = read_metrics(workdir)
  assert sorted(metrics) == [0, 1, 2, 3, 4]
  for key in ("loss", "l1", "token_entropy", "codebook_entropy", "commitment", "grad_norm",
              "lr", "steps_per_sec", "images_per_sec", "code_usage/00", "code_usage/mean",
              "data/skipped_records"):
    assert key in metrics[4], key
  assert np.isfinite(metrics[4]["loss"])
  assert "eval/psnr" in metrics[0] and "eval/psnr" in metrics[4]
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  pngs = sorted(os.listdir(os.path.join(workdir, "reconstructions")))
  assert pngs == ["step_0000002.png", "step_0000004.png"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert "held-out PSNR at step 0" in proc.stdout
  assert "held-out PSNR at step 4" in proc.stdout


def test_eight_devices_match_one_device(full_run, eight_device_run):
  workdir, _ = full_run
  assert_losses_match(read_metrics(eight_device_run), read_metrics(workdir))


def test_sigkill_and_resume_is_bit_identical(full_run, tmp_path):
  """Kill a longer run with SIGKILL once its step-2 checkpoint exists, resume it to 4."""
  workdir, _ = full_run
  proc = subprocess.Popen(main_command(tmp_path, "--config.train.steps=1000"), cwd=REPO,
                          env=subprocess_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = os.path.join(tmp_path, "checkpoints")
  deadline = time.time() + 300
  while not (os.path.isdir(ckpts) and "2" in os.listdir(ckpts)):
    assert proc.poll() is None, "the run ended before it was killed"
    assert time.time() < deadline, "no step-2 checkpoint within 300 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # The kill lands a few steps after step 2; drop what was saved after it, so the resume
  # really starts from step 2 (and from the data-iterator state saved with it).
  for name in os.listdir(ckpts):
    if name.isdigit() and int(name) > 2:
      subprocess.run(["rm", "-rf", os.path.join(ckpts, name)], check=True)
  resumed = run_main(tmp_path, "--config.train.steps=4")
  assert "resumed from step 2" in resumed.stderr
  assert_same_saved_state(tmp_path, workdir, 4)


def test_an_interrupted_checkpoint_is_never_resumed(full_run, tmp_path):
  """A save killed mid-write leaves Orbax's temporary directory; resume ignores it.

  Step 4's checkpoint is replaced by what an interrupted save of it leaves: the temporary
  `4.orbax-checkpoint-tmp-<time>` with a truncated array manifest and no commit marker.
  The run resumes from step 2, writes step 4 again and ends bit-identical to the
  uninterrupted run.
  """
  workdir, _ = full_run
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  ckpts = os.path.join(tmp_path, "checkpoints")
  partial = os.path.join(ckpts, "4.orbax-checkpoint-tmp-1795400000")
  os.rename(os.path.join(ckpts, "4"), partial)
  for marker in glob.glob(os.path.join(partial, "**", "commit_success.txt"), recursive=True):
    os.remove(marker)
  with open(os.path.join(partial, "state", "manifest.ocdbt"), "r+b") as f:
    f.truncate(7)
  resumed = run_main(tmp_path, "--config.train.steps=4")
  assert "resumed from step 2" in resumed.stderr
  assert_same_saved_state(tmp_path, workdir, 4)


def test_sigterm_saves_and_exits_zero(tmp_path):
  proc = subprocess.Popen(main_command(tmp_path, "--config.train.steps=100000",
                                       "--config.train.checkpoint_every=100000"),
                          cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics_file = os.path.join(tmp_path, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics_file) and '"loss"' in open(metrics_file).read()):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  steps = [int(s) for s in os.listdir(os.path.join(tmp_path, "checkpoints")) if s.isdigit()]
  assert len(steps) == 1 and 1 <= steps[0] < 100000, steps


def test_encode_decode_round_trip(full_run, tmp_path):
  workdir, _ = full_run
  from PIL import Image
  images = tmp_path / "images"
  (images / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (37, 50, 3), np.uint8)).save(images / "a.png")
  Image.fromarray(rng.integers(0, 255, (16, 24, 3), np.uint8)).save(images / "sub" / "b.jpg")
  codes = tmp_path / "codes.npz"
  run_main(workdir, f"--input={images}", f"--output={codes}", mode="encode", config=None)
  with np.load(codes) as data:
    assert list(data["names"]) == ["a.png", "sub/b.jpg"]
    # tiny: downsample 4, 4 groups; 37x50 is centre-cropped to 36x48.
    assert data["codes_00000"].shape == (9, 12, 4)
    assert data["codes_00001"].shape == (4, 6, 4)
    assert data["codes_00000"].min() >= 0 and data["codes_00000"].max() < 16
  out = tmp_path / "decoded"
  run_main(workdir, f"--input={codes}", f"--output={out}", mode="decode", config=None)
  assert Image.open(out / "a.png").size == (48, 36)
  assert Image.open(out / "sub" / "b.png").size == (24, 16)


@pytest.mark.parametrize("override,needle", [
    ("--config.train.stepz=3", "stepz"),
    ("--config.train.steps=abc", "config.train.steps"),
    ("--config.data.source=nowhere", "config.data.source"),
    ("--config.mesh.data=3", "config.mesh"),
])
def test_bad_config_fails_before_compiling(tmp_path, override, needle):
  proc = subprocess.run(main_command(tmp_path, override), cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert needle in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_corrupt_files_in_a_folder_are_skipped_and_logged(tmp_path):
  from PIL import Image
  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(folder / f"{i}.jpg")
  good = (folder / "0.jpg").read_bytes()
  (folder / "truncated.jpg").write_bytes(good[:len(good) // 3])
  (folder / "not_an_image.png").write_text("plain text")
  workdir = tmp_path / "run"
  run_main(workdir, "--config.data.source=folder", f"--config.data.path={folder}",
           "--config.train.steps=3", "--config.train.batch_size=8")
  metrics = read_metrics(workdir)
  assert max(metrics) == 3 and np.isfinite(metrics[3]["loss"])
  # 8 images: 1 held out for eval (every 100th record), 7 in training, 2 of them corrupt;
  # 3 batches of 8 pass each corrupt file several times, each time counted.
  assert metrics[3]["data/skipped_records"] >= 2


def test_eval_mode_writes_metrics(full_run, inception_weights_file):
  workdir, _ = full_run
  relative = os.path.relpath(workdir, REPO)  # Orbax needs absolute paths; main must cope
  proc = run_main(relative, "--config.lpips.allow_random=True",
                  f"--config.eval.inception_path={inception_weights_file}", mode="eval")
  with open(os.path.join(workdir, "eval_4.json")) as f:
    results = json.load(f)
  assert results["step"] == 4 and results["num_images"] == 6
  for key in ("psnr", "ssim", "lpips", "rfid", "code_usage_mean", "code_perplexity_mean"):
    assert np.isfinite(results[key]), key
  assert len(results["code_usage"]) == 4  # tiny: 4 groups
  assert "eval of step 4 on 6 images: psnr" in proc.stdout
  assert "eval/ssim" in read_metrics(workdir)[4]


def test_curriculum_stage2_starts_from_stage1_with_two_resolutions(full_run, tmp_path):
  """tiny,stage2 from the tiny run: step 0 evaluates stage 1's final EMA params, and the
  batches alternate between the 32 px (batch 8) and 64 px (batch 2) buckets."""
  stage1, stage1_proc = full_run
  proc = run_main(tmp_path, f"--config.train.init_from={stage1}",
                  config="configs/uniwetok.py:tiny,stage2")
  assert f"starting from {stage1}" in proc.stderr
  # The training-time eval of stage 1's last step, as printed (metrics.jsonl of that workdir
  # also holds the --mode=eval results of other tests, under the same key and step).
  final = re.search(r"held-out PSNR at step 4: ([0-9.]+) dB", stage1_proc.stdout)
  after = read_metrics(tmp_path)
  assert abs(after[0]["eval/psnr"] - float(final.group(1))) <= 0.005
  assert np.isfinite(after[4]["loss"])
  # images/s counts the images actually trained: 8 + 2 per pair of steps.
  assert after[4]["images_per_sec"] < 8 * after[4]["steps_per_sec"]


def test_resolution_buckets_alternate(tmp_path):
  from unimm_jax import config_defaults
  from unimm_jax.data import pipeline
  config = config_defaults.load_config("configs/uniwetok.py:tiny,stage2")
  iterator = pipeline.build_train_iterator(config.data, global_batch_size=8, seed=0)
  shapes = [next(iterator)["image"].shape for _ in range(4)]
  assert shapes == [(8, 32, 32, 3), (2, 64, 64, 3)] * 2
  config.data.resolution_buckets = "32:8,64"
  with pytest.raises(ValueError, match="resolution_buckets"):
    config_defaults.validate(config)
