"""InceptionV3 as the FID network: pool3 (2048-d) features, inference only (NHWC).

This is the network of TensorFlow's 2015-12-05 Inception graph, as pytorch-fid ports it
(src/pytorch_fid/inception.py: `fid_inception_v3`, `FIDInceptionA`, `FIDInceptionC`,
`FIDInceptionE_1`, `FIDInceptionE_2`, and the `InceptionV3` wrapper), on torchvision's
Inception3 layout (torchvision/models/inception.py). Facts taken from those files:
- BasicConv2d: conv without bias -> BatchNorm (eps 0.001, running statistics) -> ReLU.
- Stem: Conv2d_1a_3x3 (3 -> 32, stride 2), Conv2d_2a_3x3 (32 -> 32), Conv2d_2b_3x3 (32 -> 64,
  padding 1), max-pool 3 / stride 2, Conv2d_3b_1x1 (64 -> 80), Conv2d_4a_3x3 (80 -> 192),
  max-pool 3 / stride 2; convs unpadded unless said.
- Mixed_5b/5c/5d: A blocks with pool_features 32, 64, 64; Mixed_6a: B; Mixed_6b..6e: C blocks
  with channels_7x7 128, 160, 160, 192; Mixed_7a: D; Mixed_7b, Mixed_7c: E blocks.
- Differences from torchvision's own InceptionV3: the pool branch of every A, C and E block
  averages 3x3 windows (stride 1, padding 1) over the in-image pixels only
  (count_include_pad=False, as TF's average pool does), and Mixed_7c (FIDInceptionE_2) takes
  a 3x3 max instead (padding 1, padded cells never win). B and D blocks are unchanged.
- Output: global average pool of Mixed_7c -> (b, 2048); the 1008-way fc is not used.
- Input: pytorch-fid's wrapper takes x in [0, 1], resizes it to 299x299 with
  F.interpolate(mode='bilinear', align_corners=False) (no antialiasing) and then maps
  2 x - 1. Bilinear weights sum to one, so resize(2 x - 1) = 2 resize(x) - 1: here images
  come in [-1, 1] (the library's convention) and are resized directly, which is the same map.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_RESOLUTION = 299
FEATURE_DIM = 2048
# FID values are compared across papers to a decimal or two; reduced-precision matmul passes
# (TF32 on GPU, bf16 on TPU) would move them, so every conv runs at full float32 precision.
_PRECISION = jax.lax.Precision.HIGHEST


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's bilinear interpolation along one axis.

  align_corners=False, no antialiasing: output i samples the input at
  max((i + 0.5) * in_size / out_size - 0.5, 0) between its two nearest pixels, the upper one
  clamped to the last pixel. (jax.image.resize would antialias when shrinking.)
  """
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = src - lower
  weights = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lower), 1.0 - frac)
  np.add.at(weights, (rows, upper), frac)
  return weights


def resize_bilinear_like_torch(images: jax.Array, height: int, width: int) -> jax.Array:
  """(b, h, w, c) -> (b, height, width, c), as F.interpolate(bilinear, align_corners=False)."""
  rows = jnp.asarray(bilinear_resize_matrix(images.shape[1], height), images.dtype)
  cols = jnp.asarray(bilinear_resize_matrix(images.shape[2], width), images.dtype)
  out = jnp.einsum('oh,bhwc->bowc', rows, images, precision=_PRECISION)
  return jnp.einsum('pw,bowc->bopc', cols, out, precision=_PRECISION)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """3x3 mean, stride 1, padding 1, dividing by the count of in-image pixels only."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  """3x3 max; stride 1 pads by 1 with -inf, stride 2 is unpadded (floor of the output size)."""
  pad = 1 if stride == 1 else 0
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3, running stats) -> ReLU; (b, h, w, c) -> (b, h', w', f).

  Submodules are named `conv` and `bn` like torchvision's, so parameter paths follow the
  PyTorch state-dict keys.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=_PRECISION,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """Mixed_5b..5d: (b, h, w, c) -> (b, h, w, 224 + pool_features)."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch1x1 = BasicConv2d(64, (1, 1), name='branch1x1')(x)
    branch5x5 = BasicConv2d(48, (1, 1), name='branch5x5_1')(x)
    branch5x5 = BasicConv2d(64, (5, 5), padding=(2, 2), name='branch5x5_2')(branch5x5)
    dbl = BasicConv2d(64, (1, 1), name='branch3x3dbl_1')(x)
    dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(dbl)
    dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(dbl)
    pool = BasicConv2d(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch5x5, dbl, pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a, grid reduction: (b, h, w, c) -> (b, (h - 3) // 2 + 1, ..., 480 + c)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = BasicConv2d(384, (3, 3), strides=2, name='branch3x3')(x)
    dbl = BasicConv2d(64, (1, 1), name='branch3x3dbl_1')(x)
    dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(dbl)
    dbl = BasicConv2d(96, (3, 3), strides=2, name='branch3x3dbl_3')(dbl)
    return jnp.concatenate([branch3x3, dbl, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e, factorised 7x7 convs: (b, h, w, c) -> (b, h, w, 768)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    branch1x1 = BasicConv2d(192, (1, 1), name='branch1x1')(x)
    b7 = BasicConv2d(c7, (1, 1), name='branch7x7_1')(x)
    b7 = BasicConv2d(c7, **row, name='branch7x7_2')(b7)
    b7 = BasicConv2d(192, **col, name='branch7x7_3')(b7)
    dbl = BasicConv2d(c7, (1, 1), name='branch7x7dbl_1')(x)
    dbl = BasicConv2d(c7, **col, name='branch7x7dbl_2')(dbl)
    dbl = BasicConv2d(c7, **row, name='branch7x7dbl_3')(dbl)
    dbl = BasicConv2d(c7, **col, name='branch7x7dbl_4')(dbl)
    dbl = BasicConv2d(192, **row, name='branch7x7dbl_5')(dbl)
    pool = BasicConv2d(192, (1, 1), name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, b7, dbl, pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a, grid reduction: (b, h, w, c) -> (b, (h - 3) // 2 + 1, ..., 512 + c)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv2d(192, (1, 1), name='branch3x3_1')(x)
    b3 = BasicConv2d(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv2d(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv2d(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b / 7c, expanded filter banks: (b, h, w, c) -> (b, h, w, 2048).

  `max_pool` selects FIDInceptionE_2's 3x3 max in the pool branch (Mixed_7c); otherwise the
  in-image 3x3 mean of FIDInceptionE_1.
  """
  max_pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    branch1x1 = BasicConv2d(320, (1, 1), name='branch1x1')(x)
    b3 = BasicConv2d(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([BasicConv2d(384, **row, name='branch3x3_2a')(b3),
                          BasicConv2d(384, **col, name='branch3x3_2b')(b3)], axis=-1)
    dbl = BasicConv2d(448, (1, 1), name='branch3x3dbl_1')(x)
    dbl = BasicConv2d(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(dbl)
    dbl = jnp.concatenate([BasicConv2d(384, **row, name='branch3x3dbl_3a')(dbl),
                           BasicConv2d(384, **col, name='branch3x3dbl_3b')(dbl)], axis=-1)
    pooled = _max_pool_3x3(x, 1) if self.max_pool else _avg_pool_3x3_same(x)
    pool = BasicConv2d(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, b3, dbl, pool], axis=-1)


class FIDInceptionV3(nn.Module):
  """Images (b, h, w, 3) in [-1, 1] -> pool3 features (b, 2048), float32.

  Variables: 'params' (conv kernels (kh, kw, in, out), BN scale and bias) and 'batch_stats'
  (BN running mean and var); `unimm_jax.convert.inception_weights.load_fid_inception` fills
  both from pytorch-fid's weights. With resize_input (pytorch-fid's default) any input size
  is resized to 299x299 first; without it the input must already be the size wanted.
  """
  resize_input: bool = True

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, 3, 3)
    x = images.astype(jnp.float32)
    if self.resize_input:
      x = resize_bilinear_like_torch(x, FID_RESOLUTION, FID_RESOLUTION)
    x = BasicConv2d(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv2d(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3(x, 2)
    x = BasicConv2d(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3(x, 2)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))
