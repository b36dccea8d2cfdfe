"""`--mode=eval` of a tokenizer run: metrics of the latest checkpoint over the eval split.

Restores only what it uses: the EMA params (the params without EMA), and with zero-shot
classification the params of the training-only module that embeds images. Writes
WORKDIR/eval_STEP.json and the scalars to TensorBoard under `eval/` (process 0). LPIPS needs
config.lpips.path (or allow_random), rFID config.eval.inception_path; without them those two
metrics are left out and the reason is printed. With config.eval.zero_shot_classes,
zero-shot top-k accuracy (UniWeTok Table 1) of that module's embedding of the EMA tokens,
over the same (labelled) eval images, is added.

A residual tokenizer (its spec's `trajectory_levels`) is also evaluated along its residual
trajectory: for every depth d = 1..L, the same metrics of the reconstruction from the first
d levels and, when a training-only module aligns a feature with a teacher, the mean cosine
of that feature to the teacher's (EvoTok's Fig. 5b). They are `trajectory` in the JSON
(one entry per depth) and a plot, WORKDIR/eval_STEP_trajectory.png.

A tokenizer with normalised latents (its spec's `normalized_latents`) also reports the mean
and std of the eval images' latents ('latent_mean', 'latent_std', over every value) and
'latent_normalization': the config.model.latent_mean / latent_scale that would make them
zero-mean and unit-std, printed as the overrides a unified system's config.vq takes.
"""
import json
import os

import jax
import matplotlib
import numpy as np

from unimm_jax.convert import inception_weights
from unimm_jax.data import pipeline
from unimm_jax.evals import lpips as lpips_eval
from unimm_jax.evals import reconstruction_eval
from unimm_jax.evals import zero_shot
from unimm_jax.inference import image_codec
from unimm_jax.inference import restore
from unimm_jax.losses import distillation

_SUMMARY = ("psnr", "ssim", "lpips", "rfid", "code_usage_mean", "code_perplexity_mean",
            "zero_shot_top1", "zero_shot_top5", "zero_shot_top10")


def _embedding_module(task):
  """The training-only module that embeds images for zero-shot classification."""
  found = [m for m in task.modules if getattr(m, "provides_embedding", False)]
  if not found:
    raise ValueError("config.eval.zero_shot_classes needs a training-only module that embeds "
                     "images (UniWeTok: the distillation heads of a run with "
                     "config.loss.pre_distill or config.loss.post_distill > 0); this run "
                     "has none")
  return found[0]


def evaluate(task, context, workdir: str, writer) -> dict:
  """The metrics dict of `reconstruction_eval.evaluate_reconstruction`, plus 'step'."""
  config, model = task.config, task.model
  ec = config.eval
  classes_path = ec.get("zero_shot_classes", "")  # configs saved before the field have none
  classes = module = None
  rng = jax.random.key(0)
  fields = {}
  if classes_path:
    module = _embedding_module(task)
    classes = zero_shot.load_class_embeddings(classes_path)
    fields["module_params"] = {
        module.name: jax.eval_shape(task.init_module_params, rng)[module.name]}
  step, variables = restore.restore_eval_variables(
      workdir, jax.eval_shape(task.init_variables, rng), context)
  if fields:
    _, restored = restore.restore_fields(workdir, fields, context, step)
    module_params = restored["module_params"][module.name]

  lpips_distance = inception_features = None
  if config.lpips.path or config.lpips.allow_random:
    lpips_distance = context.on_mesh(lpips_eval.load(config.lpips.path or None,
                                                     allow_random=config.lpips.allow_random))
  else:
    print("LPIPS left out: set config.lpips.path (README: LPIPS weights)")
  if ec.inception_path:
    inception, inception_variables = inception_weights.load_fid_inception(ec.inception_path)
    inception_features = context.on_mesh(lambda x: inception.apply(inception_variables, x))
  else:
    print("rFID left out: set config.eval.inception_path (README: FID Inception weights)")
  zero_shot_eval = None
  if classes is not None:
    def embed(images):
      """(b, h, w, 3) -> (b, d): the module's embedding of the EMA tokenizer's tokens."""
      out = model.apply(variables, images, train=False, method="encode")
      return module.image_embedding(module_params, out)
    zero_shot_eval = (context.on_mesh(embed), classes)
  layout = task.layout
  results = reconstruction_eval.evaluate_reconstruction(
      pipeline.iter_eval_batches(config.data, ec.num_images, ec.batch_size,
                                 with_labels=classes is not None), ec.batch_size,
      reconstruct=context.on_mesh(lambda x: image_codec.reconstruct(model)(variables, x)),
      encode=(None if layout is None
              else context.on_mesh(lambda x: image_codec.encode(model)(variables, x))),
      codebook_size=None if layout is None else layout.codebook_size,
      lpips_distance=lpips_distance, inception_features=inception_features,
      zero_shot=zero_shot_eval)
  results["step"] = step
  if task.spec.normalized_latents:
    results.update(_latent_statistics(
        task, context.on_mesh(lambda x: model.apply(variables, x, method="encode").latents)))
  if task.spec.trajectory_levels and task.spec.trajectory_levels(config.model):
    results["trajectory"] = _trajectory(
        task, context, variables, lpips_distance=lpips_distance,
        inception_features=inception_features)
    if writer is not None:
      _plot_trajectory(results["trajectory"], os.path.join(workdir, f"eval_{step}_trajectory.png"))
  if writer is not None:
    with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
      json.dump(results, f, indent=1)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()
                                if isinstance(v, float)})
  summary = ", ".join(f"{k} {results[k]:.4f}" for k in _SUMMARY if k in results)
  print(f"eval of step {step} on {results['num_images']} images: {summary}")
  return results


def _latent_statistics(task, encode) -> dict:
  """Mean and std of the normalised latents of the eval images (`encode`: images -> (b, h,
  w, d)), and the normalisation constants that would make them 0 and 1."""
  config = task.config
  total = total_sq = count = 0.0
  for images in pipeline.iter_eval_batches(config.data, config.eval.num_images,
                                           config.eval.batch_size):
    latents = np.asarray(jax.device_get(encode(images)), np.float64)
    total, total_sq, count = total + latents.sum(), total_sq + (latents ** 2).sum(), \
        count + latents.size
  mean = total / count
  std = float(np.sqrt(max(total_sq / count - mean ** 2, 0.0)))
  scale, offset = config.model.latent_scale, config.model.latent_mean
  constants = {"latent_mean": float(offset + scale * mean), "latent_scale": float(scale * std)}
  print("latents normalised to zero mean and unit std over the eval images: "
        + " ".join(f"--config.vq.{k}={v:.8g}" for k, v in constants.items()))
  return {"latent_mean": float(mean), "latent_std": std, "latent_normalization": constants}


def _trajectory(task, context, variables, **metric_fns) -> list[dict]:
  """The reconstruction metrics (and the aligned feature's cosine to its teacher) of the
  sum of the first d levels, for d = 1..L."""
  config, model = task.config, task.model
  ec = config.eval
  aligned = next((m for m in task.modules if m.aligned_feature), None)
  frozen = aligned.load_frozen() if aligned else None
  trajectory = []
  for depth in range(1, task.spec.trajectory_levels(config.model) + 1):
    def at_depth(images, depth=depth):
      return model.apply(variables, images, depth, method="at_depth")

    def cosine(images, at_depth=at_depth):
      """(b,) per-image mean over tokens of cos(feature, the teacher's)."""
      feature = at_depth(images).features[aligned.aligned_feature]
      return 1.0 - jax.vmap(distillation.cosine_distillation_loss)(
          feature, aligned.target(frozen, images))

    metrics = reconstruction_eval.evaluate_reconstruction(
        pipeline.iter_eval_batches(config.data, ec.num_images, ec.batch_size), ec.batch_size,
        reconstruct=context.on_mesh(lambda x, at_depth=at_depth: at_depth(x).recon),
        encode=None, codebook_size=None,
        feature_cosine=context.on_mesh(cosine) if aligned else None, **metric_fns)
    trajectory.append({"depth": depth, **{k: v for k, v in metrics.items()
                                           if k != "num_images"}})
    print(f"depth {depth}: " + ", ".join(f"{k} {v:.4f}" for k, v in trajectory[-1].items()
                                         if k != "depth"))
  return trajectory


def _plot_trajectory(trajectory: list[dict], path: str) -> None:
  """PSNR (and the feature cosine) against depth, one panel each."""
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  depths = [t["depth"] for t in trajectory]
  panels = [k for k in ("psnr", "ssim", "feature_cosine") if k in trajectory[0]]
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
  for ax, key in zip(np.atleast_1d(axes), panels):
    ax.plot(depths, [t[key] for t in trajectory], marker="o")
    ax.set_xlabel("residual depth d (levels summed)")
    ax.set_title({"psnr": "PSNR (dB)", "ssim": "SSIM",
                  "feature_cosine": "semantic cosine to the teacher"}[key])
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
