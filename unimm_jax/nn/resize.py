"""Separable resampling that matches `torch.nn.functional.interpolate(..., align_corners=False)`.

Pretrained ViT position grids are resized by transformers with torch's `interpolate` (bicubic
for fixed-resolution ViTs, antialiased bilinear for SigLIP2's per-image grids), so a port must
reproduce torch's resampling weights, float32 rounding of the source coordinate included.

Both modes are separable: each output axis is a (out, in) weight matrix applied by an einsum.
Bicubic reproduces both forms of torch's call: `size=` (scale = in_size / out_size) and
`scale_factor=` (scale = 1 / scale_factor, output floor(in_size * scale_factor)), which
DINOv2-style position resizes use with a 0.1 offset (MingTok's encoder).

Torch facts the weights follow (checked against torch 2.13 on CPU, float32 and float64):
- Bicubic: source coordinate (dst + 0.5) * scale - 0.5, not clamped to 0; Keys' kernel with
  A = -0.75 on the taps floor(src) - 1 .. floor(src) + 2, whose indices are clamped to
  [0, in - 1] so that the weights of out-of-range taps pile up on the border sample.
- Antialiased bilinear (PIL-style): center = scale * (dst + 0.5), triangle filter of half-width
  support = max(scale, 1) evaluated at (j + 0.5 - center) / max(scale, 1), weights normalised
  to sum 1 over the inputs j in the window [int(center - support + 0.5),
  int(center + support + 0.5)) clipped to [0, in). In exact arithmetic the window is just the
  filter's support, but in float32 it decides boundary taps whose weight rounds to ~1e-6.
- Torch CPU's antialiased kernel is wrong when the output width is 1 and the output height
  differs from the input height: every output row then equals output row 0. These functions
  compute the intended resize there.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
_CUBIC_A = -0.75


def _cubic_near(x: np.ndarray) -> np.ndarray:
  """Keys' cubic kernel on |x| <= 1."""
  return ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1


def _cubic_far(x: np.ndarray) -> np.ndarray:
  """Keys' cubic kernel on 1 <= |x| <= 2."""
  return ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None
                   ) -> np.ndarray:
  """Torch's bicubic (align_corners=False) resize of one axis as a matrix.

  Args:
    in_size: input length along the axis.
    out_size: output length along the axis.
    scale_factor: torch's `scale_factor=` for this axis (then out_size must be
      floor(in_size * scale_factor)); None: the `size=` form.

  Returns:
    float64 array (out_size, in_size); `m @ x` resizes x (in_size, ...) along axis 0.
  """
  if scale_factor is None:
    scale = np.float32(in_size) / np.float32(out_size)
  else:
    if out_size != int(np.floor(in_size * scale_factor)):
      raise ValueError(f'scale_factor {scale_factor} resizes {in_size} to '
                       f'{int(np.floor(in_size * scale_factor))}, not {out_size}')
    # Torch computes 1 / scale_factor in double and rounds it to float once.
    scale = np.float32(1.0 / scale_factor)
  dst = np.arange(out_size)
  # Torch float32 rounds (dst + 0.5) * scale - 0.5 to float32 once (the compiler fuses it into
  # an FMA; the float64 product of a float32 and a half-integer is exact, so rounding the
  # float64 result reproduces that). Rounding twice, as a non-FMA build does, can move src by
  # an ulp, i.e. ~3e-6 in weights.
  src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32).astype(np.float64)
  base = np.floor(src)
  t = src - base
  weights = (_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t))
  matrix = np.zeros((out_size, in_size))
  for offset, weight in zip(range(-1, 3), weights):
    # Within one tap offset every row has a single column, so plain fancy-index += is safe.
    matrix[dst, np.clip(base.astype(np.int64) + offset, 0, in_size - 1)] += weight
  return matrix


def _resize_separable(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """Applies rows (h2, h) and cols (w2, w) to x (..., h, w, c) -> (..., h2, w2, c), float32."""
  x = x.astype(jnp.float32)
  x = jnp.einsum('ah,...hwc->...awc', rows, x, precision=_HIGHEST)
  return jnp.einsum('bw,...awc->...abc', cols, x, precision=_HIGHEST)


def resize_bicubic(x: jax.Array, out_hw: Sequence[int],
                   scale_factors: Sequence[float] | None = None) -> jax.Array:
  """Torch's `interpolate(mode='bicubic', align_corners=False, size=out_hw)`, channels last;
  with `scale_factors` (sh, sw), its `scale_factor=(sh, sw)` form (out_hw must be what that
  gives, floor(h * sh), floor(w * sw)).

  Args:
    x: (..., h, w, c).
    out_hw: static output size (h2, w2).
    scale_factors: static (sh, sw) or None.

  Returns:
    float32 (..., h2, w2, c).
  """
  h, w = x.shape[-3:-1]
  sh, sw = scale_factors or (None, None)
  rows = jnp.asarray(bicubic_matrix(h, out_hw[0], sh), jnp.float32)
  cols = jnp.asarray(bicubic_matrix(w, out_hw[1], sw), jnp.float32)
  return _resize_separable(x, rows, cols)


def antialias_bilinear_weights(in_size: int, out_size: jax.Array,
                               out_index: jax.Array) -> jax.Array:
  """Rows of torch's antialiased bilinear resize matrix for an in_size -> out_size axis.

  Works with a traced out_size, so one compiled program serves every output size.

  Args:
    in_size: static input length.
    out_size: int scalar, the output length (may be traced).
    out_index: int (n,), output samples whose weights are wanted. Indices outside
      [0, out_size) give finite values that callers are expected to mask.

  Returns:
    float32 (n, in_size); row r produces output sample out_index[r].
  """
  # A zero size (e.g. an empty padding slot) would divide by zero; its rows are masked anyway.
  out_size = jnp.maximum(jnp.asarray(out_size, jnp.int32), 1)
  # float32 throughout, as torch's float32 kernel computes (and rounds) center and the taps.
  scale = jnp.float32(in_size) / out_size.astype(jnp.float32)
  support = jnp.maximum(scale, 1.0)
  # Torch multiplies by the float32 reciprocal of the support rather than dividing by it.
  inv_support = 1.0 / support
  center = (scale * (jnp.asarray(out_index).astype(jnp.float32) + 0.5))[:, None]
  j = jnp.arange(in_size, dtype=jnp.float32)[None, :]
  # Torch truncates toward zero; floor differs only below 0, where the clip to [0, in) wins.
  in_window = (j >= jnp.floor(center - support + 0.5)) & (j < jnp.floor(center + support + 0.5))
  weights = jnp.maximum(1.0 - jnp.abs((j - center + 0.5) * inv_support), 0.0)
  weights = jnp.where(in_window, weights, 0.0)
  total = jnp.sum(weights, axis=1, keepdims=True)
  # Out-of-range indices can have no input under the filter; keep their rows finite (zero).
  return weights / jnp.where(total > 0, total, 1.0)


def resize_antialias_bilinear(x: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """Torch's `interpolate(mode='bilinear', antialias=True, align_corners=False, size=out_hw)`.

  Args:
    x: (..., h, w, c), channels last.
    out_hw: static output size (h2, w2).

  Returns:
    float32 (..., h2, w2, c).
  """
  h, w = x.shape[-3:-1]
  rows = antialias_bilinear_weights(h, out_hw[0], jnp.arange(out_hw[0]))
  cols = antialias_bilinear_weights(w, out_hw[1], jnp.arange(out_hw[1]))
  return _resize_separable(x, rows, cols)


def resize_grid_to_shapes(grid: jax.Array, spatial_shapes: jax.Array,
                          num_positions: int) -> jax.Array:
  """Resizes a position grid to each image's patch grid, flattened and padded (SigLIP2).

  Follows transformers' Siglip2VisionEmbeddings.resize_positional_embeddings: image i with
  (h, w) = spatial_shapes[i] gets the antialiased bilinear resize of grid to (h, w) at
  positions k < h * w (row k // w, column k % w), and the value of position 0 beyond.

  Args:
    grid: (gh, gw, d) position embeddings.
    spatial_shapes: int (b, 2) patch grid (h, w) per image, may be traced; h * w must not
      exceed num_positions.
    num_positions: static padded sequence length.

  Returns:
    float32 (b, num_positions, d).
  """
  gh, gw, _ = grid.shape
  heights, widths = spatial_shapes[:, 0], spatial_shapes[:, 1]
  k = jnp.arange(num_positions)[None, :]
  safe_widths = jnp.maximum(widths, 1)[:, None]
  # Padding positions point at (0, 0), which is resized position 0.
  valid = k < heights[:, None] * widths[:, None]
  rows = jnp.where(valid, k // safe_widths, 0)
  cols = jnp.where(valid, k % safe_widths, 0)
  row_weights = jax.vmap(lambda size, index: antialias_bilinear_weights(gh, size, index))(
      heights, rows)
  col_weights = jax.vmap(lambda size, index: antialias_bilinear_weights(gw, size, index))(
      widths, cols)
  return jnp.einsum('bki,bkj,ijd->bkd', row_weights, col_weights, grid.astype(jnp.float32),
                    precision=_HIGHEST)
