"""The class-to-image task: a class-conditional generator (config.system.name, see
`unimm_jax.systems.class_generators`) trained on class-labelled images.

A batch is {'image': (b, S, S, 3) in [-1, 1], 'label': (b,) int32 class ids} from
`unimm_jax.data.pipeline` with labels: the built-in scene classes (data.source
'scene_classes'), an ImageNet-style folder of class subdirectories, or a TFDS dataset with a
`label`. The loss is the generator's own (BitDance: its binary diffusion head's v-loss);
class dropout for guidance happens inside it.

Modes: train, eval (held-out loss, a classifier check of generated images on the built-in
classes, a Frechet distance on Inception features when config.eval.inception_path is set),
generate (`--class_id=K`: PNGs of class K), plan. See `class_to_image_eval`.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unimm_jax.data import pipeline
from unimm_jax.data import sources
from unimm_jax.systems import class_generators
from unimm_jax.train import optimizers
from unimm_jax.train.tasks import class_to_image_eval
from unimm_jax.train.train_state import TrainState, keep_if_finite


class ClassToImageTask:
  """Trains `class_generators.build(config)` on `config.data` with class labels."""
  throughput_unit = "images"
  kind = "a class-to-image generator"
  modes = ("train", "eval", "generate", "plan")
  generate_flags = ("class_id", "output", "num_images", "cfg_scale", "temperature")
  generate_required = ("class_id", "output")

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.system = class_generators.build(config)
    self.optimizer = optimizers.Optimizer(config.optim, config.train.steps)

  @functools.cached_property
  def class_names(self) -> tuple[str, ...]:
    """The data's class names in id order, checked against the generator's class count."""
    names = sources.class_names(self.config.data)
    if len(names) != self.system.num_classes:
      raise ValueError(f"config.model.num_classes={self.system.num_classes}, but "
                       f"config.data has {len(names)} classes (e.g. {list(names[:3])})")
    return names

  # ---- what the trainer asks ------------------------------------------------------------

  def batch_ndims(self) -> dict[str, int]:
    return {"image": 4, "label": 1}

  def global_batch_sizes(self) -> list[int]:
    return [self.config.train.batch_size]

  def count_items(self, host_batch: dict) -> int:
    return host_batch["image"].shape[0]

  def train_iterator(self, seed: int):
    """This host's batches {'image', 'label', 'skipped'}, checkpointable."""
    self.class_names  # pylint: disable=pointless-statement  (checked before any batch)
    return pipeline.build_train_iterator(self.config.data,
                                         global_batch_size=self.config.train.batch_size,
                                         seed=seed, with_labels=True)

  def init_params(self, rng: jax.Array) -> dict:
    return self.system.init_params(rng)

  def initial_weights(self) -> None:
    return None

  def init(self, rng: jax.Array) -> TrainState:
    return TrainState.create(self.init_params(rng), self.optimizer.tx,
                             ema=self.config.ema_decay > 0)

  @functools.cache
  def load_frozen(self) -> dict:
    """The generator's frozen networks, read once (the step and the evaluator share them)."""
    return self.system.load_frozen()

  def frozen_shapes(self) -> dict:
    return self.system.frozen_shapes()

  def batch_shapes(self) -> list[dict]:
    """The global train batch as ShapeDtypeStructs (for --mode=plan)."""
    b, s = self.config.train.batch_size, self.config.data.image_size
    return [{"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32)}]

  def check(self, abstract_state: TrainState) -> None:
    """Start-up check from shapes: the param groups match parameters."""
    self.optimizer.check((abstract_state.params, None))

  # ---- the step -------------------------------------------------------------------------

  def statistics(self, params, frozen, batch, rng) -> dict:
    """The generator's loss and metrics on a batch without training noise (eval)."""
    loss, metrics = self.system.loss(params, frozen, batch["image"], batch["label"], rng,
                                     train=False)
    return {"loss": loss, **metrics}

  def train_step(self, state: TrainState, frozen: dict, batch: dict, rng: jax.Array):
    """One update on the generator's loss. Returns (state, metrics)."""
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      params, _ = self.optimizer.stop_frozen((params, None))
      return self.system.loss(params, frozen, batch["image"], batch["label"], rng,
                              train=True)

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = keep_if_finite(state.apply_gradients(grads, self.config.ema_decay), state, ok)
    metrics = {"loss": loss, **stats, "grad_norm": grad_norm,
               "lr": self.optimizer.schedule(state.step),
               "nonfinite": (~ok).astype(jnp.int32)}
    return new_state, metrics

  # ---- evaluation and inference ----------------------------------------------------------

  def evaluator(self, context, writer, workdir: str):
    return class_to_image_eval.ClassToImageEvaluator(self, context, writer, workdir)

  def evaluate_checkpoint(self, context, workdir: str) -> dict:
    return class_to_image_eval.evaluate_checkpoint(self, context, workdir)

  def generate(self, context, workdir: str, *, class_id: int, output: str,
               num_images: int = 4, cfg_scale: float | None = None,
               temperature: float | None = None) -> str:
    return class_to_image_eval.generate_to_folder(
        self, context, workdir, class_id, output=output, num_images=num_images,
        cfg_scale=cfg_scale, temperature=temperature, seed=self.config.seed)
