"""Shared layers against references written from their definitions (numpy, or torch ops)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.nn.attention import MultiHeadAttention
from unimm_jax.nn.conv_blocks import Downsample, ResBlock, Upsampler, depth_to_space
from unimm_jax.nn.mlp import SwiGLU, swiglu_hidden_dim
from unimm_jax.nn.norms import AdaptiveGroupNorm, GroupNorm, RMSNorm, num_groups_for
from unimm_jax.nn.rope import GridPositions, apply_rope, grid_positions, rope_2d_angles
from unimm_jax.nn.transformer import GridTransformer, TransformerStack

RNG = np.random.default_rng(0)


def _randn(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def _init_apply(module, *args):
  """Initialises and applies under jit: one compile beats dispatching every op eagerly."""
  variables = jax.jit(module.init)(jax.random.key(0), *args)
  return nn.unbox(variables)['params'], jax.jit(module.apply)(variables, *args)


# ----------------------------------------------------------------------------- RoPE


def _reference_positions(h, w, mode):
  """Loops over the grid using the formulas as written in SPECS."""
  out = []
  for row in range(h):
    for col in range(w):
      if mode == 'encoder':
        pos = [col * 7 / (w - 1) + 0.5, row * 7 / (h - 1) + 0.5]
      else:
        pos = [(col + 0.5) * 7.5 / (w - 0.5), (row + 0.5) * 7.5 / (h - 0.5)]
      out.append(pos)
  return np.array(out)


def _reference_rope(x, positions, num_registers):
  """x (s, heads, head_dim); rotates pair j by (x+1) f_j for j < D/4, else (y+1) f_{j-D/4}."""
  s, heads, head_dim = x.shape
  quarter, half = head_dim // 4, head_dim // 2
  out = np.array(x, np.float64)
  for t in range(s):
    for j in range(half):
      if t < num_registers:
        continue  # position (0, 0): identity
      px, py = positions[t - num_registers]
      k = j if j < quarter else j - quarter
      coord = (px if j < quarter else py) + 1.0
      theta = coord / 10000 ** (2 * k / half)
      a, b = x[t, :, 2 * j], x[t, :, 2 * j + 1]
      out[t, :, 2 * j] = a * np.cos(theta) - b * np.sin(theta)
      out[t, :, 2 * j + 1] = b * np.cos(theta) + a * np.sin(theta)
  return out


@pytest.mark.parametrize('mode', ['encoder', 'decoder'])
def test_grid_positions_follow_the_formula(mode):
  got = grid_positions(3, 5, GridPositions(mode))
  np.testing.assert_allclose(got, _reference_positions(3, 5, mode), rtol=1e-6)
  assert got[0, 0] == pytest.approx(0.5 if mode == 'encoder' else 0.5 * 7.5 / 4.5)
  assert got[-1, 0] == pytest.approx(7.5)  # both formulas end at 7.5


def test_encoder_positions_on_a_single_row_are_finite():
  np.testing.assert_allclose(grid_positions(1, 1, GridPositions.ENCODER), [[0.5, 0.5]])


@pytest.mark.parametrize('mode', ['encoder', 'decoder'])
def test_rope_matches_reference(mode):
  h, w, registers, heads, head_dim = 3, 4, 2, 2, 16
  positions = grid_positions(h, w, GridPositions(mode))
  angles = rope_2d_angles(positions, head_dim, num_prefix=registers)
  x = _randn(1, registers + h * w, heads, head_dim)
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(angles)))[0]
  want = _reference_rope(x[0], _reference_positions(h, w, mode), registers)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[:registers], x[0, :registers])


def test_rope_preserves_norms_and_is_relative():
  head_dim = 16
  q, k = _randn(1, 1, 1, head_dim), _randn(1, 1, 1, head_dim)
  pos = np.array([[1.3, 4.0], [6.2, 0.7]])

  def score(positions):
    angles = jnp.asarray(rope_2d_angles(positions, head_dim))
    rq = apply_rope(jnp.asarray(q), angles[:1])
    rk = apply_rope(jnp.asarray(k), angles[1:])
    np.testing.assert_allclose(np.linalg.norm(rq), np.linalg.norm(q), rtol=1e-5)
    return float(jnp.sum(rq * rk))

  shifted = pos + np.array([2.5, -0.4])
  assert score(pos) == pytest.approx(score(shifted), rel=1e-4, abs=1e-5)
  assert score(pos) != pytest.approx(score(pos * np.array([1.0, 2.0])), rel=1e-3)


def test_rope_rejects_head_dim_not_multiple_of_4():
  with pytest.raises(ValueError, match='divisible by 4'):
    rope_2d_angles(np.zeros((1, 2)), 6)


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize('channels,groups',
                         [(16, 16), (24, 24), (32, 32), (48, 24), (128, 32), (1024, 32)])
def test_num_groups_for(channels, groups):
  assert num_groups_for(channels) == groups


def _reference_group_norm(x, groups, eps=1e-6):
  b, h, w, c = x.shape
  xg = x.astype(np.float64).reshape(b, h, w, groups, c // groups)  # contiguous channel groups
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = xg.var(axis=(1, 2, 4), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)


def test_rms_norm_matches_numpy():
  x = _randn(2, 5, 8)
  params, got = _init_apply(RMSNorm(), jnp.asarray(x))
  want = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(got, want * params['scale'], rtol=1e-5)


def test_group_norm_matches_numpy():
  x = _randn(2, 4, 3, 64) * 3 + 1
  _, got = _init_apply(GroupNorm(), jnp.asarray(x))
  np.testing.assert_allclose(got, _reference_group_norm(x, 32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('channels', [16, 64])
def test_adaptive_group_norm_matches_numpy(channels):
  x = _randn(2, 6, 6, channels) * 2 + 0.5
  z = np.sign(_randn(2, 3, 3, 8))
  module = AdaptiveGroupNorm()
  variables = nn.unbox(jax.jit(module.init)(jax.random.key(0), x, z))
  # Non-zero biases so that both Dense layers are fully exercised.
  ramp = lambda p: 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) / p.size
  params = jax.tree.map(lambda p: p + ramp(p), variables['params'])
  got = jax.jit(module.apply)({'params': params}, x, z)
  mean = z.mean(axis=(1, 2))
  std = np.sqrt(z.var(axis=(1, 2), ddof=1) + 1e-6)  # unbiased, as torch's .var()
  scale = std @ params['gamma']['kernel'] + params['gamma']['bias']
  bias = mean @ params['beta']['kernel'] + params['beta']['bias']
  normed = _reference_group_norm(x, num_groups_for(channels))
  want = scale[:, None, None] * normed + bias[:, None, None]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- MLP / attention


@pytest.mark.parametrize('dim,hidden', [(32, 256), (128, 512), (1024, 2816)])
def test_swiglu_hidden_dim(dim, hidden):
  assert swiglu_hidden_dim(dim) == hidden


def test_swiglu_matches_numpy():
  x = _randn(2, 3, 16)
  params, got = _init_apply(SwiGLU(hidden_dim=32), jnp.asarray(x))
  w1, w2 = params['w1'], params['w2']['kernel']
  gate, up = x @ w1[:, 0], x @ w1[:, 1]
  want = (gate / (1 + np.exp(-gate)) * up) @ w2
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_matches_numpy_with_rope():
  b, s, heads, head_dim = 2, 5, 2, 8
  x = _randn(b, s, heads * head_dim)
  angles = jnp.asarray(rope_2d_angles(grid_positions(1, s - 1, GridPositions.DECODER), head_dim, 1))
  params, got = _init_apply(MultiHeadAttention(heads), jnp.asarray(x), None, angles)
  q, k, v = (np.einsum('bsd,dhk->bshk', x, params[n]) for n in ('query', 'key', 'value'))
  q, k = (np.asarray(apply_rope(jnp.asarray(t), angles)) for t in (q, k))
  logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(head_dim)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum('bhqs,bshk,hkd->bqd', p, v, params['out'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_remat_stack_is_the_same_function():
  x = jnp.asarray(_randn(2, 6, 16))
  plain, remat = TransformerStack(1, 2), TransformerStack(1, 2, remat=True)
  variables = jax.jit(plain.init)(jax.random.key(0), x)
  remat_shapes = jax.eval_shape(remat.init, jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(remat_shapes)
  grad = lambda m: jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, x) ** 2)))(variables)
  for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(remat))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_grid_transformer_keeps_grid_and_owns_registers():
  x = jnp.asarray(_randn(2, 3, 4, 16))
  params, got = _init_apply(GridTransformer(1, 2, 4, GridPositions.ENCODER), x)
  assert got.shape == x.shape
  assert params['registers'].shape == (4, 16)


# ----------------------------------------------------------------------------- conv blocks


def _reference_depth_to_space(x, s):
  b, h, w, c = x.shape
  cp = c // (s * s)
  out = np.zeros((b, h * s, w * s, cp), x.dtype)
  for i in range(s):
    for j in range(s):
      for k in range(cp):
        out[:, i::s, j::s, k] = x[..., (i * s + j) * cp + k]
  return out


def test_depth_to_space_is_dcr():
  x = _randn(2, 3, 4, 12)
  np.testing.assert_array_equal(depth_to_space(jnp.asarray(x), 2), _reference_depth_to_space(x, 2))


@pytest.mark.parity
def test_depth_to_space_against_torch_pixel_shuffle():
  torch = pytest.importorskip('torch')
  x = _randn(2, 3, 4, 12)
  cp = 3
  # pixel_shuffle is CRD (input channel k*4 + i*2 + j); reorder DCR channels into that layout.
  crd = np.stack([x[..., (i * 2 + j) * cp + k]
                  for k in range(cp) for i in range(2) for j in range(2)], -1)
  want = torch.nn.functional.pixel_shuffle(torch.from_numpy(crd).permute(0, 3, 1, 2), 2)
  np.testing.assert_array_equal(depth_to_space(jnp.asarray(x), 2), want.permute(0, 2, 3, 1).numpy())


def _perturbed_init(module, x):
  """Initial parameters plus noise, so norm scales and biases are not the trivial 1 and 0."""
  params = nn.unbox(jax.jit(module.init)(jax.random.key(0), x))['params']
  rng = np.random.default_rng(1)
  noise = lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype)
  return jax.tree.map(lambda p: p + noise(p), params)


def _nchw(torch, a):
  return torch.tensor(np.asarray(a)).permute(0, 3, 1, 2)


def _torch_conv(torch, t, kernel, bias=None, stride=1):
  """NCHW conv with a flax HWIO kernel, PyTorch's symmetric padding of k // 2."""
  weight = torch.tensor(np.asarray(kernel)).permute(3, 2, 0, 1)  # HWIO -> OIHW
  bias = None if bias is None else torch.tensor(np.asarray(bias))
  return torch.nn.functional.conv2d(t, weight, bias, stride=stride, padding=kernel.shape[0] // 2)


@pytest.mark.parity
def test_res_block_against_torch_ops():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  x = _randn(2, 6, 6, 32)
  module = ResBlock(64)
  params = _perturbed_init(module, x)
  assert set(params) == {'norm1', 'norm2', 'conv1', 'conv2', 'nin_shortcut'}
  got = jax.jit(module.apply)({'params': params}, x)

  def norm_swish(t, p):
    weight, bias = (torch.tensor(np.asarray(p['norm'][n])) for n in ('scale', 'bias'))
    return F.silu(F.group_norm(t, 32, weight, bias, eps=1e-6))

  t = _nchw(torch, x)
  y = _torch_conv(torch, norm_swish(t, params['norm1']), params['conv1']['kernel'])
  y = _torch_conv(torch, norm_swish(y, params['norm2']), params['conv2']['kernel'])
  want = y + _torch_conv(torch, t, params['nin_shortcut']['kernel'])
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
  assert 'nin_shortcut' not in jax.eval_shape(ResBlock(32).init, jax.random.key(0), x)['params']


@pytest.mark.parity
def test_downsample_pads_symmetrically_like_torch():
  torch = pytest.importorskip('torch')
  x = _randn(2, 8, 8, 4)
  module = Downsample(6)
  params = _perturbed_init(module, x)
  got = jax.jit(module.apply)({'params': params}, x)
  assert got.shape == (2, 4, 4, 6)
  want = _torch_conv(torch, _nchw(torch, x), params['conv']['kernel'], params['conv']['bias'],
                     stride=2)
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)


def test_upsampler_shapes():
  params, got = _init_apply(Upsampler(), jnp.asarray(_randn(1, 3, 5, 8)))
  assert got.shape == (1, 6, 10, 8)
  assert params['conv1']['kernel'].shape == (3, 3, 8, 32)


def test_cross_attention_with_bias_and_key_mask_matches_numpy():
  b, t, s, heads, head_dim = 2, 3, 5, 2, 4
  x, kv = _randn(b, t, heads * head_dim), _randn(b, s, heads * head_dim)
  key_mask = np.array([[True] * 5, [True, True, True, False, False]])
  module = MultiHeadAttention(heads, qkv_bias=True, out_bias=True)
  variables = module.init(jax.random.key(0), jnp.asarray(x), jnp.asarray(kv))
  params = jax.tree.map(lambda p: p + 0.1 * _randn(*p.shape), nn.unbox(variables)['params'])
  got = module.apply({'params': params}, jnp.asarray(x), jnp.asarray(kv), None,
                     jnp.asarray(key_mask))
  q = np.einsum('btd,dhk->bthk', x, params['query']) + params['query_bias']
  k = np.einsum('bsd,dhk->bshk', kv, params['key']) + params['key_bias']
  v = np.einsum('bsd,dhk->bshk', kv, params['value']) + params['value_bias']
  logits = np.einsum('bthk,bshk->bhts', q, k) / np.sqrt(head_dim)
  logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum('bhts,bshk,hkd->btd', p, v, params['out']) + params['out_bias']
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
