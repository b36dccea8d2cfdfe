"""The narrow view of a mesh that evaluators and inference need: place, gather, activate.

Training builds one inside its `Setup`; `--mode=eval/encode/decode/generate` build one from
the config alone, without a trainer, optimiser or train state.
"""
import contextlib
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from unimm_jax.parallel import sharding


class MeshContext:
  """A mesh with its logical-axis rules.

  Attributes: mesh, rules; `batch_shards` = data x fsdp, the number of ways a batch splits.
  """

  def __init__(self, mesh: Mesh, rules: Sequence):
    self.mesh, self.rules = mesh, tuple(rules)

  @property
  def batch_shards(self) -> int:
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def activate(self) -> contextlib.AbstractContextManager:
    """Mesh and logical rules in force while tracing, so activation constraints apply."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def shardings(self, boxed_tree: Any) -> Any:
    """NamedShardings of a boxed (or unboxed) abstract tree, by the logical rules."""
    return sharding.tree_shardings(boxed_tree, self.mesh, self.rules)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    """A batch-leading array of rank `ndim`: dim 0 over the `batch` rule's mesh axes."""
    return sharding.batch_sharding(self.mesh, self.rules, ndim)

  def place(self, x: np.ndarray, host_local: bool, array_sharding=None) -> jax.Array:
    """Host data -> one global array, batch-sharded (or as `array_sharding` says).

    host_local: each process holds its own slice (training batches); otherwise every
    process holds the same full array (eval images).
    """
    s = array_sharding or self.batch_sharding(np.ndim(x))
    if host_local:
      return jax.make_array_from_process_local_data(s, x)
    return jax.make_array_from_callback(np.shape(x), s, lambda index: x[index])

  def place_batch(self, host_batch: dict, host_local: bool) -> dict:
    """Every array of a batch dict placed by `place`."""
    return {name: self.place(x, host_local) for name, x in host_batch.items()}

  @functools.cached_property
  def gather(self):
    """gather(tree): `tree` replicated on every device, so each process can read it whole
    (device_get cannot read shards held by another process). One jit, compiled per tree
    structure and shapes."""
    return jax.jit(lambda tree: tree, out_shardings=self.replicated)

  def on_mesh(self, fn):
    """numpy batch -> fn on batch-sharded global arrays -> numpy on every host (a jitted fn,
    compiled per input shape)."""
    jitted = jax.jit(fn, out_shardings=self.replicated)

    def run(*arrays):
      with self.activate():
        out = jitted(*(self.place(a, host_local=False) for a in arrays))
      return np.asarray(jax.device_get(out))
    return run
