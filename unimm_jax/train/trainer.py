"""The one training loop: sharded state, Grain batches, CLU logs, Orbax checkpoints.

The trainer knows nothing about a particular model; a task (config.task) supplies
`init`, `train_step` and `eval_step`.
"""
import functools
import logging
import os
import signal
import time

from clu import periodic_actions
import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from unimm_jax import config_defaults
from unimm_jax.data import pipeline
from unimm_jax.evals import image_metrics
from unimm_jax.inference import image_io
from unimm_jax.parallel import mesh as mesh_lib
from unimm_jax.parallel import sharding
from unimm_jax.train import checkpointing
from unimm_jax.train import metric_logging
from unimm_jax.train import tasks


class PreemptionFlag:
  """Set by SIGTERM; the loop saves a checkpoint at the next step boundary and exits."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class Setup:
  """Everything a run needs besides the loop: mesh, task, shardings, compiled steps."""

  def __init__(self, config: ml_collections.ConfigDict):
    config_defaults.validate(config)
    self.config = config
    self.mesh = mesh_lib.make_mesh(config.mesh)
    self.rules = tuple(tuple(r) for r in config.sharding_rules)
    self.task = tasks.build_task(config)
    batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if config.train.batch_size % batch_shards:
      raise ValueError(f"config.train.batch_size={config.train.batch_size} is not divisible "
                       f"by the mesh's data x fsdp = {batch_shards}")
    self.init_rng, self.train_rng = jax.random.split(jax.random.key(config.seed))
    # Outside `activate()`: under logical rules Flax would constrain each freshly boxed
    # param inside init; the jitted init's out_shardings already place them.
    boxed = jax.eval_shape(self.task.init, self.init_rng)
    self.state_shardings = sharding.tree_shardings(boxed, self.mesh, self.rules)
    self.abstract_state = checkpointing.abstract_with_shardings(
        nn.unbox(boxed), self.state_shardings)
    self.image_sharding = sharding.batch_sharding(self.mesh, self.rules, ndim=4)

  def checkpointer(self, workdir: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(workdir, keep=self.config.train.keep_checkpoints,
                                      save_every=self.config.train.checkpoint_every)

  def activate(self):
    """Mesh and logical rules in force while tracing, so activation constraints apply."""
    return _Contexts(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))

  def init_state(self):
    init = jax.jit(lambda rng: nn.unbox(self.task.init(rng)),
                   out_shardings=self.state_shardings)
    return init(self.init_rng)

  @functools.cached_property
  def frozen(self):
    """The task's frozen networks (e.g. LPIPS), replicated on every device; loaded once."""
    return jax.device_put(self.task.load_frozen(), NamedSharding(self.mesh, P()))

  def compile_train_step(self):
    """jit of task.train_step(state, frozen, batch, rng) with the state donated."""
    return jax.jit(self.task.train_step,
                   in_shardings=(self.state_shardings, None, {"image": self.image_sharding},
                                 None),
                   out_shardings=(self.state_shardings, None), donate_argnums=(0,))

  def compile_eval_step(self):
    return jax.jit(self.task.eval_step,
                   in_shardings=(self.state_shardings, {"image": self.image_sharding}),
                   out_shardings=self.image_sharding)

  def global_images(self, images: np.ndarray, host_local: bool) -> jax.Array:
    """Host data -> one global array sharded over the batch axes.

    host_local: each process holds its own slice (training batches); otherwise every
    process holds the same full array (eval images).
    """
    if host_local:
      return jax.make_array_from_process_local_data(self.image_sharding, images)
    return jax.make_array_from_callback(images.shape, self.image_sharding,
                                        lambda index: images[index])


class _Contexts:
  def __init__(self, *contexts):
    self.contexts = contexts

  def __enter__(self):
    for c in self.contexts:
      c.__enter__()

  def __exit__(self, *exc):
    for c in reversed(self.contexts):
      c.__exit__(*exc)


def _eval_images(setup: Setup) -> np.ndarray:
  """Held-out crops, rounded up to a multiple of the batch shards so they split evenly."""
  shards = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
  n = -(-setup.config.train.eval_num_images // shards) * shards
  return pipeline.build_eval_images(setup.config.data, n)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains until config.train.steps, resuming from WORKDIR's latest checkpoint.

  Returns the final metrics, including `eval/psnr` at the start and end of this run.
  """
  preemption = PreemptionFlag()  # first, so a SIGTERM during start-up also exits cleanly
  try:
    return _train(config, workdir, preemption)
  finally:
    preemption.restore()


def _train(config: ml_collections.ConfigDict, workdir: str, preemption: PreemptionFlag):
  setup = Setup(config)
  checkpointer = setup.checkpointer(workdir)
  tc = config.train
  data_iter = pipeline.build_train_iterator(
      config.data, global_batch_size=tc.batch_size, seed=config.seed)
  eval_images = _eval_images(setup)
  eval_batch = {"image": setup.global_images(eval_images, host_local=False)}

  latest = checkpointer.latest_step()
  if latest is None:
    state, progress = setup.init_state(), {"skipped_records": 0}
    logging.info("starting from scratch in %s", workdir)
  else:
    with setup.activate():
      state, progress = checkpointer.restore(latest, setup.abstract_state, data_iter)
    logging.info("resumed from step %d in %s", latest, workdir)
  train_step = setup.compile_train_step()
  eval_step = setup.compile_eval_step()

  writer = metric_logging.create_writer(workdir)
  if latest is None:
    writer.write_hparams(metric_logging.flatten_hparams(config))
  step = int(jax.device_get(state.step))
  # Console progress with an ETA; steps/s and images/s go to the writers below.
  report = periodic_actions.ReportProgress(num_train_steps=tc.steps, every_secs=None,
                                           every_steps=tc.log_every)

  last_eval = {}

  def evaluate(state, step) -> tuple[float, np.ndarray]:
    """Mean PSNR of the held-out crops (EMA params), logged once per step; and the recons."""
    if last_eval.get("step") != step:
      with setup.activate():
        recons = np.asarray(jax.device_get(eval_step(state, eval_batch)))
      value = float(np.mean(image_metrics.psnr(eval_images, recons, data_range=2.0)))
      writer.write_scalars(step, {"eval/psnr": value})
      last_eval.update(step=step, value=value, recons=recons)
    return last_eval["value"], last_eval["recons"]

  psnr_start, recons = evaluate(state, step)
  print(f"held-out PSNR at step {step}: {psnr_start:.2f} dB "
        f"({len(eval_images)} crops, EMA params)", flush=True)

  nonfinite_seen, consecutive_bad = int(jax.device_get(state.nonfinite_steps)), 0
  last_log_step, last_log_time = step, time.perf_counter()
  saved_step, first_step = latest, step
  try:
    while step < tc.steps and not preemption.requested:
      host_batch = next(data_iter)
      progress["skipped_records"] += int(host_batch["skipped"].sum())
      batch = {"image": setup.global_images(host_batch["image"], host_local=True)}
      with jax.profiler.StepTraceAnnotation("train", step_num=step), setup.activate():
        state, metrics = train_step(state, setup.frozen, batch, setup.train_rng)
      step += 1
      report(step)
      if step == first_step + 1:  # throughput is measured from after compilation
        jax.block_until_ready(state)
        last_log_step, last_log_time = step, time.perf_counter()

      if step % tc.log_every == 0 or step == tc.steps:
        metrics, nonfinite_total = jax.device_get((metrics, state.nonfinite_steps))
        now = time.perf_counter()
        flat = metric_logging.flatten_metrics(metrics)
        flat.update({"data/skipped_records": progress["skipped_records"],
                     "nonfinite_steps": int(nonfinite_total)})
        if step > last_log_step:  # not on the first step, whose time is compilation
          steps_per_sec = (step - last_log_step) / (now - last_log_time)
          flat.update(steps_per_sec=steps_per_sec,
                      images_per_sec=steps_per_sec * tc.batch_size)
        writer.write_scalars(step, flat)
        consecutive_bad = _check_nonfinite(
            int(nonfinite_total) - nonfinite_seen, step - last_log_step, consecutive_bad,
            tc.max_nonfinite_steps, step, checkpointer.latest_step())
        nonfinite_seen = int(nonfinite_total)
        last_log_step, last_log_time = step, now
        speed = f" {flat['images_per_sec']:.1f} img/s" if "images_per_sec" in flat else ""
        print(f"step {step}/{tc.steps} loss {flat['loss']:.4f}{speed}", flush=True)

      if step % tc.image_every == 0 or step == tc.steps:
        _, recons = evaluate(state, step)
        _write_grid(writer, workdir, step, eval_images, recons, tc.grid_images)
      elif step % tc.eval_every == 0:
        evaluate(state, step)

      if checkpointer.save(step, state, data_iter, config, progress, force=step == tc.steps):
        saved_step = step
    if preemption.requested:
      if saved_step != step:
        checkpointer.save(step, state, data_iter, config, progress, force=True)
    else:
      psnr_end, _ = evaluate(state, step)
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.flush()

  if preemption.requested:
    logging.warning("checkpoint saved at step %d after SIGTERM", step)
    return {"step": step, "preempted": True}
  print(f"held-out PSNR at step {step}: {psnr_end:.2f} dB (start of this run: "
        f"{psnr_start:.2f} dB)", flush=True)
  return {"step": step, "eval/psnr_start": psnr_start, "eval/psnr": psnr_end}


def _check_nonfinite(new_bad: int, window: int, consecutive: int, limit: int, step: int,
                     last_good_checkpoint) -> int:
  """Reports skipped NaN/Inf steps; raises once `limit` consecutive steps were skipped."""
  if not new_bad:
    return 0
  logging.warning("%d of the last %d steps had a NaN/Inf loss or gradient and were skipped "
                  "(parameters kept from the last finite step)", new_bad, window)
  consecutive = consecutive + new_bad if new_bad == window else new_bad
  if consecutive >= limit:
    raise FloatingPointError(
        f"{consecutive} consecutive non-finite steps up to step {step}; stopping. The last "
        f"good checkpoint (step {last_good_checkpoint}) is kept; lower the learning rate or "
        f"check the data, then rerun in the same workdir to resume from it.")
  return consecutive


def _write_grid(writer, workdir, step, originals, recons, n):
  grid = metric_logging.reconstruction_grid(originals[:n], recons[:n])
  writer.write_images(step, {"reconstructions": grid[None]})
  if jax.process_index() == 0:
    image_io.save_png(os.path.join(workdir, "reconstructions", f"step_{step:07d}.png"), grid)
