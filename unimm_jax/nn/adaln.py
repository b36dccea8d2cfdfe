"""Adaptive LayerNorm (adaLN): a condition sets the scale, shift and gate of a residual block.

`modulation` is the zero-initialised projection of the condition, so every block starts as
the identity (gate 0) and the final layer at a zero shift and scale (DiT, BitDance's heads);
`AdaLNResBlock` is x + gate * SwiGLU(LayerNorm(x) * (1 + scale) + shift).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn.mlp import SwiGLU

Dtype = Any


def modulation(y: jax.Array, chunks: int, name: str, dtype: Dtype) -> list[jax.Array]:
  """Zero-initialised Dense(chunks * width) of the condition y (..., width), split into
  `chunks` arrays of y's width (e.g. scale, shift, gate). Created on the calling module."""
  width = y.shape[-1]
  out = nn.Dense(chunks * width, dtype=dtype, name=name,
                 kernel_init=initializers.zeros('embed', 'mlp'),
                 bias_init=initializers.zeros('mlp'))(y)
  return jnp.split(out, chunks, axis=-1)


def modulate(x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
  return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
  """x + gate * SwiGLU(LayerNorm(x) * (1 + scale) + shift) (BitDance diff_head.py `ResBlock`;
  its SwiGLU has biases, this one is the library's bias-free SwiGLU of hidden 1.5 width).

  Shapes: x, scale, shift, gate (b, m, width) -> (b, m, width).
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, scale: jax.Array, shift: jax.Array,
               gate: jax.Array) -> jax.Array:
    h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, scale_init=initializers.ones('embed'),
                     bias_init=initializers.zeros('embed'), name='norm')(x)
    h = SwiGLU(int(1.5 * x.shape[-1]), dtype=self.dtype, name='mlp')(modulate(h, scale, shift))
    return x + gate * h
