"""Parameter groups (`config.optim.groups`): frozen, per-group learning rate and weight decay,
patterns refused by name. Train steps run through the trainer's Setup on the tiny LM."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unimm_jax import config_defaults
from unimm_jax.train import optimizers
from unimm_jax.train import trainer

MLP = r"layers_\d+/mlp/.*"


def _lm_config(**groups):
  config = config_defaults.load_config("configs/lm.py:tiny")
  for name, group in groups.items():
    config.optim.groups[name] = group
  return config


def _steps(config, num_steps: int):
  """(initial params, params after num_steps, final state) on the first batches."""
  setup = trainer.Setup(config)
  state = setup.init_state()
  before = jax.device_get(state.params)
  data = setup.task.train_iterator(config.seed)
  step = setup.compile_train_step()
  with setup.activate():
    for _ in range(num_steps):
      state, _ = step(state, setup.frozen, setup.global_batch(next(data)), setup.train_rng)
  return before, jax.device_get(state.params), state


def _paths(tree, pattern):
  """{path: leaf} of the leaves whose path matches pattern."""
  paths = jax.tree.leaves(optimizers.path_strings(tree))
  leaves = jax.tree.leaves(tree)
  return {p: leaf for p, leaf in zip(paths, leaves) if re.fullmatch(pattern, p)}


def test_frozen_group_is_bit_identical_and_keeps_no_optimizer_state():
  config = _lm_config(mlp=dict(pattern=MLP, frozen=True))
  before, after, state = _steps(config, 2)
  frozen = _paths(before, MLP)
  assert len(frozen) == 6  # gate, up, down of 2 layers
  for path, value in frozen.items():
    np.testing.assert_array_equal(_paths(after, MLP)[path], value, err_msg=path)
  moved = [p for p, v in _paths(before, ".*").items() if p not in frozen
           and not np.array_equal(_paths(after, ".*")[p], v)]
  assert moved  # the others trained
  # Adam's two moments exist for the trained params only.
  num = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == 2 * (num(before) - num(frozen))


def test_a_group_at_lr_mult_m_takes_an_sgd_step_m_times_the_size():
  def sgd(lr_mult):
    config = _lm_config(mlp=dict(pattern=MLP, lr_mult=lr_mult))
    # A large step, so that the differences of float32 params resolve the updates.
    config.optim.update(dict(name="sgd", lr=1.0, weight_decay=0.0, grad_clip=0.0))
    before, after, _ = _steps(config, 1)
    before, after = _paths(before, ".*"), _paths(after, ".*")
    return {p: after[p] - before[p] for p in before}

  one, three = sgd(1.0), sgd(3.0)
  for path in one:
    if re.fullmatch(MLP, path):
      # Up to the rounding of param + update (about 1e-8 at these params' scale).
      np.testing.assert_allclose(three[path], 3.0 * one[path], rtol=1e-4, atol=1e-7,
                                 err_msg=path)
      assert np.abs(one[path]).max() > 0
    else:
      np.testing.assert_array_equal(three[path], one[path], err_msg=path)


def test_group_weight_decay_on_zero_gradients():
  """adamw with zero gradients moves a param by -lr * wd * p: by its group's decay."""
  optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=0.5, b1=0.9, b2=0.99, weight_decay=0.1, schedule="constant",
      warmup_steps=0, grad_clip=0.0,
      groups=dict(head=dict(pattern="head/.*", weight_decay=0.0))))
  opt = optimizers.Optimizer(optim, total_steps=10)
  params = ({"head": {"w": jnp.ones(3)}, "body": {"w": jnp.ones(3)}}, None)
  updates, _ = opt.tx.update(jax.tree.map(jnp.zeros_like, params), opt.tx.init(params), params)
  np.testing.assert_allclose(updates[0]["head"]["w"], 0.0)
  np.testing.assert_allclose(updates[0]["body"]["w"], -0.5 * 0.1 * np.ones(3), rtol=1e-6)


def test_module_params_are_matched_under_modules():
  optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, b1=0.9, b2=0.99, weight_decay=0.0, schedule="constant",
      warmup_steps=0, grad_clip=1.0,
      groups=dict(prior=dict(pattern="modules/gap_prior/.*", frozen=True))))
  opt = optimizers.Optimizer(optim, total_steps=10)
  tree = ({"encoder": {"w": jnp.ones(2)}}, {"gap_prior": {"w": jnp.ones(2)}})
  assert opt.frozen(tree) == ({"encoder": {"w": False}}, {"gap_prior": {"w": True}})
  opt.check(tree)


def test_a_pattern_that_matches_nothing_is_refused_before_compiling():
  config = _lm_config(vision=dict(pattern="vision_tower/.*", frozen=True))
  with pytest.raises(ValueError, match=r"config.optim.groups.vision.pattern='vision_tower/\.\*' "
                                       r"matches no parameter"):
    trainer.Setup(config)


def test_overlapping_groups_and_bad_fields_are_refused():
  config = _lm_config(mlp=dict(pattern=MLP, lr_mult=0.5), ups=dict(pattern=r".*/up_proj/.*"))
  with pytest.raises(ValueError, match=r"layers_0/mlp/up_proj/kernel is in config.optim.groups "
                                       r"\['mlp', 'ups'\]"):
    trainer.Setup(config)
  with pytest.raises(ValueError, match="config.optim.groups.mlp: fields are pattern"):
    trainer.Setup(_lm_config(mlp=dict(pattern=MLP, lr=0.5)))
  with pytest.raises(ValueError, match="config.optim.groups.default"):
    trainer.Setup(_lm_config(default=dict(pattern=MLP)))
