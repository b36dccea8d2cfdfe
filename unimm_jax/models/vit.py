"""One Vision Transformer for the four teacher / encoder families: SigLIP, SigLIP2, DINOv2, CLIP.

The families share the pre-LayerNorm block x + attn(LN(x)), x + mlp(LN(x)) with biased q/k/v
projections, and differ in a few switches, each fixed by `ViTConfig.family` to what the
transformers implementation of that family does (so imported weights give its outputs):

                 SigLIP          SigLIP2                DINOv2                  CLIP
  patches        conv p x p      linear on (p, p, c)    conv p x p              conv, no bias
                                 patches given as input
  class token    no              no                     yes                     yes
  positions      learned grid    learned grid resized   learned grid, bicubic   learned grid
                                 per image (antialiased  (A = -0.75) resize
                                 bilinear), padded      whenever the patch grid
                                                        differs
  before blocks  -               -                      -                       LayerNorm
  block extras   -               key padding mask       LayerScale on both      -
                                                        branches
  after blocks   LayerNorm       LayerNorm              LayerNorm               -
  pooled         attention-probe head (MAP): a learned  LN(x)[:, 0]             LN(x[:, 0])
                 query attends over the tokens, then
                 x + MLP(LN(x)); masked for SigLIP2
  MLP act        gelu (tanh)     gelu (tanh)            gelu (erf) or SwiGLU    quick_gelu

Outputs follow transformers: `last_hidden_state` is after the final LayerNorm where the
family has one (CLIP: the last block's output); `hidden_states` holds num_layers + 1 arrays:
the embeddings (CLIP: after its pre-LayerNorm), then each block's output, the last one
before the final LayerNorm.

Images are NHWC at this boundary (SigLIP2: patchified, see `__call__`); the family's pixel
normalisation is the caller's (see `unimm_jax.models.teacher`).
"""
import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn.attention import MultiHeadAttention
from unimm_jax.nn.attention_pool import AttentionPool
from unimm_jax.nn.mlp import ACTIVATIONS, MLP, SwiGLU
from unimm_jax.nn.resize import resize_bicubic, resize_grid_to_shapes

Dtype = Any
FAMILIES = ('siglip', 'siglip2', 'dinov2', 'clip')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of one ViT. `image_size // patch_size` is the side of the learned position
  grid (SigLIP2: sqrt(num_patches))."""
  family: str
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  activation: str = 'gelu_pytorch_tanh'
  swiglu: bool = False  # DINOv2-giant's gated MLP (bias on every projection)
  use_head: bool = True  # SigLIP / SigLIP2: the attention-probe pooling head exists
  # False: no LayerNorm after the blocks (nor a head); last_hidden_state is the last block's
  # output. For encoders that read an inner layer (EvoTok's hidden_states[-2]) and so drop
  # the layers above it.
  final_norm: bool = True
  head_dim: int = 0  # width of a head; 0 = hidden_size // num_heads (BEiT: may not divide)
  dtype: Dtype = jnp.float32  # compute dtype; params keep theirs
  scan_layers: bool = False
  remat: bool = False
  attention_impl: str | None = 'xla'  # jax.nn.dot_product_attention's implementation

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'ViTConfig.family={self.family!r} is not one of {FAMILIES}')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'ViTConfig.activation={self.activation!r} is not one of '
                       f'{sorted(ACTIVATIONS)}')
    if not self.head_dim and self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads '
                       f'{self.num_heads}; set head_dim')

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def class_token(self) -> bool:
    return self.family in ('dinov2', 'clip')

  @property
  def num_positions(self) -> int:
    return self.grid_size ** 2 + int(self.class_token)


def _layer_norm(config: ViTConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch computes it: E[x^2] - E[x]^2 loses digits on the large
  # activations of pretrained ViTs.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=config.dtype,
                      scale_init=initializers.ones('embed'), bias_init=initializers.zeros('embed'),
                      name=name)


def _feed_forward(config: ViTConfig) -> nn.Module:
  """The block's MLP: fc2(act(fc1(x))), or DINOv2-giant's SwiGLU with biases, its input kernel
  `fc1` (embed, 2, mlp) (index 0 the gate, index 1 the up projection)."""
  if config.swiglu:
    return SwiGLU(config.mlp_dim, use_bias=True, names=('fc1', 'fc2'), dtype=config.dtype,
                  name='mlp')
  return MLP(config.mlp_dim, config.activation, config.dtype, name='mlp')


class EncoderLayer(nn.Module):
  """Pre-LN block (DINOv2: LayerScale on each branch). Shapes: x (b, s, d), key_mask (b, s)
  or None -> (b, s, d).

  Returns (x, x) so that nn.scan stacks every layer's output (the hidden states). A causal
  stack (MingTok's semantic decoder) also passes `mask` (a MaskSpec or dense (b, 1, s, t)
  bool, `unimm_jax.nn.masks`) and, decoding incrementally, `cache` (a
  `kv_cache.LayerCache`): then it returns (x, updated cache).
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None, mask=None, cache=None):
    c = self.config
    attention = MultiHeadAttention(c.num_heads, head_dim=c.head_dim or None, qkv_bias=True,
                                   out_bias=True, implementation=c.attention_impl,
                                   dtype=c.dtype, name='attention')
    h = attention(_layer_norm(c, 'norm1')(x), key_mask=key_mask, mask=mask, cache=cache)
    if cache is not None:
      h, cache = h
    if c.family == 'dinov2':
      h = h * self.param('layer_scale1', initializers.ones('embed'), (x.shape[-1],)).astype(c.dtype)
    x = x + h
    h = _feed_forward(c)(_layer_norm(c, 'norm2')(x))
    if c.family == 'dinov2':
      h = h * self.param('layer_scale2', initializers.ones('embed'), (x.shape[-1],)).astype(c.dtype)
    x = nn.with_logical_constraint(x + h, ('batch', 'length', 'embed'))
    return x, (x if cache is None else cache)


class VisionTransformer(nn.Module):
  """The ViT of `config.family`; returns transformers' BaseModelOutputWithPooling fields.

  Call as `apply(variables, pixel_values)` with pixel_values (b, h, w, c) NHWC (a remainder
  of h or w beyond a multiple of the patch size is dropped, as torch's strided conv does),
  or for SigLIP2 `apply(variables, pixel_values, pixel_attention_mask, spatial_shapes)`
  with the processor's patchified pixel_values (b, n, p * p * c) in (row, column, channel)
  order within each patch, pixel_attention_mask (b, n) (1 for real patches) and
  spatial_shapes (b, 2) int (patch rows, patch columns) of each image.

  SigLIP and CLIP require the patch grid to equal the position grid unless
  `interpolate_pos_encoding` (as transformers); DINOv2 always interpolates when it differs.

  Returns a dict: last_hidden_state (b, s, d), pooler_output (b, d) or None (SigLIP
  without head), hidden_states: tuple of num_layers + 1 arrays (b, s, d). s counts the
  class token where the family has one.
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array, pixel_attention_mask: jax.Array | None = None,
               spatial_shapes: jax.Array | None = None, *,
               interpolate_pos_encoding: bool = False) -> dict[str, Any]:
    c = self.config
    x, key_mask = self._embed(pixel_values, pixel_attention_mask, spatial_shapes,
                              interpolate_pos_encoding)
    if c.family == 'clip':
      x = _layer_norm(c, 'pre_norm')(x)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    layer_cls = nn.remat(EncoderLayer) if c.remat else EncoderLayer
    if c.scan_layers:
      stack = nn.scan(layer_cls, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=nn.broadcast, length=c.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      last, per_layer = stack(c, name='layers')(x, key_mask)
      hidden_states = (x,) + tuple(per_layer[i] for i in range(c.num_layers))
    else:
      hidden_states = [x]
      for i in range(c.num_layers):
        hidden_states.append(layer_cls(c, name=f'layers_{i}')(hidden_states[-1], key_mask)[0])
      last, hidden_states = hidden_states[-1], tuple(hidden_states)

    if not c.final_norm:
      pooled = None
    elif c.family == 'clip':
      pooled = _layer_norm(c, 'final_norm')(last[:, 0])
    else:
      last = _layer_norm(c, 'final_norm')(last)
      pooled = last[:, 0] if c.family == 'dinov2' else None
      if c.family in ('siglip', 'siglip2') and c.use_head:
        # SigLIP's MAP head: a learned probe attends over the tokens, then y + MLP(LN(y)).
        pooled = AttentionPool(c.num_heads, c.mlp_dim, c.activation, c.layer_norm_eps,
                               implementation=c.attention_impl, dtype=c.dtype,
                               name='head')(last, key_mask)
    return {'last_hidden_state': last, 'pooler_output': pooled, 'hidden_states': hidden_states}

  def _embed(self, pixel_values, pixel_attention_mask, spatial_shapes, interpolate_pos_encoding):
    """Patch + position (+ class) embeddings (b, s, d) and the key mask (b, s) or None."""
    c = self.config
    p, d = c.patch_size, c.hidden_size
    kernel = self.param('patch_embedding', initializers.kernel_init_axes(
        (None, None, None, 'embed'), in_axis=(0, 1, 2), out_axis=3),
                        (p, p, c.num_channels, d))
    positions = self.param('position_embedding', initializers.normal(1.0, None, 'embed'),
                           (c.num_positions, d))
    if c.family == 'siglip2':
      if pixel_attention_mask is None or spatial_shapes is None:
        raise ValueError('SigLIP2 takes patchified pixel_values (b, n, p*p*c) with '
                         'pixel_attention_mask (b, n) and spatial_shapes (b, 2)')
      chex.assert_shape(pixel_values, (None, None, p * p * c.num_channels))
      patches = pixel_values
      grid = positions.reshape(c.grid_size, c.grid_size, d).astype(jnp.float32)
      pos = resize_grid_to_shapes(grid, spatial_shapes, patches.shape[1]).astype(c.dtype)
      key_mask = pixel_attention_mask.astype(bool)
    else:
      chex.assert_rank(pixel_values, 4)
      b, h, w, _ = pixel_values.shape
      gh, gw = h // p, w // p
      patches = pixel_values[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c.num_channels)
      patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c.num_channels)
      pos = self._grid_positions(positions, (gh, gw), interpolate_pos_encoding)[None]
      key_mask = None
    x = jnp.einsum('bnk,kd->bnd', patches.astype(c.dtype),
                   kernel.reshape(-1, d).astype(c.dtype))
    if c.family != 'clip':
      x = x + self.param('patch_bias', initializers.zeros('embed'), (d,)).astype(c.dtype)
    if c.class_token:
      cls = self.param('class_embedding', initializers.normal(1.0, 'embed'), (d,))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(c.dtype), (x.shape[0], 1, d)), x], 1)
    return x + pos.astype(c.dtype), key_mask

  def _grid_positions(self, positions: jax.Array, grid_hw: tuple[int, int],
                      interpolate: bool) -> jax.Array:
    """Position embeddings (s, d) for a (gh, gw) patch grid, class position first."""
    c = self.config
    if grid_hw == (c.grid_size, c.grid_size):
      return positions
    if c.family != 'dinov2' and not interpolate:
      raise ValueError(f'{c.family}: a {grid_hw} patch grid differs from the {c.grid_size}^2 '
                       'position grid; pass interpolate_pos_encoding=True to resize it')
    prefix, grid = positions[:int(c.class_token)], positions[int(c.class_token):]
    grid = grid.reshape(c.grid_size, c.grid_size, -1).astype(jnp.float32)
    # transformers resizes in float32 (DINOv2 says why: bicubic in half precision drifts).
    resized = resize_bicubic(grid, grid_hw).reshape(grid_hw[0] * grid_hw[1], -1)
    return jnp.concatenate([prefix, resized.astype(positions.dtype)], 0)
