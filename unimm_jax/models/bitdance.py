"""BitDance class-to-image: an autoregressive transformer over binary tokens with a binary
diffusion head (UniWeTok paper sec 4 / Table 9; SPECS 1; the authors' BitDance code,
imagenet_gen/src/model.py (serial) and model_parallel.py (parallel)).

An image is a frozen binary tokenizer's (h, w) grid of d-bit tokens in {-1, +1}. The tokens
are put in sequence order (`order`: 'patch' = the grid cut into sqrt(P) x sqrt(P) patches in
raster order, each patch in raster order, their parallel_mode 'patch'; 'raster' = row-major)
and generated P at a time (P = `parallel`; P = 1 is their serial model):

  sequence  [class tokens (K)] [query tokens (P - 1)] [connector(token 0 .. hw - P - 1)]
  mask      the first K - 1 positions causal, then blocks of P: the last class token and the
            queries are block 0, each later block of P inputs sees itself and everything before
  output    the hidden states of the last hw positions, RMSNorm-ed, plus a learned embedding
            of the target's position; block j's P states condition the head that denoises
            tokens [jP, (j + 1) P) jointly (`models.bit_diffusion`; the parallel head's
            attention spans the block, the serial head is per token).

Facts from their code:
- class conditioning: an embedding table of num_classes + 1 rows (the last is the null class
  of classifier-free guidance) of K * width values, i.e. K tokens per class (K = 64 in their
  runs); labels are replaced by the null class with probability 0.1 in training;
- P - 1 learned query tokens and all embeddings N(0, 0.02); an RMSNorm after the embedding
  and after the last block; blocks are pre-RMSNorm, bias-free attention with 2D RoPE (tokens
  at (i + 0.5, j + 0.5) + 1 of their grid cell, `GridPositions.CENTRES`; class and query
  tokens at 0; input token j at the cell of target j, which is the cell of sequence position
  j), SwiGLU with hidden round_up(8 width / 3, 256);
- the connector (their `MLPConnector`) is a SwiGLU with biases, hidden 1.5 width;
- training reads the inputs with each bit flipped with probability 0.1 u (`flip_bits`) and
  the targets clean; every block is denoised at 4 (t, eps) draws; t logit-normal (-0.8, 0.8);
- sampling: the guided stream pairs each class with the null class; the CFG scale ramps
  linearly over blocks from 1 ('linear') or stays ('constant'); every block's sample goes
  through sign() before it is fed back (and at the end, to the tokenizer's decoder).
  Their first block with the linear ramp (scale exactly 1) runs the two streams unguided and
  feeds each its own sample; here both streams always read the same (guided) tokens.
- [open] transformer kernels use the library's PyTorch-default init, not N(0, 0.02).

Sizes (their BitDance_B / _L / _H): 24 x 768 (12 heads), head 6 blocks / 2 adaLN; 32 x 1024
(16), 8 / 2; 40 x 1280 (20), 12 / 3; head width = model width, head attention heads of 64.
"""
import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.losses import diffusion
from unimm_jax.models import bit_diffusion
from unimm_jax.nn import initializers
from unimm_jax.nn import kv_cache
from unimm_jax.nn import masks
from unimm_jax.nn.dtypes import compute_dtype
from unimm_jax.nn.embeddings import patch_order
from unimm_jax.nn.mlp import SwiGLU
from unimm_jax.nn.norms import RMSNorm
from unimm_jax.nn.rope import GridPositions, grid_positions, rope_2d_angles
from unimm_jax.nn.transformer import TransformerBlock

ORDERS = ('patch', 'raster')


@dataclasses.dataclass(frozen=True)
class BitDanceConfig:
  """Shape and training switches (module docstring).

  latent_dim: bits per token (the tokenizer's g * d'). grid: (h, w) tokens per image.
  num_classes: classes; row num_classes of the class table is the null class.
  width, depth, num_heads: the transformer (head_dim = width / num_heads, a multiple of 4).
  class_tokens: K. parallel: P tokens per block. order: 'patch' | 'raster'.
  head_width (0: width), head_depth, head_adaln_blocks, head_head_dim (parallel head),
  head_bounded (x estimate through 2 sigmoid - 1): the diffusion head.
  class_dropout, bit_flip: label dropout probability and the bits' maximal flip rate.
  noise_repeats, t_mean, t_std, time_shift: the head's loss (`bit_diffusion.denoising_loss`).
  dtype: compute dtype name; remat: recompute each block in the backward pass.
  """
  latent_dim: int
  grid: tuple[int, int]
  num_classes: int
  width: int = 768
  depth: int = 24
  num_heads: int = 12
  class_tokens: int = 64
  parallel: int = 1
  order: str = 'patch'
  head_width: int = 0
  head_depth: int = 6
  head_adaln_blocks: int = 2
  head_head_dim: int = 64
  head_bounded: bool = True
  class_dropout: float = 0.1
  bit_flip: float = 0.1
  noise_repeats: int = 4
  t_mean: float = diffusion.P_MEAN
  t_std: float = diffusion.P_STD
  time_shift: float = 1.0
  dtype: str = 'float32'
  remat: bool = False

  def __post_init__(self):
    h, w = self.grid
    p = self.parallel
    if self.width % self.num_heads or (self.width // self.num_heads) % 4:
      raise ValueError(f'width={self.width} / num_heads={self.num_heads} must be a head_dim '
                       'divisible by 4 (2D RoPE)')
    if p < 1 or (h * w) % p:
      raise ValueError(f'parallel={p} must divide the {h}x{w} token grid')
    if self.order not in ORDERS:
      raise ValueError(f'order={self.order!r} is not one of {ORDERS}')
    side = int(round(p ** 0.5))
    if self.order == 'patch' and (side * side != p or h % side or w % side):
      raise ValueError(f"order='patch' needs parallel={p} to be a square whose side divides "
                       f'the {h}x{w} grid')
    if self.class_tokens < 1:
      raise ValueError(f'class_tokens={self.class_tokens} must be >= 1')
    if p > 1 and (self.head_width or self.width) % self.head_head_dim:
      raise ValueError(f'head width {self.head_width or self.width} is not a multiple of '
                       f'head_head_dim={self.head_head_dim}')
    if self.head_adaln_blocks < 1 or self.head_depth % self.head_adaln_blocks:
      raise ValueError(f'head_adaln_blocks={self.head_adaln_blocks} must divide '
                       f'head_depth={self.head_depth}')
    if self.noise_repeats < 1:
      raise ValueError(f'noise_repeats={self.noise_repeats} must be >= 1')
    compute_dtype(self.dtype, 'dtype')

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def num_blocks(self) -> int:
    return self.num_tokens // self.parallel

  @property
  def sequence_length(self) -> int:
    """Transformer positions: K + P - 1 prefix tokens and hw - P inputs."""
    return self.class_tokens + self.num_tokens - 1

  @property
  def prefix_length(self) -> int:
    return self.class_tokens + self.parallel - 1

  def sequence_cells(self) -> np.ndarray:
    """(hw,) int: the row-major grid cell of each sequence position."""
    side = 1 if self.order == 'raster' else int(round(self.parallel ** 0.5))
    return patch_order(*self.grid, side)

  def rope_angles(self) -> np.ndarray:
    """(sequence_length, head_dim // 2) float32: the module docstring's positions."""
    cells = grid_positions(*self.grid, GridPositions.CENTRES)[self.sequence_cells()]
    angles = rope_2d_angles(cells, self.width // self.num_heads, self.prefix_length)
    return angles[:self.sequence_length]

  def mask_order(self) -> np.ndarray:
    """(sequence_length,) int32 mask orders (`nn.masks.block_causal` with a causal prefix of
    K - 1 class tokens), in numpy: a constant at trace time."""
    i, c = np.arange(self.sequence_length, dtype=np.int32), self.class_tokens - 1
    return np.where(i < c, i, c + (i - c) // self.parallel).astype(np.int32)


def to_sequence(config: BitDanceConfig, bits: jax.Array) -> jax.Array:
  """(b, h, w, d) grid -> (b, hw, d) in sequence order."""
  b, h, w, d = bits.shape
  if (h, w) != tuple(config.grid) or d != config.latent_dim:
    raise ValueError(f'tokens of shape {(h, w, d)}; the generator was built for '
                     f'{tuple(config.grid) + (config.latent_dim,)}')
  return bits.reshape(b, h * w, d)[:, config.sequence_cells()]


def from_sequence(config: BitDanceConfig, tokens: jax.Array) -> jax.Array:
  """(b, hw, d) in sequence order -> (b, h, w, d) grid."""
  inverse = np.argsort(config.sequence_cells())
  b, _, d = tokens.shape
  return tokens[:, inverse].reshape(b, *config.grid, d)


class BitDance(nn.Module):
  """The class-to-image generator. Methods (apply with `method=`):

  __call__(bits (b, h, w, d), labels (b,) int, train) -> (loss, metrics): the training loss;
    rngs {'noise'} (t, eps, bit flips, label dropout when train).
  prefix(labels (b,)) -> (b, K + P - 1, width): class tokens then queries.
  connect(tokens (b, s, d)) -> (b, s, width): the connector.
  transformer(x (b, s, width), start, cache) -> (hidden (b, s, width), cache): the blocks at
    sequence positions [start, start + s), final-normed; cache None runs the whole sequence.
  conditions(hidden (b, s, width), first) -> (b, s, width): + the position embeddings of
    targets [first, first + s).
  denoise(z (n, m, d), t (n, m), cond (n, m, width)) -> x estimate: the head.
  """
  config: BitDanceConfig

  def setup(self):
    cfg = self.config
    dt = compute_dtype(cfg.dtype, 'dtype')
    self.class_table = self.param('class_table', initializers.normal(0.02, 'vocab', 'embed'),
                                  (cfg.num_classes + 1, cfg.class_tokens * cfg.width))
    if cfg.parallel > 1:
      self.queries = self.param('queries', initializers.normal(0.02, None, 'embed'),
                                (cfg.parallel - 1, cfg.width))
    self.connector = SwiGLU(int(1.5 * cfg.width), out_features=cfg.width, use_bias=True,
                            names=('connector_in', 'connector_out'), dtype=dt)
    self.embed_norm = RMSNorm(dtype=dt)
    block = nn.remat(TransformerBlock) if cfg.remat else TransformerBlock
    self.blocks = [block(cfg.num_heads, dt) for _ in range(cfg.depth)]
    self.final_norm = RMSNorm(dtype=dt)
    self.target_positions = self.param('target_positions',
                                       initializers.normal(0.02, None, 'embed'),
                                       (cfg.num_tokens, cfg.width))
    head_width = cfg.head_width or cfg.width
    self.head = bit_diffusion.BitDiffusionHead(
        head_width, cfg.head_depth, cfg.head_adaln_blocks,
        attention_heads=head_width // cfg.head_head_dim if cfg.parallel > 1 else 0,
        bounded=cfg.head_bounded, dtype=dt)

  def prefix(self, labels: jax.Array) -> jax.Array:
    cfg = self.config
    chex.assert_rank(labels, 1)
    x = jnp.take(self.class_table, labels, axis=0).reshape(-1, cfg.class_tokens, cfg.width)
    if cfg.parallel > 1:
      queries = jnp.broadcast_to(self.queries, (x.shape[0],) + self.queries.shape)
      x = jnp.concatenate([x, queries.astype(x.dtype)], axis=1)
    return x

  def connect(self, tokens: jax.Array) -> jax.Array:
    return self.connector(tokens.astype(jnp.float32))

  def transformer(self, x: jax.Array, start: jax.Array | int = 0,
                  cache: kv_cache.KVCache | None = None):
    cfg = self.config
    b, s, _ = x.shape
    angles = jax.lax.dynamic_slice_in_dim(jnp.asarray(cfg.rope_angles()), start, s)
    order = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(jnp.asarray(cfg.mask_order()),
                                                          start, s), (b, s))
    x = nn.with_logical_constraint(self.embed_norm(x), ('batch', 'length', 'embed'))
    if cache is None:
      mask = masks.MaskSpec(order)
      for block in self.blocks:
        x = block(x, angles, mask)
      return self.final_norm(x), None
    key_order = jax.lax.dynamic_update_slice(cache.order, order, (0, cache.index))
    dense = masks.dense_mask(order, key_order)
    layer_cache = kv_cache.LayerCache(cache.keys, cache.values, 0, cache.index)
    for i, block in enumerate(self.blocks):
      x, layer_cache = block(x, angles, dense, layer_cache.replace(layer=i))
    cache = cache.replace(keys=layer_cache.keys, values=layer_cache.values, order=key_order,
                          lengths=cache.lengths + s, index=cache.index + s)
    return self.final_norm(x), cache

  def conditions(self, hidden: jax.Array, first: jax.Array | int = 0) -> jax.Array:
    positions = jax.lax.dynamic_slice_in_dim(self.target_positions, first, hidden.shape[1])
    return hidden + positions.astype(hidden.dtype)

  def denoise(self, z: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
    return self.head(z, t, cond)

  def __call__(self, bits: jax.Array, labels: jax.Array, *, train: bool
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.config
    targets = to_sequence(cfg, bits).astype(jnp.float32)
    b, p = targets.shape[0], cfg.parallel
    loss_key, flip_key, drop_key = jax.random.split(self.make_rng('noise'), 3)
    inputs = targets[:, :-p]
    if train:
      inputs = diffusion.flip_bits(flip_key, inputs, cfg.bit_flip)
      dropped = jax.random.uniform(drop_key, labels.shape) < cfg.class_dropout
      labels = jnp.where(dropped, cfg.num_classes, labels)
    x = jnp.concatenate([self.prefix(labels), self.connect(inputs).astype(jnp.float32)],
                        axis=1)
    hidden, _ = self.transformer(x)
    cond = self.conditions(hidden[:, cfg.class_tokens - 1:])
    blocks = lambda a: a.reshape(b * cfg.num_blocks, p, a.shape[-1])
    return bit_diffusion.denoising_loss(
        self.head, blocks(targets), blocks(cond), loss_key, repeats=cfg.noise_repeats,
        t_mean=cfg.t_mean, t_std=cfg.t_std, shift=cfg.time_shift, t_per_row=True)


def init_cache(config: BitDanceConfig, batch_size: int) -> kv_cache.KVCache:
  """An empty KV cache for one image per row (every position but the last block's inputs)."""
  head_dim = config.width // config.num_heads
  return kv_cache.init_cache(config.depth, batch_size, config.sequence_length,
                             config.num_heads, head_dim, compute_dtype(config.dtype, 'dtype'))


def sample(model: BitDance, params: Any, labels: jax.Array, rng: jax.Array, *,
           num_steps: int, cfg_scale: float = 1.0, cfg_schedule: str = 'linear',
           temperature: float = 1.0) -> jax.Array:
  """Generates one image's tokens per label, P at a time with a KV cache.

  labels: (b,) int class ids (num_classes is the null class). cfg_scale > 1 guides every
  block with the null-class stream at `cfg_scale_at(cfg_scale, block, num_blocks,
  cfg_schedule)`. Block j's noise is `fold_in(rng, j)`. Returns (b, h, w, d) float32 in
  {-1, +1}. Trace it inside `jax.jit`.
  """
  cfg = model.config
  apply = lambda method, *a: model.apply({'params': params}, *a, method=method)
  b, p = labels.shape[0], cfg.parallel
  guided = cfg_scale > 1.0
  streams = jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)]) if guided \
      else labels
  rows = streams.shape[0]

  def sample_block(hidden, j):
    cond = apply(BitDance.conditions, hidden[:, -p:], j * p)
    denoise = lambda z, t, c: apply(BitDance.denoise, z, t, c)
    scale = bit_diffusion.cfg_scale_at(cfg_scale, j, cfg.num_blocks, cfg_schedule)
    velocity = bit_diffusion.guided_velocity(denoise, cond[:b], cond[b:] if guided else None,
                                             scale)
    z = bit_diffusion.euler_maruyama(velocity, jax.random.fold_in(rng, j),
                                     (b, p, cfg.latent_dim), num_steps=num_steps,
                                     shift=cfg.time_shift, temperature=temperature)
    return jnp.where(z > 0, 1.0, -1.0)

  hidden, cache = apply(BitDance.transformer, apply(BitDance.prefix, streams), 0,
                        init_cache(cfg, rows))
  tokens = jnp.zeros((b, cfg.num_tokens, cfg.latent_dim), jnp.float32)
  tokens = jax.lax.dynamic_update_slice_in_dim(tokens, sample_block(hidden, 0), 0, axis=1)

  def body(j, carry):
    tokens, cache = carry
    previous = jax.lax.dynamic_slice_in_dim(tokens, (j - 1) * p, p, axis=1)
    x = apply(BitDance.connect, jnp.concatenate([previous] * (rows // b)))
    hidden, cache = apply(BitDance.transformer, x, cfg.prefix_length + (j - 1) * p, cache)
    return jax.lax.dynamic_update_slice_in_dim(tokens, sample_block(hidden, j), j * p,
                                               axis=1), cache

  tokens, _ = jax.lax.fori_loop(1, cfg.num_blocks, body, (tokens, cache))
  return from_sequence(cfg, tokens)
