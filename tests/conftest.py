"""Shared fixtures: subprocess runs of `unimm_jax.main` on the tiny UniWeTok config.

Markers: `parity` (compared against a PyTorch reference: torch ops, transformers models, or
a fixture their code made) and `e2e` (end-to-end runs: `python -m unimm_jax.main`, a
notebook or several processes as subprocesses, and every UniWeTok ablation row through the
whole trainer). `bash launch/test.sh --fast` runs the tests that carry neither.

Each end-to-end run is a separate process (as a user would start it), so device counts can
differ between runs. Runs are session-scoped and shared by the tests that read them.

The session shares one fresh persistent compilation cache, set up before jax is imported
and inherited by every subprocess and pytest-xdist worker (`launch/test.sh` runs two): the
many runs of the same tiny configs compile each program once (a tiny UniWeTok run drops
from ~34 s to ~12 s on 2 cores), which keeps the suite inside CI's time budget. It starts
empty, so every program is compiled in a session.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

# pytest-xdist workers inherit the controller's environment: they share its cache.
if "UNIMM_JAX_TEST_CACHE" not in os.environ:
  os.environ["UNIMM_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="unimm_jax_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["UNIMM_JAX_TEST_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# Tiny programs: XLA's CPU backend optimisations (LLVM's) cost more compile time than they
# save in running them; off in this process, its xdist workers and every subprocess.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if os.environ.get("UNIMM_TEST_FULL_OPT") != "1":
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

from inception_fixture_weights import random_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  config.addinivalue_line("markers", "parity: compared against a PyTorch reference")
  config.addinivalue_line("markers", "e2e: end-to-end runs (subprocesses of unimm_jax.main, "
                          "notebooks, every ablation row through the trainer)")
TINY = "configs/uniwetok.py:tiny"


def main_command(workdir, *overrides, config=TINY, mode="train"):
  cmd = [sys.executable, "-m", "unimm_jax.main", f"--mode={mode}"]
  if workdir is not None:
    cmd.append(f"--workdir={workdir}")
  if config:
    cmd.append(f"--config={config}")
  return cmd + list(overrides)


def subprocess_env(devices: int = 1) -> dict:
  env = dict(os.environ)
  flags = [f"--xla_force_host_platform_device_count={devices}"]
  if os.environ.get("UNIMM_TEST_FULL_OPT") != "1":
    flags.append(FAST_COMPILE_FLAG)
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def run_main(workdir, *overrides, devices=1, config=TINY, mode="train", timeout=600):
  """Runs main to completion; fails the test with its output if it exits non-zero."""
  proc = subprocess.run(main_command(workdir, *overrides, config=config, mode=mode),
                        cwd=REPO, env=subprocess_env(devices), capture_output=True,
                        text=True, timeout=timeout)
  if proc.returncode != 0:
    pytest.fail(f"main exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                f"STDERR:\n{proc.stderr[-8000:]}")
  return proc


def read_metrics(workdir) -> dict[int, dict]:
  """metrics.jsonl -> {step: merged record}; a later line for a step overrides earlier."""
  merged = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      merged.setdefault(record["step"], {}).update(record)
  return merged


def _saved_state_arrays(workdir, step) -> dict:
  """The raw saved `state` item of a checkpoint as {leaf path: numpy}, without model code."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    state = checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


# Tests that train a few steps in-process turn XLA's backend optimisations off: the same
# results, a third of the compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def train_steps_in_process(config, steps: int):
  """(state, metrics of the last step) after `steps` compiled train steps of `config` on one
  batch of uniform random images (config.data.image_size, config.train.batch_size)."""
  from unimm_jax.train import trainer  # pylint: disable=g-import-not-at-top
  setup = trainer.Setup(config)
  state = setup.init_state(FAST_COMPILE)
  size, batch_size = config.data.image_size, config.train.batch_size
  images = np.random.default_rng(0).uniform(-1, 1, (batch_size, size, size, 3))
  batch = {"image": setup.global_images(images.astype(np.float32), host_local=True)}
  with setup.activate():
    step = setup.compile_train_step().lower(state, setup.frozen, batch, setup.train_rng)
    step = step.compile(compiler_options=FAST_COMPILE)
    for _ in range(steps):
      state, metrics = step(state, setup.frozen, batch, setup.train_rng)
  return state, jax.device_get(metrics)


def assert_resumes_bit_identically(run_workdir, tmp_path, *overrides, config=TINY):
  """A copy of `run_workdir` (a 4-step run with checkpoints at 2 and 4) without its step-4
  checkpoint resumes from step 2 (main given `overrides`) to the same saved state; returns
  the copy's workdir."""
  workdir = tmp_path / "run"
  shutil.copytree(run_workdir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  resumed = run_main(workdir, *overrides, config=config)
  assert "resumed from step 2" in resumed.stderr
  assert_same_saved_state(workdir, run_workdir, 4)
  return workdir


def assert_same_saved_state(workdir, reference_workdir, step) -> None:
  """Every leaf of the two runs' saved train states at `step` is bit-identical."""
  reference = _saved_state_arrays(reference_workdir, step)
  got = _saved_state_arrays(workdir, step)
  assert reference.keys() == got.keys()
  for name in reference:
    np.testing.assert_array_equal(got[name], reference[name], err_msg=name)


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
  """Tiny UniWeTok, 1 device, 4 steps, checkpoints every 2: the reference run."""
  workdir = tmp_path_factory.mktemp("full_run")
  proc = run_main(workdir, "--config.train.steps=4")
  return workdir, proc


EVOTOK_TINY = "configs/evotok.py:tiny"


def evotok_teacher_flags(teacher: str) -> tuple[str, ...]:
  """Overrides that switch tiny EvoTok's semantic terms on against `teacher` and start its
  encoder from the same SigLIP (as the paper's config does)."""
  return (f"--config.teacher.path={teacher}", "--config.loss.semantic=1.0",
          "--config.loss.semantic_fold=1.0", f"--config.model.encoder.init_path={teacher}")


@pytest.fixture(scope="session")
def evotok_teacher(tmp_path_factory):
  """A SigLIP vision tower written by transformers as tiny EvoTok's semantic teacher and the
  start of its encoder: hidden 32 (the semantic out_width), 32 px with patch 8 (the
  encoder's 4 x 4 grid), 3 layers of 2 heads (the encoder's architecture)."""
  transformers = pytest.importorskip("transformers")
  path = tmp_path_factory.mktemp("evotok_teacher")
  transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
      image_size=32, patch_size=8)).save_pretrained(path)
  return str(path)


@pytest.fixture(scope="session")
def evotok_run(tmp_path_factory, evotok_teacher):
  """Tiny EvoTok with its semantic terms and its encoder started from the teacher, 4 steps,
  checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("evotok_run")
  return workdir, run_main(workdir, *evotok_teacher_flags(evotok_teacher), config=EVOTOK_TINY)


@pytest.fixture(scope="session")
def eight_device_run(tmp_path_factory):
  """The same 4 steps in one process with 8 devices (data 8): the multi-device reference."""
  workdir = tmp_path_factory.mktemp("eight_device_run")
  run_main(workdir, "--config.train.steps=4", devices=8)
  return workdir


def assert_exact_losses_match(got: dict, reference: dict, steps=(1, 2, 3, 4)) -> None:
  """Per-step loss and gradient norm of two runs on the same data in different layouts,
  equal up to reduction order (models without a discrete choice that float noise flips)."""
  for step in steps:
    np.testing.assert_allclose(got[step]["loss"], reference[step]["loss"], rtol=2e-5,
                               err_msg=f"step {step}")
    np.testing.assert_allclose(got[step]["grad_norm"], reference[step]["grad_norm"],
                               rtol=2e-4, err_msg=f"step {step}")


def assert_losses_match(got: dict, reference: dict, steps=(1, 2, 3, 4)) -> None:
  """Per-step losses (read_metrics records) of two runs on the same data, different layouts.

  The first step (same params, same batch) is the same computation up to reduction order.
  Later steps drift slowly: a latent within float noise of 0 may take the other sign, and
  the binary quantizer turns that into a different code. Losses stay within 2e-3 (1.3e-3 is
  the largest seen on the tiny config).
  """
  np.testing.assert_allclose(got[steps[0]]["loss"], reference[steps[0]]["loss"], rtol=1e-5)
  np.testing.assert_allclose(got[steps[0]]["grad_norm"], reference[steps[0]]["grad_norm"],
                             rtol=1e-5)
  for step in steps[1:]:
    np.testing.assert_allclose(got[step]["loss"], reference[step]["loss"], rtol=2e-3,
                               err_msg=f"step {step}")


@pytest.fixture(scope="session")
def inception_reference():
  """pytorch-fid's features for the seeded random weights (tests/fixtures/*inception*)."""
  with np.load(os.path.join(REPO, "tests", "fixtures", "inception_reference.npz")) as data:
    shapes = json.loads(str(data["state_dict_shapes"]))
    return dict(images=data["images"], features=data["features"], seed=int(data["seed"]),
                state_dict=random_state_dict(shapes, int(data["seed"])))


@pytest.fixture(scope="session")
def inception_weights_file(inception_reference, tmp_path_factory):
  """Those weights as a safetensors file under pytorch-fid's key names (95 MB, written once)."""
  path = str(tmp_path_factory.mktemp("inception") / "fid_inception.safetensors")
  save_file(inception_reference["state_dict"], path)
  return path


def check_chat_and_generate(workdir, tmp_path, *generate_flags, devices: int = 1) -> None:
  """On a trained MLLM workdir (32 px images): `--mode=chat` prints an answer about a
  half-red image, and `--mode=generate` (with `generate_flags`, on `devices`) writes two
  32 px PNGs."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.zeros((32, 32, 3), np.uint8)
  image[:, :16] = (220, 30, 30)
  Image.fromarray(image).save(tmp_path / "scene.png")
  chat = run_main(workdir, f"--image={tmp_path / 'scene.png'}",
                  "--prompt=How many objects are there?", config=None, mode="chat")
  assert chat.stdout.strip()  # a (random) answer, printed
  out = tmp_path / "images"
  gen = run_main(workdir, "--prompt=a red circle on the left", f"--output={out}",
                 "--num_images=2", *generate_flags, config=None, mode="generate",
                 devices=devices)
  assert sorted(os.listdir(out)) == ["image_000.png", "image_001.png"]
  assert np.asarray(Image.open(out / "image_000.png")).shape == (32, 32, 3)
  assert "wrote 2 images" in gen.stdout
