"""Inference without a trainer: a mode restores the params it uses and nothing else."""
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import _saved_state_arrays
from unimm_jax import config_defaults
from unimm_jax.inference import image_codec
from unimm_jax.inference import restore
from unimm_jax.inference.tokenizer_run import load_tokenizer_run
from unimm_jax.parallel import mesh as mesh_lib
from unimm_jax.parallel.context import MeshContext
from unimm_jax.train import tasks

pytestmark = pytest.mark.e2e


@pytest.fixture
def requested_fields(monkeypatch):
  """The TrainState fields each Orbax restore asks for, recorded."""
  requests = []
  original = ocp.args.PyTreeRestore

  def spy(*args, item=None, **kwargs):
    requests.append(sorted(item))
    return original(*args, item=item, **kwargs)
  monkeypatch.setattr(ocp.args, "PyTreeRestore", spy)
  return requests


def test_eval_params_are_the_saved_ema_and_nothing_else_is_read(full_run, requested_fields):
  workdir, _ = full_run
  config = restore.saved_config(str(workdir))
  task = tasks.build_task(config)
  context = MeshContext(mesh_lib.make_mesh(config.mesh), config_defaults.sharding_rules(config))
  step, params = restore.restore_eval_params(
      str(workdir), jax.eval_shape(task.init_params, jax.random.key(0)), context)
  assert step == 4 and requested_fields == [["ema_params"]]
  saved = _saved_state_arrays(workdir, 4)
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  assert len(leaves) == len([k for k in saved if k.startswith("['ema_params']")])
  for path, value in leaves:
    np.testing.assert_array_equal(value, saved["['ema_params']" + jax.tree_util.keystr(path)])


def test_load_tokenizer_run_gives_the_load_pretrained_convention(full_run, requested_fields):
  workdir, _ = full_run
  model, variables, config = load_tokenizer_run(str(workdir))
  assert set(variables) == {"params"} and requested_fields == [["ema_params"]]
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False, method="encode"))(variables, images)
  assert out.codes.shape == (2, 8, 8, config.model.groups) and out.recon is None
  recon = jax.jit(image_codec.reconstruct(model))(variables, images)
  assert recon.shape == images.shape and float(np.abs(recon).max()) <= 1.0
