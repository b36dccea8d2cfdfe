"""Bidirectional multi-head attention: self or cross, optional biases, key mask and rotary angles.

q, k and v are separate (embed -> heads x kv) kernels so each can be sharded over heads. A
PyTorch Linear `q_proj.weight` of shape (heads * head_dim, dim) maps onto `query` as
`w.T.reshape(dim, heads, head_dim)`; a fused `wqkv` / `in_proj_weight` (3 * dim, dim) is
chunked into three equal row blocks first (q, k, v in that order); `out_proj.weight`
(dim, heads * head_dim) maps onto `out` as `w.T.reshape(heads, head_dim, dim)`.
"""
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn.rope import apply_rope

Dtype = Any


class MultiHeadAttention(nn.Module):
  """Softmax attention with scale 1/sqrt(head_dim), no causal mask.

  Shapes: x (b, t, d) queries; kv (b, s, d) keys/values, default x (self-attention);
  angles (t, head_dim // 2) rotary angles for q and k (self-attention only) or None;
  key_mask (b, s) bool, False for padding keys, or None -> (b, t, d).
  """
  num_heads: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array | None = None,
               angles: jax.Array | None = None,
               key_mask: jax.Array | None = None) -> jax.Array:
    kv = x if kv is None else kv
    chex.assert_rank([x, kv], 3)
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f'width {dim} is not divisible by num_heads={self.num_heads}')
    head_dim = dim // self.num_heads

    def project(name: str, inputs: jax.Array) -> jax.Array:
      # Explicit 3-D kernels (not nn.DenseGeneral, which inits a flat 2-D kernel and so
      # cannot carry 3 logical names once sharding rules are active). fan_in is the embed
      # side, as for PyTorch's Linear.
      init = initializers.kernel_init_axes(('embed', 'heads', 'kv'), in_axis=0, out_axis=(1, 2))
      kernel = self.param(name, init, (dim, self.num_heads, head_dim))
      out = jnp.einsum('bsd,dhk->bshk', inputs.astype(self.dtype), kernel.astype(self.dtype))
      if self.use_bias:
        bias = self.param(f'{name}_bias', initializers.zeros('heads', 'kv'),
                          (self.num_heads, head_dim))
        out = out + bias.astype(self.dtype)
      return nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'kv'))

    q, k, v = project('query', x), project('key', kv), project('value', kv)
    if angles is not None:
      q, k = apply_rope(q, angles), apply_rope(k, angles)
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
    # XLA's reference implementation accumulates the logits and softmax in float32.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    out_init = initializers.kernel_init_axes(('heads', 'kv', 'embed'), in_axis=(0, 1), out_axis=2)
    w_out = self.param('out', out_init, (self.num_heads, head_dim, dim))
    y = jnp.einsum('bshk,hkd->bsd', out, w_out.astype(self.dtype))
    if self.use_bias:
      y = y + self.param('out_bias', initializers.zeros('embed'), (dim,)).astype(self.dtype)
    return y
