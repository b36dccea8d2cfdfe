"""Chameleon's VQGAN image tokenizer (taming-transformers' VQModel at Chameleon's shape).

Architecture facts from transformers' ChameleonVQVAE (encoder, quantizer, quant_conv,
post_quant_conv) and the authors' vqgan.py (Meta's copy of taming's `Encoder`, `Decoder`,
`VQModel`, shipped with Chameleon, Lumina-mGPT and UniToken), with L = len(ch_mult) levels of
width C_i = ch * ch_mult[i]:

Encoder: conv_in 3x3 3 -> ch; per level i: num_res_blocks ResBlocks (taming's, with conv
  biases; the first maps C_{i-1} -> C_i, C_{-1} = ch), each followed by an attention block
  when level i is in attn_levels; then, except at the last level, a stride-2 conv3x3 after a
  (0, 1, 0, 1) zero pad (right and bottom). Middle: ResBlock, attention (when
  mid_attention), ResBlock at C_{L-1}. Head: GroupNorm -> swish -> conv3x3 to z_channels.
quant_conv 1x1 z_channels -> embed_dim; the vector quantizer (n_embed codes, beta 0.25,
  legacy loss); post_quant_conv 1x1 embed_dim -> z_channels.
Decoder: conv_in 3x3 z_channels -> C_{L-1}; middle as the encoder's; per level i = L-1 .. 0:
  num_res_blocks + 1 ResBlocks (the first maps the current width to C_i), each followed by
  attention when level i is in attn_levels, then, except at level 0, nearest x2 + conv3x3.
  Head: GroupNorm -> swish -> conv3x3 to 3 (no tanh).
GroupNorm: 32 groups (fewer for widths 32 does not divide, tiny configs only), eps 1e-6.
Attention block: GroupNorm, 1x1 q/k/v (with bias), single-head softmax attention over the
  h * w positions with scale 1/sqrt(C), 1x1 proj_out, residual.
Level i works at resolution `resolution / 2^i` in taming's configs, whose `attn_resolutions`
list resolutions; here `attn_levels` lists level indices (the converter translates).
"""
from collections.abc import Mapping
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.models.tokenizer_interface import TokenizerOutput
from unimm_jax.nn.attention import MultiHeadAttention
from unimm_jax.nn.conv_blocks import (Downsample, NearestUpsample, ResBlock,
                                      constrain_feature_map, conv, swish)
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.nn.norms import GroupNorm
from unimm_jax.quantizers.vector_quantizer import VectorQuantizer

Dtype = Any
_POSITIVE_FIELDS = ('ch', 'z_channels', 'embed_dim', 'n_embed', 'norm_groups')


def paper_model_config() -> ml_collections.ConfigDict:
  """config.model of Chameleon's released tokenizer (transformers' ChameleonVQVAEConfig
  defaults, the authors' vqgan.py layout): 512 px -> 32 x 32 codes of 8192."""
  return ml_collections.ConfigDict(dict(
      name='chameleon_vqgan',
      ch=128,
      ch_mult=(1, 1, 2, 2, 4),
      num_res_blocks=2,
      attn_levels=(),  # levels with attention after each ResBlock (attn_resolutions: none)
      mid_attention=True,  # the middle block's attention, at the lowest resolution
      z_channels=256,
      embed_dim=256,
      n_embed=8192,
      beta=0.25,
      legacy_loss=True,  # taming's default placement of beta (quantizers/vector_quantizer)
      dtype='float32',
      remat=False,
      attention_impl='xla',  # jax.nn.dot_product_attention's: 'xla', or 'cudnn' on GPUs
      # GroupNorm(32, C) as released; narrow CPU configs use fewer groups so that each
      # holds several channels (one channel per group normalises away its colour).
      norm_groups=32,
  ))


def downsample_factor(config: ml_collections.ConfigDict) -> int:
  """Pixels per code along each side: 2^(len(ch_mult) - 1) (16 at Chameleon's shape)."""
  return 2 ** (len(config.ch_mult) - 1)


def validate_model_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field of a chameleon_vqgan `config.model`."""
  for field in _POSITIVE_FIELDS:
    value = config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'config.model.{field}={value!r} must be a positive int')
  blocks = config.num_res_blocks
  if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 0:
    raise ValueError(f'config.model.num_res_blocks={blocks!r} must be an int >= 0 (the '
                     'encoder has that many ResBlocks per level, the decoder one more)')
  if not config.ch_mult or any(not isinstance(m, int) or m < 1 for m in config.ch_mult):
    raise ValueError(f'config.model.ch_mult={config.ch_mult!r} must be positive ints')
  levels = len(config.ch_mult)
  if any(not isinstance(i, int) or not 0 <= i < levels for i in config.attn_levels):
    raise ValueError(f'config.model.attn_levels={config.attn_levels!r} must be level indices '
                     f'in [0, {levels})')
  if not config.beta >= 0:
    raise ValueError(f'config.model.beta={config.beta!r} must be >= 0')
  compute_dtype(config.dtype, 'config.model.dtype')
  if config.attention_impl not in ('xla', 'cudnn'):
    raise ValueError(f"config.model.attention_impl={config.attention_impl!r} is not 'xla' "
                     "or 'cudnn'")


class AttnBlock(nn.Module):
  """taming's AttnBlock: x + proj(attention(GroupNorm(x))), one head over the h * w cells.

  Shapes: (b, h, w, c) -> (b, h, w, c). Params: `norm`, `attention` (query/key/value/out
  kernels with biases, one head of width c: scale 1/sqrt(c)).
  """
  dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = GroupNorm(dtype=self.dtype, max_groups=self.norm_groups,
                  name='norm')(x).reshape(b, h * w, c)
    y = MultiHeadAttention(num_heads=1, qkv_bias=True, out_bias=True, rope=None,
                           implementation=self.attention_impl, dtype=self.dtype,
                           name='attention')(y)
    return constrain_feature_map(x + y.reshape(b, h, w, c).astype(x.dtype))


class _Stack(nn.Module):
  """Shared fields of the encoder and decoder."""
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_levels: tuple[int, ...]
  mid_attention: bool
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: str = 'xla'
  norm_groups: int = 32

  def _res_block(self, features: int, name: str) -> nn.Module:
    cls = nn.remat(ResBlock) if self.remat else ResBlock
    return cls(features, dtype=self.dtype, use_bias=True, norm_groups=self.norm_groups,
               name=name)

  def _attn(self, name: str) -> AttnBlock:
    return AttnBlock(dtype=self.dtype, attention_impl=self.attention_impl,
                     norm_groups=self.norm_groups, name=name)

  def _middle(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = self._res_block(width, 'mid_block_1')(x)
    if self.mid_attention:
      x = self._attn('mid_attn_1')(x)
    return self._res_block(width, 'mid_block_2')(x)

  def _head(self, x: jax.Array, features: int) -> jax.Array:
    x = swish(GroupNorm(dtype=self.dtype, max_groups=self.norm_groups, name='norm_out')(x))
    return conv(features, 3, use_bias=True, dtype=self.dtype, name='conv_out')(x)


class ChameleonVQGANEncoder(_Stack):
  """Images (b, h, w, 3) -> encoder output (b, h/f, w/f, z_channels) float32."""
  z_channels: int = 256

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = conv(self.ch, 3, use_bias=True, dtype=self.dtype, name='conv_in')(
        images.astype(self.dtype))
    for level, mult in enumerate(self.ch_mult):
      for block in range(self.num_res_blocks):
        x = self._res_block(self.ch * mult, f'down_{level}_block_{block}')(x)
        if level in self.attn_levels:
          x = self._attn(f'down_{level}_attn_{block}')(x)
      if level != len(self.ch_mult) - 1:
        x = Downsample(x.shape[-1], dtype=self.dtype, taming_padding=True,
                       name=f'down_{level}_downsample')(x)
    return self._head(self._middle(x), self.z_channels).astype(jnp.float32)


class ChameleonVQGANDecoder(_Stack):
  """Decoder input (b, h', w', z_channels) -> images (b, h' f, w' f, 3) float32."""

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    x = conv(self.ch * self.ch_mult[-1], 3, use_bias=True, dtype=self.dtype, name='conv_in')(
        z.astype(self.dtype))
    x = self._middle(x)
    for level in reversed(range(len(self.ch_mult))):
      for block in range(self.num_res_blocks + 1):
        x = self._res_block(self.ch * self.ch_mult[level], f'up_{level}_block_{block}')(x)
        if level in self.attn_levels:
          x = self._attn(f'up_{level}_attn_{block}')(x)
      if level:
        x = NearestUpsample(dtype=self.dtype, name=f'up_{level}_upsample')(x)
    return self._head(x, 3).astype(jnp.float32)


_ENCODING_KEYS = ('quantized', 'image_tokens', 'embedding_loss', 'encoder_output')


@flax.struct.dataclass
class VQEncoding(TokenizerOutput, Mapping):
  """`ChameleonVQGAN.encode`'s result: a TokenizerOutput (recon None; codes (b, h', w', 1)
  int32; latents = the quantized (b, h', w', embed_dim); losses {'embedding'}; stats;
  features {'encoder_output', 'pre_quant'}) that also reads as a mapping with the keys
    quantized       (b, h', w', embed_dim) float32, straight-through quantized latents
    image_tokens    (b, h' * w') int32 codes, row-major (transformers' `image_tokens`)
    embedding_loss  float32 scalar, the quantizer's loss
    encoder_output  (b, h', w', z_channels) float32, before quant_conv (transformers'
                    `last_hidden_state`).
  """
  image_tokens: jax.Array

  def __getitem__(self, key: str) -> jax.Array:
    if key == 'quantized':
      return self.latents
    if key == 'embedding_loss':
      return self.losses['embedding']
    if key == 'encoder_output':
      return self.features['encoder_output']
    if key == 'image_tokens':
      return self.image_tokens
    raise KeyError(f'{key!r} is not one of {_ENCODING_KEYS}')

  def __iter__(self):
    return iter(_ENCODING_KEYS)

  def __len__(self) -> int:
    return len(_ENCODING_KEYS)


class ChameleonVQGAN(nn.Module):
  """Chameleon's VQGAN: encoder, quant_conv, quantizer, post_quant_conv, decoder.

  Reads from `config` (config.model): ch, ch_mult, num_res_blocks, attn_levels (levels with
  attention after each ResBlock), mid_attention, z_channels, embed_dim, n_embed, beta,
  legacy_loss (see `unimm_jax.quantizers.vector_quantizer`), dtype (compute; params and the
  quantizer stay float32), remat (recompute ResBlocks in the backward pass), attention_impl.

  Images are float32 in [-1, 1], NHWC, with h and w divisible by `downsample_factor`.
  Params: encoder, quant_conv, quantizer/embedding (n_embed, embed_dim), post_quant_conv,
  decoder. No dropout or batch statistics: `train` changes nothing.
  """
  config: ml_collections.ConfigDict

  def setup(self):
    cfg = self.config
    validate_model_config(cfg)
    shared = dict(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                  attn_levels=tuple(cfg.attn_levels), mid_attention=cfg.mid_attention,
                  dtype=compute_dtype(cfg.dtype, 'config.model.dtype'), remat=cfg.remat,
                  attention_impl=cfg.attention_impl, norm_groups=cfg.norm_groups)
    self.encoder = ChameleonVQGANEncoder(z_channels=cfg.z_channels, **shared)
    self.decoder = ChameleonVQGANDecoder(**shared)
    # The 1x1 convs around the quantizer run in float32: their outputs decide the codes.
    self.quant_conv = conv(cfg.embed_dim, 1, use_bias=True, dtype=jnp.float32,
                           name='quant_conv')
    self.post_quant_conv = conv(cfg.z_channels, 1, use_bias=True, dtype=jnp.float32,
                                name='post_quant_conv')
    self.quantizer = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy_loss)

  def encode(self, images: jax.Array, *, train: bool = False) -> VQEncoding:
    """Images (b, h, w, 3) -> VQEncoding (see there): codes, quantized latents, the
    embedding loss. `out['image_tokens']` are the (b, h' * w') codes of the MLLM side."""
    factor = downsample_factor(self.config)
    if images.ndim != 4 or images.shape[-1] != 3 or any(s % factor for s in images.shape[1:3]):
      raise ValueError(f'images of shape {images.shape}: want (b, h, w, 3) with h and w '
                       f'divisible by the downsample factor {factor}')
    b, h, w, _ = images.shape
    images = nn.with_logical_constraint(images, ('batch', None, None, None))
    hidden = self.encoder(images)
    chex.assert_shape(hidden, (b, h // factor, w // factor, self.config.z_channels))
    pre_quant = self.quant_conv(hidden)
    quantized, codes, losses, stats = self.quantizer(pre_quant, train)
    return VQEncoding(recon=None, codes=codes, latents=constrain_feature_map(quantized),
                      losses=losses, stats=stats,
                      features={'encoder_output': hidden, 'pre_quant': pre_quant},
                      image_tokens=codes.reshape(b, -1))

  def decode(self, quantized: jax.Array, *, train: bool = False) -> jax.Array:
    """Quantized latents (b, h', w', embed_dim) -> reconstruction (b, h' f, w' f, 3) float32
    (post_quant_conv, then the decoder)."""
    del train  # same computation in both modes
    chex.assert_rank(quantized, 4)
    chex.assert_axis_dimension(quantized, -1, self.config.embed_dim)
    b, h, w, _ = quantized.shape
    factor = downsample_factor(self.config)
    recon = self.decoder(self.post_quant_conv(quantized.astype(jnp.float32)))
    chex.assert_shape(recon, (b, h * factor, w * factor, 3))
    return nn.with_logical_constraint(recon, ('batch', None, None, None))

  def codes_to_quantized(self, codes: jax.Array) -> jax.Array:
    """Codes (b, h', w', 1) -> quantized latents (b, h', w', embed_dim) float32."""
    return self.quantizer.codes_to_quantized(codes)

  def decode_codes(self, codes: jax.Array) -> jax.Array:
    """Codes (b, h', w') integers in [0, n_embed) -> images (b, h' f, w' f, 3) float32
    (not clipped)."""
    chex.assert_rank(codes, 3)
    return self.decode(self.codes_to_quantized(codes[..., None]))

  def __call__(self, images: jax.Array, *, train: bool = False) -> VQEncoding:
    """Encode, quantize and decode: `encode`'s result with recon (b, h, w, 3)."""
    out = self.encode(images, train=train)
    return out.replace(recon=self.decode(out.latents, train=train))
