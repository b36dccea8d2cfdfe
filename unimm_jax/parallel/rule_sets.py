"""Named logical-axis rule sets: how parameters and activations map onto the mesh.

`config.sharding` picks one; `config.sharding_rules`, when not empty, replaces it with
explicit (logical name, mesh axes) pairs. The mesh sizes come from `config.mesh`.

  data_parallel  batch over `data`; every parameter and optimiser state replicated.
  fsdp           batch over (`data`, `fsdp`); parameters and optimiser state sharded over
                 `fsdp` along their embed (transformers) or conv_out (convolutions) axis,
                 gathered layer by layer in the step (ZeRO-3 style).
  tensor         batch over `data`; Megatron-style tensor parallelism over `tensor`:
                 attention heads, MLP hidden units, the vocabulary and conv output channels
                 are split, and so are the activations that carry them.
  fsdp_tensor    both: fsdp for embed/conv_out and the batch, tensor for heads/mlp/vocab.

`expert` is the leading axis of a mixture-of-experts layer's stacked expert kernels
(`unimm_jax.nn.moe`): stored sharded over `fsdp` (gathered per layer, like every fsdp
parameter) in fsdp, split over `tensor` in tensor and fsdp_tensor (each device computes its
own experts), replicated in data_parallel. Its rule comes before embed's and mlp's: Flax gives
a mesh axis to the first rule that claims it, as `sharding.spec_for` gives it to the first
dimension (the expert axis leads), so both place an expert kernel the same way.

A dimension its mesh axes do not divide stays replicated (`sharding.spec_for`), so one set
serves every model: a 3-channel conv output or 4 registers are simply not split.
"""
from typing import Any, Sequence

_COMMON = (("kv", None), ("length", None), ("conv_in", None), ("codebook", None),
           ("layers", None))  # layers: the stacked axis of scanned layers

RULE_SETS: dict[str, tuple[tuple[str, Any], ...]] = {
    "data_parallel": (("batch", "data"), ("expert", None), ("embed", None),
                      ("conv_out", None), ("heads", None), ("mlp", None),
                      ("vocab", None)) + _COMMON,
    "fsdp": (("batch", ("data", "fsdp")), ("expert", "fsdp"), ("embed", "fsdp"),
             ("conv_out", "fsdp"), ("heads", None), ("mlp", None), ("vocab", None)) + _COMMON,
    "tensor": (("batch", "data"), ("expert", "tensor"), ("embed", None),
               ("conv_out", "tensor"), ("heads", "tensor"), ("mlp", "tensor"),
               ("vocab", "tensor")) + _COMMON,
    "fsdp_tensor": (("batch", ("data", "fsdp")), ("expert", "tensor"), ("embed", "fsdp"),
                    ("conv_out", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
                    ("vocab", "tensor")) + _COMMON,
}


def mesh_axes_used(rules: Sequence[tuple[str, Any]]) -> set[str]:
  """Every mesh axis some logical name maps to."""
  used = set()
  for _, axes in rules:
    used.update((axes,) if isinstance(axes, str) else tuple(axes or ()))
  return used


def resolve(name: str, explicit_rules: Sequence[tuple[str, Any]]) -> tuple:
  """The rules in force: `explicit_rules` when given, else the named set."""
  if explicit_rules:
    return tuple((logical, axes) for logical, axes in explicit_rules)
  if name not in RULE_SETS:
    raise ValueError(f"config.sharding={name!r} is not one of {sorted(RULE_SETS)}")
  return RULE_SETS[name]


def check_mesh(rules: Sequence[tuple[str, Any]], mesh_sizes: dict[str, int],
               name: str) -> None:
  """Raises if a mesh axis with more than one device (or -1) is used by no rule: every
  device along it would repeat the same work on the same data."""
  used = mesh_axes_used(rules)
  for axis, size in mesh_sizes.items():
    if (size > 1 or size == -1) and axis not in used:
      raise ValueError(
          f"config.sharding={name!r} does not use mesh axis {axis!r} (config.mesh.{axis}="
          f"{size}): its devices would all repeat the same work. Set config.mesh.{axis}=1 "
          f"or pick a rule set that uses it ({', '.join(sorted(RULE_SETS))})")
