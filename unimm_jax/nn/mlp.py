"""Feed-forward layers: the one SwiGLU, and the two-layer MLP of the ViTs and pooling heads.

SwiGLU: out(silu(gate(x)) * up(x)), in one of two parameter layouts fixed by the checkpoints
it imports:
  'fused'  the gate and up projections are one kernel `<in_name>` (embed, 2, mlp): index 0 is
           the gate (goes through silu), index 1 the up projection (+ `<in_name>_bias` (2, mlp));
           the output projection is `<out_name>` {kernel, bias}. A PyTorch `w1` of shape
           (2 * hidden, dim) whose output is chunked in two (first half gate) maps onto it by
           reshaping to (2, hidden, dim); keeping the 2 as its own axis lets `mlp` be sharded
           without splitting gate from up. UniWeTok's blocks (`w1`, `w2`), DINOv2-giant
           (`fc1`, `fc2`), BitDance's connector.
  'hf'     separate `gate_proj`, `up_proj`, `down_proj` {kernel, bias} (transformers' LLMs).

MLP: fc2(act(fc1(x))) with biases; `feed_forward` builds its layers on the calling module,
so a head can keep `fc1` and `fc2` beside its other params.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn.linear import Projection, project

Dtype = Any
SWIGLU_LAYOUTS = ('fused', 'hf')

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'silu': jax.nn.silu,
}


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0, multiple_of: int = 256) -> int:
  """Hidden width: int(2/3 * mlp_ratio * dim) rounded up to a multiple of `multiple_of`.

  For UniWeTok (BitDance autoencoder_uni.py `FeedForward`): dim 1024 -> 2816, dim 128 -> 512.
  """
  hidden = int(2 * mlp_ratio * dim / 3)
  return -(-hidden // multiple_of) * multiple_of


class SwiGLU(nn.Module):
  """Gated MLP. Shapes: (..., d) -> (..., out_features or d).

  Attributes: hidden_dim; out_features (None: d); use_bias (every projection); layout
  'fused' or 'hf' (module docstring); names (in, out) of the fused layout's params;
  kernel_stddev (N(0, stddev) kernels; None: PyTorch's default init); dtype, param_dtype.
  """
  hidden_dim: int
  out_features: int | None = None
  use_bias: bool = False
  layout: str = 'fused'
  names: tuple[str, str] = ('w1', 'w2')
  kernel_stddev: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.layout not in SWIGLU_LAYOUTS:
      raise ValueError(f'SwiGLU.layout={self.layout!r} is not one of {SWIGLU_LAYOUTS}')
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, stddev=self.kernel_stddev)
    out_features = self.out_features or x.shape[-1]
    if self.layout == 'hf':
      gate, up = (Projection((self.hidden_dim,), ('embed', 'mlp'), self.use_bias, name=name,
                             **common)(x) for name in ('gate_proj', 'up_proj'))
      out_name = 'down_proj'
    else:
      in_name, out_name = self.names
      gate_up = project(self, x, (2, self.hidden_dim), ('embed', None, 'mlp'),
                        kernel_name=in_name,
                        bias_name=f'{in_name}_bias' if self.use_bias else None, **common)
      gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return Projection((out_features,), ('mlp', 'embed'), self.use_bias, name=out_name,
                      **common)(hidden)


def feed_forward(x: jax.Array, hidden_dim: int, activation: str, dtype: Dtype,
                 out_features: int | None = None) -> jax.Array:
  """fc2(act(fc1(x))), both Dense with bias, created on the calling module (call it from a
  compact method). Shapes: (..., d) -> (..., out_features or d)."""
  if activation not in ACTIVATIONS:
    raise ValueError(f'activation={activation!r} is not one of {sorted(ACTIVATIONS)}')
  h = nn.Dense(hidden_dim, dtype=dtype, kernel_init=initializers.kernel_init('embed', 'mlp'),
               bias_init=initializers.zeros('mlp'), name='fc1')(x)
  h = nn.with_logical_constraint(ACTIVATIONS[activation](h), ('batch', 'length', 'mlp'))
  return nn.Dense(out_features or x.shape[-1], dtype=dtype,
                  kernel_init=initializers.kernel_init('mlp', 'embed'),
                  bias_init=initializers.zeros('embed'), name='fc2')(h)


class MLP(nn.Module):
  """`feed_forward` as a module (params fc1, fc2). Shapes: (..., d) -> (..., d)."""
  hidden_dim: int
  activation: str = 'gelu_pytorch_tanh'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return feed_forward(x, self.hidden_dim, self.activation, self.dtype)


class Projector(nn.Module):
  """Features of another network (..., in) -> the LLM's width (..., out): fc2(gelu(fc1(x))),
  exact (erf) GELU as torch's nn.GELU() (LLaVA's `mlp2x_gelu`: UniToken's ViT adapter,
  EvoTok's projectors). approximate_gelu: the tanh approximation instead (transformers'
  'gelu_pytorch_tanh': BitDance's MLLM `MLPconnector`, bits -> LLM width, hidden = out).
  Params fc1 {kernel (in, hidden), bias}, fc2 {kernel, bias}."""
  hidden: int
  out: int
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Projection((self.hidden,), ('embed', 'mlp'), use_bias=True, dtype=self.dtype,
                   name='fc1')(x)
    x = nn.gelu(x, approximate=self.approximate_gelu)
    return Projection((self.out,), ('mlp', 'embed'), use_bias=True, dtype=self.dtype,
                      name='fc2')(x)
