"""Deterministic random weights for the LPIPS parity fixture, in numpy only.

Shared by tests/fixtures/make_lpips_fixture.py (which loads them into the `lpips` package's
model, in a venv with torch) and tests/test_lpips.py (which writes them to a safetensors file
for `unimm_jax.evals.lpips.load`), so the 59 MB of trunk weights are regenerated rather than
stored. Each tensor draws from its own stream seeded by (seed, crc32 of its name), so the set
and order of names do not matter, and only uniform doubles are used: NumPy keeps the PCG64
bit stream fixed across versions but not its normal sampler.
"""
import re
import zlib

import numpy as np

# The package exposes each head twice (lin{k} and lins.{k}, one tensor); both names draw
# the same values.
_ALIAS = re.compile(r'^lins\.(\d)\.')


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
  """One float32 tensor in torch layout.

  Conv weights (c_out, c_in, kh, kw): He-uniform over fan_in (variance 2 / fan_in), so
  activations keep their scale through VGG16's 13 ReLU convs. Biases: U(-0.1, 0.1). Heads
  (1, c, 1, 1): U(0, 1), non-negative like the trained ones.
  """
  rng = np.random.default_rng([seed, zlib.crc32(_ALIAS.sub(r'lin\1.', name).encode())])
  uniform = rng.random(shape)  # [0, 1), float64
  if name.endswith('.bias'):
    values = 0.2 * uniform - 0.1
  elif name.startswith('lin'):  # lin{k} and lins.{k}
    values = uniform
  else:
    bound = np.sqrt(6.0 / np.prod(shape[1:]))
    values = bound * (2.0 * uniform - 1.0)
  return values.astype(np.float32)


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """{name: shape} of the trunk and head keys -> {name: float32 tensor}."""
  return {name: random_tensor(name, tuple(shape), seed) for name, shape in shapes.items()}
