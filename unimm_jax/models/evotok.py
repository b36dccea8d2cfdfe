"""EvoTok (../shared/papers/evotok.txt, SPECS 2): one residual-VQ trajectory whose first
L_pix levels reconstruct pixels and whose first L_sem levels decode to the teacher's
semantics.

  images (b, H, W, 3) in [-1, 1]
    -> SigLIP encoder, features of its second-to-last layer (hidden_states[-2]) (b, n, D)
    -> Linear-Tanh-Linear to the code width d, on the (h, w) patch grid
    -> residual quantizer: L levels of K codes (EMA codebooks, `quantizer_state`)
    -> f_pix = sum of the first L_pix levels -> 1x1 conv -> pixel decoder -> (b, H, W, 3)
    -> f_sem = sum of the first L_sem levels -> semantic decoder -> (b, h * w, teacher width)

Facts from the authors' code (VisionXLab/EvoTok, evotok/tokenizer/vq_model/):
- the encoder is a transformers SiglipVisionModel and the features are
  `hidden_states[-2]`: the output of the next-to-last block, before `post_layernorm`. The
  last block, `post_layernorm` and the pooling head never reach the loss (the authors freeze
  them); here they are not built at all (`encoder.num_layers` counts them, the model runs
  one block fewer), and the importer checks and skips their tensors;
- their ScalingLayerForSigLip maps [-1, 1] to [0, 1] with a clamp and back with mean = std =
  0.5: the identity on valid images, so the encoder reads the images clipped to [-1, 1];
- both task layers are Linear-Tanh-Linear (the hidden width is the input width);
- the pixel branch is a 1x1 conv (d -> z_channels) and LlamaGen's decoder, the same stack as
  Chameleon's (`ChameleonVQGANDecoder`): GroupNorm(32, eps 1e-6), swish, num_res_blocks + 1
  ResBlocks per level, attention after each at the lowest resolution and in the middle,
  nearest upsampling then a 3x3 conv;
- the semantic decoder is BEiT v2's ViT on the latent grid with patch size 1: a 1x1 conv
  embedding (d -> width), a class token, learned positions (grid^2 + 1, never resized),
  pre-LayerNorm blocks (eps 1e-6, exact GELU, MLP 4x) whose heads are width // heads wide
  (1024 // 12 = 85: attention runs 1020 wide and projects back to 1024; q and v have biases,
  k has none, which softmax cannot tell from a trained k bias), no LayerScale, then, with
  mean pooling, a final LayerNorm (`fc_norm`) on the patch tokens (the class token dropped).
"""
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.models.chameleon_vqgan import ChameleonVQGANDecoder
from unimm_jax.models.tokenizer_interface import TokenizerOutput
from unimm_jax.models.vit import EncoderLayer, VisionTransformer, ViTConfig
from unimm_jax.nn import initializers
from unimm_jax.nn.conv_blocks import conv
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.quantizers.residual_quantizer import ResidualQuantizer

_LN_EPS = 1e-6


def encoder_config(config: ml_collections.ConfigDict) -> ViTConfig:
  """The SigLIP encoder (config.model.encoder), built one block short: see the docstring."""
  e = config.encoder
  return ViTConfig(family='siglip', hidden_size=e.hidden_size, num_layers=e.num_layers - 1,
                   num_heads=e.num_heads, mlp_dim=e.mlp_dim, patch_size=e.patch_size,
                   image_size=e.image_size, layer_norm_eps=e.layer_norm_eps,
                   activation='gelu_pytorch_tanh', use_head=False, final_norm=False,
                   dtype=compute_dtype(config.dtype, 'config.model.dtype'),
                   remat=config.remat, attention_impl=config.attention_impl)


def semantic_block_config(config: ml_collections.ConfigDict) -> ViTConfig:
  """The semantic decoder's blocks as a ViTConfig (a plain pre-LN block: 'siglip' is the
  family without LayerScale); image_size / patch_size give the latent grid."""
  s = config.semantic
  grid = config.encoder.image_size // config.encoder.patch_size
  return ViTConfig(family='siglip', hidden_size=s.width, num_layers=s.depth,
                   num_heads=s.num_heads, mlp_dim=s.mlp_ratio * s.width, patch_size=1,
                   image_size=grid, num_channels=config.code_dim, layer_norm_eps=_LN_EPS,
                   activation='gelu', head_dim=s.width // s.num_heads,
                   dtype=compute_dtype(config.dtype, 'config.model.dtype'),
                   remat=config.remat, attention_impl=config.attention_impl)


DECOUPLINGS = ('evolution', 'layer', 'branch')


def validate_model_config(config: ml_collections.ConfigDict) -> None:
  """Names the first inconsistent field of config.model."""
  if config.decoupling not in DECOUPLINGS:
    raise ValueError(f'config.model.decoupling={config.decoupling!r} is not one of '
                     f'{DECOUPLINGS}')
  if config.decoupling != 'evolution' and (
      config.num_levels != config.pixel_depth + config.semantic_depth):
    raise ValueError(f'config.model.decoupling={config.decoupling!r} quantizes pixels and '
                     'semantics separately: num_levels must be pixel_depth + semantic_depth '
                     f'({config.pixel_depth} + {config.semantic_depth}), got '
                     f'{config.num_levels}')
  if config.decoupling == 'layer' and not 0 <= config.pixel_layer < config.encoder.num_layers - 1:
    raise ValueError(f'config.model.pixel_layer={config.pixel_layer} must index '
                     f'hidden_states below the features\' layer {config.encoder.num_layers - 1}')
  if not 0 < config.pixel_depth <= config.num_levels:
    raise ValueError(f'config.model.pixel_depth={config.pixel_depth} must lie in '
                     f'[1, num_levels={config.num_levels}]')
  if not 0 < config.semantic_depth <= config.num_levels:
    raise ValueError(f'config.model.semantic_depth={config.semantic_depth} must lie in '
                     f'[1, num_levels={config.num_levels}]')
  if config.encoder.num_layers < 2:
    raise ValueError('config.model.encoder.num_layers must be >= 2: the features are the '
                     'second-to-last layer\'s')
  if config.encoder.image_size % config.encoder.patch_size:
    raise ValueError(f'config.model.encoder.image_size={config.encoder.image_size} is not a '
                     f'multiple of its patch_size={config.encoder.patch_size}')
  for width in (config.decoder.ch * m for m in config.decoder.ch_mult):
    if width % 32:
      raise ValueError(f'config.model.decoder: width {width} is not a multiple of the 32 '
                       'GroupNorm groups of the authors\' decoder')


def downsample_factor(config: ml_collections.ConfigDict) -> int:
  """Pixels per latent cell: the encoder's patch size (the decoder upsamples by as much)."""
  return config.encoder.patch_size


class TaskLayers(nn.Module):
  """Linear-Tanh-Linear (the hidden width is the input's): (..., d_in) -> (..., out).
  Params `hidden` and `out` (kernel (in, out), bias)."""
  out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(x.shape[-1], dtype=self.dtype,
                 kernel_init=initializers.kernel_init('embed', 'mlp'),
                 bias_init=initializers.zeros('mlp'), name='hidden')(x)
    return nn.Dense(self.out, dtype=self.dtype, kernel_init=initializers.kernel_init('mlp', None),
                    bias_init=initializers.zeros(None), name='out')(jnp.tanh(x))


class SemanticDecoder(nn.Module):
  """f_sem (b, h, w, d) -> (b, h * w, out_width) float32: the BEiT v2 ViT of the module
  docstring, then Linear-Tanh-Linear to the teacher's width.

  Params: patch_embedding (d, width), patch_bias, class_embedding (width,),
  position_embedding (h * w + 1, width), layers_{i}, fc_norm, task.
  """
  config: ViTConfig
  out_width: int

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    c = self.config
    b, h, w, d = latents.shape
    chex.assert_equal((h, w), (c.grid_size, c.grid_size))
    x = nn.Dense(c.hidden_size, dtype=c.dtype,
                 kernel_init=initializers.kernel_init(None, 'embed'),
                 bias_init=initializers.zeros('embed'), name='patch_embedding')(
                     latents.reshape(b, h * w, d))
    cls = self.param('class_embedding', initializers.normal(0.02, 'embed'), (c.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.hidden_size)), x], 1)
    x = x + self.param('position_embedding', initializers.normal(0.02, None, 'embed'),
                       (c.num_positions + 1, c.hidden_size)).astype(x.dtype)
    layer_cls = nn.remat(EncoderLayer) if c.remat else EncoderLayer
    for i in range(c.num_layers):
      x = layer_cls(c, name=f'layers_{i}')(x, None)[0]
    x = nn.LayerNorm(epsilon=_LN_EPS, use_fast_variance=False, dtype=c.dtype,
                     scale_init=initializers.ones('embed'), bias_init=initializers.zeros('embed'),
                     name='fc_norm')(x[:, 1:])
    return TaskLayers(self.out_width, c.dtype, name='task')(x).astype(jnp.float32)


class EvoTok(nn.Module):
  """The EvoTok tokenizer (module docstring) on config.model.

  Fields read: code_dim, num_levels, codebook_size, pixel_depth (L_pix), semantic_depth
  (L_sem), decoupling, pixel_layer, decay, vq_warmup, dead_code_threshold, lookup_chunk,
  encoder.{hidden_size,
  num_layers, num_heads, mlp_dim, patch_size, image_size, layer_norm_eps}, semantic.{width,
  depth, num_heads, mlp_ratio, out_width}, decoder.{ch, ch_mult, num_res_blocks,
  z_channels}, dtype, remat, attention_impl.

  Variables: params {encoder, encode_task, post_quant_conv, pixel_decoder,
  semantic_decoder} and `quantizer_state` (the EMA codebooks, see ResidualQuantizer).
  Images are float32 in [-1, 1], NHWC, at the encoder's image size.

  `decoupling` (Table 5) picks where f_pix comes from:
    'evolution'  the paper's: one residual trajectory, f_pix its first L_pix levels;
    'layer'      (DualToken-like) a second residual quantizer of L_pix levels on the
                 encoder's hidden_states[pixel_layer] (its own task layers), f_sem from the
                 first quantizer's L_sem levels on the usual features;
    'branch'     (TokenFlow-like) the same, on a second encoder of the same architecture.
  The paper gives only the idea of rows 2-3; these layouts, pixel_layer (hidden_states index
  of the pixel features) and the separate L_pix + L_sem = num_levels codes per token (pixel
  levels first) are our choices. Their commitment is the mean over all levels of both.
  """
  config: ml_collections.ConfigDict

  def setup(self):
    cfg = self.config
    validate_model_config(cfg)
    dtype = compute_dtype(cfg.dtype, 'config.model.dtype')
    self.encoder = VisionTransformer(encoder_config(cfg))
    self.encode_task = TaskLayers(cfg.code_dim)
    quantizer = lambda levels, depths, **kw: ResidualQuantizer(
        num_levels=levels, codebook_size=cfg.codebook_size, code_dim=cfg.code_dim,
        partial_depths=depths, decay=cfg.decay, vq_warmup=cfg.vq_warmup,
        dead_code_threshold=cfg.dead_code_threshold, chunk_size=cfg.lookup_chunk, **kw)
    if cfg.decoupling == 'evolution':
      self.quantizer = quantizer(cfg.num_levels, (cfg.pixel_depth, cfg.semantic_depth))
    else:
      self.quantizer = quantizer(cfg.semantic_depth, (cfg.semantic_depth,))
      self.pixel_quantizer = quantizer(cfg.pixel_depth, (cfg.pixel_depth,))
      self.pixel_encode_task = TaskLayers(cfg.code_dim)
      if cfg.decoupling == 'branch':
        self.pixel_encoder = VisionTransformer(encoder_config(cfg))
    dc = cfg.decoder
    self.post_quant_conv = conv(dc.z_channels, 1, use_bias=True, dtype=jnp.float32,
                                name='post_quant_conv')
    self.pixel_decoder = ChameleonVQGANDecoder(
        ch=dc.ch, ch_mult=tuple(dc.ch_mult), num_res_blocks=dc.num_res_blocks,
        attn_levels=(len(dc.ch_mult) - 1,), mid_attention=True, dtype=dtype, remat=cfg.remat,
        attention_impl=cfg.attention_impl, norm_groups=32)
    self.semantic_decoder = SemanticDecoder(semantic_block_config(cfg),
                                            cfg.semantic.out_width)

  def encode(self, images: jax.Array, *, train: bool = False) -> TokenizerOutput:
    """Images (b, H, W, 3) -> TokenizerOutput (recon None): codes (b, h, w, L); latents =
    f_pix (b, h, w, d); features {'pre_quant' (b, h, w, d), 'semantic_latents' = f_sem};
    losses {'commitment'}; stats of the quantizer."""
    e = self.config.encoder
    chex.assert_shape(images, (None, e.image_size, e.image_size, 3))
    b = images.shape[0]
    grid = e.image_size // e.patch_size
    images = nn.with_logical_constraint(jnp.clip(images, -1.0, 1.0), ('batch', None, None, None))
    hidden_states = self.encoder(images)['hidden_states']
    to_grid = lambda task, h: task(h.astype(jnp.float32)).reshape(b, grid, grid, -1)
    pre_quant = to_grid(self.encode_task, hidden_states[-1])
    if self.config.decoupling == 'evolution':
      (f_pix, f_sem), codes, losses, stats = self.quantizer(pre_quant, train)
      return TokenizerOutput(recon=None, codes=codes, latents=f_pix, losses=losses,
                             stats=stats,
                             features={'pre_quant': pre_quant, 'semantic_latents': f_sem})
    pixel_hidden = (hidden_states[self.config.pixel_layer] if self.config.decoupling == 'layer'
                    else self.pixel_encoder(images)['hidden_states'][-1])
    pixel_pre_quant = to_grid(self.pixel_encode_task, pixel_hidden)
    (f_sem,), sem_codes, sem_losses, sem_stats = self.quantizer(pre_quant, train)
    (f_pix,), pix_codes, pix_losses, pix_stats = self.pixel_quantizer(pixel_pre_quant, train)
    lp, ls = self.config.pixel_depth, self.config.semantic_depth
    commitment = (lp * pix_losses['commitment'] + ls * sem_losses['commitment']) / (lp + ls)
    return TokenizerOutput(
        recon=None, codes=jnp.concatenate([pix_codes, sem_codes], -1), latents=f_pix,
        losses={'commitment': commitment},
        stats={**sem_stats, **{f'pixel_{k}': v for k, v in pix_stats.items()}},
        features={'pre_quant': pre_quant, 'pixel_pre_quant': pixel_pre_quant,
                  'semantic_latents': f_sem})

  def decode(self, latents: jax.Array, *, train: bool = False) -> jax.Array:
    """f_pix (b, h, w, d) -> reconstruction (b, h f, w f, 3) float32 (not clipped)."""
    del train  # no dropout or batch statistics
    chex.assert_rank(latents, 4)
    recon = self.pixel_decoder(self.post_quant_conv(latents.astype(jnp.float32)))
    return nn.with_logical_constraint(recon, ('batch', None, None, None))

  def decode_semantic(self, semantic_latents: jax.Array) -> jax.Array:
    """f_sem (b, h, w, d) -> (b, h * w, semantic.out_width) float32: what the MLLM reads and
    the teacher's features are compared with."""
    return self.semantic_decoder(semantic_latents)

  def codes_to_quantized(self, codes: jax.Array, depth: int | None = None) -> jax.Array:
    """Codes (b, h, w, m) of the first m levels -> the sum of the first `depth` levels'
    rows (default: L_pix, what the pixel decoder reads). Decoupled: the pixel quantizer's
    levels, the first L_pix codes."""
    depth = depth or self.config.pixel_depth
    if self.config.decoupling == 'evolution':
      return self.quantizer.codes_to_quantized(codes, depth)
    return self.pixel_quantizer.codes_to_quantized(codes[..., :self.config.pixel_depth], depth)

  def pixel_code_embeddings(self, codes: jax.Array) -> jax.Array:
    """Codes (..., m >= L_pix) -> (..., L_pix, d) float32: the row of each of the first L_pix
    codes in its level's codebook (what an MLLM's depth head reads; their sum is f_pix)."""
    lp = self.config.pixel_depth
    quantizer = self.quantizer if self.config.decoupling == 'evolution' else self.pixel_quantizer
    codebooks = quantizer.codebooks.value
    return jnp.stack([jnp.take(codebooks[i], codes[..., i].astype(jnp.int32), axis=0)
                      for i in range(lp)], axis=-2)

  def at_depth(self, images: jax.Array, depth: int) -> TokenizerOutput:
    """`__call__` (eval) with f_pix and f_sem both replaced by the sum of the first `depth`
    levels: the reconstruction and semantic features along the residual trajectory (paper
    Fig. 5b); latents and features['semantic_latents'] are that sum. Evolution only."""
    if self.config.decoupling != 'evolution':
      raise ValueError('at_depth: a decoupled EvoTok has no single residual trajectory')
    out = self.encode(images)
    partial = self.quantizer.codes_to_quantized(out.codes, depth)
    return out.replace(recon=self.decode(partial), latents=partial,
                       features={**out.features, 'semantic_latents': partial,
                                 'semantic': self.decode_semantic(partial)})

  def __call__(self, images: jax.Array, *, train: bool = False) -> TokenizerOutput:
    """`encode` with the reconstruction and features['semantic'] (b, h * w, out_width)."""
    out = self.encode(images, train=train)
    semantic = self.decode_semantic(out.features['semantic_latents'])
    return out.replace(recon=self.decode(out.latents, train=train),
                       features={**out.features, 'semantic': semantic})
