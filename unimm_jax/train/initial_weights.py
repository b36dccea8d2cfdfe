"""A fresh run whose parts start from pretrained weights (a SigLIP encoder, an LLM).

A task's `initial_weights()` returns the sources of some of its params: a nested dict in
the structure of the params (partial: only the subtrees it starts from weights), whose leaves
are arrays or `LazyArray`s (`unimm_jax.convert.hf_checkpoint`), read slice by slice. `overlay`
writes them over freshly initialised params, each leaf built per addressable device from
its slice (a host reads only what its devices hold) in the dtype and sharding of the leaf it
replaces. Every source must name an existing parameter of the same shape: a weight file that
does not fit is refused, naming the tensor, before training starts.
"""
from typing import Any, Mapping

import flax
import jax
import numpy as np


def _describe(source: Any) -> str:
  """The checkpoint tensor(s) behind a source, for error messages."""
  return getattr(source, "source", "an array")


def overlay(params: Any, shardings: Any, sources: Mapping) -> Any:
  """`params` (unboxed jax.Arrays) with the leaves that `sources` names replaced.

  Args:
    params: the params tree of a fresh train state.
    shardings: the tree of NamedShardings of `params`.
    sources: a partial tree of `params` (see the module docstring).
  Returns:
    the new params tree; leaves `sources` does not name are the same arrays as before.
  Raises:
    ValueError naming the source tensor whose parameter is missing or shaped differently.
  """
  flat_params = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  flat_shardings = flax.traverse_util.flatten_dict(flax.core.unfreeze(shardings), sep="/")
  flat_sources = flax.traverse_util.flatten_dict(dict(sources), sep="/")
  for name, source in flat_sources.items():
    if name not in flat_params:
      raise ValueError(f"pretrained {_describe(source)} is for parameter {name}, which the "
                       "model (config.model) does not have")
    want = tuple(flat_params[name].shape)
    if tuple(source.shape) != want:
      raise ValueError(f"pretrained {_describe(source)} has shape {tuple(source.shape)}, but "
                       f"parameter {name} of the model (config.model) has shape {want}")
  for name, source in flat_sources.items():
    dtype = flat_params[name].dtype
    flat_params[name] = jax.make_array_from_callback(
        tuple(source.shape), flat_shardings[name],
        lambda index, source=source, dtype=dtype: np.asarray(source[index], dtype))
  return flax.traverse_util.unflatten_dict(flat_params, sep="/")

