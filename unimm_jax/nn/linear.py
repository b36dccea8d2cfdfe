"""Linear maps over several axes, with logical axis names on every kernel and bias.

`project` contracts the last input axes of x with a kernel of shape (*in, *out) whose
parameters it creates on the calling module under the names it is given; `Projection` is the
same map as a module of its own (params `kernel`, `bias`). The two layouts exist because
imported checkpoints fix the names: transformers' LLMs nest `q_proj/kernel`, while the ViTs
and tokenizers keep `query` and `query_bias` beside each other.

Explicit N-D kernels (not nn.DenseGeneral, which initialises a flat 2-D kernel) so that each
axis can carry its own logical name once sharding rules are active.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers

Dtype = Any


def kernel_initializer(axes: tuple[str | None, ...], num_in: int, stddev: float | None):
  """N(0, stddev) (LLMs), or PyTorch's default U(+-1/sqrt(fan_in)) with fan_in over the first
  `num_in` axes when stddev is None; annotated with `axes`."""
  if stddev is not None:
    return initializers.normal(stddev, *axes)
  return initializers.kernel_init_axes(axes, in_axis=tuple(range(num_in)),
                                       out_axis=tuple(range(num_in, len(axes))))


def project(module: nn.Module, x: jax.Array, out_shape: tuple[int, ...],
            axes: tuple[str | None, ...], *, kernel_name: str, bias_name: str | None,
            dtype: Dtype, param_dtype: Dtype = jnp.float32,
            stddev: float | None = None) -> jax.Array:
  """x (..., *in) . kernel (*in, *out) [+ bias (*out)] -> (..., *out), params on `module`.

  `axes` names the kernel's axes (input ones first); the bias takes the output names. Call
  from inside `module`'s compact method or setup.
  """
  num_in = len(axes) - len(out_shape)
  kernel = module.param(kernel_name, kernel_initializer(axes, num_in, stddev),
                        x.shape[x.ndim - num_in:] + tuple(out_shape), param_dtype)
  y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=num_in)
  if bias_name is not None:
    bias = module.param(bias_name, initializers.zeros(*axes[num_in:]), tuple(out_shape),
                        param_dtype)
    y = y + bias.astype(dtype)
  return y


class Projection(nn.Module):
  """`project` as a module: params `kernel` (*in, *out) and, with use_bias, `bias` (*out)."""
  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  stddev: float | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return project(self, x, self.out_shape, self.axes, kernel_name='kernel',
                   bias_name='bias' if self.use_bias else None, dtype=self.dtype,
                   param_dtype=self.param_dtype, stddev=self.stddev)
