"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"), VGG16 variant.

What the network computes, from the `lpips` package (0.1.4, files lpips/lpips.py,
lpips/pretrained_networks.py and lpips/__init__.py), LPIPS(net='vgg', version='0.1'):
- Scaling layer (`ScalingLayer`): images in [-1, 1] become (x - shift) / scale per RGB channel
  with shift (-0.030, -0.088, -0.188) and scale (0.458, 0.448, 0.450): the ImageNet mean and
  std re-expressed for [-1, 1] inputs.
- Trunk (`pretrained_networks.vgg16`): torchvision's VGG16 `features` (3x3 convs with bias,
  zero padding 1, ReLU; 2x2 stride-2 max-pool without ceil between blocks), cut into five
  slices whose outputs are the taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
- Per tap (`normalize_tensor`): x / (sqrt(sum_c x^2) + 1e-10): the eps is added to the norm,
  not inside the sqrt.
- Distance: squared difference of the normalised taps, a learned 1x1 conv without bias to one
  channel (`NetLinLayer`, the dropout before it is off in eval), mean over h and w, sum over
  the five taps.

Parameter layout (`params` of `LPIPS`):
  trunk/conv{block}_{layer}/kernel (3, 3, c_in, c_out), bias (c_out,)  conv1_1 ... conv5_3
  lin{k}/kernel (c_k, 1)                                              k = 0..4, c_k = 64, 128,
                                                                      256, 512, 512
`unimm_jax.evals.lpips` maps the `lpips` package's state-dict names onto this layout.
"""
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers

Dtype = Any

# ScalingLayer buffers of the `lpips` package (lpips/lpips.py).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Default eps of `lpips.normalize_tensor` (lpips/__init__.py).
NORM_EPS = 1e-10
# Output widths of VGG16's convs, one tuple per block; each block ends at an LPIPS tap.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_CHANNELS = tuple(block[-1] for block in VGG16_BLOCKS)

# torchvision initialises an untrained VGG's convs with kaiming_normal_(mode='fan_out',
# nonlinearity='relu') and zero biases; a random trunk here starts the same way, which keeps
# activations at a steady scale through the 13 convs.
_vgg_kernel_init = nn.with_logical_partitioning(
    nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
    (None, None, 'conv_in', 'conv_out'))


def unit_normalize(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """x / (||x||_channels + eps), as `lpips.normalize_tensor`. Shapes: (..., c) -> (..., c).

  sqrt has an infinite derivative at 0, and a pixel whose channels are all zero after ReLU is
  common at the deep taps, so the zero case is routed around sqrt: same value, zero gradient
  there instead of NaN.
  """
  sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  positive = sum_sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)
  return x / (norm + eps)


class VGG16Trunk(nn.Module):
  """VGG16 conv stack. (b, h, w, 3) -> five taps (b, h / 2^k, w / 2^k, TAP_CHANNELS[k]).

  Odd sizes are floored by each max-pool, as PyTorch's MaxPool2d(2, 2) does.
  """
  dtype: Dtype = jnp.float32
  precision: jax.lax.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for block, widths in enumerate(VGG16_BLOCKS):
      if block > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
      for layer, width in enumerate(widths):
        x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    precision=self.precision, kernel_init=_vgg_kernel_init,
                    bias_init=initializers.zeros('conv_out'),
                    name=f'conv{block + 1}_{layer + 1}')(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


class LPIPS(nn.Module):
  """LPIPS distance between two image batches.

  Call: (x, y) images (b, h, w, 3) float32 in [-1, 1] -> distances (b,), or with
  per_layer=True the five per-tap terms (b, 5) whose sum is the distance. h and w of at least
  16 keep every tap non-empty.

  Freshly initialised heads are all ones, i.e. the `lpips` package's lpips=False baseline
  (plain sum over channels): non-negative distances for smoke runs on a random trunk.

  Identical images give 0 up to rounding: under jit, XLA may fuse the x and y halves
  differently, which leaves terms near 1e-16.
  """
  dtype: Dtype = jnp.float32
  precision: jax.lax.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, per_layer: bool = False) -> jax.Array:
    chex.assert_rank(x, 4)
    chex.assert_equal_shape([x, y])
    chex.assert_axis_dimension(x, -1, 3)
    b = x.shape[0]
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    # One trunk pass over both batches: larger convs, and the weights are read once.
    both = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale
    taps = VGG16Trunk(dtype=self.dtype, precision=self.precision, name='trunk')(both)
    terms = []
    for k, tap in enumerate(taps):
      unit = unit_normalize(tap.astype(jnp.float32))
      diff = jnp.square(unit[:b] - unit[b:])
      weighted = nn.Dense(1, use_bias=False, precision=self.precision,
                          kernel_init=initializers.ones('conv_out', None),
                          name=f'lin{k}')(diff)
      terms.append(jnp.mean(weighted, axis=(1, 2, 3)))
    terms = jnp.stack(terms, axis=-1)
    return terms if per_layer else jnp.sum(terms, axis=-1)
