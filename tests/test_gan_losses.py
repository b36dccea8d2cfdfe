"""GAN losses against values worked out by hand from their definitions."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.losses import gan

# Chosen so every hinge term is a small exact number.
REAL = jnp.array([2.0, 0.5, -1.0, 0.0])  # relu(1 - r) = [0, 0.5, 2, 1], mean 0.875
FAKE = jnp.array([-2.0, 0.0, 1.0, 0.5])  # relu(1 + f) = [0, 1, 2, 1.5], mean 1.125
LN3 = math.log(3.0)


def test_hinge_d_loss():
  loss = gan.hinge_d_loss(REAL, FAKE)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, 0.5 * (0.875 + 1.125), rtol=1e-6)


def test_hinge_d_loss_accepts_patch_maps_and_bf16():
  real = REAL.reshape(2, 1, 2, 1).astype(jnp.bfloat16)
  fake = FAKE.reshape(2, 1, 2, 1).astype(jnp.bfloat16)
  loss = gan.hinge_d_loss(real, fake)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_hinge_g_loss():
  np.testing.assert_allclose(gan.hinge_g_loss(FAKE), 0.125, rtol=1e-6)  # -(-0.5 / 4)


def test_non_saturating_losses():
  # softplus(0) = ln 2, softplus(-ln 3) = ln(4/3); each mean is (ln 2 + ln 4/3) / 2 = ln(8/3) / 2.
  real = jnp.array([0.0, LN3])
  fake = jnp.array([0.0, -LN3])
  half_ln = math.log(8.0 / 3.0) / 2.0
  np.testing.assert_allclose(gan.non_saturating_d_loss(real, fake), 0.5 * (2 * half_ln),
                             rtol=1e-6)
  np.testing.assert_allclose(gan.non_saturating_g_loss(real), half_ln, rtol=1e-6)


def test_non_saturating_losses_average_patches_first():
  # Image 0 patches [0, 2] (mean 1), image 1 patches [-ln 3, ln 3] (mean 0).
  logits = jnp.array([[0.0, 2.0], [-LN3, LN3]]).reshape(2, 1, 2, 1)
  sp = lambda x: math.log1p(math.exp(x))
  np.testing.assert_allclose(gan.non_saturating_g_loss(logits, average_patches_first=True),
                             (sp(-1.0) + sp(0.0)) / 2, rtol=1e-6)
  # Elementwise instead: softplus(-0), softplus(-2), softplus(ln 3), softplus(-ln 3).
  np.testing.assert_allclose(gan.non_saturating_g_loss(logits),
                             (sp(0.0) + sp(-2.0) + sp(LN3) + sp(-LN3)) / 4, rtol=1e-6)
  d = gan.non_saturating_d_loss(logits, -logits, average_patches_first=True)
  np.testing.assert_allclose(d, 0.5 * ((sp(-1.0) + sp(0.0)) / 2 + (sp(-1.0) + sp(0.0)) / 2),
                             rtol=1e-6)


def test_lecam_regularizer():
  # relu(real - 0)^2 = [1, 9] -> 5; relu(2 - fake)^2 = [9, 0] -> 4.5.
  reg = gan.lecam_regularizer(jnp.array([1.0, 3.0]), jnp.array([-1.0, 2.0]), 2.0, 0.0)
  np.testing.assert_allclose(reg, 9.5, rtol=1e-6)
  assert reg.dtype == jnp.float32


def test_lecam_regularizer_treats_emas_as_constants():
  grads = jax.grad(lambda e: gan.lecam_regularizer(jnp.array([1.0]), jnp.array([-1.0]), e, e))(
      0.5)
  assert grads == 0.0


def test_lecam_ema_update():
  ema = gan.LeCamEma(real=jnp.float32(1.0), fake=jnp.float32(-1.0))
  new = gan.update_lecam_ema(ema, jnp.array([2.0, 4.0]), jnp.array([[-2.0], [-4.0]]), decay=0.9)
  np.testing.assert_allclose(new.real, 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6)
  np.testing.assert_allclose(new.fake, 0.9 * -1.0 + 0.1 * -3.0, rtol=1e-6)
  init = gan.LeCamEma.initial()
  assert init.real == 0.0 and init.fake == 0.0 and init.real.dtype == jnp.float32
  first = gan.update_lecam_ema(init, jnp.full((2, 3, 3, 1), 2.0), jnp.full((2, 3, 3, 1), -1.0))
  np.testing.assert_allclose(first.real, 0.001 * 2.0, rtol=1e-5)
  np.testing.assert_allclose(first.fake, 0.001 * -1.0, rtol=1e-5)


def test_lecam_ema_is_a_pytree_and_updates_under_jit():
  step = jax.jit(gan.update_lecam_ema)
  ema = gan.LeCamEma.initial()
  for _ in range(3):
    ema = step(ema, jnp.ones((2, 2)), -jnp.ones((2, 2)))
  np.testing.assert_allclose(ema.real, 1.0 - 0.999 ** 3, rtol=1e-5)
  np.testing.assert_allclose(ema.fake, -(1.0 - 0.999 ** 3), rtol=1e-5)


def test_r1_penalty_linear_discriminator():
  """D(x) = <w, x> + b per image: the gradient is w for every image, so R1 = ||w||^2."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((4, 4, 3)), jnp.float32)
  images = jnp.asarray(rng.standard_normal((5, 4, 4, 3)), jnp.float32)
  disc = lambda x: jnp.sum(x * w, axis=(1, 2, 3))[:, None] + 0.3
  np.testing.assert_allclose(gan.r1_penalty(disc, images), jnp.sum(w ** 2), rtol=1e-5)


def test_r1_penalty_quadratic_discriminator_and_patch_logits():
  """D(x) = x^2 per pixel as a patch map: grad = 2x, R1 = mean_b 4 * sum(x_b^2)."""
  images = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 2, 1)), jnp.float32)
  expected = np.mean(4.0 * np.sum(np.asarray(images) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(gan.r1_penalty(lambda x: x ** 2, images), expected, rtol=1e-5)


def test_r1_penalty_matches_finite_differences():
  """A nonlinear per-image D: central differences of D along each pixel give the gradient."""
  x = np.random.default_rng(2).standard_normal((2, 2, 2, 1))
  disc = lambda v: jnp.sum(jnp.tanh(v) * jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1),
                           axis=(1, 2, 3))
  eps, grads = 1e-3, np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    plus, minus = x.copy(), x.copy()
    plus[idx] += eps
    minus[idx] -= eps
    grads[idx] = (np.sum(disc(jnp.asarray(plus, jnp.float32)))
                  - np.sum(disc(jnp.asarray(minus, jnp.float32)))) / (2 * eps)
  expected = np.mean(np.sum(grads ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(gan.r1_penalty(disc, jnp.asarray(x, jnp.float32)), expected,
                             rtol=2e-3)


def test_adaptive_generator_weight():
  rng = np.random.default_rng(3)
  a = rng.standard_normal((3, 3, 8, 3)).astype(np.float32)
  b = rng.standard_normal((3, 3, 8, 3)).astype(np.float32) * 0.1
  expected = np.linalg.norm(a) / (np.linalg.norm(b) + 1e-4)
  np.testing.assert_allclose(gan.adaptive_generator_weight(a, b), expected, rtol=1e-5)
  # A pytree (kernel and bias) uses the global norm.
  tree = gan.adaptive_generator_weight({'k': a, 'b': a[0, 0, 0]}, {'k': b, 'b': b[0, 0, 0]})
  expected_tree = (np.sqrt(np.sum(a ** 2) + np.sum(a[0, 0, 0] ** 2))
                   / (np.sqrt(np.sum(b ** 2) + np.sum(b[0, 0, 0] ** 2)) + 1e-4))
  np.testing.assert_allclose(tree, expected_tree, rtol=1e-5)


def test_adaptive_generator_weight_clips_and_stops_gradient():
  big = jnp.full((4,), 10.0)
  np.testing.assert_allclose(gan.adaptive_generator_weight(big, jnp.zeros(4)), 1e4)
  np.testing.assert_allclose(gan.adaptive_generator_weight(big, jnp.zeros(4), 50.0), 50.0)
  grad = jax.grad(lambda s: gan.adaptive_generator_weight(s * big, big))(1.0)
  assert grad == 0.0


@pytest.mark.parametrize('step, expected', [(0, 0.0), (19_999, 0.0), (20_000, 1.0),
                                            (20_001, 1.0)])
def test_disc_factor_at_with_traced_step(step, expected):
  factor = jax.jit(gan.disc_factor_at, static_argnums=1)(jnp.int32(step), 20_000)
  assert factor.dtype == jnp.float32 and factor == expected
  assert gan.disc_factor_at(step, 0) == 1.0
