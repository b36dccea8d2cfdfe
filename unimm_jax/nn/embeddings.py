"""Fixed and learned embeddings of scalars and positions: diffusion timesteps, 2D sin-cos.

`timestep_embedding` is BitDance's (and DiT's) sinusoid of 1000 t; `TimestepEmbedder` follows
it with the two-layer MLP of their heads; `sincos_2d_embedding` embeds grid positions.
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
