"""Periodic evaluation inside a training run, one evaluator per kind of task.

An evaluator is built by its task (`task.evaluator(context, writer, workdir)`) from a
`unimm_jax.parallel.context.MeshContext` (place, gather, activate), the config and the
task's functions of the model's variables, never the trainer; it offers:
  evaluate(variables, step) -> dict of scalars (written to the writers once per step, cached),
  write_samples(variables, step): pictures or text for a human (grids, continuations),
  metric_name, headline(scalars) and description: what the console prints at the start and
    end of a run ("held-out PSNR at step 0: 10.35 dB (16 crops, EMA params)").
`variables` are the ones eval uses (`TrainState.eval_variables`: {'params': the EMA params
when one is kept, else the params, plus the model's other collections}).
"""
import abc
import json
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from unimm_jax.data import pipeline
from unimm_jax.data import text_corpus
from unimm_jax.evals import image_metrics
from unimm_jax.inference import image_io
from unimm_jax.inference import restore
from unimm_jax.inference import sampling
from unimm_jax.parallel.context import MeshContext
from unimm_jax.train import metric_logging


class CachedEvaluator(abc.ABC):
  """Runs `_compute(variables)` at most once per step and writes its scalars."""

  def __init__(self, writer):
    self.writer, self._step, self._scalars = writer, None, None

  def evaluate(self, variables, step: int) -> dict[str, float]:
    if self._step != step:
      self._scalars = self._compute(variables)
      self.writer.write_scalars(step, self._scalars)
      self._step = step
    return self._scalars

  @abc.abstractmethod
  def _compute(self, variables) -> dict[str, float]:
    """The evaluation's scalars for `variables`, e.g. {'eval/psnr': 19.5}."""


class ReconstructionEvaluator(CachedEvaluator):
  """PSNR of held-out crops reconstructed with the eval variables; grids to TensorBoard + PNG.

  reconstruct: (variables, images (b, h, w, 3)) -> (b, h, w, 3) in [-1, 1].
  """
  metric_name = "PSNR"

  def __init__(self, context: MeshContext, config: ml_collections.ConfigDict,
               reconstruct: Callable, writer, workdir: str):
    super().__init__(writer)
    self.context, self.config, self.workdir = context, config, workdir
    # Rounded up to a multiple of the batch shards so the crops split evenly.
    shards = context.batch_shards
    n = -(-config.train.eval_num_images // shards) * shards
    self.images = pipeline.build_eval_images(config.data, n)
    self.batch = context.place(self.images, host_local=False)
    # Replicated out: every process gets all reconstructions, whichever devices made them.
    self.reconstruct = jax.jit(reconstruct, out_shardings=context.replicated)
    self.recons = None

  def _compute(self, variables) -> dict[str, float]:
    with self.context.activate():
      self.recons = np.asarray(jax.device_get(self.reconstruct(variables, self.batch)))
    return {"eval/psnr": float(np.mean(image_metrics.psnr(self.images, self.recons,
                                                          data_range=2.0)))}

  def write_samples(self, variables, step: int) -> None:
    self.evaluate(variables, step)
    n = self.config.train.grid_images
    grid = metric_logging.reconstruction_grid(self.images[:n], self.recons[:n])
    self.writer.write_images(step, {"reconstructions": grid[None]})
    if jax.process_index() == 0:
      image_io.save_png(os.path.join(self.workdir, "reconstructions", f"step_{step:07d}.png"),
                        grid)

  def headline(self, scalars: dict[str, float]) -> str:
    return f"{scalars['eval/psnr']:.2f} dB"

  @property
  def description(self) -> str:
    return f"{len(self.images)} crops, EMA params"


class LanguageModelEvaluator(CachedEvaluator):
  """Held-out loss, perplexity and next-token accuracy (eval params) over the eval split;
  samples: a greedy continuation of the start of the first eval document, as text.

  statistics: (params, batch) -> {'ce_sum', 'correct_sum', 'tokens'} (masked sums) of a
  batch of the arrays named in `fields`; model: the LLM that `sampling.generate` runs;
  tokenizer: the text tokenizer.
  """
  metric_name = "loss"

  def __init__(self, context: MeshContext, config: ml_collections.ConfigDict,
               statistics: Callable, fields: tuple[str, ...], model, tokenizer, writer,
               workdir: str):
    super().__init__(writer)
    self.context, self.config, self.workdir = context, config, workdir
    self.model, self.tokenizer = model, tokenizer
    shards = context.batch_shards
    batch_size = -(-config.eval.batch_size // shards) * shards
    host_batches = list(text_corpus.build_text_eval_batches(
        config.data, tokenizer, batch_size=batch_size, max_batches=config.eval.num_batches))
    self.batches = [context.place_batch({k: b[k] for k in fields}, host_local=False)
                    for b in host_batches]
    self.num_tokens = int(sum(b["loss_mask"].sum() for b in host_batches))
    self.statistics = jax.jit(statistics, out_shardings=context.replicated)
    first = host_batches[0]
    prompt_len = min(config.eval.prompt_tokens, int((first["segment_ids"][0] == 1).sum()))
    self.prompt = first["tokens"][:1, :prompt_len]

  def _compute(self, variables) -> dict[str, float]:
    totals = {}
    with self.context.activate():
      for batch in self.batches:
        for name, value in jax.device_get(self.statistics(variables["params"],
                                                          batch)).items():
          totals[name] = totals.get(name, 0.0) + float(value)
    loss = totals["ce_sum"] / max(totals["tokens"], 1.0)
    return {"eval/loss": loss, "eval/perplexity": float(np.exp(loss)),
            "eval/accuracy": totals["correct_sum"] / max(totals["tokens"], 1.0)}

  def write_samples(self, variables, step: int) -> None:
    self.evaluate(variables, step)
    params = jax.device_get(self.context.gather(variables["params"]))
    new = sampling.generate(self.model, params, self.prompt, self.config.eval.sample_tokens,
                            eos_ids=self.tokenizer.eos_ids)
    text = (self.tokenizer.decode(self.prompt[0].tolist()) + " ⟶ "
            + self.tokenizer.decode(np.asarray(new)[0].tolist()))
    self.writer.write_texts(step, {"samples": text})
    if jax.process_index() == 0:
      path = os.path.join(self.workdir, "samples", f"step_{step:07d}.txt")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        f.write(text + "\n")

  def headline(self, scalars: dict[str, float]) -> str:
    return f"{scalars['eval/loss']:.4f} (perplexity {scalars['eval/perplexity']:.2f})"

  @property
  def description(self) -> str:
    return f"{self.num_tokens} target tokens, EMA params"


def rounded_up(n: int, multiple: int) -> int:
  """n rounded up to a multiple of `multiple` (an eval set that splits over the batch
  shards); 0 stays 0."""
  return -(-n // multiple) * multiple if n else 0


def frozen_on_mesh(task, context: MeshContext):
  """The task's frozen networks (`task.load_frozen()`), replicated on the mesh."""
  return jax.device_put(task.load_frozen(), context.replicated)


def restore_task_params(task, context: MeshContext, workdir: str):
  """(step, eval params) of the latest checkpoint of `workdir`, shaped by task.init_params
  and placed on `context`'s mesh (only the params are read)."""
  boxed = jax.eval_shape(task.init_params, jax.random.key(0))
  return restore.restore_eval_params(workdir, boxed, context)


def evaluate_latest_checkpoint(task, context: MeshContext, workdir: str,
                               make_evaluator: Callable) -> dict:
  """`--mode=eval` of a task whose evaluator reads only params: the scalars and samples of
  `make_evaluator(writer)` for the latest checkpoint, written to WORKDIR/eval_STEP.json and
  TensorBoard, and printed."""
  step, params = restore_task_params(task, context, workdir)
  writer = metric_logging.create_writer(workdir)
  evaluator = make_evaluator(writer)
  scalars = evaluator.evaluate({"params": params}, step)
  evaluator.write_samples({"params": params}, step)
  writer.close()
  results = {"step": step, **{k.removeprefix("eval/"): v for k, v in scalars.items()}}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
      json.dump(results, f, indent=1)
  print(f"eval of step {step}: {evaluator.headline(scalars)} ({evaluator.description})")
  return results
