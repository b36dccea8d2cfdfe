"""Evaluation and generation of the class-to-image task (`unimm_jax.train.tasks.class_to_image`).

Every evaluation draws config.eval.num_generations images, cycling through the classes,
with config.generation's guidance (the noise is fixed by config.seed, so evaluations of
different steps compare like with like), and reports:
  loss          the generator's loss on held-out labelled images (fixed noise)
  class_check   (built-in scene classes) the fraction of generated images that a closed-form
                classifier (`unimm_jax.evals.scene_classes`) assigns to their class; chance
                is 1 / num_classes
  fid           (config.eval.inception_path set) the Frechet distance between the Inception
                pool3 features of the generated images and of as many held-out images: a
                gFID-style figure on this many images (the paper's gFID uses 50,000)
and writes a grid of the generations (TensorBoard and WORKDIR/generations/step_*.png).
`--mode=generate --class_id=K` restores only the eval params.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.convert import inception_weights
from unimm_jax.data import pipeline
from unimm_jax.evals import fid
from unimm_jax.evals import scene_classes
from unimm_jax.inference import image_io
from unimm_jax.train import evaluators
from unimm_jax.train import metric_logging


# The samples grid shows at most this many classes (columns), and up to 4 samples of each.
_GRID_CLASSES = 28


class ClassToImageEvaluator(evaluators.CachedEvaluator):
  """The class-to-image evaluation (module docstring); trainer interface as
  `unimm_jax.train.evaluators`."""
  metric_name = "class check / loss"

  def __init__(self, task, context, writer, workdir: str):
    super().__init__(writer)
    self.task, self.context, self.workdir = task, context, workdir
    config, shards = task.config, context.batch_shards
    self.frozen = evaluators.frozen_on_mesh(task, context)
    num_classes = task.system.num_classes
    n = evaluators.rounded_up(config.eval.num_generations, shards)
    self.labels = np.arange(n, dtype=np.int32) % num_classes
    eval_size = evaluators.rounded_up(config.train.eval_num_images, shards)
    images, labels = next(pipeline.iter_eval_batches(config.data, eval_size, eval_size,
                                                     with_labels=True))
    self.real = images
    self.batch = context.place_batch({"image": images, "label": labels.astype(np.int32)},
                                     host_local=False)
    self.statistics = jax.jit(task.statistics, out_shardings=context.replicated)
    self.generate = jax.jit(
        lambda params, frozen, labels, key: task.system.sample(
            params, frozen, labels, key, cfg_scale=config.generation.cfg_scale,
            temperature=config.generation.temperature),
        out_shardings=context.replicated)
    self.classify = (scene_classes.classify_class_scene
                     if config.data.source == "scene_classes" else None)
    self.inception = self.real_statistics = None
    if config.eval.inception_path:
      model, variables = inception_weights.load_fid_inception(config.eval.inception_path)
      self.inception = context.on_mesh(lambda x: model.apply(variables, x))
    self.images = None

  def _fid(self, images: np.ndarray) -> float:
    """Frechet distance between the Inception features of `images` and of as many held-out
    images (whose statistics are computed once, at the first evaluation)."""
    if self.real_statistics is None:
      real = fid.FeatureStatistics()
      real_images = list(pipeline.iter_eval_images(self.task.config.data, len(images)))
      real.update(np.asarray(self.inception(np.stack(real_images)), np.float64))
      self.real_statistics = real.statistics()
    fake = fid.FeatureStatistics()
    fake.update(np.asarray(self.inception(images), np.float64))
    return float(fid.frechet_distance(*self.real_statistics, *fake.statistics()))

  def _compute(self, variables) -> dict[str, float]:
    with self.context.activate():
      return self._scores(variables["params"])

  def _scores(self, params) -> dict[str, float]:
    config, context = self.task.config, self.context
    stats = jax.device_get(self.statistics(params, self.frozen, self.batch,
                                           jax.random.key(config.seed)))
    scalars = {f"eval/{k}": float(v) for k, v in stats.items()}
    if not len(self.labels):  # config.eval.num_generations = 0: the loss alone
      return scalars
    labels = context.place(self.labels, host_local=False)
    self.images = np.asarray(jax.device_get(self.generate(
        params, self.frozen, labels, jax.random.key(config.seed + 1))))
    if self.classify is not None:
      guesses = np.array([self.classify(image) for image in self.images])
      scalars["eval/class_check"] = float(np.mean(guesses == self.labels))
      scalars["eval/class_check_chance"] = 1.0 / self.task.system.num_classes
      scalars["eval/class_check_no_object"] = float(np.mean(guesses < 0))
    if self.inception is not None:
      scalars["eval/fid"] = self._fid(self.images)
    return scalars

  def write_samples(self, variables, step: int) -> None:
    """A grid of the generations, one class per column, the first _GRID_CLASSES classes
    (TensorBoard and PNG)."""
    self.evaluate(variables, step)
    if self.images is None:
      return
    num_classes = self.task.system.num_classes
    columns = min(num_classes, len(self.images), _GRID_CLASSES)
    rows = min(len(self.images) // columns, 4)
    grid = metric_logging.image_grid(self._by_class(columns, rows), columns=columns)
    self.writer.write_images(step, {"generations": grid[None]})
    if jax.process_index() == 0:
      image_io.save_png(os.path.join(self.workdir, "generations", f"step_{step:07d}.png"), grid)

  def _by_class(self, columns: int, rows: int) -> np.ndarray:
    """rows x columns images: column k shows generations of class k."""
    picked = [np.flatnonzero(self.labels == k)[:rows] for k in range(columns)]
    return np.stack([self.images[picked[k][r]] for r in range(rows) for k in range(columns)])

  def headline(self, scalars: dict[str, float]) -> str:
    parts = []
    if "eval/class_check" in scalars:
      parts.append(f"class check {scalars['eval/class_check']:.3f} (chance "
                   f"{scalars['eval/class_check_chance']:.3f})")
    if "eval/fid" in scalars:
      parts.append(f"FID {scalars['eval/fid']:.2f} ({len(self.labels)} images)")
    parts.append(f"loss {scalars['eval/loss']:.4f}")
    return ", ".join(parts)

  @property
  def description(self) -> str:
    return (f"{len(self.labels)} generations over {self.task.system.num_classes} classes, "
            f"{len(self.real)} held-out images")


def evaluate_checkpoint(task, context, workdir: str) -> dict:
  """`--mode=eval`: the evaluator's scalars for the latest checkpoint, written to
  WORKDIR/eval_STEP.json and TensorBoard."""
  return evaluators.evaluate_latest_checkpoint(
      task, context, workdir, lambda writer: ClassToImageEvaluator(task, context, writer, workdir))


def generate_to_folder(task, context, workdir: str, class_id: int, *, output: str,
                       num_images: int = 4, cfg_scale: float | None = None,
                       temperature: float | None = None, seed: int = 0) -> str:
  """`--mode=generate --class_id=K`: `num_images` images of class K as PNGs in `output`."""
  system, gen = task.system, task.config.generation
  if not 0 <= class_id < system.num_classes:
    raise ValueError(f"--class_id={class_id} is not a class id in [0, {system.num_classes})")
  name = task.class_names[class_id]
  _, params = evaluators.restore_task_params(task, context, workdir)
  frozen = evaluators.frozen_on_mesh(task, context)
  labels = jnp.full((num_images,), class_id, jnp.int32)
  with context.activate():
    images = jax.jit(lambda p, f, l, k: system.sample(
        p, f, l, k, cfg_scale=gen.cfg_scale if cfg_scale is None else cfg_scale,
        temperature=gen.temperature if temperature is None else temperature))(
            params, frozen, labels, jax.random.key(seed))
  os.makedirs(output, exist_ok=True)
  for i, image in enumerate(np.asarray(images)):
    image_io.save_png(os.path.join(output, f"image_{i:03d}.png"), image_io.to_uint8(image))
  return f"wrote {num_images} images of class {class_id} ({name!r}) to {output}"
