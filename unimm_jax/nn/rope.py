"""Rotary position embeddings (RoPE) in the two channel pairings this library needs.

`apply_rope_rotate_half` (1D, the LLMs: transformers' convention): channel i pairs with
i + head_dim / 2; angles are positions times `rope_inverse_frequencies` (theta and the
'linear' / 'llama3' scalings of `RopeScaling`).

`apply_rope` (2D, UniWeTok's grid transformer and the GAP prior): a pair is two adjacent
channels (2i, 2i + 1), rotated by the angles of `rope_2d_angles` over an image grid.

Both take angles (..., s, head_dim // 2) and rotate (b, s, heads, head_dim) queries or keys in
float32. The 2D facts come from the authors' code (BitDance, modeling/vision_encoder/autoencoder_uni.py,
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
import dataclasses
import enum
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np


class GridPositions(enum.Enum):
  """Where grid index i lands in the normalised 8x8 range."""
  ENCODER = 'encoder'  # i * 7 / (n - 1) + 0.5
  DECODER = 'decoder'  # (i + 0.5) * 7.5 / (n - 0.5)
  CENTRES = 'centres'  # i + 0.5, not normalised (BitDance's generators, layers_parallel.py)


def _axis_positions(n: int, mode: GridPositions) -> np.ndarray:
  idx = np.arange(n, dtype=np.float64)
  if mode is GridPositions.ENCODER:
    return idx * (7.0 / (n - 1) if n > 1 else 0.0) + 0.5
  if mode is GridPositions.CENTRES:
    return idx + 0.5
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


def _cos_sin(x: jax.Array, angles: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin of angles (s, d/2) or (b, s, d/2), shaped to broadcast over x's heads."""
  chex.assert_rank(x, 4)
  if angles.ndim == 2:
    angles = angles[None]
  chex.assert_shape(angles, (None, x.shape[1], x.shape[3] // 2))
  angles = angles.astype(jnp.float32)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates adjacent channel pairs (2i, 2i+1) of every head by the given angles.

  Computed in float32 (angles of up to ~9 rad lose their fine structure in bf16), returned in
  x's dtype.

  Args:
    x: (b, s, heads, head_dim).
    angles: (s, head_dim // 2), or (b, s, head_dim // 2) per row.
  Returns:
    (b, s, heads, head_dim).
  """
  cos, sin = _cos_sin(x, angles)
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def apply_rope_rotate_half(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotate-half RoPE: channel i pairs with i + head_dim / 2 (transformers' LLMs).

  [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], in float32, returned in x's dtype.
  Shapes: x (b, s, heads, head_dim); angles (s, head_dim // 2) or (b, s, head_dim // 2).
  """
  cos, sin = _cos_sin(x, angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


ROPE_SCALING_TYPES = ('linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, transformers' `rope_parameters` beyond 'default'.

  'linear': every inverse frequency divided by `factor`.
  'llama3': frequencies with wavelength above original_max_position_embeddings /
    low_freq_factor divided by `factor`, below original / high_freq_factor kept, and
    interpolated in between (Llama 3.1).
  """
  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_SCALING_TYPES:
      raise ValueError(f'rope scaling type {self.rope_type!r} is not supported; '
                       f'supported: {ROPE_SCALING_TYPES}')


def rope_inverse_frequencies(head_dim: int, theta: float,
                             scaling: RopeScaling | None = None) -> np.ndarray:
  """(head_dim // 2,) float32 inverse frequencies theta^(-2i / head_dim), scaled as `scaling`
  says. Computed in float32 as transformers does, so angles agree to the last bits."""
  inv = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
         ).astype(np.float32)
  if scaling is None:
    return inv
  if scaling.rope_type == 'linear':
    return (inv / np.float32(scaling.factor)).astype(np.float32)
  old_len = np.float32(scaling.original_max_position_embeddings)
  low, high, factor = (np.float32(v) for v in (scaling.low_freq_factor, scaling.high_freq_factor,
                                               scaling.factor))
  wavelen = np.float32(2 * math.pi) / inv
  scaled = np.where(wavelen > old_len / low, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_1d_angles(positions: jax.Array, inverse_frequencies: np.ndarray) -> jax.Array:
  """positions (b, s) int -> angles (b, s, head_dim // 2) float32 for the rotate-half RoPE."""
  return positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies)
