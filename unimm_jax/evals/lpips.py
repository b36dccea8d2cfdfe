"""LPIPS distances (VGG16) with the `lpips` package's weights, read from a safetensors file.

Weights file (README section "LPIPS weights"):
LPIPS needs two sets of trained weights: torchvision's ImageNet VGG16 (the trunk) and the
lpips package's calibrated 1x1 heads (shipped inside its pip wheel as weights/v0.1/vgg.pth).
Neither is downloaded by this library, and nothing here reads pickles, so make the file once,
in any environment that has torch, torchvision and lpips installed (it need not be this one;
torchvision fetches its VGG16 checkpoint on first use):

    python -m venv /tmp/lpips_env
    /tmp/lpips_env/bin/pip install torch torchvision lpips safetensors numpy
    /tmp/lpips_env/bin/python tests/fixtures/make_lpips_fixture.py \\
        --export-pretrained lpips_vgg.safetensors

The file (about 59 MB, float32) holds `lpips.LPIPS(net='vgg').state_dict()` under the
package's own names; pass its path to `load` (or to the config field that asks for a
perceptual loss). Without a file, `load` stops with an error unless the caller opts into a
random trunk (`allow_random=True`), which is meant for tests and smoke runs only: its
distances are not perceptual.

Key names (torch layouts) and where they go in `unimm_jax.models.lpips.LPIPS`'s params:
  net.slice{s}.{i}.weight (c_out, c_in, 3, 3) -> trunk/conv{b}_{l}/kernel (3, 3, c_in, c_out)
  net.slice{s}.{i}.bias (c_out,)               -> trunk/conv{b}_{l}/bias
      i is the layer's index in torchvision's vgg16().features: 0, 2 | 5, 7 | 10, 12, 14 |
      17, 19, 21 | 24, 26, 28 for slices 1 | 2 | 3 | 4 | 5 (blocks b = s).
  lin{k}.model.1.weight (1, c_k, 1, 1)          -> lin{k}/kernel (c_k, 1)
The package's state dict also lists `lins.{k}.model.1.weight` (the same tensors reached
through its ModuleList) and the `scaling_layer.shift` / `scaling_layer.scale` buffers; they
are accepted when they agree with lin{k} and with the constants in `models/lpips.py`.
"""
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from unimm_jax.models.lpips import LPIPS, SCALE, SHIFT, TAP_CHANNELS, VGG16_BLOCKS

Params = dict[str, Any]

_MAKE_FILE_HINT = (
    "make one from the lpips package's weights and torchvision's VGG16 with "
    "`python tests/fixtures/make_lpips_fixture.py --export-pretrained lpips_vgg.safetensors` "
    "in an environment with torch, torchvision and lpips (see 'Weights file' in the "
    "docstring of unimm_jax/evals/lpips.py)")


def _trunk_names() -> dict[str, str]:
  """lpips key prefix -> trunk conv name, e.g. 'net.slice2.5' -> 'conv2_1'.

  torchvision's `features` numbers every layer: each conv is followed by a ReLU and every
  block after the first starts with a max-pool, so conv indices skip accordingly.
  """
  names = {}
  index = 0
  for block, widths in enumerate(VGG16_BLOCKS):
    if block > 0:
      index += 1  # the max-pool
    for layer in range(len(widths)):
      names[f'net.slice{block + 1}.{index}'] = f'conv{block + 1}_{layer + 1}'
      index += 2  # the conv and its ReLU
  return names


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Required lpips state-dict key -> torch shape: 26 trunk tensors and 5 heads."""
  shapes = {}
  c_in = 3
  widths = [w for block in VGG16_BLOCKS for w in block]
  for prefix, c_out in zip(_trunk_names(), widths):
    shapes[f'{prefix}.weight'] = (c_out, c_in, 3, 3)
    shapes[f'{prefix}.bias'] = (c_out,)
    c_in = c_out
  for k, c in enumerate(TAP_CHANNELS):
    shapes[f'lin{k}.model.1.weight'] = (1, c, 1, 1)
  return shapes


def _check_optional(key: str, value: np.ndarray, tensors: dict[str, np.ndarray]) -> str | None:
  """Checks a tolerated extra key of the package's state dict; returns a problem or None."""
  constants = {'scaling_layer.shift': SHIFT, 'scaling_layer.scale': SCALE}
  if key in constants:
    want = np.asarray(constants[key], np.float32).reshape(1, 3, 1, 1)
    if value.shape != want.shape or not np.allclose(value, want, rtol=0, atol=1e-7):
      return f'{key} is {value.ravel().tolist()}, this LPIPS uses {want.ravel().tolist()}'
    return None
  match = re.fullmatch(r'lins\.(\d)\.model\.1\.weight', key)
  if match and int(match.group(1)) < len(TAP_CHANNELS):
    twin = f'lin{match.group(1)}.model.1.weight'
    if twin in tensors and not np.array_equal(value, tensors[twin]):
      return f'{key} differs from {twin} (the package stores one tensor under both names)'
    return None
  return f'unexpected key {key}'


def convert_state_dict(tensors: dict[str, np.ndarray]) -> Params:
  """lpips state dict (torch layouts) -> `LPIPS` params; errors name every bad key.

  Raises:
    ValueError: a missing, unexpected or mismatched-shape key (all listed in one message).
  """
  shapes = expected_shapes()
  problems = []
  for key, value in tensors.items():
    if key in shapes:
      if tuple(value.shape) != shapes[key]:
        problems.append(f'{key} has shape {tuple(value.shape)}, expected {shapes[key]}')
    else:
      problem = _check_optional(key, value, tensors)
      if problem:
        problems.append(problem)
  problems += [f'missing key {key}' for key in shapes if key not in tensors]
  if problems:
    raise ValueError('LPIPS weights do not match the lpips VGG16 state dict:\n  '
                     + '\n  '.join(problems))

  def get(key):
    return jnp.asarray(np.asarray(tensors[key], np.float32))

  trunk = {}
  for prefix, name in _trunk_names().items():
    trunk[name] = {'kernel': get(f'{prefix}.weight').transpose(2, 3, 1, 0),  # OIHW -> HWIO
                   'bias': get(f'{prefix}.bias')}
  params = {'trunk': trunk}
  for k in range(len(TAP_CHANNELS)):
    params[f'lin{k}'] = {'kernel': get(f'lin{k}.model.1.weight').reshape(1, -1).T}
  return params


def load_params(path: str) -> Params:
  """Reads a safetensors file of the lpips package's VGG state dict -> `LPIPS` params."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'LPIPS weights file {path} does not exist; {_MAKE_FILE_HINT}.')
  return convert_state_dict(safetensors.numpy.load_file(path))


def random_params(seed: int = 0) -> Params:
  """Untrained `LPIPS` params (He-normal trunk, unit heads). For tests and smoke runs only."""
  dummy = jnp.zeros((1, 16, 16, 3), jnp.float32)
  variables = jax.jit(LPIPS().init)(jax.random.key(seed), dummy, dummy)
  return nn.unbox(variables)['params']


def resolve_params(path: str | None, *, allow_random: bool = False, seed: int = 0) -> Params:
  """Params from `path`, or a random trunk if allowed; else a ValueError saying what to do."""
  if path:
    return load_params(path)
  if allow_random:
    return random_params(seed)
  raise ValueError(f'LPIPS needs a weights file and none was given; {_MAKE_FILE_HINT}. '
                   'Tests and smoke runs may opt into an untrained trunk instead '
                   '(allow_random=True); its distances are not perceptual.')


def load(path: str | None = None, *, allow_random: bool = False, seed: int = 0,
         dtype: Any = jnp.float32, precision: jax.lax.PrecisionLike = None
         ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns fn(x, y) -> (b,) LPIPS distances for images (b, h, w, 3) float32 in [-1, 1].

  Args:
    path: safetensors file of the lpips package's VGG state dict (see 'Weights file' above).
    allow_random: with no path, use an untrained trunk drawn from `seed` instead of failing.
      Only for tests and smoke runs: such distances are not perceptual.
    seed: seed of the random trunk.
    dtype: compute dtype of the trunk convs (normalisation and distances stay float32).
    precision: conv/matmul precision; None is the backend default ('highest' gives exact
      float32 convs on GPU and TPU).
  The params are arguments of the jitted apply, not baked-in constants; a caller that needs
  them as explicit state (e.g. inside its own jit) can use `load_params` and `LPIPS` directly.

  Raises:
    ValueError: no path and allow_random is False, or the file's keys or shapes are wrong.
    FileNotFoundError: path does not exist.
  """
  params = resolve_params(path, allow_random=allow_random, seed=seed)
  apply = jax.jit(LPIPS(dtype=dtype, precision=precision).apply)

  def distance(x: jax.Array, y: jax.Array) -> jax.Array:
    return apply({'params': params}, x, y)

  return distance
