"""SwiGLU feed-forward: w2(silu(gate(x)) * up(x)), all bias-free."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers

Dtype = Any


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0, multiple_of: int = 256) -> int:
  """Hidden width: int(2/3 * mlp_ratio * dim) rounded up to a multiple of `multiple_of`.

  For UniWeTok (BitDance autoencoder_uni.py `FeedForward`): dim 1024 -> 2816, dim 128 -> 512.
  """
  hidden = int(2 * mlp_ratio * dim / 3)
  return -(-hidden // multiple_of) * multiple_of


class SwiGLU(nn.Module):
  """Gated MLP. Shapes: (..., d) -> (..., d).

  The gate and up projections are one kernel (embed, 2, mlp): index 0 is the gate (goes
  through silu), index 1 the up projection. A PyTorch `w1` of shape (2 * hidden, dim) whose
  output is chunked in two (first half gate) maps onto it by reshaping to (2, hidden, dim);
  keeping the 2 as its own axis lets `mlp` be sharded without splitting gate from up.
  """
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    # An explicit 3-D kernel: nn.DenseGeneral inits a flat 2-D one, which cannot carry three
    # logical names once sharding rules are active.
    w1 = self.param('w1', initializers.kernel_init_axes(('embed', None, 'mlp'), in_axis=0,
                                                        out_axis=(1, 2)),
                    (dim, 2, self.hidden_dim))
    gate_up = jnp.einsum('...d,dgm->...gm', x.astype(self.dtype), w1.astype(self.dtype))
    hidden = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
    hidden = nn.with_logical_constraint(hidden, ('batch', 'length', 'mlp'))
    return nn.Dense(dim, use_bias=False, dtype=self.dtype,
                    kernel_init=initializers.kernel_init('mlp', 'embed'), name='w2')(hidden)
