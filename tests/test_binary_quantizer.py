"""Group-wise binary quantizer against direct numpy enumeration and closed forms."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.quantizers.binary_quantizer import BinaryQuantizer, binary_sign, code_matrix

G, D = 3, 4  # groups, bits per group


def _quantize(u, groups=G, bits=D, temperature=0.01):
  """(quantized, codes, losses and stats in one dict)."""
  q = BinaryQuantizer(groups, bits, temperature)
  quantized, codes, losses, stats = jax.jit(lambda x: q.apply({}, x, True))(jnp.asarray(u))
  return quantized, codes, {**losses, **stats}


def _reference_entropies(u, groups, bits, temperature):
  """Enumerates the 2^d' sign vectors with itertools.product and evaluates the definitions."""
  codes = np.array(list(itertools.product([-1.0, 1.0], repeat=bits)))  # any fixed order works
  grouped = np.asarray(u, np.float64).reshape(-1, groups, bits)
  logits = 2.0 * grouped @ codes.T / temperature  # (n, g, 2^d')
  logits -= logits.max(-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(-1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    plogp = np.where(p > 0, p * np.log(p), 0.0)
  token = np.mean(-plogp.sum(-1))
  p_bar = p.reshape(-1, 2 ** bits).mean(0)
  codebook = -np.sum(p_bar * np.log(p_bar + 1e-5))
  commitment = np.mean((grouped - np.where(grouped > 0, 1.0, -1.0)) ** 2)
  return token, codebook, commitment


@pytest.mark.parametrize('temperature,scale', [(0.01, 0.01), (0.01, 1.0), (1.0, 1.0)])
def test_entropies_match_enumeration(temperature, scale):
  u = np.random.default_rng(1).standard_normal((2, 3, 5, G * D)).astype(np.float32) * scale
  _, _, aux = _quantize(u, temperature=temperature)
  token, codebook, commitment = _reference_entropies(u, G, D, temperature)
  np.testing.assert_allclose(aux['token_entropy'], token, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(aux['codebook_entropy'], codebook, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(aux['entropy'], token - codebook, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(aux['commitment'], commitment, rtol=1e-5)


def test_token_entropy_closed_form():
  """p over codes factorises into independent bits: p(bit_i = +1) = sigmoid(4 u_i / T)."""
  temperature = 0.5
  u = np.random.default_rng(2).standard_normal((4, 2, G * D)).astype(np.float32)
  _, _, aux = _quantize(u, temperature=temperature)
  p = 1.0 / (1.0 + np.exp(-4.0 * u.astype(np.float64) / temperature))
  bit_entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
  want = bit_entropy.reshape(-1, G, D).sum(-1).mean()
  np.testing.assert_allclose(aux['token_entropy'], want, rtol=1e-4)


def test_sign_of_zero_is_minus_one():
  signs = binary_sign(jnp.array([-0.5, 0.0, -0.0, 1e-30, 2.0]))
  np.testing.assert_array_equal(signs, [-1, -1, -1, 1, 1])
  quantized, codes, _ = _quantize(np.zeros((1, 1, 1, G * D), np.float32))
  np.testing.assert_array_equal(quantized, -np.ones((1, 1, 1, G * D)))
  np.testing.assert_array_equal(codes, np.zeros((1, 1, 1, G)))


def test_code_bit_order():
  """Channel g*d' + i is bit i (weight 2^i) of group g's code."""
  u = -np.ones((G * D, G * D), np.float32)
  np.fill_diagonal(u, 1.0)  # row r has only channel r positive
  _, codes, _ = _quantize(u.reshape(G * D, 1, 1, G * D))
  codes = np.asarray(codes).reshape(G * D, G)
  for channel in range(G * D):
    group, bit = divmod(channel, D)
    want = np.zeros(G, np.int32)
    want[group] = 2 ** bit
    np.testing.assert_array_equal(codes[channel], want)
  assert codes.dtype == np.int32


def test_code_matrix_rows_are_the_codes():
  m = np.asarray(code_matrix(D))
  assert m.shape == (BinaryQuantizer(G, D).codebook_size, D) == (2 ** D, D)
  np.testing.assert_array_equal(((m > 0) * 2 ** np.arange(D)).sum(-1), np.arange(2 ** D))


def test_codes_quantized_round_trip():
  q = BinaryQuantizer(G, D)
  every_code = np.arange(2 ** D)
  codes = np.stack([np.roll(every_code, g) for g in range(G)], -1).reshape(2, 2, 4, G)
  latents = q.apply({}, jnp.asarray(codes), method=BinaryQuantizer.codes_to_quantized)
  assert latents.shape == (2, 2, 4, G * D) and latents.dtype == jnp.float32
  quantized, codes_again, _ = _quantize(np.asarray(latents))
  np.testing.assert_array_equal(codes_again, codes)
  np.testing.assert_array_equal(quantized, latents)
  u = np.random.default_rng(3).standard_normal((2, 3, 3, G * D)).astype(np.float32)
  quantized, codes, _ = _quantize(u)
  from_codes = q.apply({}, codes, method=BinaryQuantizer.codes_to_quantized)
  np.testing.assert_array_equal(from_codes, quantized)
  np.testing.assert_array_equal(quantized, np.where(u > 0, 1.0, -1.0))


def test_straight_through_gradient_is_identity():
  q = BinaryQuantizer(G, D)
  u = jnp.asarray(np.random.default_rng(4).standard_normal((2, 2, 2, G * D)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(5).standard_normal(u.shape), jnp.float32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(w * q.apply({}, x, True)[0])))(u)
  np.testing.assert_allclose(grad, w, rtol=1e-6)


def test_statistics():
  rng = np.random.default_rng(6)
  u = rng.standard_normal((4, 5, 5, G * D)).astype(np.float32)
  u[..., :D] = np.abs(u[..., :D])  # group 0 always emits code 2^D - 1
  _, codes, aux = _quantize(u)
  codes = np.asarray(codes).reshape(-1, G)
  for g in range(G):
    counts = np.bincount(codes[:, g], minlength=2 ** D)
    freq = counts[counts > 0] / counts.sum()
    np.testing.assert_allclose(aux['code_usage'][g], np.mean(counts > 0), rtol=1e-6)
    perplexity = np.exp(-np.sum(freq * np.log(freq)))
    np.testing.assert_allclose(aux['code_perplexity'][g], perplexity, rtol=1e-5)
  assert aux['code_usage'][0] == pytest.approx(1 / 2 ** D)
  assert aux['code_perplexity'][0] == pytest.approx(1.0)
  signs = np.where(u > 0, 1.0, -1.0).reshape(-1, G, D)
  np.testing.assert_allclose(aux['bit_mean'], signs.mean(0), rtol=1e-6)
  assert aux['bit_mean'].shape == (G, D)


def test_bfloat16_inputs_use_float32_math():
  u = np.random.default_rng(7).standard_normal((2, 4, 4, G * D)).astype(np.float32) * 0.05
  u_bf16 = jnp.asarray(u, jnp.bfloat16)
  quantized, _, aux = _quantize(u_bf16)
  _, _, aux32 = _quantize(np.asarray(u_bf16.astype(jnp.float32)))
  assert quantized.dtype == jnp.float32
  for key in ('token_entropy', 'codebook_entropy', 'commitment'):
    assert aux[key].dtype == jnp.float32
    np.testing.assert_allclose(aux[key], aux32[key], rtol=1e-6)


def test_entropy_gradients_finite_at_the_paper_width():
  """16 groups x 8 bits (2^128 codes) with the 256-code matrix per group."""
  q = BinaryQuantizer(16, 8, 0.01)
  u = jnp.tanh(jnp.asarray(np.random.default_rng(8).standard_normal((2, 8, 8, 128)), jnp.float32))
  loss = lambda x: q.apply({}, x, True)[2]['entropy']
  value, grad = jax.jit(jax.value_and_grad(loss))(u)
  assert np.isfinite(value) and np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_codebook_entropy_ratio_weights_the_codebook_term():
  u = np.random.default_rng(5).normal(size=(3, G * D)).astype(np.float32)
  q = BinaryQuantizer(G, D, 0.01, codebook_entropy_ratio=0.25)
  _, _, losses, stats = q.apply({}, jnp.asarray(u), True)
  np.testing.assert_allclose(losses['entropy'],
                             stats['token_entropy'] - 0.25 * stats['codebook_entropy'], rtol=1e-6)
