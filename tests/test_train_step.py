"""The jitted train step in-process: NaN steps are skipped and reported, EMA warms up."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_config_and_mesh import load_config
from unimm_jax.train import trainer
from unimm_jax.train.train_state import update_ema


@pytest.fixture(scope="module")
def tiny_setup():
  setup = trainer.Setup(load_config("tiny"))
  return setup, setup.compile_train_step()


def _batch(setup, value=None):
  size = setup.config.data.image_size
  images = np.random.default_rng(0).uniform(-1, 1, (8, size, size, 3)).astype(np.float32)
  if value is not None:
    images[0, 0, 0, 0] = value
  return {"image": setup.global_images(images, host_local=True)}


def test_nan_batch_is_skipped_and_counted(tiny_setup):
  setup, train_step = tiny_setup
  state = setup.init_state()
  before = jax.device_get(state.params)
  with setup.activate():
    state, metrics = train_step(state, _batch(setup, np.nan), setup.train_rng)
  assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 1 and int(state.nonfinite_steps) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  with setup.activate():
    state, metrics = train_step(state, _batch(setup), setup.train_rng)
  assert int(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 2 and int(state.nonfinite_steps) == 1
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(state.params), before)
  assert any(jax.tree.leaves(changed))


def test_consecutive_nonfinite_steps_stop_the_run():
  assert trainer._check_nonfinite(0, 10, 5, 20, 100, 90) == 0
  assert trainer._check_nonfinite(3, 10, 0, 20, 100, 90) == 3
  with pytest.raises(FloatingPointError, match="last good checkpoint \\(step 90\\)"):
    trainer._check_nonfinite(10, 10, 15, 20, 100, 90)


def test_ema_warmup_closed_form():
  ema, params = jnp.zeros(3), jnp.ones(3)
  # step 0: decay_t = min(0.999, 1/10) = 0.1 -> 0.9 of the new params.
  np.testing.assert_allclose(update_ema(ema, params, 0.999, jnp.int32(0)), 0.9 * np.ones(3),
                             rtol=1e-6)
  # late: the configured decay.
  np.testing.assert_allclose(update_ema(ema, params, 0.999, jnp.int32(10**6)),
                             0.001 * np.ones(3), rtol=1e-4)
  np.testing.assert_allclose(update_ema(ema, params, 0.0, jnp.int32(5)), np.ones(3))
