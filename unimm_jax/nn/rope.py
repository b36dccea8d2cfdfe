"""Two-dimensional rotary position embedding over an image grid (UniWeTok's middle transformer).

Facts from the authors' code (BitDance, modeling/vision_encoder/autoencoder_uni.py,
`precompute_freqs_cis_2d`, `apply_rotary_emb` and the two `forward`s that build `pos_2d`):

- grid positions are normalised to an 8x8 range whatever the grid size: the encoder puts
  index i at i * 7 / (H - 1) + 0.5, the decoder at (i + 0.5) * 7.5 / (H - 0.5);
- each token's position is (x, y) = (column, row) coordinates, shifted by +1; the learned
  register tokens prepended to the sequence sit at position (0, 0);
- frequencies 1 / 10000^(2k / half_dim) for k < head_dim / 4, half_dim = head_dim / 2;
- the first head_dim / 4 rotation pairs rotate by x * freq_k, the remaining head_dim / 4 by
  y * freq_k; a pair is two adjacent channels (2i, 2i + 1), rotated as a complex number.

On a 1-row (or 1-column) grid the authors' encoder formula divides 0 by 0; we place that
single index at 0.5, the value every other grid size gives index 0.
"""
import enum

import chex
import jax
import jax.numpy as jnp
import numpy as np


class GridPositions(enum.Enum):
  """Where grid index i lands in the normalised 8x8 range."""
  ENCODER = 'encoder'  # i * 7 / (n - 1) + 0.5
  DECODER = 'decoder'  # (i + 0.5) * 7.5 / (n - 0.5)


def _axis_positions(n: int, mode: GridPositions) -> np.ndarray:
  idx = np.arange(n, dtype=np.float64)
  if mode is GridPositions.ENCODER:
    return idx * (7.0 / (n - 1) if n > 1 else 0.0) + 0.5
  return (idx + 0.5) * (7.5 / (n - 0.5))


def grid_positions(height: int, width: int, mode: GridPositions) -> np.ndarray:
  """Normalised (x, y) position of every cell of a row-major (height, width) grid.

  Returns: (height * width, 2) float32, column 0 = x (along width), column 1 = y.
  """
  ys = _axis_positions(height, mode)
  xs = _axis_positions(width, mode)
  grid_y, grid_x = np.meshgrid(ys, xs, indexing='ij')
  return np.stack([grid_x.reshape(-1), grid_y.reshape(-1)], axis=1).astype(np.float32)


def rope_2d_angles(positions: np.ndarray, head_dim: int, num_prefix: int = 0,
                   base: float = 10000.0) -> np.ndarray:
  """Rotation angle of every rotation pair of every token.

  Args:
    positions: (n, 2) normalised (x, y) grid positions from `grid_positions`.
    head_dim: per-head width; must be a multiple of 4 (two axes, pairs of channels).
    num_prefix: number of register tokens prepended to the sequence (angle 0).
    base: RoPE base.
  Returns:
    (num_prefix + n, head_dim // 2) float32 angles; pair j of a token is rotated by
    angles[token, j].
  """
  if head_dim % 4:
    raise ValueError(f'2D RoPE needs head_dim divisible by 4, got {head_dim}')
  quarter = head_dim // 4
  half_dim = head_dim // 2
  freqs = 1.0 / base ** (2.0 * np.arange(quarter, dtype=np.float64) / half_dim)
  t = np.asarray(positions, np.float64) + 1.0
  t = np.concatenate([np.zeros((num_prefix, 2)), t], axis=0)
  angles = np.concatenate([t[:, :1] * freqs, t[:, 1:] * freqs], axis=1)
  return angles.astype(np.float32)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates adjacent channel pairs (2i, 2i+1) of every head by the given angles.

  Computed in float32 (angles of up to ~9 rad lose their fine structure in bf16), returned in
  x's dtype.

  Args:
    x: (b, s, heads, head_dim).
    angles: (s, head_dim // 2).
  Returns:
    (b, s, heads, head_dim).
  """
  chex.assert_rank(x, 4)
  chex.assert_shape(angles, (x.shape[1], x.shape[3] // 2))
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)
