"""Parameter initialisers shared by the layers in `unimm_jax.nn`.

The tokenizers reimplemented here were trained from scratch in PyTorch with PyTorch's default
initialisation and their optimiser settings (e.g. UniWeTok's Adam at lr 1e-4) were tuned for
it, so kernels start the same way: `kaiming_uniform(a=sqrt(5))`, i.e. U(-1/sqrt(fan_in),
1/sqrt(fan_in)), which is a variance scaling of 1/3 over fan_in. Flax computes fan_in from the
last two kernel axes times the receptive field, the same fan_in PyTorch uses for Linear and
Conv2d. Biases start at zero (PyTorch draws them from the same small uniform; zero keeps the
initialiser a function of the shape alone).
"""
import flax.linen as nn
import jax

torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
zeros_init = nn.initializers.zeros_init()
ones_init = nn.initializers.ones_init()


def kernel_init(*axes: str | None) -> jax.nn.initializers.Initializer:
  """PyTorch-default kernel initialiser annotated with logical axis names."""
  return nn.with_logical_partitioning(torch_default_kernel_init, axes)


def kernel_init_axes(axes: tuple[str | None, ...], in_axis, out_axis
                     ) -> jax.nn.initializers.Initializer:
  """PyTorch-default init for an N-D kernel whose fan_in spans `in_axis` (int or tuple)."""
  init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform', in_axis=in_axis,
                                          out_axis=out_axis)
  return nn.with_logical_partitioning(init, axes)


def zeros(*axes: str | None) -> jax.nn.initializers.Initializer:
  """Zero initialiser (biases) annotated with logical axis names."""
  return nn.with_logical_partitioning(zeros_init, axes)


def ones(*axes: str | None) -> jax.nn.initializers.Initializer:
  """One initialiser (norm scales) annotated with logical axis names."""
  return nn.with_logical_partitioning(ones_init, axes)


def normal(stddev: float, *axes: str | None) -> jax.nn.initializers.Initializer:
  """Gaussian initialiser with logical axis names (PyTorch's nn.Embedding uses N(0, 1))."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)
