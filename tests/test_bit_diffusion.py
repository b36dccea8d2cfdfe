"""BitDance's binary diffusion head, loss and sampler against closed forms, and the class-to-
image transformer's block-causal cached steps against its full run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.losses import diffusion
from unimm_jax.models import bit_diffusion
from unimm_jax.models import bitdance
from unimm_jax.nn import masks


def test_sampler_draws_the_gaussian_the_exact_denoiser_implies():
  # Data x ~ N(mu, sigma^2); z_t = (1 - t) eps + t x, so E[x | z_t] is linear in z_t. The
  # SDE integrated to t = 0.95 then the final Euler step returns E[x | z_0.95], whose spread
  # is sigma^2 * t^2 sigma^2 / (t^2 sigma^2 + (1 - t)^2) at t = 0.95.
  mu, sigma = 0.3, 0.5

  def denoise(z, t, cond):
    del cond
    t = t[..., None]
    return mu + t * sigma ** 2 * (z - t * mu) / (t ** 2 * sigma ** 2 + (1 - t) ** 2)

  velocity = bit_diffusion.guided_velocity(denoise, jnp.zeros((20000, 1, 1)), None)
  x = jax.jit(lambda k: bit_diffusion.euler_maruyama(velocity, k, (20000, 1, 1),
                                                     num_steps=200))(jax.random.key(0))
  t = 0.95
  expected_std = sigma * np.sqrt(t ** 2 * sigma ** 2 / (t ** 2 * sigma ** 2 + (1 - t) ** 2))
  assert abs(float(x.mean()) - mu) < 0.02
  assert abs(float(x.std()) - expected_std) < 0.02


def test_exact_predictor_lands_on_the_data_after_the_last_euler_step():
  target = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], (3, 4, 5)), jnp.float32)
  velocity = bit_diffusion.guided_velocity(lambda z, t, c: jnp.broadcast_to(target, z.shape),
                                           jnp.zeros((3, 4, 1)), None)
  x = bit_diffusion.euler_maruyama(velocity, jax.random.key(1), target.shape, num_steps=7,
                                   shift=3.0)
  np.testing.assert_allclose(x, target, atol=1e-5)


def test_guidance_combines_the_velocities_and_scale_one_is_conditional():
  def denoise(z, t, cond):  # x_hat = the condition's first channel, broadcast
    del t
    return jnp.broadcast_to(cond[..., :1], z.shape)

  z = jnp.full((2, 3, 4), 0.2)
  cond, uncond = jnp.full((2, 3, 1), 0.9), jnp.full((2, 3, 1), -0.5)
  t = jnp.float32(0.4)
  v_c = (0.9 - 0.2) / 0.6
  v_u = (-0.5 - 0.2) / 0.6
  got = bit_diffusion.guided_velocity(denoise, cond, uncond, 2.5)(z, t)
  np.testing.assert_allclose(got, v_u + 2.5 * (v_c - v_u), rtol=1e-5)
  one = bit_diffusion.guided_velocity(denoise, cond, uncond, 1.0)(z, t)
  np.testing.assert_allclose(one, bit_diffusion.guided_velocity(denoise, cond, None)(z, t),
                             rtol=1e-6)
  # Near t = 1 the velocity's denominator is clamped at 0.05.
  near_one = bit_diffusion.guided_velocity(denoise, cond, None)(z, jnp.float32(0.99))
  np.testing.assert_allclose(near_one, (0.9 - 0.2) / 0.05, rtol=1e-5)


def test_cfg_ramp():
  ramp = [float(bit_diffusion.cfg_scale_at(4.0, j, 8)) for j in range(8)]
  np.testing.assert_allclose(ramp, [1 + 3 * j / 8 for j in range(8)])
  assert float(bit_diffusion.cfg_scale_at(4.0, 5, 8, 'constant')) == 4.0
  assert float(bit_diffusion.cfg_scale_at(1.0, 5, 8)) == 1.0
  with pytest.raises(ValueError, match='cosine'):
    bit_diffusion.cfg_scale_at(4.0, 0, 8, 'cosine')


def test_bit_flips_and_time_shift():
  bits = jnp.ones((400, 500))
  flipped = diffusion.flip_bits(jax.random.key(0), bits, 0.1)
  assert set(np.unique(np.asarray(flipped))) <= {-1.0, 1.0}
  # P(flip) = E[0.1 u] = 0.05.
  assert abs(float(jnp.mean(flipped < 0)) - 0.05) < 0.003
  assert diffusion.flip_bits(jax.random.key(0), bits, 0.0) is bits
  t = jnp.array([0.0, 0.5, 1.0])
  np.testing.assert_allclose(diffusion.time_shift(t, 3.0), [0.0, 0.25, 1.0])
  np.testing.assert_allclose(diffusion.time_shift(t, 1.0), t)


def test_denoising_loss_closed_form_and_one_t_per_block():
  rng = np.random.default_rng(0)
  targets = jnp.asarray(rng.choice([-1.0, 1.0], (6, 4, 3)), jnp.float32)
  cond = jnp.zeros((6, 4, 2))
  seen = {}

  def zero(z, t, c):
    seen['t'] = t
    return jnp.zeros_like(z)

  loss, metrics = bit_diffusion.denoising_loss(zero, targets, cond, jax.random.key(3),
                                               repeats=2, t_per_row=True)
  t = seen['t']
  assert t.shape == (12, 4)
  np.testing.assert_array_equal(t, jnp.broadcast_to(t[:, :1], t.shape))  # one t per block
  # A zero estimate: v_pred - v = (0 - x) / max(1 - t, 0.05).
  x = jnp.tile(targets, (2, 1, 1))
  expected = jnp.mean(jnp.square(x / jnp.maximum(1 - t, 0.05)[..., None]))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert float(metrics['x_mse']) == pytest.approx(1.0)
  exact, _ = bit_diffusion.denoising_loss(lambda z, t, c: jnp.tile(targets, (2, 1, 1)),
                                          targets, cond, jax.random.key(3), repeats=2)
  assert float(exact) == 0.0


def _head_output(attention_heads):
  head = bit_diffusion.BitDiffusionHead(16, 2, 1, attention_heads=attention_heads)
  z = jax.random.normal(jax.random.key(0), (2, 4, 3))
  t, cond = jnp.full((2, 4), 0.3), jax.random.normal(jax.random.key(1), (2, 4, 5))
  params = head.init(jax.random.key(2), z, t, cond)
  # Zero-initialised adaLN and output layers make a fresh head constant: perturb every param.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(3), p.shape),
                        params)
  run = lambda z: head.apply(params, z, t, cond)
  return run, z


@pytest.mark.parametrize('attention_heads', [0, 2])
def test_parallel_head_mixes_a_block_and_serial_head_does_not(attention_heads):
  run, z = _head_output(attention_heads)
  base, changed = run(z), run(z.at[0, 0].add(1.0))
  assert np.all(np.abs(np.asarray(base)) < 1)  # 2 sigmoid - 1
  np.testing.assert_array_equal(changed[1], base[1])  # rows are independent
  others_moved = float(jnp.max(jnp.abs(changed[0, 1:] - base[0, 1:])))
  assert (others_moved > 1e-4) == bool(attention_heads)


TINY = dict(latent_dim=6, num_classes=5, width=32, depth=2, num_heads=2, class_tokens=3,
            head_depth=2, head_adaln_blocks=1, head_head_dim=16, noise_repeats=2)


def test_patch_order_of_a_4x4_grid():
  cfg = bitdance.BitDanceConfig(grid=(4, 4), parallel=4, **TINY)
  np.testing.assert_array_equal(cfg.sequence_cells(),
                                [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15])
  bits = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
  np.testing.assert_array_equal(bitdance.from_sequence(cfg, bitdance.to_sequence(cfg, bits)),
                                bits)
  # Class tokens causal, then blocks of 4 starting at the last class token.
  np.testing.assert_array_equal(cfg.mask_order(),
                                [0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5])


@pytest.mark.parametrize('parallel,order', [(4, 'patch'), (1, 'raster')])
def test_cached_block_steps_equal_the_full_block_causal_run(parallel, order):
  cfg = bitdance.BitDanceConfig(grid=(4, 4), parallel=parallel, order=order, **TINY)
  model = bitdance.BitDance(cfg)
  bits = jnp.sign(jax.random.normal(jax.random.key(0), (2, 4, 4, 6)))
  labels = jnp.array([1, 4])
  params = model.init({'params': jax.random.key(1), 'noise': jax.random.key(2)}, bits,
                      labels, train=False)['params']
  apply = lambda method, *a: model.apply({'params': params}, *a, method=method)
  tokens = bitdance.to_sequence(cfg, bits)
  p = parallel
  x = jnp.concatenate([apply(bitdance.BitDance.prefix, labels),
                       apply(bitdance.BitDance.connect, tokens[:, :-p])], axis=1)
  full, _ = apply(bitdance.BitDance.transformer, x)
  full = full[:, cfg.class_tokens - 1:]  # (b, hw, width): block j's states at [jp, (j+1)p)
  hidden, cache = apply(bitdance.BitDance.transformer, apply(bitdance.BitDance.prefix, labels),
                        0, bitdance.init_cache(cfg, 2))
  steps = [hidden[:, -p:]]
  for j in range(1, cfg.num_blocks):
    hidden, cache = apply(bitdance.BitDance.transformer,
                          apply(bitdance.BitDance.connect, tokens[:, (j - 1) * p:j * p]),
                          cfg.prefix_length + (j - 1) * p, cache)
    steps.append(hidden)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)
  # Block causality: changing block j's tokens leaves blocks <= j's conditions alone.
  j = cfg.num_blocks // 2
  changed = x.at[:, cfg.prefix_length + (j - 1) * p:].add(1.0)
  after, _ = apply(bitdance.BitDance.transformer, changed)
  after = after[:, cfg.class_tokens - 1:]
  np.testing.assert_allclose(after[:, :j * p], full[:, :j * p], atol=1e-6)
  assert float(jnp.max(jnp.abs(after[:, j * p:] - full[:, j * p:]))) > 1e-4


def test_sample_is_binary_deterministic_and_guided():
  cfg = bitdance.BitDanceConfig(grid=(2, 2), parallel=2, order='raster', **TINY)
  model = bitdance.BitDance(cfg)
  bits = jnp.ones((1, 2, 2, 6))
  params = model.init({'params': jax.random.key(1), 'noise': jax.random.key(2)}, bits,
                      jnp.array([0]), train=False)['params']
  params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(3), p.shape),
                        params)
  run = jax.jit(lambda labels, key, s: bitdance.sample(model, params, labels, key,
                                                       num_steps=4, cfg_scale=s,
                                                       cfg_schedule='constant'),
                static_argnums=2)
  labels = jnp.arange(8) % 5
  a, b = run(labels, jax.random.key(0), 1.0), run(labels, jax.random.key(0), 1.0)
  assert a.shape == (8, 2, 2, 6)
  assert set(np.unique(np.asarray(a))) <= {-1.0, 1.0}
  np.testing.assert_array_equal(a, b)
  guided = run(labels, jax.random.key(0), 6.0)
  assert not np.array_equal(guided, a)


def test_mask_order_is_the_block_causal_mask_with_a_causal_prefix():
  cfg = bitdance.BitDanceConfig(grid=(4, 4), parallel=4, **TINY)
  spec = masks.block_causal(1, cfg.sequence_length, 4, causal_prefix=cfg.class_tokens - 1)
  np.testing.assert_array_equal(cfg.mask_order(), spec.order[0])
