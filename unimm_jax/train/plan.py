"""`--mode=plan`: size a run for a pod before renting it.

The train step of any config is compiled ahead of time for the mesh in `config.mesh`, on as
many fake CPU devices as that mesh needs, from abstract arrays only: no parameter is
initialised, no weight or image is read. The report gives

- parameter counts (trained model, training-only modules, discriminator) and frozen ones;
- FLOPs per step: matmul and convolution FLOPs counted on the step's jaxpr (forward,
  backward and rematerialised recomputation; a scanned layer stack counts once per layer),
  globally and per device; XLA's own per-device figure is printed beside it, but it counts
  a `lax.scan` body only once, so for scanned stacks only the jaxpr count is right;
- per-device memory from XLA's memory analysis of the compiled step: arguments (state,
  batch, frozen networks), outputs, temporaries; the donated state aliases its outputs.

Argument and output sizes are exact for any backend: they follow from shapes, dtypes and
shardings. Temporaries are the CPU compiler's schedule, which fuses and lays out buffers
differently from the TPU and GPU compilers; treat them as an estimate of the order of
magnitude, and check the first real step's memory on the target.
"""
import dataclasses
import math
import time

import jax
import ml_collections
import numpy as np

from unimm_jax.parallel import mesh as mesh_lib
from unimm_jax.parallel import sharding
from unimm_jax.train import checkpointing
from unimm_jax.train import trainer


def use_fake_devices(num_devices: int) -> None:
  """This process sees `num_devices` CPU devices; call before anything uses the backend."""
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", num_devices)


def devices_needed(mesh_config: ml_collections.ConfigDict, num_devices: int | None) -> int:
  """The device count to plan for: `num_devices`, or the mesh's product if it has no -1."""
  sizes = [int(mesh_config[a]) for a in mesh_lib.MESH_AXES]
  if num_devices is None:
    if -1 in sizes:
      raise ValueError(f"config.mesh={dict(mesh_config)} has a -1 axis: give --plan_devices "
                       "or set every axis size")
    return math.prod(sizes)
  mesh_lib.mesh_shape(mesh_config, num_devices)  # raises, naming the mesh, if they disagree
  return num_devices


# ------------------------------------------------------------------------- FLOP counting


def _dot_flops(eqn) -> int:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
  window = math.prod(rhs[d] for d in spec[2:])
  in_features = rhs[spec[1]]  # already divided by feature_group_count
  out = eqn.outvars[0].aval.shape
  return 2 * math.prod(out) * window * in_features // eqn.params["batch_group_count"]


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> int:
  """Matmul and convolution FLOPs of a jaxpr: 2 per multiply-add, sub-jaxprs included,
  a scan body times its length, the largest branch of a cond. A while loop's trip count is
  unknown to the jaxpr: its body counts once."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


# ------------------------------------------------------------------------------ planning


@dataclasses.dataclass
class BucketPlan:
  """One compiled train step: a global batch shape on the mesh."""
  batch: dict[str, tuple[int, ...]]
  flops_global: int  # jaxpr matmul/conv FLOPs of one step, all devices together
  flops_per_device_xla: float  # XLA's cost analysis (a scan body counted once)
  argument_bytes: int  # per device
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    """Arguments + temporaries + outputs not aliased to a donated argument, per device."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


@dataclasses.dataclass
class Plan:
  num_devices: int
  mesh: dict[str, int]
  param_counts: dict[str, int]  # params, module_params, discriminator, frozen
  state_bytes_global: int
  state_bytes_per_device: int
  buckets: list[BucketPlan]


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _bytes_per_device(abstract_tree) -> int:
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def plan_train_step(config: ml_collections.ConfigDict) -> Plan:
  """Compiles the train step of `config` for its mesh on the current (fake) devices."""
  setup = trainer.Setup(config)
  state = setup.abstract_state
  frozen = checkpointing.abstract_with_shardings(sharding.unbox(setup.task.frozen_shapes()),
                                                 setup.frozen_shardings)
  rng = jax.ShapeDtypeStruct(setup.train_rng.shape, setup.train_rng.dtype,
                             sharding=setup.context.replicated)
  step = setup.compile_train_step()
  buckets = []
  for batch in setup.task.batch_shapes():
    batch = {name: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=setup.batch_shardings[name])
             for name, a in batch.items()}
    start = time.perf_counter()
    with setup.activate():
      traced = step.trace(state, frozen, batch, rng)  # one trace for the count and XLA
      compiled = traced.lower().compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    buckets.append(BucketPlan(
        batch={name: tuple(a.shape) for name, a in batch.items()},
        flops_global=jaxpr_flops(traced.jaxpr.jaxpr),
        flops_per_device_xla=float(cost.get("flops", 0.0)),
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        compile_seconds=seconds))
  counts = {"params": _count(state.params), "module_params": _count(state.module_params),
            "discriminator": _count(state.discriminator), "frozen": _count(frozen)}
  state_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(state))
  return Plan(num_devices=setup.mesh.size, mesh=dict(setup.mesh.shape), param_counts=counts,
              state_bytes_global=state_bytes, state_bytes_per_device=_bytes_per_device(state),
              buckets=buckets)


def _si(x: float) -> str:
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {unit}"
  return f"{x:.0f} "


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(plan: Plan, name: str) -> str:
  """The report `--mode=plan` prints."""
  mesh = " x ".join(f"{axis} {size}" for axis, size in plan.mesh.items())
  c = plan.param_counts
  lines = [
      f"plan for {name}: {plan.num_devices} devices, mesh {mesh}",
      f"parameters: {c['params']:,} model, {c['module_params']:,} training-only modules, "
      f"{c['discriminator']:,} discriminator; {c['frozen']:,} frozen",
      f"train state (params, optimiser state, EMA if kept, counters): "
      f"{_gib(plan.state_bytes_global)} in all, {_gib(plan.state_bytes_per_device)} per device",
  ]
  for b in plan.buckets:
    shapes = ", ".join(f"{k} {v}" for k, v in b.batch.items())
    lines += [
        f"step on batch {shapes} (compiled in {b.compile_seconds:.1f} s):",
        f"  FLOPs per step: {_si(b.flops_global)}FLOP in all, "
        f"{_si(b.flops_global / plan.num_devices)}FLOP per device (jaxpr matmul/conv count; "
        f"XLA per device: {_si(b.flops_per_device_xla)}FLOP, a scan body counted once)",
        f"  memory per device: arguments {_gib(b.argument_bytes)}, outputs "
        f"{_gib(b.output_bytes)} ({_gib(b.alias_bytes)} aliased to donated arguments), "
        f"temporaries {_gib(b.temp_bytes)}; peak about {_gib(b.peak_bytes)}",
    ]
  return "\n".join(lines)
