"""The train state shared by every task: step, params, their EMA and the optimiser state."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any  # None when config.ema_decay == 0: no copy is kept or updated
  opt_state: Any
  nonfinite_steps: jax.Array  # updates skipped because loss or gradients were NaN/Inf
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  # Task-specific trained state beside the main model, e.g. a GAN discriminator with its own
  # optimiser; None when the task has none. Checkpointed and sharded with the rest.
  extra: Any = None
  # Training-only modules trained by the main loss with the same optimiser, but not part of
  # the model that is exported or run at inference (UniWeTok's distillation heads and
  # generative prior); no EMA. None when the task has none.
  aux_params: Any = None
  aux_opt_state: Any = None

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, extra: Any = None,
             aux_params: Any = None, ema: bool = True) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=jax.tree.map(jnp.copy, params) if ema else None,
               opt_state=tx.init(params),
               nonfinite_steps=jnp.zeros((), jnp.int32), tx=tx, extra=extra,
               aux_params=aux_params,
               aux_opt_state=None if aux_params is None else tx.init(aux_params))

  @property
  def eval_params(self):
    """The params that eval, samples, encode/decode and exports use: the EMA if kept."""
    return self.params if self.ema_params is None else self.ema_params

  def apply_gradients(self, grads, ema_decay: float, aux_grads: Any = None) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema_params = (None if self.ema_params is None
                  else update_ema(self.ema_params, params, ema_decay, self.step))
    new = self.replace(step=self.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state)
    if self.aux_params is None:
      return new
    aux_updates, aux_opt_state = self.tx.update(aux_grads, self.aux_opt_state, self.aux_params)
    return new.replace(aux_params=optax.apply_updates(self.aux_params, aux_updates),
                       aux_opt_state=aux_opt_state)


def update_ema(ema, params, decay: float, step: jax.Array):
  """EMA with the usual warm-up: decay_t = min(decay, (1 + t) / (10 + t)).

  Without the warm-up a 0.999 EMA would sit near the random init for thousands of steps;
  with it, short runs (demo, tests) already evaluate sensible EMA weights. decay = 0 makes
  the EMA track the parameters exactly.
  """
  t = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def keep_if_finite(new: TrainState, old: TrainState, ok: jax.Array) -> TrainState:
  """`new` where `ok`, else `old` with only the step advanced (a skipped NaN/Inf step).

  Skipping inside the step keeps every later checkpoint free of non-finite values.
  """
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return kept.replace(step=new.step, nonfinite_steps=old.nonfinite_steps + (~ok))
