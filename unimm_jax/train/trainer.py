"""The one training loop: sharded state, Grain batches, CLU logs, Orbax checkpoints.

The trainer knows nothing about a particular model; a task (config.task, see
`unimm_jax.train.tasks`) supplies `init(rng)`, `check(abstract_state)` (start-up checks
from shapes: param groups, loss weights), `load_frozen()`, `train_step(state, frozen, batch,
rng)`, `batch_ndims()` (batch arrays by name and rank, all batch-leading),
`global_batch_sizes()` (every global batch size its data yields), `train_iterator(seed)` (a
checkpointable Grain iterator of host-local batches with a `skipped` count),
`throughput_unit` and `count_items(host_batch)` (images or tokens in a host batch),
`initial_weights()` (pretrained sources of some params for a fresh run, or None: see
`unimm_jax.train.initial_weights`), and
`evaluator(context, writer, workdir)` (see `unimm_jax.train.evaluators`), which receives a
`MeshContext`, not the trainer. For `--mode=plan` (`unimm_jax.train.plan`) it also gives
`frozen_shapes()` and `batch_shapes()`: the frozen networks and the global batches as
ShapeDtypeStructs, without reading weights or data.
"""
import functools
import logging
import signal
import time

from clu import periodic_actions
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from unimm_jax import config_defaults
from unimm_jax.parallel import mesh as mesh_lib
from unimm_jax.parallel.context import MeshContext
from unimm_jax.train import checkpointing
from unimm_jax.train import initial_weights
from unimm_jax.train import metric_logging
from unimm_jax.train import tasks


class PreemptionWatch:
  """Tells the loop when to save a checkpoint and exit because of SIGTERM.

  One process: a Python SIGTERM handler sets a flag, and the loop stops at the next step
  boundary. Several processes: the signal may reach any one of them, and all must save the
  same step together. jax.distributed.initialize has installed JAX's preemption notifier,
  which passes the notice to every process through the coordination service; each then
  stops at the same agreed step (`multihost_utils.reached_preemption_sync_point`), without
  a device collective in the step.
  """

  def __init__(self):
    self._multiprocess = jax.process_count() > 1
    self.requested = False
    if not self._multiprocess:  # a Python handler would replace JAX's notifier
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def stop_at(self, step: int) -> bool:
    """Called at every step boundary, on every process; True on all of them together."""
    if self._multiprocess and multihost_utils.reached_preemption_sync_point(step):
      logging.warning("preemption notice: all processes save step %d and exit", step)
      self.requested = True
    return self.requested

  def restore(self):
    if not self._multiprocess:
      signal.signal(signal.SIGTERM, self._previous)


class Setup:
  """Everything a run needs besides the loop: mesh, task, shardings, compiled steps."""

  def __init__(self, config: ml_collections.ConfigDict):
    config_defaults.validate(config)
    self.config = config
    self.context = MeshContext(mesh_lib.make_mesh(config.mesh),
                               config_defaults.sharding_rules(config))
    self.mesh, self.rules = self.context.mesh, self.context.rules
    self.task = tasks.build_task(config)
    for size in self.task.global_batch_sizes():
      if size % self.context.batch_shards:
        raise ValueError(f"global batch size {size} (config.train.batch_size, or a "
                         "config.data.resolution_buckets entry) is not divisible by the "
                         f"mesh's data x fsdp = {self.context.batch_shards}")
    self.init_rng, self.train_rng = jax.random.split(jax.random.key(config.seed))
    # Outside `activate()`: under logical rules Flax would constrain each freshly boxed
    # param inside init; the jitted init's out_shardings already place them.
    boxed = jax.eval_shape(self.task.init, self.init_rng)
    self.task.check(boxed)
    self.state_shardings = self.context.shardings(boxed)
    self.abstract_state = checkpointing.abstract_with_shardings(
        nn.unbox(boxed), self.state_shardings)
    self.batch_shardings = {name: self.context.batch_sharding(ndim)
                            for name, ndim in self.task.batch_ndims().items()}

  def checkpointer(self, workdir: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(workdir, keep=self.config.train.keep_checkpoints,
                                      save_every=self.config.train.checkpoint_every)

  def activate(self):
    """Mesh and logical rules in force while tracing, so activation constraints apply."""
    return self.context.activate()

  def init_state(self, compiler_options: dict | None = None):
    """The initial train state, laid out by the rules. `compiler_options` go to XLA for
    this one compile (tests pass a fast, unoptimised one: init runs only once)."""
    init = jax.jit(lambda rng: nn.unbox(self.task.init(rng)),
                   out_shardings=self.state_shardings)
    return init.lower(self.init_rng).compile(compiler_options)(self.init_rng)

  def start_from_run(self, state, workdir: str):
    """`state` with the params, EMA params, model state and discriminator of the latest
    checkpoint in `workdir`; step, optimiser state, training-only modules and counters start
    anew. This is how a curriculum stage starts from the previous stage
    (`config.train.init_from`)."""
    checkpointer = checkpointing.Checkpointer(workdir, keep=1, save_every=1)
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"config.train.init_from={workdir!r}: no checkpoint in "
                              f"{workdir}/checkpoints")
    with self.activate():
      previous, _ = checkpointer.restore(step, self.abstract_state)
    checkpointer.close()
    logging.info("initialised from step %d of %s", step, workdir)
    return state.replace(params=previous.params, ema_params=previous.ema_params,
                         discriminator=previous.discriminator,
                         model_state=previous.model_state)

  def start_from_weights(self, state):
    """`state` with the params (and EMA params) that the task starts from pretrained
    weights (`task.initial_weights()`, e.g. a SigLIP encoder named in the config); the
    state itself when there are none."""
    sources = self.task.initial_weights()
    if not sources:
      return state
    params = initial_weights.overlay(state.params, self.state_shardings.params, sources)
    logging.info("params %s start from pretrained weights", sorted(sources))
    ema = (None if state.ema_params is None else initial_weights.overlay(
        state.ema_params, self.state_shardings.ema_params, sources))
    return state.replace(params=params, ema_params=ema)

  @functools.cached_property
  def frozen_shardings(self):
    """Where the frozen networks live: by the logical rules, so a large teacher ViT is
    split like a trained one; unnamed arrays (LPIPS) are replicated."""
    return self.context.shardings(self.task.frozen_shapes())

  @functools.cached_property
  def frozen(self):
    """The task's frozen networks (LPIPS, a teacher), on the mesh; loaded once."""
    return jax.device_put(self.task.load_frozen(), self.frozen_shardings)

  def compile_train_step(self):
    """jit of task.train_step(state, frozen, batch, rng) with the state donated."""
    return jax.jit(self.task.train_step,
                   in_shardings=(self.state_shardings, None, self.batch_shardings, None),
                   out_shardings=(self.state_shardings, None), donate_argnums=(0,))

  def global_batch(self, host_batch: dict, host_local: bool = True) -> dict:
    """The task's batch arrays (see `batch_ndims`) as global arrays, batch axis sharded."""
    return {name: self.context.place(host_batch[name], host_local, s)
            for name, s in self.batch_shardings.items()}

  def global_images(self, images: np.ndarray, host_local: bool) -> jax.Array:
    """Host images (b, h, w, 3) -> one global array sharded over the batch axes."""
    return self.context.place(images, host_local)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains until config.train.steps, resuming from WORKDIR's latest checkpoint.

  Returns the step and the evaluator's scalars at the end of this run (e.g. `eval/psnr`),
  and at its start with a `_start` suffix.
  """
  preemption = PreemptionWatch()  # first, so a SIGTERM during start-up also exits cleanly
  try:
    return _train(config, workdir, preemption)
  finally:
    preemption.restore()


def _train(config: ml_collections.ConfigDict, workdir: str, preemption: PreemptionWatch):
  setup = Setup(config)
  checkpointer = setup.checkpointer(workdir)
  tc = config.train
  data_iter = setup.task.train_iterator(config.seed)

  latest = checkpointer.latest_step()
  if latest is None:
    state, progress = setup.init_state(), {"skipped_records": 0}
    # A previous stage's run already holds what pretrained weights would give.
    state = (setup.start_from_run(state, tc.init_from) if tc.init_from
             else setup.start_from_weights(state))
    logging.info("starting %s in %s", f"from {tc.init_from}" if tc.init_from else "from scratch",
                 workdir)
  else:
    with setup.activate():
      state, progress = checkpointer.restore(latest, setup.abstract_state, data_iter)
    logging.info("resumed from step %d in %s", latest, workdir)
  train_step = setup.compile_train_step()

  writer = metric_logging.create_writer(workdir)
  evaluator = setup.task.evaluator(setup.context, writer, workdir)
  if latest is None:
    writer.write_hparams(metric_logging.flatten_hparams(config))
  step = int(jax.device_get(state.step))
  # Console progress with an ETA; steps/s and images/s go to the writers below.
  report = periodic_actions.ReportProgress(num_train_steps=tc.steps, every_secs=None,
                                           every_steps=tc.log_every)

  unit = setup.task.throughput_unit
  scalars_start = evaluator.evaluate(state.eval_variables, step)
  print(f"held-out {evaluator.metric_name} at step {step}: "
        f"{evaluator.headline(scalars_start)} ({evaluator.description})", flush=True)

  nonfinite_seen, consecutive_bad = int(jax.device_get(state.nonfinite_steps)), 0
  last_log_step, last_log_time = step, time.perf_counter()
  items_since_log = 0  # images or tokens over all hosts since the last log
  saved_step, first_step = latest, step
  try:
    while step < tc.steps and not preemption.stop_at(step):
      host_batch = next(data_iter)
      progress["skipped_records"] += int(host_batch["skipped"].sum())
      batch = setup.global_batch(host_batch)
      with jax.profiler.StepTraceAnnotation("train", step_num=step), setup.activate():
        state, metrics = train_step(state, setup.frozen, batch, setup.train_rng)
      step += 1
      items_since_log += setup.task.count_items(host_batch) * jax.process_count()
      report(step)
      if step == first_step + 1:  # throughput is measured from after compilation
        jax.block_until_ready(state)
        last_log_step, last_log_time, items_since_log = step, time.perf_counter(), 0

      if step % tc.log_every == 0 or step == tc.steps:
        metrics, nonfinite_total = jax.device_get((metrics, state.nonfinite_steps))
        now = time.perf_counter()
        flat = metric_logging.flatten_metrics(metrics)
        flat.update({"data/skipped_records": progress["skipped_records"],
                     "nonfinite_steps": int(nonfinite_total)})
        if step > last_log_step:  # not on the first step, whose time is compilation
          flat.update({"steps_per_sec": (step - last_log_step) / (now - last_log_time),
                       f"{unit}_per_sec": items_since_log / (now - last_log_time)})
        writer.write_scalars(step, flat)
        consecutive_bad = _check_nonfinite(
            int(nonfinite_total) - nonfinite_seen, step - last_log_step, consecutive_bad,
            tc.max_nonfinite_steps, step, checkpointer.latest_step())
        nonfinite_seen = int(nonfinite_total)
        last_log_step, last_log_time, items_since_log = step, now, 0
        speed = (f" {flat[f'{unit}_per_sec']:.1f} {unit}/s" if f"{unit}_per_sec" in flat
                 else "")
        print(f"step {step}/{tc.steps} loss {flat['loss']:.4f}{speed}", flush=True)

      if step % tc.image_every == 0 or step == tc.steps:
        evaluator.write_samples(state.eval_variables, step)
      elif step % tc.eval_every == 0:
        evaluator.evaluate(state.eval_variables, step)

      if checkpointer.save(step, state, data_iter, config, progress, force=step == tc.steps):
        saved_step = step
    if preemption.requested:
      if saved_step != step:
        checkpointer.save(step, state, data_iter, config, progress, force=True)
    else:
      scalars_end = evaluator.evaluate(state.eval_variables, step)
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.flush()

  if preemption.requested:
    logging.warning("checkpoint saved at step %d after SIGTERM", step)
    return {"step": step, "preempted": True}
  print(f"held-out {evaluator.metric_name} at step {step}: {evaluator.headline(scalars_end)} "
        f"(start of this run: {evaluator.headline(scalars_start)})", flush=True)
  return {"step": step, **scalars_end, **{f"{k}_start": v for k, v in scalars_start.items()}}


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
