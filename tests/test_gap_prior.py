"""Generative-Aware Prior and the BitDance flow objective (closed forms, causality, learning)."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unimm_jax.losses import diffusion
from unimm_jax.models.gap_prior import GAPPrior, GAPPriorConfig
from unimm_jax.nn.embeddings import timestep_embedding

TINY = GAPPriorConfig(latent_dim=16, width=32, depth=2, num_heads=2, head_width=32,
                      head_depth=2, head_adaln_blocks=1, noise_repeats=2)
GRID = (3, 4)  # not square, so a row-major / column-major mix-up would show


def _latents(seed: int, batch: int = 2) -> np.ndarray:
  """Random U_Q in {-1, +1}, (batch, *GRID, TINY.latent_dim) float32."""
  bits = np.random.default_rng(seed).integers(0, 2, (batch, *GRID, TINY.latent_dim))
  return (2 * bits - 1).astype(np.float32)


# Compiling dominates these tests, so every function is built once per config and shared, and
# without LLVM's optimisations (2-3x faster to compile; the tiny shapes run in microseconds).
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


@functools.cache
def _variables(config: GAPPriorConfig) -> dict:
  """Initial variables. The no-query tree is the query tree without `query` (the test of the
  switch checks this), so one init serves both and saves a compile."""
  with_query = dataclasses.replace(config, use_query_token=True)
  if config != with_query:
    params = dict(_variables(with_query)['params'])
    del params['query']
    return {'params': params}
  # RBG keys: threefry's per-parameter draws take longer to compile than the model itself.
  variables = _jit(GAPPrior(config).init)(
      {'params': jax.random.key(0, impl='unsafe_rbg'), 'noise': jax.random.key(1)}, _latents(0))
  return nn.unbox(variables)


@functools.cache
def _features_fn(config: GAPPriorConfig):
  """jitted (variables, latents) -> (conditions, targets)."""
  return _jit(functools.partial(GAPPrior(config).apply, method=GAPPrior.features))


OPTIMIZER = optax.adam(3e-3)


@functools.cache
def _step_fn(config: GAPPriorConfig):
  """One jitted Adam step that also reports what the tests read, so one compile serves them:
  (params, opt_state, latents, key) -> (new params, new opt_state, loss at `params`, metrics,
  d loss / d latents)."""
  model = GAPPrior(config)

  def step(params, opt_state, latents, key):
    loss_fn = lambda p, x: model.apply({'params': p}, x, rngs={'noise': key})
    (loss, metrics), (grads, latent_grad) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, latents)
    updates, opt_state = OPTIMIZER.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, metrics, latent_grad

  return _jit(step)


@functools.cache
def _latent_grad_fn(config: GAPPriorConfig):
  """jitted (latents, params, key) -> d loss / d latents."""
  model = GAPPrior(config)
  return _jit(jax.grad(lambda x, p, k: model.apply({'params': p}, x, rngs={'noise': k})[0]))


# ----------------------------------------------------------------------------- objective

def test_logit_normal_t_is_sigmoid_of_a_gaussian():
  key = jax.random.key(7)
  t = diffusion.sample_logit_normal_t(key, (200_000,))
  np.testing.assert_allclose(t, jax.nn.sigmoid(-0.8 + 0.8 * jax.random.normal(key, (200_000,))),
                             rtol=1e-6)
  logit = np.log(np.asarray(t, np.float64) / (1 - np.asarray(t, np.float64)))
  assert abs(logit.mean() + 0.8) < 0.01 and abs(logit.std() - 0.8) < 0.01
  assert t.dtype == jnp.float32 and 0 < float(t.min()) and float(t.max()) < 1


def test_flow_interpolate_and_velocity_closed_form():
  x = jnp.array([[1.0, -1.0, 1.0]])
  eps = jnp.array([[0.5, 2.0, -1.5]])
  np.testing.assert_allclose(diffusion.flow_interpolate(x, eps, 0.0), eps)
  np.testing.assert_allclose(diffusion.flow_interpolate(x, eps, 1.0), x)
  np.testing.assert_allclose(diffusion.flow_interpolate(x, eps, 0.25),
                             [[0.625, 1.25, -0.875]], rtol=1e-6)
  # Below the clamp the velocity of the target is exactly x - eps, whatever t.
  for t in (0.1, 0.5, 0.95):
    z = diffusion.flow_interpolate(x, eps, t)
    np.testing.assert_allclose(diffusion.velocity(x, z, t), x - eps, rtol=1e-5, atol=1e-6)
  # Above it the denominator is 0.05: (1 - t)(x - eps) / 0.05.
  z = diffusion.flow_interpolate(x, eps, 0.99)
  np.testing.assert_allclose(diffusion.velocity(x, z, 0.99), 0.2 * (x - eps), rtol=1e-4)
  # t per row, broadcast over channels.
  t = jnp.array([[0.5], [0.99]])
  xs, zs = jnp.ones((2, 3)), jnp.zeros((2, 3))
  np.testing.assert_allclose(diffusion.velocity(xs, zs, t), [[2.0] * 3, [20.0] * 3], rtol=1e-5)


def test_x_prediction_velocity_loss_closed_form():
  x = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
  z = jnp.array([[0.3, -0.2], [0.7, 0.1]])
  t = jnp.array([[0.5], [0.99]])
  pred = x + jnp.array([[0.1, -0.1], [0.2, 0.0]])
  # v_pred - v = (pred - x) / max(1 - t, 0.05): row 0 / 0.5, row 1 / 0.05.
  expected = np.mean([(0.1 / 0.5) ** 2, (0.1 / 0.5) ** 2, (0.2 / 0.05) ** 2, 0.0])
  np.testing.assert_allclose(diffusion.x_prediction_velocity_loss(pred, x, z, t), expected,
                             rtol=1e-5)
  assert float(diffusion.x_prediction_velocity_loss(x, x, z, t)) == 0.0


def test_timestep_embedding_closed_form():
  emb = timestep_embedding(jnp.array([0.0, 0.25]), dim=8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
  args = 250.0 * 10000.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(args), np.sin(args)]), atol=2e-4)


# ----------------------------------------------------------------------------- prior

def test_paper_preset_has_bitdance_t_size():
  config = GAPPriorConfig.paper()
  assert config.latent_dim == 16 * 8 and config.use_query_token
  shapes = jax.eval_shape(lambda: GAPPrior(config).init(
      {'params': jax.random.key(0), 'noise': jax.random.key(1)}, jnp.zeros((1, 8, 8, 128))))
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.unbox(shapes)['params']))
  print(f'GAP prior (paper preset) parameters: {count:,}')
  assert abs(count - 8.6e6) / 8.6e6 < 0.1


def test_params_carry_logical_axis_names():
  variables = jax.eval_shape(lambda: GAPPrior(TINY).init(
      {'params': jax.random.key(0), 'noise': jax.random.key(1)}, _latents(0)))
  boxed = jax.tree.leaves(variables['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed and all(isinstance(p, nn.Partitioned) for p in boxed)
  assert all(len(p.names) == p.value.ndim for p in boxed)


@pytest.mark.parametrize('use_query', [True, False])
def test_features_are_causal(use_query):
  config = dataclasses.replace(TINY, use_query_token=use_query)
  latents = _latents(1)
  n = GRID[0] * GRID[1]
  flat = latents.reshape(2, n, -1)
  cuts = (1, 5, n - 1)
  # The original and one copy per cut with every token from the cut on flipped, in one batch.
  flipped = [np.concatenate([flat[:, :j], -flat[:, j:]], axis=1) for j in cuts]
  batch = np.concatenate([flat] + flipped).reshape(-1, *latents.shape[1:])
  cond, targets = _features_fn(config)(_variables(config), batch)
  offset = 0 if use_query else 1  # row r of cond is the condition for target U_B[r + offset]
  assert cond.shape == (2 * (1 + len(cuts)), n - offset, config.width)
  np.testing.assert_array_equal(targets[:2], flat[:, offset:])
  target_index = np.arange(n - offset) + offset
  for i, j in enumerate(cuts, start=1):
    changed = cond[2 * i:2 * i + 2]
    same, after = target_index <= j, target_index > j
    np.testing.assert_allclose(changed[:, same], cond[:2, same], atol=1e-6)
    if after.any():  # the check can see a dependence where one is allowed
      assert float(jnp.abs(changed[:, after] - cond[:2, after]).max()) > 1e-3


def test_query_switch_changes_params():
  def param_shapes(config):
    variables = jax.eval_shape(lambda: GAPPrior(config).init(
        {'params': jax.random.key(0), 'noise': jax.random.key(1)}, _latents(0)))
    return nn.unbox(variables)['params']

  with_query = param_shapes(TINY)
  without = param_shapes(dataclasses.replace(TINY, use_query_token=False))
  assert with_query['query'].shape == (TINY.width,)
  assert set(with_query) - set(without) == {'query'}
  assert set(without) < set(with_query)


@pytest.fixture(scope='module')
def trained():
  """20 Adam steps on one fixed random binary latent, fresh (t, eps) every step.

  Returns (latents, evaluate, initial params, trained params, per-step losses), where
  evaluate(params, key) -> (loss, metrics, d loss / d latents).
  """
  latents = _latents(3)
  step = _step_fn(TINY)
  initial = _variables(TINY)['params']
  opt_state = OPTIMIZER.init(initial)

  def evaluate(params, key):
    return step(params, opt_state, latents, key)[2:]

  params, losses = initial, []
  for i in range(20):
    params, opt_state, loss, _, _ = step(params, opt_state, latents, jax.random.key(100 + i))
    losses.append(float(loss))
  return latents, evaluate, initial, params, losses


def test_prior_learns_a_fixed_latent(trained):
  _, evaluate, initial, final, losses = trained
  assert np.all(np.isfinite(losses))
  # The same (t, eps) draws before and after, averaged over a few keys to steady the estimate.
  keys = [jax.random.key(9000 + i) for i in range(4)]
  before = np.mean([float(evaluate(initial, k)[0]) for k in keys])
  after = np.mean([float(evaluate(final, k)[0]) for k in keys])
  print(f'GAP loss: {before:.4f} -> {after:.4f}; per step {np.round(losses, 3).tolist()}')
  assert after < 0.7 * before
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  assert 0.5 < float(evaluate(final, keys[0])[1]['bit_accuracy']) <= 1.0


def test_gradient_reaches_the_tokenizer_latents(trained):
  latents, evaluate, _, params, _ = trained
  grad = evaluate(params, jax.random.key(5))[2]
  per_token = jnp.abs(grad).reshape(grad.shape[0], -1, grad.shape[-1]).sum(axis=(0, 2))
  assert bool(jnp.all(per_token > 0))
  # Without the query U_B[0] is never a target: its gradient can only come through the
  # transformer's input, so this checks the conditioning path on its own. The zero-initialised
  # head layers would block it at init, so every parameter gets a small random offset first
  # (in numpy: eager jax ops would compile once per shape).
  config = dataclasses.replace(TINY, use_query_token=False)
  rng = np.random.default_rng(11)
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32),
                        _variables(config)['params'])
  grad = _latent_grad_fn(config)(latents, params, jax.random.key(5))
  assert float(jnp.abs(grad.reshape(grad.shape[0], -1, grad.shape[-1])[:, 0]).max()) > 0
