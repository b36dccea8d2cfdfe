"""pytorch-fid's InceptionV3 weights (safetensors) -> `FIDInceptionV3` variables.

The file holds the state dict of pytorch-fid's FID Inception (`fid_inception_v3()`), i.e. the
tensors of pt_inception-2015-12-05-6726825d.pth under their own key names. Convert that
.pth once, with torch and safetensors installed:

  import torch, safetensors.torch
  sd = torch.load('pt_inception-2015-12-05-6726825d.pth', map_location='cpu')
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'fid.safetensors')

Key mapping, for every BasicConv2d `<path>` (e.g. `Conv2d_1a_3x3`, `Mixed_5b.branch1x1`):
  <path>.conv.weight (out, in, kh, kw)  -> params    <path>/conv/kernel (kh, kw, in, out)
  <path>.bn.weight / .bn.bias          -> params    <path>/bn/scale, <path>/bn/bias
  <path>.bn.running_mean / running_var  -> batch_stats <path>/bn/mean, <path>/bn/var
  <path>.bn.num_batches_tracked         optional (a training counter), ignored
  fc.weight (1008, 2048), fc.bias (1008) required with these shapes, then dropped: the model
                                        returns pool3 features, not logits.
Any other key, a missing key, or a shape that differs is an error naming the key.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from unimm_jax.models.inception import FEATURE_DIM, FID_RESOLUTION, FIDInceptionV3

_NUM_CLASSES = 1008  # the 2015-12-05 graph's classifier (1000 classes + 8 unused)
_FC_SHAPES = {'fc.weight': (_NUM_CLASSES, FEATURE_DIM), 'fc.bias': (_NUM_CLASSES,)}
# torch suffix -> (flax collection, leaf name, torch array -> flax array)
_LEAVES = {
    'conv.weight': ('params', ('conv', 'kernel'), lambda w: np.transpose(w, (2, 3, 1, 0))),
    'bn.weight': ('params', ('bn', 'scale'), lambda w: w),
    'bn.bias': ('params', ('bn', 'bias'), lambda w: w),
    'bn.running_mean': ('batch_stats', ('bn', 'mean'), lambda w: w),
    'bn.running_var': ('batch_stats', ('bn', 'var'), lambda w: w),
}


def _torch_shape(suffix: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if suffix == 'conv.weight':
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  return tuple(flax_shape)


def expected_torch_keys(model: FIDInceptionV3) -> dict[str, tuple[int, ...]]:
  """Every required key of pytorch-fid's state dict with its PyTorch shape."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, FID_RESOLUTION, FID_RESOLUTION, 3), jnp.float32))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  expected = dict(_FC_SHAPES)
  for suffix, (collection, leaf, _) in _LEAVES.items():
    for path, value in flat.items():
      if path[0] == collection and path[-2:] == leaf:
        expected['.'.join(path[1:-2]) + '.' + suffix] = _torch_shape(suffix, value.shape)
  return expected


def load_fid_inception(path: str) -> tuple[FIDInceptionV3, dict]:
  """Reads a safetensors file of pytorch-fid's FID Inception weights.

  Returns:
    (model, variables): `model.apply(variables, images)` maps (b, h, w, 3) images in
    [-1, 1] to (b, 2048) pool3 features; variables holds 'params' and 'batch_stats'.
  Raises:
    ValueError naming the first missing, unexpected or wrongly shaped key.
  """
  model = FIDInceptionV3()
  expected = expected_torch_keys(model)
  tensors = load_file(path)
  for key in sorted(expected):
    if key not in tensors:
      raise ValueError(f'{path}: missing key {key!r}')
    if tuple(tensors[key].shape) != expected[key]:
      raise ValueError(f'{path}: key {key!r} has shape {tuple(tensors[key].shape)}, '
                       f'expected {expected[key]}')
  for key in sorted(tensors):
    optional = (key.endswith('.bn.num_batches_tracked')
                and key.replace('num_batches_tracked', 'running_mean') in expected)
    if key not in expected and not optional:
      raise ValueError(f'{path}: unexpected key {key!r}')

  flat = {}
  for key in expected:
    if key in _FC_SHAPES:
      continue
    for suffix, (collection, leaf, convert) in _LEAVES.items():
      if key.endswith('.' + suffix):
        module_path = tuple(key[:-len(suffix) - 1].split('.'))
        value = convert(np.asarray(tensors[key], np.float32))
        flat[(collection, *module_path, *leaf)] = jnp.asarray(value)
  return model, flax.traverse_util.unflatten_dict(flat)
