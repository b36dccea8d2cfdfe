"""Every ablation row of UniWeTok's Tables 1-7 trains at tiny size; its terms are logged.

Rows whose tiny configs are identical (Table 6 rows 2 and 3; rows that differ only in the
batch size, which tiny keeps) share one run. Each distinct config compiles its train step
once, with XLA's backend optimisations off (`conftest.train_steps_in_process`), and takes
two steps on random images with a tiny SigLIP teacher written by transformers.
"""
import collections

import numpy as np
import pytest

from conftest import read_metrics, run_main, train_steps_in_process
from unimm_jax import config_defaults

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

ROWS = sorted(config_defaults.load_config_module("configs/uniwetok.py").TABLE_ROWS)


def _tiny_row(row: str, teacher: str = ""):
  config = config_defaults.load_config(f"configs/uniwetok.py:tiny,{row}")
  if config.loss.pre_distill or config.loss.post_distill:
    config.teacher.path = teacher
  return config


def _distinct_rows() -> list[tuple[str, ...]]:
  groups = collections.defaultdict(list)
  for row in ROWS:
    groups[_tiny_row(row, "teacher").to_json()].append(row)
  return [tuple(rows) for rows in groups.values()]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  """A SigLIP vision tower (hidden 32) as the distillation teacher."""
  path = tmp_path_factory.mktemp("teacher")
  transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
      image_size=16, patch_size=8)).save_pretrained(path)
  return str(path)


@pytest.mark.e2e  # the whole trainer for each of 13 configs: 3 minutes, kept out of --fast
@pytest.mark.parametrize("rows", _distinct_rows(), ids=lambda rows: "=".join(rows))
def test_row_trains_two_steps(rows, tiny_teacher):
  config = _tiny_row(rows[0], tiny_teacher)
  state, metrics = train_steps_in_process(config, 2)
  expected = {"pre_distill": config.loss.pre_distill, "post_distill": config.loss.post_distill,
              "gap": config.loss.gap}
  for name, weight in expected.items():
    assert (name in metrics) == bool(weight), (name, sorted(metrics))
  assert np.isfinite(metrics["loss"]) and int(state.step) == 2
  if config.loss.gap:
    assert ("query" in state.module_params["gap_prior"]) == config.gap_prior.use_query_token


@pytest.mark.e2e
def test_every_term_is_logged_under_its_name(tiny_teacher, tmp_path):
  """The full method (Table 1 row 3) end to end: each term has its own metrics.jsonl key."""
  run_main(tmp_path, f"--config.teacher.path={tiny_teacher}", "--config.train.steps=2",
           config="configs/uniwetok.py:tiny,table1_row3")
  logged = read_metrics(tmp_path)[2]
  for name in ("pre_distill", "post_distill", "gap", "gap_bit_accuracy", "token_entropy",
               "codebook_entropy", "commitment", "l1", "loss"):
    assert name in logged and np.isfinite(logged[name]), name


def test_distillation_without_a_teacher_is_refused():
  config = config_defaults.load_config("configs/uniwetok.py:tiny,table1_row2")
  with pytest.raises(ValueError, match="config.teacher.path"):
    config_defaults.validate(config)
