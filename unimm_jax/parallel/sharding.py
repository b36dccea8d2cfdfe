"""Logical-axis shardings for pytrees whose leaves carry `nn.Partitioned` names."""
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


def _is_partitioned(x) -> bool:
  return isinstance(x, nn.Partitioned)


class LogicalAxes(tuple):
  """Logical axis names of one array. A tuple subclass, so pytrees treat it as a leaf."""


def unbox(tree) -> Any:
  """The values of a boxed tree, without the sharding constraints that `nn.unbox` adds while
  logical rules are active (so it also works on host data and abstract shapes there)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_partitioned(x) else x,
                      tree, is_leaf=_is_partitioned)


def logical_names(tree) -> Any:
  """Per leaf, its LogicalAxes (None entries for unannotated dims)."""
  def names(leaf):
    if _is_partitioned(leaf):
      return LogicalAxes(leaf.names)
    return LogicalAxes((None,) * len(getattr(leaf, "shape", ())))
  return jax.tree.map(names, tree, is_leaf=_is_partitioned)


def _mesh_axes(logical: tuple, rules: Rules) -> list:
  table = dict((name, axes) for name, axes in rules)
  return [table.get(name) if name is not None else None for name in logical]


def spec_for(shape: Sequence[int], logical: tuple, mesh: Mesh, rules: Rules) -> P:
  """PartitionSpec for one array; a dim its mesh axes do not divide stays replicated.

  Replicating instead of failing lets one rule set serve every model: a 3-channel conv
  output or a 4-register embedding simply is not split.
  """
  spec, used = [], set()
  for dim, axes in zip(shape, _mesh_axes(logical, rules)):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = 1
    for a in axes:
      size *= mesh.shape[a]
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def tree_shardings(abstract_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a (boxed or unboxed) abstract tree, as an unboxed tree."""
  names = logical_names(abstract_tree)
  unboxed = unbox(abstract_tree)
  return jax.tree.map(
      lambda leaf, logical: NamedSharding(mesh, spec_for(leaf.shape, logical, mesh, rules)),
      unboxed, names)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a batch-leading array: dim 0 over the `batch` rule's mesh axes."""
  axes = dict((name, a) for name, a in rules).get("batch")
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))
