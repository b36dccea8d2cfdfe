"""Using a run's checkpoints after training: its config, its EMA parameters, `--mode=eval`."""
import json
import logging
import os

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from unimm_jax.convert import inception_weights
from unimm_jax.convert import uniwetok_weights
from unimm_jax.data import pipeline
from unimm_jax.evals import lpips as lpips_eval
from unimm_jax.evals import reconstruction_eval
from unimm_jax.evals import zero_shot
from unimm_jax.train import checkpointing
from unimm_jax.train import metric_logging
from unimm_jax.train import trainer


def restore_latest(config: ml_collections.ConfigDict, workdir: str):
  """(setup, step, train state) of the latest checkpoint in `workdir`, without the data
  iterator; the state is laid out on the config's mesh."""
  setup = trainer.Setup(config)
  checkpointer = setup.checkpointer(workdir)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  with setup.activate():
    state, _ = checkpointer.restore(step, setup.abstract_state)
  checkpointer.close()
  logging.info("restored the state of step %d from %s", step, workdir)
  return setup, step, state


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str):
  """(task, EMA params, or params without EMA) of `workdir`'s latest checkpoint."""
  setup, _, state = restore_latest(config, workdir)
  return setup.task, state.eval_params


def import_uniwetok_weights(config: ml_collections.ConfigDict, workdir: str,
                           weights_path: str) -> None:
  """Writes step 0 of a new `workdir` from the authors' UniWeTok weights (`--mode=import`).

  The params and the EMA params are the imported ones (their EMA weights when the file has
  them, see `uniwetok_weights`); the optimiser, the discriminator and training-only modules
  start as at initialisation, and no data-iterator state is saved. The workdir then serves
  `--mode=eval/encode/decode`, `--config.train.init_from` (fine-tuning as a new run), or
  training in place from step 0.
  """
  if config.model.name != "uniwetok":
    raise ValueError(f"--mode=import reads UniWeTok autoencoder weights; config.model.name "
                     f"is {config.model.name!r}")
  setup = trainer.Setup(config)
  checkpointer = setup.checkpointer(workdir)
  if checkpointer.latest_step() is not None:
    raise FileExistsError(f"{workdir}/checkpoints already holds step "
                          f"{checkpointer.latest_step()}; import into a new workdir")
  params = jax.device_put(uniwetok_weights.load_uniwetok_state_dict(weights_path, config.model),
                          setup.state_shardings.params)
  state = setup.init_state()
  state = state.replace(params=params,
                        ema_params=None if state.ema_params is None else params)
  checkpointer.save(0, state, None, config, {"skipped_records": 0}, force=True)
  checkpointer.wait()
  checkpointer.close()


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored with the latest checkpoint of `workdir`."""
  checkpointer = checkpointing.Checkpointer(workdir, keep=1, save_every=1)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; pass --config")
  config = checkpointer.restore_config(step)
  checkpointer.close()
  return config


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode=eval`: metrics of the latest checkpoint's EMA params over the eval split.

  Writes WORKDIR/eval_STEP.json and the scalars to TensorBoard (process 0). LPIPS needs
  config.lpips.path (or allow_random), rFID config.eval.inception_path; without them those
  two metrics are left out and the reason is printed. With config.eval.zero_shot_classes,
  zero-shot top-k accuracy (Table 1) of the distillation head's embedding of the EMA
  tokens, over the same (labelled) eval images, is added.
  """
  ec = config.eval
  # Configs saved before the field existed have none.
  classes_path = ec.get("zero_shot_classes", "")
  classes = None
  if classes_path:
    if not (config.loss.pre_distill or config.loss.post_distill):
      raise ValueError("config.eval.zero_shot_classes needs the distillation heads of a run "
                       "with config.loss.pre_distill or config.loss.post_distill > 0; both "
                       "are 0 in this one")
    classes = zero_shot.load_class_embeddings(classes_path)
  setup, step, state = restore_latest(config, workdir)
  task, params = setup.task, state.eval_params

  def on_mesh(fn):
    """numpy batch -> fn on the batch-sharded global array -> numpy on every host."""
    jitted = jax.jit(fn)

    def run(*arrays):
      with setup.activate():
        out = jitted(*(setup.global_images(a, host_local=False) for a in arrays))
      return np.asarray(multihost_utils.process_allgather(out, tiled=True))
    return run

  lpips_distance = inception_features = None
  if config.lpips.path or config.lpips.allow_random:
    lpips_distance = on_mesh(lpips_eval.load(config.lpips.path or None,
                                             allow_random=config.lpips.allow_random))
  else:
    print("LPIPS left out: set config.lpips.path (README: LPIPS weights)")
  if ec.inception_path:
    inception, variables = inception_weights.load_fid_inception(ec.inception_path)
    inception_features = on_mesh(lambda x: inception.apply(variables, x))
  else:
    print("rFID left out: set config.eval.inception_path (README: FID Inception weights)")
  zero_shot_eval = None
  if classes is not None:
    heads_params = state.aux_params["heads"]

    def embed(images):
      """(b, h, w, 3) -> (b, out_dim): the trained head pooling the EMA tokenizer's U_Q."""
      quantized, _, _ = task.model.apply({"params": params}, images, train=False,
                                         method=task.model.encode)
      return task.heads.apply({"params": heads_params}, quantized,
                              method=task.heads.zero_shot_embedding)
    zero_shot_eval = (on_mesh(embed), classes)
  results = reconstruction_eval.evaluate_reconstruction(
      pipeline.iter_eval_batches(config.data, ec.num_images, ec.batch_size,
                                 with_labels=classes is not None), ec.batch_size,
      reconstruct=on_mesh(lambda x: task.reconstruct(params, x)),
      encode=on_mesh(lambda x: task.encode(params, x)),
      codebook_size=2 ** config.model.group_bits, lpips_distance=lpips_distance,
      inception_features=inception_features, zero_shot=zero_shot_eval)
  results["step"] = step
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
      json.dump(results, f, indent=1)
    writer = metric_logging.create_writer(workdir)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()
                                if isinstance(v, float)})
    writer.close()
  summary = ", ".join(f"{k} {results[k]:.4f}" for k in
                      ("psnr", "ssim", "lpips", "rfid", "code_usage_mean",
                       "code_perplexity_mean", "zero_shot_top1", "zero_shot_top5",
                       "zero_shot_top10") if k in results)
  print(f"eval of step {step} on {results['num_images']} images: {summary}")
  return results
