"""UniWeTok: hybrid conv/transformer binary tokenizer (codebook 2^(g*d'), 2^128 in the paper).

Architecture facts from the authors' code, BitDance modeling/vision_encoder/autoencoder_uni.py
(`Encoder`, `GANDecoder`, `VQModel`), and for the WeTok variant WeTok
src/WeTok/modules/diffusionmodules/improved_model.py (`Encoder`, `Decoder`, `GANDecoder`):

Encoder: conv_in 3x3 (no bias) 3 -> ch; per level i (width C_i = ch * ch_mult[i]):
  num_res_blocks ResBlocks, then (except at the last level) a stride-2 downsample conv.
  UniWeTok (`double_channel_downsample=True`): the ResBlocks keep C_i and the downsample conv
  maps C_i -> C_{i+1}. WeTok (False): the first ResBlock of level i maps C_{i-1} -> C_i
  (C_{-1} = ch) and the downsample keeps C_i.
  Middle: num_attn_blocks transformer blocks with 4 registers and encoder-normalised 2D RoPE;
  no ResBlocks between the downsampling path and the transformer.
  Head: GroupNorm -> conv1x1 (with bias) to z = g * d' -> SigLu = 2 * sigmoid(x) - 1 =
  tanh(x / 2) (no swish before the conv; the code has it commented out).
Decoder (`GANDecoder` when generative_decoder else WeTok's `Decoder`):
  generative: concat([z, noise], channels), noise ~ N(0, 1) of z's shape, drawn on every call,
  at inference too (the authors' forward has no deterministic branch), then conv_in 3x3 (with
  bias) 2z -> C_top; otherwise conv_in z -> C_top.
  Middle: num_attn_blocks transformer blocks with 4 registers, decoder-normalised 2D RoPE;
  then num_res_blocks ResBlocks at C_top.
  Per level, top-down (i = L-1 .. 0): AdaptiveGroupNorm(z -> current width) styled by the
  quantized latent, num_res_blocks ResBlocks (as many as the encoder, not taming's
  num_res_blocks + 1; the first maps the current width to C_i), then an Upsampler (conv3x3
  to 4C, DCR depth_to_space) except at level 0.
  Head: GroupNorm -> swish -> conv3x3 (with bias) to 3.
The middle transformer's heads: the code's default n_heads = 16 (no released config sets
another), i.e. head_dim 64 at the paper's top width 1024; here `num_heads` in the config.
"""
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.models.tokenizer_interface import TokenizerOutput
from unimm_jax.nn.conv_blocks import (Downsample, ResBlock, Upsampler, constrain_feature_map, conv,
                                      swish)
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.nn.norms import AdaptiveGroupNorm, GroupNorm
from unimm_jax.nn.rope import GridPositions
from unimm_jax.nn.transformer import GridTransformer
from unimm_jax.quantizers.binary_quantizer import BinaryQuantizer

Dtype = Any

def downsample_factor(config: ml_collections.ConfigDict) -> int:
  """Pixels per latent cell along each side: 2^(len(ch_mult) - 1)."""
  return 2 ** (len(config.ch_mult) - 1)


def _res_block_cls(remat: bool) -> type[nn.Module]:
  """ResBlock, or one whose activations are recomputed in the backward pass (the full-resolution
  ResBlocks hold most of the activation memory at 256 px); parameter names are unchanged."""
  return nn.remat(ResBlock) if remat else ResBlock


class UniWeTokEncoder(nn.Module):
  """Images (b, h, w, 3) -> pre-quantization latents U (b, h/f, w/f, z) in float32."""
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  num_attn_blocks: int
  num_heads: int
  num_registers: int
  z_channels: int
  siglu: bool
  double_channel_downsample: bool
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: str | None = 'xla'

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    widths = [self.ch * m for m in self.ch_mult]
    res_block = _res_block_cls(self.remat)
    x = conv(self.ch, 3, use_bias=False, dtype=self.dtype, name='conv_in')(
        images.astype(self.dtype))
    for level, width in enumerate(widths):
      last = level == len(widths) - 1
      for block in range(self.num_res_blocks):
        x = res_block(width, dtype=self.dtype, name=f'down_{level}_block_{block}')(x)
      if not last:
        down_width = widths[level + 1] if self.double_channel_downsample else width
        x = Downsample(down_width, dtype=self.dtype, name=f'down_{level}_downsample')(x)
    if self.num_attn_blocks:
      x = GridTransformer(self.num_attn_blocks, self.num_heads, self.num_registers,
                          GridPositions.ENCODER, dtype=self.dtype, remat=self.remat,
                          implementation=self.attention_impl, name='mid_attn')(x)
    x = GroupNorm(dtype=self.dtype, name='norm_out')(x)
    # The head runs in float32: its output is the quantizer's input, whose sign decides codes.
    u = conv(self.z_channels, 1, use_bias=True, dtype=jnp.float32, name='conv_out')(
        x.astype(jnp.float32))
    # SigLu as the code computes it: 2 * sigmoid(x) - 1 = tanh(x / 2) (the paper's formula
    # has the opposite sign; the released weights follow the code).
    return jnp.tanh(u / 2) if self.siglu else u


class UniWeTokDecoder(nn.Module):
  """Quantized latents (b, h', w', z) -> images (b, h' * f, w' * f, 3) in float32."""
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  num_attn_blocks: int
  num_heads: int
  num_registers: int
  generative: bool
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: str | None = 'xla'

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    widths = [self.ch * m for m in self.ch_mult]
    res_block = _res_block_cls(self.remat)
    style = z.astype(jnp.float32)
    x = style
    if self.generative:
      # Fresh noise on every call, training and inference alike, as the authors' decoder does.
      noise = jax.random.normal(self.make_rng('noise'), z.shape, jnp.float32)
      x = jnp.concatenate([style, noise], axis=-1)
    x = conv(widths[-1], 3, use_bias=True, dtype=self.dtype, name='conv_in')(x.astype(self.dtype))
    if self.num_attn_blocks:
      x = GridTransformer(self.num_attn_blocks, self.num_heads, self.num_registers,
                          GridPositions.DECODER, dtype=self.dtype, remat=self.remat,
                          implementation=self.attention_impl, name='mid_attn')(x)
    for block in range(self.num_res_blocks):
      x = res_block(widths[-1], dtype=self.dtype, name=f'mid_block_{block}')(x)
    for level in reversed(range(len(widths))):
      x = AdaptiveGroupNorm(dtype=self.dtype, name=f'adaptive_{level}')(x, style)
      for block in range(self.num_res_blocks):
        x = res_block(widths[level], dtype=self.dtype, name=f'up_{level}_block_{block}')(x)
      if level > 0:
        x = Upsampler(dtype=self.dtype, name=f'up_{level}_upsample')(x)
    x = swish(GroupNorm(dtype=self.dtype, name='norm_out')(x))
    return conv(3, 3, use_bias=True, dtype=self.dtype, name='conv_out')(x).astype(jnp.float32)


class UniWeTok(nn.Module):
  """UniWeTok autoencoder with its group-wise binary quantizer.

  Reads from `config`: ch, ch_mult, num_res_blocks, num_attn_blocks (0 = CNN-only ablation),
  num_heads, num_registers, groups (g), group_bits (d'), siglu (False = identity head),
  double_channel_downsample (False = WeTok's downsampling), generative_decoder,
  entropy_temperature and codebook_entropy_ratio (the quantizer's entropy loss), dtype
  ('float32' | 'bfloat16': compute dtype; params stay float32), remat (recompute each
  transformer block and ResBlock in the backward pass), attention_impl
  (`jax.nn.dot_product_attention`'s implementation: 'xla', or 'cudnn' on NVIDIA GPUs).

  With `generative_decoder`, every decode draws noise from the 'noise' rng stream, so
  `apply` needs rngs={'noise': key} for __call__ and decode.

  Images are float32 in [-1, 1], NHWC, with h and w divisible by `downsample_factor(config)`.
  `train` is accepted for the tokenizer interface: the network has no dropout or batch
  statistics, so training and evaluation compute the same function.
  """
  config: ml_collections.ConfigDict

  def setup(self):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype, 'config.model.dtype')
    shared = dict(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                  num_attn_blocks=cfg.num_attn_blocks, num_heads=cfg.num_heads,
                  num_registers=cfg.num_registers, dtype=dtype, remat=cfg.remat,
                  attention_impl=cfg.attention_impl)
    self.encoder = UniWeTokEncoder(
        z_channels=cfg.groups * cfg.group_bits, siglu=cfg.siglu,
        double_channel_downsample=cfg.double_channel_downsample, **shared)
    self.decoder = UniWeTokDecoder(generative=cfg.generative_decoder, **shared)
    self.quantizer = BinaryQuantizer(cfg.groups, cfg.group_bits, cfg.entropy_temperature,
                                     cfg.codebook_entropy_ratio)

  @property
  def _z_channels(self) -> int:
    return self.config.groups * self.config.group_bits

  def encode(self, images: jax.Array, *, train: bool = False) -> TokenizerOutput:
    """Images (b, h, w, 3) -> TokenizerOutput without recon: latents = quantized (b, h/f,
    w/f, g*d') float32 +-1 with straight-through gradient, codes (b, h/f, w/f, g) int32, the
    quantizer's losses and stats, and features['pre_quant'] = the encoder output U_G
    (b, h/f, w/f, g*d') before quantization."""
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, -1, 3)
    factor = downsample_factor(self.config)
    b, h, w, _ = images.shape
    if h % factor or w % factor:
      raise ValueError(f'image size {h}x{w} is not divisible by the downsample factor {factor}')
    images = nn.with_logical_constraint(images, ('batch', None, None, None))
    u = self.encoder(images)
    chex.assert_shape(u, (b, h // factor, w // factor, self._z_channels))
    quantized, codes, losses, stats = self.quantizer(u, train)
    return TokenizerOutput(recon=None, codes=codes, latents=constrain_feature_map(quantized),
                           losses=losses, stats=stats, features={'pre_quant': u})

  def decode(self, quantized: jax.Array, *, train: bool = False) -> jax.Array:
    """Quantized latents (b, h', w', g*d') -> reconstruction (b, h'*f, w'*f, 3) float32."""
    del train  # same computation in both modes; see the class docstring
    chex.assert_rank(quantized, 4)
    chex.assert_axis_dimension(quantized, -1, self._z_channels)
    b, h, w, _ = quantized.shape
    factor = downsample_factor(self.config)
    recon = self.decoder(quantized)
    chex.assert_shape(recon, (b, h * factor, w * factor, 3))
    return nn.with_logical_constraint(recon, ('batch', None, None, None))

  def codes_to_quantized(self, codes: jax.Array) -> jax.Array:
    """Codes (b, h', w', g) -> quantized latents (b, h', w', g*d') float32 +-1."""
    return self.quantizer.codes_to_quantized(codes)

  def __call__(self, images: jax.Array, *, train: bool) -> TokenizerOutput:
    """Encode, quantize and decode: images (b, h, w, 3) -> `encode`'s TokenizerOutput with
    recon (b, h, w, 3)."""
    out = self.encode(images, train=train)
    return out.replace(recon=self.decode(out.latents, train=train))
