"""Lazy reading of a transformers checkpoint directory and placement of its weights on a mesh.

A directory saved by `save_pretrained` holds `config.json` and either `model.safetensors` or
shards listed by `model.safetensors.index.json`. Tensors are memory-mapped, never read whole:
a converter describes each of our parameters as a `LazyArray` (a transposed / reshaped view
of one tensor, or a stack of per-layer views), and `place` builds every jax.Array from the
slices its addressable devices hold. A host therefore reads only the bytes of its own
shards, and at most one parameter's slice is held in host memory at a time.

The safetensors header is parsed here (8-byte little-endian length, then JSON) rather than
through `safetensors.numpy`, which cannot return bfloat16 tensors; ml_dtypes supplies the
numpy bfloat16 that bf16 checkpoints (Qwen, Llama) need.
"""
import dataclasses
import json
import os
import struct
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh

from unimm_jax.parallel import sharding as sharding_lib

_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


def _memmap_file(path: str) -> dict[str, np.ndarray]:
  """Name -> read-only memmap of every tensor in one safetensors file."""
  with open(path, 'rb') as f:
    (header_len,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(header_len))
  tensors = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _DTYPES:
      raise ValueError(f'{path}: tensor {name!r} has unsupported dtype {info["dtype"]}')
    start, end = info['data_offsets']
    shape = tuple(info['shape'])
    if start == end:
      tensors[name] = np.zeros(shape, _DTYPES[info['dtype']])
      continue
    tensors[name] = np.memmap(path, dtype=_DTYPES[info['dtype']], mode='r',
                              offset=8 + header_len + start, shape=shape)
  return tensors


class HFCheckpoint:
  """A `save_pretrained` directory: `config` (config.json) and lazily mapped `tensors`."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    config_path = os.path.join(self.path, 'config.json')
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f'{self.path}: no config.json (expected a directory written by '
                              'transformers save_pretrained or downloaded from the Hub)')
    with open(config_path) as f:
      self.config: dict[str, Any] = json.load(f)
    single = os.path.join(self.path, 'model.safetensors')
    index = os.path.join(self.path, 'model.safetensors.index.json')
    if os.path.isfile(single):
      files = [single]
    elif os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
      files = sorted({os.path.join(self.path, name) for name in weight_map.values()})
    else:
      raise FileNotFoundError(f'{self.path}: neither model.safetensors nor '
                              'model.safetensors.index.json (pickled .bin weights are not read)')
    self.tensors: dict[str, np.ndarray] = {}
    for file in files:
      self.tensors.update(_memmap_file(file))

  @classmethod
  def from_tensors(cls, path: str, config: dict[str, Any],
                   tensors: dict[str, np.ndarray]) -> 'HFCheckpoint':
    """A checkpoint of given tensors and config (a bare state dict, or part of one), named
    `path` in errors."""
    checkpoint = cls.__new__(cls)
    checkpoint.path, checkpoint.config, checkpoint.tensors = path, config, tensors
    return checkpoint

  def get(self, key: str) -> np.ndarray:
    if key not in self.tensors:
      raise ValueError(f'{self.path}: missing tensor {key!r}')
    return self.tensors[key]


def state_dict_file(path: str) -> HFCheckpoint:
  """A bare safetensors state dict (an authors' checkpoint), readable by `Reader` like a
  checkpoint directory (with an empty config)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such safetensors file')
  return HFCheckpoint.from_tensors(os.path.abspath(path), {}, _memmap_file(path))


@dataclasses.dataclass(frozen=True)
class LazyArray:
  """One of our parameters as a view of checkpoint tensors, read slice by slice.

  `view()` returns a numpy view (memmap-backed: transposes and reshapes of contiguous data
  copy nothing); `layers`, when set, is a list of such views, or of LazyArrays (stacks
  themselves: an MoE layer's experts, stacked again over scanned layers), stacked on a new
  leading axis, read only for the entries a slice asks for. `source` names the checkpoint
  tensor(s) for error messages.
  """
  shape: tuple[int, ...]
  source: str
  view: Callable[[], np.ndarray] | None = None
  layers: tuple[Any, ...] | None = None

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    if self.layers is None:
      return np.asarray(self.view()[index])
    first, rest = (index[0] if index else slice(None)), index[1:]
    chosen = range(len(self.layers))[first]
    parts = [self.layers[i] for i in chosen]
    return np.stack([np.asarray(p[rest] if isinstance(p, LazyArray) else p()[rest])
                     for p in parts])


class RowsAsMean:
  """`base` (a LazyArray) with the entries `indices` along `axis` replaced by the mean of
  entries [0, upto) along it: a vocabulary's new tokens started as LLaVA starts its image
  markers. Read slice by slice like a LazyArray; the mean is computed once, on first read."""

  def __init__(self, base: LazyArray, indices: Sequence[int], *, axis: int, upto: int):
    if not 0 < upto <= base.shape[axis] or any(not 0 <= i < base.shape[axis] for i in indices):
      raise ValueError(f'{base.source}: rows {tuple(indices)} / mean of the first {upto} are '
                       f'outside its {base.shape[axis]} entries along axis {axis}')
    self.base, self.indices, self.axis, self.upto = base, tuple(indices), axis, upto
    self.shape = base.shape
    self.source = f'{base.source} (entries {self.indices} = mean of the first {upto})'
    self._mean = None

  def mean(self) -> np.ndarray:
    """The mean of entries [0, upto) along the axis, summed in float64 over chunks (a 7B
    model's embedding is several GB in float64)."""
    if self._mean is None:
      full, total = self.base.view(), 0.0
      for start in range(0, self.upto, 4096):
        chunk = np.take(full, np.arange(start, min(start + 4096, self.upto)), axis=self.axis)
        total = total + chunk.astype(np.float64).sum(axis=self.axis)
      self._mean = total / self.upto
    return self._mean

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (len(self.shape) - len(index))
    out = np.array(self.base[index])
    along = range(self.shape[self.axis])[index[self.axis]]
    rest = tuple(ix for axis, ix in enumerate(index) if axis != self.axis)
    for i in self.indices:
      if i in along:
        target = [slice(None)] * out.ndim
        target[self.axis] = along.index(i)
        out[tuple(target)] = self.mean()[rest].astype(out.dtype)
    return out


@dataclasses.dataclass(frozen=True)
class Converted:
  """What a family converter returns.

  model: the Flax module; `model.apply({'params': params}, *example_inputs)` runs it.
  sources: nested dict of LazyArray with the structure of the model's params.
  example_inputs: small arrays (or ShapeDtypeStructs) that `model.init` accepts, used only
    through jax.eval_shape to get the parameter shapes and logical names.
  parts: further networks held by the same checkpoint, by name, each a Converted (a full
    Chameleon: its VQGAN image tokenizer beside the LLM).
  initialised: top-level parameter names the checkpoint does not hold, whose sources are
    freshly initialised values (a transformers Chameleon VQ has no decoder).
  """
  model: nn.Module
  sources: dict
  example_inputs: tuple
  parts: Mapping[str, 'Converted'] = dataclasses.field(default_factory=dict)
  initialised: tuple[str, ...] = ()


def tensor(checkpoint: HFCheckpoint, key: str,
           transform: Callable[[np.ndarray], np.ndarray] = lambda w: w) -> LazyArray:
  """`transform(tensor)` as a LazyArray; the transform must be a view-making numpy op."""
  shape = np.shape(transform(checkpoint.get(key)))
  return LazyArray(shape=tuple(shape), source=key, view=lambda: transform(checkpoint.get(key)))


class Reader:
  """Reads a checkpoint's tensors (under `prefix`) as LazyArrays, remembering which were used,
  so that a converter can reject the tensors it did not use."""

  def __init__(self, checkpoint: HFCheckpoint, prefix: str = ''):
    self.checkpoint, self.prefix, self.used = checkpoint, prefix, set()

  def __call__(self, key: str, transform: Callable[[np.ndarray], np.ndarray] = lambda w: w
               ) -> LazyArray:
    key = self.prefix + key
    self.used.add(key)
    try:
      return tensor(self.checkpoint, key, transform)
    except ValueError as e:  # a reshape that the tensor's shape does not allow
      if key not in self.checkpoint.tensors:
        raise
      raise ValueError(f'{self.checkpoint.path}: tensor {key!r} of shape '
                       f'{tuple(self.checkpoint.get(key).shape)} does not fit the model from '
                       f'config.json ({e})') from None

  def has(self, key: str) -> bool:
    return self.prefix + key in self.checkpoint.tensors

  def check_all_used(self, skipped: Callable[[str], bool], model_name: str) -> None:
    """Raises ValueError naming checkpoint tensors neither read nor `skipped`."""
    unused = sorted(k for k in self.checkpoint.tensors if k not in self.used and not skipped(k))
    if unused:
      raise ValueError(f'{self.checkpoint.path}: tensor(s) not used by the {model_name} model: '
                       f'{unused[:10]}{" ..." if len(unused) > 10 else ""}')


def stack(per_layer: Sequence[LazyArray], what: str = 'layers') -> LazyArray:
  """Stacks LazyArrays of equal shape (per layer, or per expert: `what`) on a new leading
  axis; they may be stacks themselves."""
  shapes = {a.shape for a in per_layer}
  if len(shapes) != 1:
    raise ValueError(f'{what} differ in shape: ' +
                     ', '.join(f'{a.source} {a.shape}' for a in per_layer))
  return LazyArray(shape=(len(per_layer),) + per_layer[0].shape,
                   source=f'{per_layer[0].source} (x{len(per_layer)} {what})',
                   layers=tuple(a.view if a.layers is None else a for a in per_layer))


def stack_layer_trees(trees: Sequence[Mapping]) -> dict:
  """Per-layer nested dicts of LazyArrays -> one dict of stacked LazyArrays."""
  return jax.tree.map(lambda *leaves: stack(leaves), *trees,
                      is_leaf=lambda x: isinstance(x, LazyArray))


def check_shapes(sources: Mapping, abstract_params: Mapping, where: str) -> None:
  """Raises ValueError naming the checkpoint tensor whose shape differs from the model's.

  `sources` and `abstract_params` are nested dicts (unboxed) with the same structure.
  """
  flat_src = flax.traverse_util.flatten_dict(sources, sep='/')
  flat_abs = flax.traverse_util.flatten_dict(abstract_params, sep='/')
  missing = sorted(set(flat_abs) - set(flat_src))
  if missing:
    raise ValueError(f'{where}: the converter has no source for parameter(s) {missing}')
  extra = sorted(set(flat_src) - set(flat_abs))
  if extra:
    raise ValueError(f'{where}: converted parameter(s) {extra} do not exist in the model')
  for name, src in flat_src.items():
    if tuple(src.shape) != tuple(flat_abs[name].shape):
      raise ValueError(f'{where}: tensor {src.source} gives shape {tuple(src.shape)} for '
                       f'parameter {name}, but the model (from config.json) expects '
                       f'{tuple(flat_abs[name].shape)}')


def place(sources: Mapping, abstract_params: Any, *, dtype: Any = jnp.float32,
          mesh: Mesh | None = None, rules: Sequence | None = None) -> Any:
  """Builds the parameter tree from LazyArrays.

  Args:
    sources: nested dict of LazyArray, the structure of the model's params.
    abstract_params: `jax.eval_shape(model.init, ...)['params']`, boxed with logical names
      (nn.Partitioned) when the model annotates them; used for shapes and shardings.
    dtype: parameter dtype after conversion (checkpoints store bf16 or f32).
    mesh, rules: when given, each leaf is a jax.Array sharded by the logical rules, built
      per addressable device from its slice only; otherwise leaves live on the default device.
  Returns:
    the params tree (unboxed), leaves jax.Array of `dtype`.
  """
  unboxed = flax.core.unfreeze(sharding_lib.unbox(abstract_params))
  check_shapes(sources, unboxed, 'checkpoint')
  if mesh is None:
    return jax.tree.map(lambda s: jnp.asarray(s[()], dtype), sources,
                        is_leaf=lambda x: isinstance(x, LazyArray))
  shardings = sharding_lib.tree_shardings(abstract_params, mesh, rules or ())

  def build(src: LazyArray, sharding):
    return jax.make_array_from_callback(src.shape, sharding,
                                        lambda index: src[index].astype(dtype))

  return jax.tree.map(build, sources, shardings, is_leaf=lambda x: isinstance(x, LazyArray))


def linear(read: 'Reader', key: str) -> dict:
  """A PyTorch Linear at `key` (weight (out, in), bias) -> {'kernel' (in, out), 'bias'}."""
  return {'kernel': read(f'{key}.weight', lambda w: w.T), 'bias': read(f'{key}.bias')}


def layer_norm(read: 'Reader', key: str) -> dict:
  """A PyTorch LayerNorm / GroupNorm at `key` (weight, bias) -> {'scale', 'bias'}."""
  return {'scale': read(f'{key}.weight'), 'bias': read(f'{key}.bias')}
