"""MingTok (../shared/papers/mingtok.txt section 2, SPECS 4): a continuous tokenizer in three
stages, trained by masked feature prediction.

  images (b, H, W, 3) in [-1, 1]
    -> low-level encoder: ViT, patch P (32), full attention, class token appended last
       -> output layer: mean of each run of width / d channels + Linear(GELU(LN(x))) to d
       -> latents z (b, H/P, W/P, d), normalised (z - mean) / scale        [what `encode` gives]
    -> semantic decoder: Linear(d -> width) + each latent channel repeated width / d times,
       causal blocks, no positions, final LayerNorm -> features (b, n, width)  [what the LLM reads]
    -> pixel decoder: Linear(width -> r^2 width_pix), each token a r x r block (r = P / p),
       full-attention blocks, LayerNorm, Linear to p x p x 3 pixels, unpatchify, clamp

Facts from the authors' code (inclusionAI/Ming-UniVision, mingtok/modeling_mingtok.py and
mingtok/vision_transformer/), which decide whether their weights load:
- every block is pre-LayerNorm (eps 1e-6) with biased qkv / proj, no LayerScale, heads of 64;
  the encoder's and semantic decoder's MLPs are SwiGLU with hidden round_up_8(int(4 w 2/3))
  (768 -> 2048, 1024 -> 2736), silu on the first half of w12; the pixel decoder's is
  fc2(GELU(fc1)) 4x wide, exact GELU, as is the encoder output layer's GELU;
- the encoder's class token is appended after the patches and its position is the last row of
  pos_embed; positions are resized, for any grid but the square native one, by torch's bicubic
  `interpolate` in the scale_factor form with DINOv2's 0.1 offset, ((g + 0.1) / M), in float32;
- the semantic decoder is causal, so the class token (last) changes no patch feature: they drop
  its output, and here it is never fed (the encoder still attends to it);
- `forward` returns the latents normalised; the semantic decoder reads them un-normalised
  (`forward_feature_decoder` multiplies back), so `semantic_features` and `decode` take
  normalised latents and undo it;
- the pixel decoder's rearrange "b (h w) (x y c) -> b (h x w y) c": channel (x, y, c) of token
  (h, w) becomes token (h r + x, w r + y); its head's channels are (row, column, RGB) of a
  p x p patch ('nhwpqc -> nchpwq'); the image is clamped to [-1, 1].

Training (the paper; the authors released no training code): `__call__(images, train=True)`
masks a random `config.mask.ratio` of the patch tokens of a `config.mask.image_fraction` of
the images at the encoder's input (a learned mask token replaces their patch embeddings, the
positions stay, as SimMIM), and returns the masked pass: the pixel decoder reconstructs the
whole image from masked and unmasked inputs alike, and `features` carry the latents, the
semantic features and the mask for the masked feature prediction modules
(`unimm_jax.systems.mingtok`). The mask token is ours (not in their release: imported as 0).
"""
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.models.tokenizer_interface import TokenizerOutput
from unimm_jax.models.vit import EncoderLayer, ViTConfig
from unimm_jax.nn import initializers
from unimm_jax.nn import kv_cache
from unimm_jax.nn import masks
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.nn.resize import resize_bicubic

_LN_EPS = 1e-6
_HEAD_DIM = 64  # their builders: num_heads = width // 64
# DINOv2's work-around offset in the position resize's scale factor (their default).
POSITION_RESIZE_OFFSET = 0.1


def swiglu_hidden(width: int, mlp_ratio: int = 4) -> int:
  """Their SwiGLUFFNFused width: int(mlp_ratio * width * 2 / 3) rounded up to a multiple of 8."""
  return (int(mlp_ratio * width * 2 / 3) + 7) // 8 * 8


def block_config(config: ml_collections.ConfigDict, stage: str) -> ViTConfig:
  """The blocks of config.model.<stage> ('encoder', 'semantic' or 'pixel') as a ViTConfig
  ('siglip' is the plain pre-LN family; image_size / patch_size are unused here)."""
  s = config[stage]
  swiglu = stage != 'pixel'
  return ViTConfig(family='siglip', hidden_size=s.width, num_layers=s.depth,
                   num_heads=s.width // _HEAD_DIM, patch_size=1, image_size=1,
                   mlp_dim=swiglu_hidden(s.width, s.mlp_ratio) if swiglu else s.mlp_ratio * s.width,
                   swiglu=swiglu, activation='gelu', layer_norm_eps=_LN_EPS,
                   dtype=compute_dtype(config.dtype, 'config.model.dtype'), remat=config.remat,
                   attention_impl=config.attention_impl)


def validate_model_config(config: ml_collections.ConfigDict) -> None:
  """Names the first inconsistent field of config.model."""
  for stage in ('encoder', 'semantic', 'pixel'):
    if config[stage].width % _HEAD_DIM:
      raise ValueError(f'config.model.{stage}.width={config[stage].width} is not a multiple of '
                       f'the heads\' width {_HEAD_DIM}')
  if config.encoder.width % config.latent_dim:
    raise ValueError(f'config.model.encoder.width={config.encoder.width} is not a multiple of '
                     f'latent_dim={config.latent_dim} (the output shortcut averages runs)')
  if config.semantic.width % config.latent_dim:
    raise ValueError(f'config.model.semantic.width={config.semantic.width} is not a multiple '
                     f'of latent_dim={config.latent_dim} (the input shortcut repeats channels)')
  if config.encoder.patch_size % config.pixel.patch_size:
    raise ValueError(f'config.model.pixel.patch_size={config.pixel.patch_size} does not divide '
                     f'encoder.patch_size={config.encoder.patch_size}')
  if config.image_size % config.encoder.patch_size:
    raise ValueError(f'config.model.image_size={config.image_size} is not a multiple of '
                     f'encoder.patch_size={config.encoder.patch_size}')
  if not 0.0 <= config.mask.ratio < 1.0 or not 0.0 <= config.mask.image_fraction <= 1.0:
    raise ValueError(f'config.model.mask: ratio={config.mask.ratio} must lie in [0, 1) and '
                     f'image_fraction={config.mask.image_fraction} in [0, 1]')


def downsample_factor(config: ml_collections.ConfigDict) -> int:
  return config.encoder.patch_size


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=_LN_EPS, use_fast_variance=False, dtype=dtype,
                      scale_init=initializers.ones('embed'), bias_init=initializers.zeros('embed'),
                      name=name)


def _dense(features: int, dtype: Any, axes: tuple, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=initializers.kernel_init(*axes),
                  bias_init=initializers.zeros(axes[1]), name=name)


def sample_token_mask(rng: jax.Array, batch: int, tokens: int, ratio: float,
                      image_fraction: float) -> jax.Array:
  """(b, n) bool, True = masked: round(ratio * n) random tokens in each of a random
  `image_fraction` of the images (each image independently), none in the others."""
  count = round(ratio * tokens)
  order_rng, image_rng = jax.random.split(rng)
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(order_rng, (batch, tokens)), axis=1), axis=1)
  masked_image = jax.random.uniform(image_rng, (batch, 1)) < image_fraction
  return (ranks < count) & masked_image


class LowLevelEncoder(nn.Module):
  """Images (b, H, W, 3) -> un-normalised latents (b, H/P, W/P, d) float32 (class token
  dropped). `token_mask` (b, n) bool replaces those patch embeddings by the mask token.

  Params: patch_embedding (P, P, 3, w), patch_bias, class_embedding (w,), position_embedding
  (M^2 + 1, w) (class last), mask_token (w,), layers_{i}, out_norm, out_proj.
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    c = block_config(cfg, 'encoder')
    p, w = cfg.encoder.patch_size, cfg.encoder.width
    chex.assert_rank(images, 4)
    b, height, width, _ = images.shape
    gh, gw = height // p, width // p
    patches = images[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, 3)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * 3)
    kernel = self.param('patch_embedding', initializers.kernel_init_axes(
        (None, None, None, 'embed'), in_axis=(0, 1, 2), out_axis=3), (p, p, 3, w))
    x = jnp.einsum('bnk,kd->bnd', patches.astype(c.dtype), kernel.reshape(-1, w).astype(c.dtype))
    x = x + self.param('patch_bias', initializers.zeros('embed'), (w,)).astype(c.dtype)
    mask_token = self.param('mask_token', initializers.zeros('embed'), (w,))
    if token_mask is not None:
      x = jnp.where(token_mask[..., None], mask_token.astype(c.dtype), x)
    cls = self.param('class_embedding', initializers.zeros('embed'), (w,))
    x = jnp.concatenate([x, jnp.broadcast_to(cls.astype(c.dtype), (b, 1, w))], axis=1)
    native = cfg.image_size // p
    positions = self.param('position_embedding', initializers.normal(0.02, None, 'embed'),
                           (native * native + 1, w))
    x = x + self._positions(positions, native, (gh, gw), height == width).astype(c.dtype)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    layer_cls = nn.remat(EncoderLayer) if c.remat else EncoderLayer
    for i in range(c.num_layers):
      x = layer_cls(c, name=f'layers_{i}')(x, None)[0]
    x = x[:, :-1].astype(jnp.float32)  # the class token's latent is never used downstream
    shortcut = x.reshape(b, gh * gw, cfg.latent_dim, w // cfg.latent_dim).mean(-1)
    h = jax.nn.gelu(_layer_norm(c.dtype, 'out_norm')(x), approximate=False)
    h = _dense(cfg.latent_dim, c.dtype, ('embed', None), 'out_proj')(h)
    return (shortcut + h.astype(jnp.float32)).reshape(b, gh, gw, cfg.latent_dim)

  @staticmethod
  def _positions(positions: jax.Array, native: int, grid: tuple[int, int],
                 square_image: bool) -> jax.Array:
    """(gh * gw + 1, w) positions, class last. Their rule: unchanged only for a square image
    with the native number of patches; otherwise bicubic, scale factor (g + 0.1) / M."""
    if grid[0] * grid[1] == native * native and square_image:
      return positions
    table = positions[:-1].reshape(native, native, -1).astype(jnp.float32)
    factors = tuple((g + POSITION_RESIZE_OFFSET) / native for g in grid)
    resized = resize_bicubic(table, grid, factors).reshape(grid[0] * grid[1], -1)
    return jnp.concatenate([resized.astype(positions.dtype), positions[-1:]], axis=0)


def init_semantic_cache(config: ml_collections.ConfigDict, batch_size: int,
                        max_length: int) -> kv_cache.KVCache:
  """An empty KV cache for the semantic decoder with room for `max_length` tokens."""
  c = block_config(config, 'semantic')
  return kv_cache.init_cache(c.num_layers, batch_size, max_length, c.num_heads, _HEAD_DIM,
                             c.dtype)


class SemanticDecoder(nn.Module):
  """Un-normalised latents (b, s, d) -> semantic features (b, s, width) float32, causal over
  the s tokens; with `cache` (see `init_semantic_cache`) the s tokens continue the cached
  ones and it returns (features, updated cache).

  Params: in_proj (d, width), layers_{i}, norm.
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, latents: jax.Array, cache: kv_cache.KVCache | None = None):
    cfg = self.config
    c = block_config(cfg, 'semantic')
    chex.assert_rank(latents, 3)
    b, s, d = latents.shape
    x = _dense(c.hidden_size, c.dtype, (None, 'embed'), 'in_proj')(latents.astype(c.dtype))
    x = x + jnp.repeat(latents, c.hidden_size // d, axis=-1).astype(c.dtype)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    spec = masks.causal(b, s, offset=0 if cache is None else cache.index)
    layer_cls = nn.remat(EncoderLayer) if c.remat else EncoderLayer
    if cache is None:
      dense = masks.dense_mask(spec.order, spec.order)
      for i in range(c.num_layers):
        x = layer_cls(c, name=f'layers_{i}')(x, None, dense)[0]
    else:
      order = jax.lax.dynamic_update_slice(cache.order, spec.order, (0, cache.index))
      dense = masks.dense_mask(spec.order, order)
      layer_cache = kv_cache.LayerCache(cache.keys, cache.values, 0, cache.index)
      for i in range(c.num_layers):
        x, layer_cache = layer_cls(c, name=f'layers_{i}')(x, None, dense,
                                                         layer_cache.replace(layer=i))
      cache = kv_cache.KVCache(keys=layer_cache.keys, values=layer_cache.values, order=order,
                               lengths=cache.lengths + s, index=cache.index + s)
    features = _layer_norm(c.dtype, 'norm')(x).astype(jnp.float32)
    return features if cache is None else (features, cache)


class PixelDecoder(nn.Module):
  """Semantic features (b, gh * gw, width) on a (gh, gw) grid -> images (b, gh P, gw P, 3)
  float32, clamped to [-1, 1] when `clamp` (training reads them unclamped: clamping stops
  the gradient of out-of-range pixels).

  Params: sem_to_pix (width, r^2 width_pix), layers_{i}, norm, head (width_pix, p^2 3).
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, features: jax.Array, grid: tuple[int, int], clamp: bool) -> jax.Array:
    cfg = self.config
    c = block_config(cfg, 'pixel')
    p, r = cfg.pixel.patch_size, cfg.encoder.patch_size // cfg.pixel.patch_size
    gh, gw = grid
    b = features.shape[0]
    chex.assert_shape(features, (None, gh * gw, cfg.semantic.width))
    x = _dense(r * r * c.hidden_size, c.dtype, ('embed', 'mlp'), 'sem_to_pix')(
        features.astype(c.dtype))
    # Channel (x, y, c) of token (h, w) -> token (h r + x, w r + y).
    x = x.reshape(b, gh, gw, r, r, c.hidden_size).transpose(0, 1, 3, 2, 4, 5)
    x = nn.with_logical_constraint(x.reshape(b, gh * r * gw * r, c.hidden_size),
                                   ('batch', 'length', 'embed'))
    layer_cls = nn.remat(EncoderLayer) if c.remat else EncoderLayer
    for i in range(c.num_layers):
      x = layer_cls(c, name=f'layers_{i}')(x, None)[0]
    x = _dense(p * p * 3, c.dtype, ('embed', None), 'head')(_layer_norm(c.dtype, 'norm')(x))
    x = x.astype(jnp.float32).reshape(b, gh * r, gw * r, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    images = x.reshape(b, gh * r * p, gw * r * p, 3)
    return jnp.clip(images, -1.0, 1.0) if clamp else images


class MingTok(nn.Module):
  """The MingTok tokenizer (module docstring) on config.model.

  Fields read: image_size (the position grid's), latent_dim, latent_mean, latent_scale,
  encoder.{width, depth, mlp_ratio, patch_size}, semantic.{width, depth, mlp_ratio},
  pixel.{width, depth, mlp_ratio, patch_size}, mask.{ratio, image_fraction}, dtype, remat,
  attention_impl.

  Variables: params {encoder, semantic_decoder, pixel_decoder}. Images are float32 in
  [-1, 1], NHWC, sides multiples of encoder.patch_size. Latents are the normalised
  (z - latent_mean) / latent_scale, (b, H/P, W/P, latent_dim).
  Training draws the token mask from the 'masking' rng stream.
  """
  config: ml_collections.ConfigDict

  def setup(self):
    validate_model_config(self.config)
    self.encoder = LowLevelEncoder(self.config)
    self.semantic_decoder = SemanticDecoder(self.config)
    self.pixel_decoder = PixelDecoder(self.config)

  def normalize(self, z: jax.Array) -> jax.Array:
    return (z - self.config.latent_mean) / self.config.latent_scale

  def denormalize(self, latents: jax.Array) -> jax.Array:
    return latents * self.config.latent_scale + self.config.latent_mean

  def semantic_features(self, latents: jax.Array, cache: kv_cache.KVCache | None = None):
    """Normalised latents (b, s, d) (or a grid (b, h, w, d), read row-major) -> features
    (b, s, width); with a cache, (features, cache) continuing it (generation, one token at
    a time)."""
    if latents.ndim == 4:
      latents = latents.reshape(latents.shape[0], -1, latents.shape[-1])
    return self.semantic_decoder(self.denormalize(latents), cache)

  def render(self, features: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Semantic features (b, gh * gw, width) -> images (b, H, W, 3) clamped to [-1, 1]."""
    return self.pixel_decoder(features, grid, clamp=True)

  def encode(self, images: jax.Array, *, train: bool = False) -> TokenizerOutput:
    del train  # masking is a training-pass matter (__call__)
    latents = self.normalize(self.encoder(images))
    return TokenizerOutput(recon=None, codes=None, latents=latents, losses={}, stats={},
                           features={})

  def decode(self, latents: jax.Array, *, train: bool = False) -> jax.Array:
    """Normalised latents (b, h, w, d) -> images (b, h P, w P, 3) in [-1, 1]."""
    del train
    return self.render(self.semantic_features(latents), latents.shape[1:3])

  def __call__(self, images: jax.Array, *, train: bool = False) -> TokenizerOutput:
    cfg = self.config
    b, height, width, _ = images.shape
    grid = (height // cfg.encoder.patch_size, width // cfg.encoder.patch_size)
    token_mask = None
    if train and cfg.mask.ratio > 0 and cfg.mask.image_fraction > 0:
      token_mask = sample_token_mask(self.make_rng('masking'), b, grid[0] * grid[1],
                                     cfg.mask.ratio, cfg.mask.image_fraction)
    latents = self.normalize(self.encoder(images, token_mask))
    tokens = latents.reshape(b, -1, cfg.latent_dim)
    features = self.semantic_features(tokens)
    recon = self.pixel_decoder(features, grid, clamp=not train)
    if token_mask is None:
      token_mask = jnp.zeros(tokens.shape[:2], bool)
    return TokenizerOutput(
        recon=recon, codes=None, latents=latents, losses={},
        stats={'masked_tokens': jnp.mean(token_mask.astype(jnp.float32)),
               'latent_std': jnp.std(latents)},
        features={'latent': tokens, 'semantic': features, 'token_mask': token_mask})
