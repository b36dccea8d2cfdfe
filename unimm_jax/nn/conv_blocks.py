"""Convolutional building blocks of the WeTok / UniWeTok encoder and decoder (NHWC).

Facts from the authors' code (WeTok src/WeTok/modules/diffusionmodules/improved_model.py and
BitDance modeling/vision_encoder/autoencoder_uni.py, classes `ResBlock`, `Upsampler`,
`depth_to_space`, and the encoder's `downsample` conv):
- ResBlock: GroupNorm(32, eps 1e-6) -> swish -> conv3x3 (no bias) -> GroupNorm -> swish ->
  conv3x3 (no bias); residual through a 1x1 conv (no bias) when the width changes.
- Downsample: conv3x3, stride 2, symmetric zero padding of 1 (PyTorch `padding=1`, not
  taming's asymmetric (0, 1, 0, 1) pad), with bias.
- Upsampler: conv3x3 (with bias) to 4C, then depth_to_space in DCR order.

taming-transformers' VQGAN (Chameleon's image tokenizer) uses the same blocks with three
switches: its ResnetBlock convs (and 1x1 shortcut) have biases (`ResBlock(use_bias=True)`),
its Downsample pads (0, 1, 0, 1) (right and bottom only) before a padding-free stride-2 conv
(`Downsample(taming_padding=True)`), and its Upsample is nearest-neighbour x2 then conv3x3
with bias (`NearestUpsample`).
"""
from typing import Any

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn.norms import GroupNorm

Dtype = Any


def conv(features: int, kernel_size: int, *, use_bias: bool, dtype: Dtype, name: str,
         strides: int = 1, padding: tuple | None = None) -> nn.Conv:
  """A 2D conv with PyTorch's zero padding of kernel_size // 2 on every side, or the
  explicit ((top, bottom), (left, right)) `padding`."""
  pad = kernel_size // 2
  padding = ((pad, pad), (pad, pad)) if padding is None else padding
  return nn.Conv(features, (kernel_size, kernel_size), strides=strides,
                 padding=padding, use_bias=use_bias, dtype=dtype,
                 kernel_init=initializers.kernel_init(None, None, 'conv_in', 'conv_out'),
                 bias_init=initializers.zeros('conv_out'), name=name)


def constrain_feature_map(x: jax.Array) -> jax.Array:
  """Shards a (b, h, w, c) feature map over batch and, where rules say so, channels."""
  return nn.with_logical_constraint(x, ('batch', None, None, 'conv_out'))


def depth_to_space(x: jax.Array, block_size: int = 2) -> jax.Array:
  """DCR depth-to-space: (b, h, w, s*s*c) -> (b, h*s, w*s, c).

  Output pixel (h*s + i, w*s + j), channel k reads input channel (i*s + j)*c + k: the depth
  (sub-pixel offset) is the slow channel index. PyTorch's pixel_shuffle is the other order
  (CRD: k*s*s + i*s + j).
  """
  chex.assert_rank(x, 4)
  return einops.rearrange(x, 'b h w (i j c) -> b (h i) (w j) c', i=block_size, j=block_size)


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


class ResBlock(nn.Module):
  """Pre-activation residual block. Shapes: (b, h, w, c_in) -> (b, h, w, features).

  use_bias: biases on both convs and the 1x1 shortcut (taming's ResnetBlock); WeTok has none.
  norm_groups: the GroupNorms' maximum group count (`nn.norms.GroupNorm.max_groups`).
  """
  features: int
  dtype: Dtype = jnp.float32
  use_bias: bool = False
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    residual = x
    common = dict(use_bias=self.use_bias, dtype=self.dtype)
    norm = dict(dtype=self.dtype, max_groups=self.norm_groups)
    y = swish(GroupNorm(name='norm1', **norm)(x))
    y = conv(self.features, 3, name='conv1', **common)(y)
    y = swish(GroupNorm(name='norm2', **norm)(y))
    y = conv(self.features, 3, name='conv2', **common)(y)
    if x.shape[-1] != self.features:
      residual = conv(self.features, 1, name='nin_shortcut', **common)(x)
    return constrain_feature_map(y + residual)


class Downsample(nn.Module):
  """Stride-2 conv3x3 with bias. Shapes: (b, h, w, c) -> (b, ceil(h/2), ceil(w/2), features)
  (taming_padding: (b, floor(h/2), floor(w/2), features)).

  taming_padding: zero-pad one row below and one column to the right, none above or left
  (taming's and Chameleon's `F.pad(x, (0, 1, 0, 1))` before a padding-free conv).
  """
  features: int
  dtype: Dtype = jnp.float32
  taming_padding: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    padding = ((0, 1), (0, 1)) if self.taming_padding else None
    y = conv(self.features, 3, use_bias=True, dtype=self.dtype, strides=2, padding=padding,
             name='conv')(x)
    return constrain_feature_map(y)


class Upsampler(nn.Module):
  """conv3x3 to 4C then DCR depth_to_space. Shapes: (b, h, w, c) -> (b, 2h, 2w, c)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = conv(4 * x.shape[-1], 3, use_bias=True, dtype=self.dtype, name='conv1')(x)
    return constrain_feature_map(depth_to_space(y, 2))


class NearestUpsample(nn.Module):
  """Nearest-neighbour x2 (each pixel repeated 2 x 2, torch's `interpolate(mode='nearest')`)
  then conv3x3 with bias. Shapes: (b, h, w, c) -> (b, 2h, 2w, c)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    y = conv(x.shape[-1], 3, use_bias=True, dtype=self.dtype, name='conv')(x)
    return constrain_feature_map(y)
