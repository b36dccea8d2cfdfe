"""Optimisers from `config.optim`, with parameter groups.

`config.optim` fields: name ('adam' | 'adamw' | 'sgd'), lr, b1, b2, eps (Adam; 1e-8 when
absent), weight_decay (adamw), schedule ('constant' | 'cosine'), warmup_steps, grad_clip (global norm; 0 = off),
and `groups`: named parameter groups, each

  config.optim.groups.<name> = dict(pattern=REGEX, lr_mult=1.0, weight_decay=None,
                                    frozen=False)

`pattern` is matched (re.fullmatch) against a parameter's path, its keys joined by '/':
`encoder/conv_in/kernel` for the model, `modules/<module>/...` for the training-only modules
of a tokenizer (`TrainState.module_params`). A group's parameters take lr x lr_mult (the same
schedule, scaled) and their own weight decay (None: optim.weight_decay); a frozen group's
gradients are zeroed before clipping and its parameters keep no optimiser state (the other
groups' Adam moments hold only their own parameters). Parameters no group matches form the
default group. A pattern that matches no parameter, or a parameter that two groups match, is
an error naming them, raised from the shapes before anything compiles (`check`).
"""
import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
DEFAULT_GROUP = "default"
MODULES_PREFIX = "modules/"
_FROZEN, _TRAINED = "frozen", "trained"


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up then constant or cosine decay to 0."""
  warmup = int(optim.warmup_steps)
  if optim.schedule == "constant":
    after = optax.constant_schedule(optim.lr)
  else:
    after = optax.cosine_decay_schedule(optim.lr, max(1, total_steps - warmup))
  if warmup == 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def path_strings(tree, prefix: str = "") -> Any:
  """Each leaf's path as 'a/b/c' (prefix prepended), in a tree of tree's structure. A boxed
  parameter (nn.Partitioned, as init returns them) counts as one leaf, so its path has no
  trailing '/value' and the tree is a prefix of the boxed and the unboxed tree alike."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: prefix + jax.tree_util.keystr(path, simple=True, separator="/"), tree,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  name: str
  pattern: str
  lr_mult: float
  weight_decay: float | None
  frozen: bool


def param_groups(optim: ml_collections.ConfigDict) -> list[ParamGroup]:
  """The groups of config.optim.groups, checked for the fields and values they need."""
  groups = []
  for name, group in (optim.get("groups") or {}).items():
    unknown = sorted(set(group) - {"pattern", "lr_mult", "weight_decay", "frozen"})
    if unknown or "pattern" not in group:
      raise ValueError(f"config.optim.groups.{name}: fields are pattern (required), lr_mult, "
                       f"weight_decay, frozen; got {sorted(group)}")
    try:
      re.compile(group["pattern"])
    except re.error as e:
      raise ValueError(f"config.optim.groups.{name}.pattern={group['pattern']!r}: {e}") from None
    lr_mult = float(group.get("lr_mult", 1.0))
    weight_decay = group.get("weight_decay")
    if lr_mult < 0 or (weight_decay is not None and weight_decay < 0):
      raise ValueError(f"config.optim.groups.{name}: lr_mult and weight_decay must be >= 0")
    if weight_decay and optim.name != "adamw":
      raise ValueError(f"config.optim.groups.{name}.weight_decay needs config.optim.name="
                       "'adamw'")
    groups.append(ParamGroup(name, group["pattern"], lr_mult,
                             None if weight_decay is None else float(weight_decay),
                             bool(group.get("frozen", False))))
  if any(g.name == DEFAULT_GROUP for g in groups):
    raise ValueError(f"config.optim.groups.{DEFAULT_GROUP}: the name is reserved for the "
                     "parameters no group matches")
  return groups


class Optimizer:
  """The optax transformation of `config.optim` over a tree of trainable params, its
  learning-rate schedule, and the parameter groups (see the module docstring).

  The tree it updates is (params, module_params): `module_params` may be None. Use
  `stop_frozen` on both inside the loss, so no gradient is computed for frozen params.
  """

  def __init__(self, optim: ml_collections.ConfigDict, total_steps: int):
    if optim.name not in OPTIMIZERS:
      raise ValueError(f"config.optim.name={optim.name!r} is not one of {OPTIMIZERS}")
    self.config = optim
    self.schedule = learning_rate_schedule(optim, total_steps)
    self.groups = param_groups(optim)
    self.tx = self._transformation()

  def _base(self, lr_mult: float, weight_decay: float) -> optax.GradientTransformation:
    o = self.config
    lr = self.schedule if lr_mult == 1.0 else (lambda step: lr_mult * self.schedule(step))
    if o.name == "sgd":
      return optax.sgd(lr)
    if o.name == "adam":
      return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8))
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8), weight_decay=weight_decay)

  def _transformation(self) -> optax.GradientTransformation:
    o = self.config
    if not self.groups:  # one group: no labels to compute
      base = self._base(1.0, o.weight_decay)
      return optax.chain(optax.clip_by_global_norm(o.grad_clip), base) if o.grad_clip > 0 else base
    per_group = {DEFAULT_GROUP: self._base(1.0, o.weight_decay)}
    for g in self.groups:
      per_group[g.name] = (optax.set_to_zero() if g.frozen else self._base(
          g.lr_mult, o.weight_decay if g.weight_decay is None else g.weight_decay))
    steps = []
    if any(g.frozen for g in self.groups):
      # First, so that clipping's global norm ignores the frozen gradients.
      steps.append(optax.multi_transform(
          {_FROZEN: optax.set_to_zero(), _TRAINED: optax.identity()},
          lambda tree: jax.tree.map(lambda f: _FROZEN if f else _TRAINED, self.frozen(tree))))
    if o.grad_clip > 0:
      steps.append(optax.clip_by_global_norm(o.grad_clip))
    steps.append(optax.multi_transform(per_group, self.labels))
    return optax.chain(*steps) if len(steps) > 1 else steps[0]

  def _label_of(self, path: str) -> str:
    matched = [g.name for g in self.groups if re.fullmatch(g.pattern, path)]
    return matched[0] if matched else DEFAULT_GROUP

  def labels(self, tree: tuple) -> tuple:
    """Group names of (params, module_params), leaf by leaf."""
    return _map_paths(tree, self._label_of)

  def frozen(self, tree: tuple) -> tuple:
    """True for the leaves of (params, module_params) in a frozen group."""
    frozen = {g.name for g in self.groups if g.frozen}
    return _map_paths(tree, lambda path: self._label_of(path) in frozen)

  def stop_frozen(self, tree: tuple) -> tuple:
    """(params, module_params) with frozen leaves behind stop_gradient: their gradient is
    zero and never computed."""
    if not any(g.frozen for g in self.groups):
      return tree
    return jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, tree,
                        self.frozen(tree))

  def check(self, tree: tuple) -> None:
    """Raises ValueError naming a group pattern that matches no parameter of (params,
    module_params) (shapes suffice), or a parameter that two groups match."""
    paths = jax.tree.leaves(_map_paths(tree, lambda path: path))
    for g in self.groups:
      if not any(re.fullmatch(g.pattern, p) for p in paths):
        raise ValueError(f"config.optim.groups.{g.name}.pattern={g.pattern!r} matches no "
                         f"parameter (paths look like {paths[:3]})")
    for p in paths:
      matched = [g.name for g in self.groups if re.fullmatch(g.pattern, p)]
      if len(matched) > 1:
        raise ValueError(f"parameter {p} is in config.optim.groups {matched}; a parameter "
                         "belongs to one group")


def _map_paths(tree: tuple, fn: Callable[[str], Any]) -> tuple:
  """fn(path string) for every leaf of (params, module_params); module params' paths start
  with 'modules/'."""
  params, module_params = tree
  return (jax.tree.map(fn, path_strings(params)),
          jax.tree.map(fn, path_strings(module_params, MODULES_PREFIX)))
