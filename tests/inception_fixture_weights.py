"""Random, regenerable weights for pytorch-fid's FID Inception state dict (numpy only).

Shared by tests/fixtures/make_inception_fixture.py (which fills pytorch-fid's own model with
them to make the reference features) and tests/test_inception.py (which writes them to a
safetensors file for our loader), so the 90 MB of weights never need storing: only the key
list with shapes and the seed go into the fixture.

Each tensor depends only on (seed, key name, shape), through a generator seeded with the
CRC32 of the key, so it is the same in any process, on any platform, in any key order.
Scales keep activations of order one through the 94 conv layers: He-normal conv kernels
(ReLU follows each), BN running statistics near (0, 1) with positive variances, and BN
affine terms near (1, 0).
"""
import zlib

import numpy as np

SEED = 20151205


def random_state_dict(shapes: dict[str, tuple[int, ...]],
                      seed: int = SEED) -> dict[str, np.ndarray]:
  """{pytorch-fid key: shape} -> {key: array}; float32, num_batches_tracked int64 zeros."""
  out = {}
  for key, shape in shapes.items():
    shape = tuple(shape)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if key.endswith('num_batches_tracked'):
      value = np.zeros(shape, np.int64)
    elif key.endswith('conv.weight'):
      fan_in = int(np.prod(shape[1:]))
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith('bn.weight'):
      value = rng.uniform(0.8, 1.2, shape)
    elif key.endswith('bn.running_var'):
      value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith(('bn.bias', 'bn.running_mean')):
      value = rng.normal(0.0, 0.1, shape)
    elif key == 'fc.weight':
      value = rng.normal(0.0, 0.01, shape)
    elif key == 'fc.bias':
      value = np.zeros(shape)
    else:
      raise KeyError(f'no rule for state-dict key {key!r}')
    out[key] = value if value.dtype == np.int64 else value.astype(np.float32)
  return out
