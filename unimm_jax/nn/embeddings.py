"""Fixed and learned embeddings of scalars and positions: diffusion timesteps, 2D sin-cos.

`timestep_embedding` is BitDance's (and DiT's) sinusoid of 1000 t; `TimestepEmbedder` follows
it with the two-layer MLP of their heads; `sincos_2d_embedding` embeds grid positions, and
`sincos_2d` a whole grid in BitDance's MLLM patch order (`patch_order`).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.nn import initializers

Dtype = Any
TIME_FREQUENCY_DIM = 256  # BitDance's TimestepEmbedder frequency_embedding_size


def timestep_embedding(t: jax.Array, dim: int = TIME_FREQUENCY_DIM,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoid of 1000 t: [cos(1000 t f_k), sin(1000 t f_k)], f_k = max_period^(-k / half).

  Shapes: t (...) -> (..., dim) float32.
  """
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
  """t (...) in [0, 1] -> (..., width): Dense(silu(Dense(timestep_embedding(t)))).

  Params `time_in`, `time_out` (kernels N(0, 0.02), zero biases, as BitDance's). The input axis
  of the second kernel stays unnamed: one mesh axis cannot shard both sides of a kernel.
  """
  width: int
  frequency_dim: int = TIME_FREQUENCY_DIM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, 'embed'))
    h = nn.Dense(self.width, dtype=self.dtype, kernel_init=init,
                 bias_init=initializers.zeros('embed'), name='time_in')(
                     timestep_embedding(t, self.frequency_dim).astype(self.dtype))
    return nn.Dense(self.width, dtype=self.dtype, kernel_init=init,
                    bias_init=initializers.zeros('embed'), name='time_out')(nn.silu(h))


def sincos_2d_embedding(positions: np.ndarray, dim: int) -> np.ndarray:
  """Fixed embedding of 2D positions: [sin(x w), cos(x w), sin(y w), cos(y w)], w_k =
  10000^(-k / (dim / 4)). Shapes: positions (n, 2) -> (n, dim) float32 (numpy, trace time)."""
  quarter = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  parts = []
  for axis in range(2):
    args = positions[:, axis:axis + 1].astype(np.float64) * omega[None]
    parts += [np.sin(args), np.cos(args)]
  return np.concatenate(parts, axis=1).astype(np.float32)


def patch_order(h: int, w: int, side: int) -> np.ndarray:
  """(hw,) int: the row-major cell of each sequence position of an (h, w) grid cut into
  side x side patches in raster order, each patch in raster order (BitDance's '(h p1)
  (w p2) -> (h w p1 p2)', one parallel block per patch); side 1 is raster order."""
  if h % side or w % side:
    raise ValueError(f'grid {h}x{w} is not a whole number of {side}x{side} patches')
  cells = np.arange(h * w).reshape(h // side, side, w // side, side)
  return cells.transpose(0, 2, 1, 3).reshape(-1)


def sincos_2d(h: int, w: int, dim: int, patch_side: int = 1) -> np.ndarray:
  """BitDance MLLM's position embedding of an h x w token grid (their MLLModel's
  get_2d_embed(h, w, ps) for LLM width `dim`), added to the image tokens at the LLM input and
  to the hidden states that condition the diffusion head.

  Each token is `sincos_2d_embedding` of (column, row): [sin, cos] of the column (x) in the
  first dim / 2 channels, then of the row (y), frequencies 10000^(-k / (dim / 4)). Tokens are
  in their generation order, `patch_order(h, w, patch_side)`.

  Shapes: -> (h * w, dim) float32 numpy (trace-time constant).
  """
  if dim % 4:
    raise ValueError(f'dim={dim} must be a multiple of 4 (sin and cos per axis)')
  cells = patch_order(h, w, patch_side)
  return sincos_2d_embedding(np.stack([cells % w, cells // w], axis=1), dim)
