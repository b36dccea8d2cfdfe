"""Resampling against torch.nn.functional.interpolate (float32, CPU, align_corners=False)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.nn.resize import (antialias_bilinear_weights, bicubic_matrix,
                                 resize_antialias_bilinear, resize_bicubic,
                                 resize_grid_to_shapes)

pytestmark = pytest.mark.parity

torch = pytest.importorskip('torch')
F = torch.nn.functional

RNG = np.random.default_rng(0)
ATOL = 1e-5
# Jitted: one compile per output size beats compiling every primitive eagerly.
_bicubic = jax.jit(resize_bicubic, static_argnums=1)
_antialias = jax.jit(resize_antialias_bilinear, static_argnums=1)


def _torch_resize(x_nhwc, out_hw, **kwargs):
  """Torch's interpolate on an NHWC numpy array (`size=out_hw`, or the kwargs'
  scale_factor when out_hw is None), returned NHWC."""
  x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
  size = None if out_hw is None else tuple(out_hw)
  y = F.interpolate(x, size=size, align_corners=False, **kwargs)
  return y.permute(0, 2, 3, 1).numpy()


def _torch_aa_matrix(in_size, out_size):
  """Torch's antialiased bilinear matrix (out, in), read off by resizing the rows of eye.

  Only the height is resized: torch CPU is wrong when the output width alone is 1.
  """
  eye = torch.eye(in_size).reshape(1, 1, in_size, in_size)
  y = F.interpolate(eye, size=(out_size, in_size), mode='bilinear', align_corners=False,
                    antialias=True)
  return y[0, 0].numpy()


@pytest.mark.parametrize('in_hw, out_hw', [
    ((16, 16), (7, 7)), ((16, 16), (9, 9)), ((16, 16), (23, 23)), ((4, 4), (10, 10)),
    ((16, 16), (16, 16)), ((16, 16), (8, 20)), ((33, 33), (51, 51))])
def test_bicubic_matches_torch(in_hw, out_hw):
  x = RNG.standard_normal((2, *in_hw, 3)).astype(np.float32)
  np.testing.assert_allclose(_bicubic(jnp.asarray(x), out_hw),
                             _torch_resize(x, out_hw, mode='bicubic'), atol=ATOL, rtol=0)


@pytest.mark.parametrize('in_hw, out_hw', [((16, 16), (32, 24)), ((16, 16), (6, 9)),
                                            ((4, 4), (6, 4)), ((16, 16), (16, 16))])
def test_bicubic_scale_factor_form_matches_torch(in_hw, out_hw):
  """DINOv2's position resize: scale_factor = (out + 0.1) / in, not size=out."""
  x = RNG.standard_normal((1, *in_hw, 3)).astype(np.float32)
  factors = tuple(float(o + 0.1) / i for o, i in zip(out_hw, in_hw))
  expected = _torch_resize(x, None, mode='bicubic', scale_factor=factors)
  assert expected.shape[1:3] == out_hw
  got = jax.jit(resize_bicubic, static_argnums=(1, 2))(jnp.asarray(x), out_hw, factors)
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
  # Not the size= form: the offset moves every sample unless the sizes are equal.
  if out_hw != in_hw:
    assert np.abs(np.asarray(_bicubic(jnp.asarray(x), out_hw)) - expected).max() > 1e-3


def test_bicubic_matrix_identity_and_partition_of_unity():
  np.testing.assert_array_equal(bicubic_matrix(16, 16), np.eye(16))
  for in_size, out_size in [(16, 7), (4, 10), (1, 5), (16, 31)]:
    np.testing.assert_allclose(bicubic_matrix(in_size, out_size).sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize('out_hw', [
    (1, 1), (1, 16), (3, 3), (15, 15), (16, 16), (31, 31), (3, 31), (15, 7), (16, 31)])
def test_antialias_bilinear_matches_torch(out_hw):
  x = RNG.standard_normal((2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(
      _antialias(jnp.asarray(x), out_hw),
      _torch_resize(x, out_hw, mode='bilinear', antialias=True), atol=ATOL, rtol=0)


def test_antialias_bilinear_output_width_one_matches_transposed_torch():
  # Torch CPU repeats output row 0 when only the width becomes 1, so compare with the
  # transposed problem, which torch gets right.
  x = RNG.standard_normal((1, 16, 16, 3)).astype(np.float32)
  expected = _torch_resize(x.transpose(0, 2, 1, 3), (1, 5), mode='bilinear', antialias=True)
  np.testing.assert_allclose(_antialias(jnp.asarray(x), (5, 1)),
                             expected.transpose(0, 2, 1, 3), atol=ATOL, rtol=0)


def test_antialias_weights_with_traced_size():
  traces = []

  @functools.partial(jax.jit, static_argnums=0)
  def weights(in_size, out_size, out_index):
    traces.append(in_size)
    return antialias_bilinear_weights(in_size, out_size, out_index)

  # 39 -> 27 has a float32 tie at a window edge that torch's window excludes.
  for in_size, out_size in [(16, 1), (16, 3), (16, 15), (16, 16), (16, 31), (39, 27)]:
    got = np.asarray(weights(in_size, jnp.int32(out_size), jnp.arange(40)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:out_size], _torch_aa_matrix(in_size, out_size), atol=2e-7,
                               rtol=0)
  assert len(traces) == 2, 'a new output size must not retrace'
  # A zero size (an empty padding slot) must stay finite too.
  assert np.isfinite(np.asarray(weights(16, jnp.int32(0), jnp.arange(40)))).all()


def _transformers_resize(grid, spatial_shapes, num_positions):
  """transformers' Siglip2VisionEmbeddings.resize_positional_embeddings rule, in torch."""
  d = grid.shape[-1]
  pos = torch.from_numpy(grid).permute(2, 0, 1).unsqueeze(0)
  out = np.empty((len(spatial_shapes), num_positions, d), np.float32)
  for i, (h, w) in enumerate(spatial_shapes):
    resized = F.interpolate(pos, size=(h, w), mode='bilinear', align_corners=False,
                            antialias=True)
    resized = resized.reshape(d, h * w).transpose(0, 1).numpy()
    out[i, :h * w] = resized
    out[i, h * w:] = resized[0]
  return out


def test_resize_grid_to_shapes_matches_transformers():
  grid = RNG.standard_normal((16, 16, 8)).astype(np.float32)
  shapes = [(4, 16), (8, 8), (16, 4), (5, 7), (1, 64)]
  got = jax.jit(resize_grid_to_shapes, static_argnums=2)(
      jnp.asarray(grid), jnp.asarray(shapes, jnp.int32), 64)
  assert got.shape == (len(shapes), 64, 8)
  np.testing.assert_allclose(got, _transformers_resize(grid, shapes, 64), atol=ATOL, rtol=0)
