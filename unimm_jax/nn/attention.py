"""Full (bidirectional) multi-head self-attention with optional rotary angles.

Projections are bias-free. q, k and v are separate (embed -> heads x kv) kernels so each can
be sharded over heads; a fused PyTorch `wqkv` of shape (3 * dim, dim) maps onto them by
chunking its output rows into three equal parts (q first), then reshaping (heads, head_dim).
"""
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn.rope import apply_rope

Dtype = Any


class SelfAttention(nn.Module):
  """Multi-head self-attention over a whole sequence, softmax scale 1/sqrt(head_dim).

  Shapes: x (b, s, d), angles (s, head_dim // 2) or None -> (b, s, d).
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, angles: jax.Array | None = None) -> jax.Array:
    chex.assert_rank(x, 3)
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f'width {dim} is not divisible by num_heads={self.num_heads}')
    head_dim = dim // self.num_heads

    # Explicit 3-D kernels (not nn.DenseGeneral, which inits a flat 2-D kernel and so cannot
    # carry 3 logical names once rules are active). fan_in is the embed (resp. heads x kv)
    # side, as for PyTorch's Linear.
    qkv_init = initializers.kernel_init_axes(('embed', 'heads', 'kv'), in_axis=0, out_axis=(1, 2))
    q, k, v = (
        jnp.einsum('bsd,dhk->bshk', x.astype(self.dtype),
                   self.param(name, qkv_init, (dim, self.num_heads, head_dim)).astype(self.dtype))
        for name in ('query', 'key', 'value'))
    if angles is not None:
      q, k = apply_rope(q, angles), apply_rope(k, angles)
    q, k, v = (nn.with_logical_constraint(t, ('batch', 'length', 'heads', 'kv')) for t in (q, k, v))
    # XLA's reference implementation accumulates the logits and softmax in float32.
    out = jax.nn.dot_product_attention(q, k, v)
    out_init = initializers.kernel_init_axes(('heads', 'kv', 'embed'), in_axis=(0, 1), out_axis=2)
    w_out = self.param('out', out_init, (self.num_heads, head_dim, dim))
    return jnp.einsum('bshk,hkd->bsd', out, w_out.astype(self.dtype))
