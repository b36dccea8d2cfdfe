"""`--mode=eval` of a tokenizer run: metrics of the latest checkpoint over the eval split.

Restores only what it uses: the EMA params (the params without EMA), and with zero-shot
classification the params of the training-only module that embeds images. Writes
WORKDIR/eval_STEP.json and the scalars to TensorBoard under `eval/` (process 0). LPIPS needs
config.lpips.path (or allow_random), rFID config.eval.inception_path; without them those two
metrics are left out and the reason is printed. With config.eval.zero_shot_classes,
zero-shot top-k accuracy (UniWeTok Table 1) of that module's embedding of the EMA tokens,
over the same (labelled) eval images, is added.
"""
import json
import os

import jax

from unimm_jax.convert import inception_weights
from unimm_jax.data import pipeline
from unimm_jax.evals import lpips as lpips_eval
from unimm_jax.evals import reconstruction_eval
from unimm_jax.evals import zero_shot
from unimm_jax.inference import image_codec
from unimm_jax.inference import restore

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
    inception, variables = inception_weights.load_fid_inception(ec.inception_path)
    inception_features = context.on_mesh(lambda x: inception.apply(variables, x))
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
  if writer is not None:
    with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
      json.dump(results, f, indent=1)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()
                                if isinstance(v, float)})
  summary = ", ".join(f"{k} {results[k]:.4f}" for k in _SUMMARY if k in results)
  print(f"eval of step {step} on {results['num_images']} images: {summary}")
  return results

