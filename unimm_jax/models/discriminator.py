"""Image discriminators for the tokenizers' adversarial loss (NHWC, images in [-1, 1]).

`PatchGAN` is the pix2pix / taming NLayerDiscriminator that WeTok (src/WeTok/modules/
discriminator/model.py, `NLayerDiscriminator` + `weights_init`) and EvoTok (evotok/tokenizer/
modules/discriminator_patchgan.py, `NLayerDiscriminator`) train with. Facts from that code:
- conv4x4 stride 2 (with bias) 3 -> ndf, LeakyReLU(0.2); then for n = 1 .. n_layers - 1 a
  conv4x4 stride 2 to ndf * min(2^n, 8) without bias, BatchNorm, LeakyReLU(0.2); then the
  same at stride 1 to ndf * min(2^n_layers, 8); then conv4x4 stride 1 (with bias) to 1 channel.
  Every conv pads 1 on each side, so a 256 px image gives a 30 x 30 logit map
  (256 -> 128 -> 64 -> 32 -> 31 -> 30).
- init: conv kernels N(0, 0.02); BatchNorm scale N(1, 0.02), bias 0. The two conv biases keep
  PyTorch's default U(+-1/sqrt(fan_in)) there; here they start at zero, as every bias in this
  library does (at most 0.14 in magnitude there, and the discriminator is trained from scratch).
- BatchNorm2d defaults: eps 1e-5, momentum 0.1 (flax momentum 0.9).

`StyleGANDiscriminator` follows the residual discriminator EvoTok ships as its 'stylegan'
option (evotok/tokenizer/modules/discriminator_stylegan.py), with StyleGAN2's minibatch
standard deviation layer added in front of the final conv (EvoTok's copy has none; set
`mbstd_group_size=0` for that network).
"""
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.nn import initializers
from unimm_jax.nn.conv_blocks import constrain_feature_map, conv
from unimm_jax.nn.dtypes import compute_dtype

Dtype = Any

_LEAKY_SLOPE = 0.2


def leaky_relu(x: jax.Array) -> jax.Array:
  return jax.nn.leaky_relu(x, _LEAKY_SLOPE)


def _normal_around_one(stddev: float) -> jax.nn.initializers.Initializer:
  """N(1, stddev): the BatchNorm scale init of taming's `weights_init`."""
  def init(key, shape, dtype=jnp.float32):
    return 1.0 + stddev * jax.random.normal(key, shape, dtype)
  return init


class PatchGAN(nn.Module):
  """NLayerDiscriminator: images (b, h, w, c) -> per-patch logits (b, h', w', 1) float32.

  Each spatial size halves (s -> s // 2) in the n_layers stride-2 convs (the first conv and
  the next n_layers - 1) and then loses 1 in each of the two stride-1 convs
  (h' = h / 2^n_layers - 2 for h divisible by 2^n_layers).

  BatchNorm and sharding. With `train=True` every BatchNorm normalises with the mean and
  (biased) variance over batch, height and width of its input, and its running averages in
  the 'batch_stats' collection move by 0.1 towards them (so `apply` needs
  mutable=['batch_stats']); with `train=False` it uses the running averages. The layers are
  built without `axis_name` on purpose: under `jax.jit` the array is one global array even
  when its batch dimension is split over devices, so the `jnp.mean` over the batch axis inside
  BatchNorm is a reduction over the global batch, and GSPMD inserts the cross-device
  all-reduce itself. The statistics (and so the output) are those of the whole batch, on any
  mesh, identical to one device. An `axis_name` is only needed where the code sees one shard
  per program (`pmap`, `shard_map`), which this library does not use for the discriminator.
  That is the statistics of PyTorch's SyncBatchNorm; the authors' plain BatchNorm2d under DDP
  normalised each GPU's share separately.

  Running statistics: PyTorch stores the unbiased variance (times n / (n - 1), n = b * h * w,
  at most 1.0011 at 256 px), flax the biased one; both normalise with the biased one in
  training. The authors call the discriminator once on real and once on fake images, so each
  call normalises its own batch and the running averages move twice per step; calling it on
  the concatenation instead pools real and fake into one set of statistics.
  """
  n_layers: int = 3
  ndf: int = 64
  dtype: Dtype = jnp.float32

  def _conv(self, features: int, strides: int, use_bias: bool, name: str) -> nn.Conv:
    return nn.Conv(features, (4, 4), strides=strides, padding=((1, 1), (1, 1)),
                   use_bias=use_bias, dtype=self.dtype,
                   kernel_init=initializers.normal(0.02, None, None, 'conv_in', 'conv_out'),
                   bias_init=initializers.zeros('conv_out'), name=name)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    chex.assert_rank(images, 4)
    if self.n_layers < 1:
      raise ValueError(f'PatchGAN needs n_layers >= 1, got {self.n_layers}')
    x = nn.with_logical_constraint(images, ('batch', None, None, None))
    x = leaky_relu(self._conv(self.ndf, 2, True, 'conv0')(x))
    for n in range(1, self.n_layers + 1):
      # The last normalised conv keeps the resolution (stride 1); the others halve it.
      strides = 2 if n < self.n_layers else 1
      x = self._conv(self.ndf * min(2 ** n, 8), strides, False, f'conv{n}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, use_fast_variance=False,
                       scale_init=nn.with_logical_partitioning(_normal_around_one(0.02),
                                                               ('conv_out',)),
                       bias_init=initializers.zeros('conv_out'), name=f'norm{n}')(x)
      x = constrain_feature_map(leaky_relu(x))
    logits = self._conv(1, 1, True, f'conv{self.n_layers + 1}')(x)
    if 0 in logits.shape[1:3]:
      # PyTorch raises here; an empty map would make every loss a mean over nothing (NaN).
      raise ValueError(f'{images.shape[1]}x{images.shape[2]} images are too small for a '
                       f'{self.n_layers}-layer PatchGAN: the logit map is empty')
    return logits.astype(jnp.float32)


def blur_3x3(x: jax.Array) -> jax.Array:
  """[1, 2, 1] x [1, 2, 1] / 16 low-pass filter, reflect-padded, size kept: (b, h, w, c).

  The filter and border of EvoTok's `Blur` (kornia `filter2d(normalized=True)`, whose default
  border is 'reflect'); separable, so two 1D passes.
  """
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  x = (x[:, :-2] + 2.0 * x[:, 1:-1] + x[:, 2:]) / 4.0
  return (x[:, :, :-2] + 2.0 * x[:, :, 1:-1] + x[:, :, 2:]) / 4.0


def minibatch_stddev(x: jax.Array, group_size: int, num_features: int = 1) -> jax.Array:
  """StyleGAN2's minibatch standard deviation: (b, h, w, c) -> (b, h, w, c + num_features).

  Samples form groups of G = min(group_size, b); channels are split into `num_features`
  contiguous chunks. Per group and chunk, the standard deviation over the group's samples
  (biased, + 1e-8 inside the sqrt) is averaged over positions and the chunk's channels, and
  appended as a constant feature map to every sample of the group. The discriminator thereby
  sees how varied a batch is, which penalises a collapsed generator.

  Groups are runs of G consecutive samples (StyleGAN2 takes every (b/G)-th sample): with the
  batch split over devices in contiguous blocks whose size is a multiple of G, each group
  lives on one device and the layer needs no communication.
  """
  chex.assert_rank(x, 4)
  b, h, w, c = x.shape
  g = min(group_size, b)
  if b % g or c % num_features:
    raise ValueError(f'minibatch_stddev: batch {b} must be divisible by the group size {g} '
                     f'and channels {c} by num_features {num_features}')
  y = x.astype(jnp.float32).reshape(b // g, g, h, w, num_features, c // num_features)
  y = y - jnp.mean(y, axis=1, keepdims=True)
  y = jnp.sqrt(jnp.mean(jnp.square(y), axis=1) + 1e-8)  # (b/g, h, w, f, c/f)
  y = jnp.mean(y, axis=(1, 2, 4))  # (b/g, f)
  y = jnp.broadcast_to(jnp.repeat(y, g, axis=0)[:, None, None, :], (b, h, w, num_features))
  return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)


class _ResidualDownBlock(nn.Module):
  """EvoTok's `DiscriminatorBlock`: (b, h, w, c) -> (b, h/2, w/2, features).

  main: conv3x3 -> lrelu -> conv3x3 -> lrelu -> [blur] -> conv3x3 stride 2 (no activation);
  skip: conv1x1 stride 2; out = (main + skip) / sqrt(2), which keeps the variance of the sum
  of two roughly independent unit-variance paths at 1.
  """
  features: int
  blur: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    skip = conv(self.features, 1, use_bias=True, dtype=self.dtype, strides=2, name='skip')(x)
    y = leaky_relu(conv(self.features, 3, use_bias=True, dtype=self.dtype, name='conv0')(x))
    y = leaky_relu(conv(self.features, 3, use_bias=True, dtype=self.dtype, name='conv1')(y))
    if self.blur:
      y = blur_3x3(y)
    y = conv(self.features, 3, use_bias=True, dtype=self.dtype, strides=2, name='down')(y)
    return constrain_feature_map((y + skip) * (1.0 / math.sqrt(2.0)))


class StyleGANDiscriminator(nn.Module):
  """StyleGAN2-like residual discriminator: images (b, s, s, c) -> logits (b, 1) float32.

  Width at resolution r is min(channel_base // r, channel_max) (the defaults give EvoTok's
  table: 64 channels at 256 px, 128 at 128, 256 at 64, 512 from 32 down). The number of
  blocks follows from the input: conv3x3 from RGB at width(s), lrelu; log2(s) - 2 residual
  blocks halving the resolution down to 4 x 4; minibatch stddev (`mbstd_group_size` 0 skips
  it); conv3x3 to width(4), lrelu; flatten; dense to width(4), lrelu; dense to 1.

  Blur: on by default, as in EvoTok (a [1, 2, 1] binomial filter before each stride-2 conv of
  the main path, which reduces aliasing of the strided subsampling); `blur=False` drops it.
  No normalisation layers, so `train` changes nothing and there is no 'batch_stats'; it is
  accepted so that every discriminator has one call signature. Weights use this library's
  PyTorch-default init (as EvoTok's code), not StyleGAN's equalised learning rate.
  """
  channel_base: int = 16384
  channel_max: int = 512
  blur: bool = True
  mbstd_group_size: int = 4
  mbstd_num_features: int = 1
  dtype: Dtype = jnp.float32

  def width(self, resolution: int) -> int:
    return min(self.channel_base // resolution, self.channel_max)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    del train  # no batch statistics or dropout
    chex.assert_rank(images, 4)
    b, h, w, _ = images.shape
    if h != w or h < 4 or h & (h - 1):
      raise ValueError(f'StyleGANDiscriminator needs square power-of-two images of at least '
                       f'4 px, got {h}x{w}')
    x = nn.with_logical_constraint(images, ('batch', None, None, None))
    x = leaky_relu(conv(self.width(h), 3, use_bias=True, dtype=self.dtype, name='from_rgb')(x))
    resolution = h
    while resolution > 4:
      x = _ResidualDownBlock(self.width(resolution // 2), self.blur, dtype=self.dtype,
                             name=f'block_{resolution}')(x)
      resolution //= 2
    if self.mbstd_group_size:
      x = minibatch_stddev(x, self.mbstd_group_size, self.mbstd_num_features)
    x = leaky_relu(conv(self.width(4), 3, use_bias=True, dtype=self.dtype, name='final_conv')(x))
    x = x.reshape(b, -1)
    x = leaky_relu(nn.Dense(self.width(4), dtype=self.dtype,
                            kernel_init=initializers.kernel_init('conv_in', 'conv_out'),
                            bias_init=initializers.zeros('conv_out'), name='final_dense')(x))
    logits = nn.Dense(1, dtype=self.dtype, kernel_init=initializers.kernel_init('conv_in', None),
                      bias_init=initializers.zeros(None), name='out')(x)
    return logits.astype(jnp.float32)


def build_discriminator(disc_config: ml_collections.ConfigDict) -> nn.Module:
  """The discriminator named by `config.disc.name`.

  'patchgan' reads n_layers, ndf; 'stylegan' reads stylegan_channel_base,
  stylegan_channel_max and, where present, stylegan_blur (True), stylegan_mbstd_group_size
  (4), stylegan_mbstd_num_features (1). Both read dtype ('float32' | 'bfloat16') where
  present (default float32; parameters, statistics and logits stay float32).
  """
  dtype_name = disc_config.get('dtype', 'float32')
  dtype = compute_dtype(dtype_name, 'config.disc.dtype')
  if disc_config.name == 'patchgan':
    return PatchGAN(n_layers=disc_config.n_layers, ndf=disc_config.ndf, dtype=dtype)
  if disc_config.name == 'stylegan':
    return StyleGANDiscriminator(
        channel_base=disc_config.stylegan_channel_base,
        channel_max=disc_config.stylegan_channel_max,
        blur=disc_config.get('stylegan_blur', True),
        mbstd_group_size=disc_config.get('stylegan_mbstd_group_size', 4),
        mbstd_num_features=disc_config.get('stylegan_mbstd_num_features', 1),
        dtype=dtype)
  raise ValueError(f"config.disc.name={disc_config.name!r} is not one of "
                   f"['patchgan', 'stylegan']")
