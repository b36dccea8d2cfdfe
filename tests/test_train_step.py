"""The jitted train step in-process: NaN steps are skipped and reported, EMA warms up."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_config_and_mesh import load_config
from unimm_jax.train import trainer
from unimm_jax.train.train_state import update_ema


# XLA without its backend optimisations: the same results, a third of the compile time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _compiled_step(setup, state, batch):
  with setup.activate():
    return setup.compile_train_step().lower(state, setup.frozen, batch, setup.train_rng).compile(
        compiler_options=_FAST_COMPILE)


@pytest.fixture(scope="module")
def tiny_setup():
  setup = trainer.Setup(load_config("tiny"))
  return setup, _compiled_step(setup, setup.init_state(_FAST_COMPILE), _batch(setup))


def _batch(setup, value=None):
  size = setup.config.data.image_size
  images = np.random.default_rng(0).uniform(-1, 1, (8, size, size, 3)).astype(np.float32)
  if value is not None:
    images[0, 0, 0, 0] = value
  return {"image": setup.global_images(images, host_local=True)}


def test_nan_batch_is_skipped_and_counted(tiny_setup):
  setup, train_step = tiny_setup
  state = setup.init_state(_FAST_COMPILE)
  before = jax.device_get(state.params)
  with setup.activate():
    state, metrics = train_step(state, setup.frozen, _batch(setup, np.nan), setup.train_rng)
  assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 1 and int(state.nonfinite_steps) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  with setup.activate():
    state, metrics = train_step(state, setup.frozen, _batch(setup), setup.train_rng)
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


def test_gan_step_with_adaptive_weight_and_perceptual_loss():
  config = load_config("tiny,gan")
  config.disc.adaptive = True
  config.loss.perceptual = 1.0
  config.lpips.allow_random = True
  setup = trainer.Setup(config)
  state = setup.init_state(_FAST_COMPILE)
  batch = _batch(setup)
  with setup.activate():
    new_state, metrics = _compiled_step(setup, state, batch)(
        jax.tree.map(jnp.copy, state), setup.frozen, batch, setup.train_rng)
  for key in ("gan", "perceptual", "gan_adaptive_weight", "disc/d_loss", "disc/lecam"):
    assert np.isfinite(float(metrics[key])), key
  # The adaptive weight is the VQGAN rule on the decoder's last kernel, computed here from
  # separate gradients of the reconstruction-side loss and of the GAN term.
  task, images = setup.task, batch["image"]
  rng = jax.random.fold_in(setup.train_rng, state.step)
  @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
  def last_layer_grads(params):
    grad_of = lambda i: jax.grad(
        lambda p: task._losses(p, None, state, setup.frozen, images, rng)[0][i])(params)
    return [g["decoder"]["conv_out"]["kernel"] for g in (grad_of(0), grad_of(1))]
  with setup.activate():
    g_nll, g_gan = last_layer_grads(state.params)
  expected = np.linalg.norm(g_nll) / (np.linalg.norm(g_gan) + 1e-4)
  np.testing.assert_allclose(float(metrics["gan_adaptive_weight"]), expected, rtol=1e-4)
  # The discriminator and its LeCAM EMAs moved.
  disc_before, disc_after = (jax.device_get(state.discriminator),
                             jax.device_get(new_state.discriminator))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), disc_before.params,
                       disc_after.params)
  assert all(jax.tree.leaves(moved))
  assert float(disc_after.lecam.real) != 0.0
