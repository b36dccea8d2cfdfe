"""Pre-norm transformer blocks and the register-token grid transformer of UniWeTok.

Block (BitDance autoencoder_uni.py and layers.py `TransformerBlock`):
  h = x + attn(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)), RMSNorm eps 1e-6, no dropout;
  attention without biases, 2D RoPE on adjacent channel pairs, and any mask of
  `unimm_jax.nn.masks` (UniWeTok's grid: none; the GAP prior: causal).
"""
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn import kv_cache
from unimm_jax.nn import masks
from unimm_jax.nn.attention import MultiHeadAttention
from unimm_jax.nn.mlp import SwiGLU, swiglu_hidden_dim
from unimm_jax.nn.norms import RMSNorm
from unimm_jax.nn.rope import GridPositions, grid_positions, rope_2d_angles

Dtype = Any


class TransformerBlock(nn.Module):
  """Pre-RMSNorm block with attention and SwiGLU. Shapes: x (b, s, d), angles (s, head_dim // 2)
  or (b, s, head_dim // 2) or None, mask a MaskSpec, a dense (b, 1, s, t) bool mask or None
  (every token sees every token) -> (b, s, d).

  With a `cache` (`kv_cache.LayerCache`, this layer's view of a stack's KV cache) the new
  tokens' keys and values are written at the cache's index, attention runs over every slot
  (the dense mask then has t = max_length columns) and the call returns (out, cache).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str | None = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array, angles: jax.Array | None = None,
               mask: masks.MaskSpec | jax.Array | None = None,
               cache: kv_cache.LayerCache | None = None):
    dim = x.shape[-1]
    attended = MultiHeadAttention(self.num_heads, implementation=self.implementation,
                                  dtype=self.dtype, name='attention')(
        RMSNorm(dtype=self.dtype, name='attention_norm')(x), angles=angles, mask=mask,
        cache=cache)
    if cache is not None:
      attended, cache = attended
    h = x + attended
    out = h + SwiGLU(swiglu_hidden_dim(dim), dtype=self.dtype, name='feed_forward')(
        RMSNorm(dtype=self.dtype, name='ffn_norm')(h))
    out = nn.with_logical_constraint(out, ('batch', 'length', 'embed'))
    return out if cache is None else (out, cache)


class TransformerStack(nn.Module):
  """`num_blocks` TransformerBlocks applied in order. Shapes: (b, s, d) -> (b, s, d).

  With `remat`, each block's activations are recomputed in the backward pass instead of
  stored (nothing saved but the block inputs), trading ~1/3 more compute for memory.
  """
  num_blocks: int
  num_heads: int
  dtype: Dtype = jnp.float32
  remat: bool = False
  implementation: str | None = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array, angles: jax.Array | None = None,
               mask: masks.MaskSpec | None = None) -> jax.Array:
    block_cls = nn.remat(TransformerBlock) if self.remat else TransformerBlock
    for i in range(self.num_blocks):
      x = block_cls(self.num_heads, dtype=self.dtype, implementation=self.implementation,
                    name=f'blocks_{i}')(x, angles, mask)
    return x


class GridTransformer(nn.Module):
  """Transformer over a feature map with learned registers and 2D RoPE (UniWeTok's middle).

  The (h, w) grid is flattened row-major, `num_registers` learned tokens (N(0, 1) init, as
  PyTorch's nn.Embedding) are prepended at RoPE position 0, the blocks run, the registers are
  dropped and the grid is restored. `positions` picks the encoder or decoder normalisation
  (see `unimm_jax.nn.rope`). No norm follows the last block (none in the authors' code).

  Shapes: (b, h, w, c) -> (b, h, w, c).
  """
  num_blocks: int
  num_heads: int
  num_registers: int
  positions: GridPositions
  dtype: Dtype = jnp.float32
  implementation: str | None = 'xla'
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    b, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'width {c} is not divisible by num_heads={self.num_heads}')
    registers = self.param('registers', initializers.normal(1.0, None, 'embed'),
                           (self.num_registers, c), jnp.float32)
    tokens = jnp.concatenate(
        [jnp.broadcast_to(registers.astype(self.dtype), (b, self.num_registers, c)),
         x.reshape(b, h * w, c).astype(self.dtype)], axis=1)
    tokens = nn.with_logical_constraint(tokens, ('batch', 'length', 'embed'))
    # Angles depend only on static shapes: computed in numpy at trace time, a constant in XLA.
    angles = jnp.asarray(rope_2d_angles(grid_positions(h, w, self.positions), c // self.num_heads,
                                        num_prefix=self.num_registers))
    tokens = TransformerStack(self.num_blocks, self.num_heads, dtype=self.dtype, remat=self.remat,
                              implementation=self.implementation, name='stack')(tokens, angles)
    return tokens[:, self.num_registers:].reshape(b, h, w, c)
