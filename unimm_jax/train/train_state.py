"""The train state shared by every task: step, params, their EMA, the optimiser state and the
model's state that gradients do not train (EMA codebooks)."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds of a run besides the data position.

  The optimiser updates (params, module_params) as one tree (see `unimm_jax.train.
  optimizers`); `opt_state` is its state.
  """
  step: jax.Array
  params: Any  # the model that eval, inference and exports use
  ema_params: Any  # None when config.ema_decay == 0: no copy is kept or updated
  opt_state: Any
  nonfinite_steps: jax.Array  # updates skipped because loss or gradients were NaN/Inf
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  # Params of the training-only modules by name (a tokenizer's distillation heads and
  # generative prior), trained by the main loss with the same optimiser but not part of the
  # model that is exported or run at inference; no EMA. None when the task has none.
  module_params: Any = None
  # A GAN discriminator with its own optimiser (`train.tasks.adversarial.DiscriminatorState`);
  # None without one. Checkpointed and sharded with the rest.
  discriminator: Any = None
  # The model's variable collections other than 'params' (EvoTok's `quantizer_state`: EMA
  # codebooks), by collection name: updated by the forward pass of each train step, not by
  # the optimiser, and part of the model that eval and inference use. None when it has none.
  model_state: Any = None

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, module_params: Any = None,
             discriminator: Any = None, ema: bool = True, model_state: Any = None
             ) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=jax.tree.map(jnp.copy, params) if ema else None,
               opt_state=tx.init((params, module_params)),
               nonfinite_steps=jnp.zeros((), jnp.int32), tx=tx, module_params=module_params,
               discriminator=discriminator, model_state=model_state)

  @property
  def eval_params(self):
    """The params that eval, samples, encode/decode and exports use: the EMA if kept."""
    return self.params if self.ema_params is None else self.ema_params

  @property
  def eval_variables(self) -> dict:
    """{'params': eval_params, **model_state}: what `model.apply` takes at eval and
    inference (the convention of `unimm_jax.convert.load_pretrained`)."""
    return {"params": self.eval_params, **(self.model_state or {})}

  def apply_gradients(self, grads, ema_decay: float, module_grads: Any = None) -> "TrainState":
    trainable = (self.params, self.module_params)
    updates, opt_state = self.tx.update((grads, module_grads), self.opt_state, trainable)
    params, module_params = optax.apply_updates(trainable, updates)
    ema_params = (None if self.ema_params is None
                  else update_ema(self.ema_params, params, ema_decay, self.step))
    return self.replace(step=self.step + 1, params=params, ema_params=ema_params,
                        opt_state=opt_state, module_params=module_params)


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
