"""Optimisers from `config.optim`."""
import ml_collections
import optax


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


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  schedule = learning_rate_schedule(optim, total_steps)
  if optim.name == "adam":
    tx = optax.adam(schedule, b1=optim.b1, b2=optim.b2)
  else:
    tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx, schedule
