"""Normalisation layers: RMSNorm, GroupNorm sized for any width, AdaptiveGroupNorm, and the
per-head LayerNorm of Chameleon's queries and keys.

All statistics are computed in float32 whatever the compute dtype, because variances of
bf16 activations lose most of their mantissa; outputs are cast back to the compute dtype.
"""
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers

Dtype = Any


def num_groups_for(channels: int, max_groups: int = 32) -> int:
  """Largest divisor of `channels` that is at most `max_groups`.

  The authors' code uses GroupNorm(32, C). For every width they use C is a multiple of 32,
  so this returns 32 there and their weights load unchanged; tiny test widths (16, 24) get
  the largest group count that divides them instead of an error.
  """
  return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis with a learned per-channel scale.

  Shapes: (..., d) -> (..., d). `scale_axis` is the logical name of d ('kv' when it
  normalises each attention head, as Qwen3's q/k norm).
  """
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  scale_axis: str = 'embed'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', initializers.ones(self.scale_axis), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


class GroupNorm(nn.Module):
  """GroupNorm over NHWC features with `num_groups_for(C, max_groups)` groups (32 at the
  paper's widths).

  Shapes: (b, h, w, c) -> (b, h, w, c). `affine=False` drops the learned scale and bias
  (AdaptiveGroupNorm supplies its own). Variance is two-pass, as in PyTorch. At small widths
  32 groups hold one channel each, which normalises away each channel's mean over the image
  (its colour); CPU-sized configs lower `max_groups` to keep several channels per group.
  """
  epsilon: float = 1e-6
  affine: bool = True
  dtype: Dtype = jnp.float32
  max_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    channels = x.shape[-1]
    return nn.GroupNorm(
        num_groups=num_groups_for(channels, self.max_groups),
        epsilon=self.epsilon,
        dtype=self.dtype,
        use_bias=self.affine,
        use_scale=self.affine,
        scale_init=initializers.ones('conv_out'),
        bias_init=initializers.zeros('conv_out'),
        use_fast_variance=False,
        name='norm',
    )(x)


class AdaptiveGroupNorm(nn.Module):
  """GroupNorm without affine, modulated by statistics of the quantized latent (the "style").

  scale = Dense(sqrt(var_hw(z) + eps)), bias = Dense(mean_hw(z)), both per sample, where the
  mean and the unbiased variance (divided by h'w' - 1, as torch's `.var()` default in the
  authors' code, whose weights depend on it; h'w' - 1 is floored at 1 so a 1x1 latent
  gives 0, not NaN) are taken over the latent's spatial positions per channel;
  out = scale * GroupNorm(x) + bias. The two Dense layers are `gamma` and `beta` as in the
  authors' code (with bias).

  Shapes: x (b, h, w, c), style (b, h', w', z) -> (b, h, w, c).
  """
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, style: jax.Array) -> jax.Array:
    chex.assert_rank([x, style], 4)
    chex.assert_equal(x.shape[0], style.shape[0])
    channels = x.shape[-1]
    style32 = style.astype(jnp.float32)
    mean = jnp.mean(style32, axis=(1, 2))
    positions = style.shape[1] * style.shape[2]
    variance = jnp.var(style32, axis=(1, 2)) * positions / max(positions - 1, 1)
    std = jnp.sqrt(variance + self.epsilon)

    def modulation(name: str) -> nn.Dense:
      # Maps z channels to feature channels: a 1x1 "conv" across the latent, hence conv axes.
      return nn.Dense(channels, dtype=jnp.float32,
                      kernel_init=initializers.kernel_init('conv_in', 'conv_out'),
                      bias_init=initializers.zeros('conv_out'), name=name)

    scale = modulation('gamma')(std)[:, None, None, :]
    bias = modulation('beta')(mean)[:, None, None, :]
    normed = GroupNorm(epsilon=self.epsilon, affine=False, dtype=jnp.float32, name='gn')(x)
    return (scale * normed + bias).astype(self.dtype)


class HeadwiseLayerNorm(nn.Module):
  """LayerNorm of each attention head over head_dim, with a per-head affine (Chameleon's q/k
  norm). Shapes: (b, s, heads, head_dim) -> same.

  Statistics over head_dim only (eps 1e-5, fixed in transformers' ChameleonLayerNorm), then a
  (heads, head_dim) scale and bias: Chameleon was trained with its heads split over
  model-parallel ranks that each kept their own affine parameters.
  """
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, -1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + self.epsilon)
    scale = self.param('scale', initializers.ones('heads', 'kv'), x.shape[-2:], jnp.float32)
    bias = self.param('bias', initializers.zeros('heads', 'kv'), x.shape[-2:], jnp.float32)
    return (y * scale + bias).astype(self.dtype)
