"""Attention pooling (SigLIP's MAP head): one learned probe attends over the tokens, then
y + MLP(LayerNorm(y)).

Used by the SigLIP / SigLIP2 ViTs (their `head`) and by UniWeTok's attention distillation head,
which gives the tokenizer's tokens the form of the function that made the teacher's pooled
embedding. Params: `probe` (1, d), `attention` (biased q/k/v/out), and with an MLP the norm
`<norm_name>` and `fc1`, `fc2` (under `mlp` when `nested_mlp`, as transformers names SigLIP's
head; beside the others otherwise).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn.attention import MultiHeadAttention
from unimm_jax.nn.mlp import MLP, feed_forward

Dtype = Any


class AttentionPool(nn.Module):
  """Shapes: tokens (b, s, d), key_mask (b, s) bool (False for padding) or None -> (b, d).

  Attributes: num_heads; mlp_dim (0: no MLP and no norm); activation of the MLP;
  layer_norm_eps; norm_name and nested_mlp (param names, see the module docstring);
  implementation of the attention; dtype.
  """
  num_heads: int
  mlp_dim: int
  activation: str = 'gelu_pytorch_tanh'
  layer_norm_eps: float = 1e-6
  norm_name: str = 'layernorm'
  nested_mlp: bool = True
  implementation: str | None = 'xla'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    width = tokens.shape[-1]
    # N(0, 1) like SigLIP's probe (torch.randn).
    probe = self.param('probe', initializers.normal(1.0, None, 'embed'), (1, width))
    queries = jnp.broadcast_to(probe.astype(self.dtype), (tokens.shape[0], 1, width))
    y = MultiHeadAttention(self.num_heads, qkv_bias=True, out_bias=True,
                           implementation=self.implementation, dtype=self.dtype,
                           name='attention')(queries, tokens, key_mask=key_mask)
    if self.mlp_dim:
      # Two-pass variance, as torch's LayerNorm computes it.
      h = nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False, dtype=self.dtype,
                       scale_init=initializers.ones('embed'),
                       bias_init=initializers.zeros('embed'), name=self.norm_name)(y)
      if self.nested_mlp:
        y = y + MLP(self.mlp_dim, self.activation, self.dtype, name='mlp')(h)
      else:
        y = y + feed_forward(h, self.mlp_dim, self.activation, self.dtype)
    return y[:, 0]
