"""The depth transformer head: L residual codes per image token, one after another along
depth, conditioned on the LLM's hidden state (RQ-Transformer's head, as EvoTok's MLLM uses it
to predict the first L_pix codes of each token; paper eq. 9, SPECS 2).

For one image token with LLM hidden state h and codes k_1..k_L (embeddings e_i(k_i) from
the tokenizer's codebook of level i), the authors' form (VisionXLab/EvoTok,
mllm/.../rqtransformer/modeling_rqtransformer.py):

  depth 1 reads        in_hidden(h)                          Linear d_llm -> width
  depth i > 1 reads    in_codes(e_1(k_1) + ... + e_{i-1}(k_{i-1}))  Linear code_dim -> width
                       (the partial residual sum, not the last code alone)
  + a learned depth position (L, width), N(0, 0.02)
  -> num_layers causal pre-LN blocks along depth: LayerNorm (eps 1e-5) -> attention (q, k,
     v and output projections with biases) -> dropout; LayerNorm -> Linear 4x -> exact GELU
     -> Linear -> dropout; no norm after the last block
  -> at depth i: its own LayerNorm + Linear(width -> K): the logits of k_i.

Tokens never see each other here (the LLM did that): the L depths of each token form one
short causal sequence. Training runs all L depths at once from the true codes (teacher
forcing); sampling asks `depth_logits` for one depth at a time.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn import masks
from unimm_jax.nn.attention import MultiHeadAttention
from unimm_jax.nn.mlp import feed_forward

Dtype = Any
LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which the authors' blocks use


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype,
                      scale_init=initializers.ones('embed'),
                      bias_init=initializers.zeros('embed'), name=name)


class DepthBlock(nn.Module):
  """One causal pre-LN block. Shapes: (n, L, width) -> (n, L, width)."""
  num_heads: int
  dropout_rate: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    n, length, width = x.shape
    h = MultiHeadAttention(self.num_heads, qkv_bias=True, out_bias=True, dtype=self.dtype,
                           name='attention')(_layer_norm(self.dtype, 'norm1')(x),
                                             mask=masks.causal(n, length))
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = feed_forward(_layer_norm(self.dtype, 'norm2')(x), 4 * width, 'gelu', self.dtype)
    return x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


class DepthTransformer(nn.Module):
  """See the module docstring.

  depth: L, codes per token; codebook_size: K, logits per depth; width, num_heads,
  num_layers: the blocks (paper: 2560, 40, 6); dropout_rate: on each branch (0.1).
  Params: in_hidden, in_codes (Dense), depth_positions (L, width), blocks_{j}, and per
  depth classifiers_{i} with norm and out.
  """
  depth: int
  codebook_size: int
  width: int
  num_heads: int
  num_layers: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32

  def setup(self):
    dense = lambda features, axes, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=initializers.kernel_init(*axes),
        bias_init=initializers.zeros(axes[1]), name=name)
    # The head's width is its model dimension ('embed', as in the blocks' projections).
    self.in_hidden = dense(self.width, (None, 'embed'), 'in_hidden')
    self.in_codes = dense(self.width, (None, 'embed'), 'in_codes')
    self.depth_positions = self.param('depth_positions', initializers.normal(0.02, None, 'embed'),
                                      (self.depth, self.width), jnp.float32)
    self.blocks = [DepthBlock(self.num_heads, self.dropout_rate, self.dtype, name=f'blocks_{j}')
                   for j in range(self.num_layers)]
    self.norms = [_layer_norm(self.dtype, f'classifiers_{i}_norm') for i in range(self.depth)]
    self.outs = [dense(self.codebook_size, ('embed', 'vocab'), f'classifiers_{i}_out')
                 for i in range(self.depth)]

  def _run(self, hidden: jax.Array, prefix_sums: jax.Array, deterministic: bool) -> jax.Array:
    """hidden (..., d_llm), prefix_sums (..., m, code_dim) -> (..., m + 1, width): the
    block outputs at depths 1..m+1."""
    lead = hidden.shape[:-1]
    x = jnp.concatenate([self.in_hidden(hidden)[..., None, :], self.in_codes(prefix_sums)],
                        axis=-2)
    length = x.shape[-2]
    x = (x + self.depth_positions[:length].astype(x.dtype)).reshape(-1, length, self.width)
    for block in self.blocks:
      x = block(x, deterministic)
    return x.reshape(lead + (length, self.width))

  def _classify(self, x: jax.Array, depth: int) -> jax.Array:
    return self.outs[depth](self.norms[depth](x)).astype(jnp.float32)

  def __call__(self, hidden: jax.Array, code_embeds: jax.Array, *,
               deterministic: bool = True) -> jax.Array:
    """Teacher-forced logits of every depth.

    Args:
      hidden: (..., d_llm) the LLM's (final-normed) hidden state before each image token.
      code_embeds: (..., L, code_dim) e_i(k_i) of the token's true codes, by depth.
      deterministic: False applies dropout (needs a 'dropout' rng).
    Returns:
      (..., L, K) float32 logits; depth i reads the codes before it only.
    """
    if code_embeds.shape[-2] != self.depth:
      raise ValueError(f'code_embeds has {code_embeds.shape[-2]} depths, the head {self.depth}')
    sums = jnp.cumsum(code_embeds, axis=-2)[..., :-1, :]
    x = self._run(hidden, sums, deterministic)
    return jnp.stack([self._classify(x[..., i, :], i) for i in range(self.depth)], axis=-2)

  def depth_logits(self, hidden: jax.Array, prefix_sums: jax.Array) -> jax.Array:
    """Logits of the next depth in sampling (no dropout).

    Args:
      hidden: (..., d_llm).
      prefix_sums: (..., m, code_dim) for m = 0..L-1: the partial sums e_1 + ... + e_j of
        the codes sampled so far, j = 1..m (the cumulative sums, as __call__ builds them).
    Returns:
      (..., K) float32 logits of depth m + 1.
    """
    m = prefix_sums.shape[-2]
    if m >= self.depth:
      raise ValueError(f'{m} codes given; the head predicts {self.depth} per token')
    return self._classify(self._run(hidden, prefix_sums, True)[..., m, :], m)
