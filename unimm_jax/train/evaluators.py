"""Periodic evaluation inside a training run, one evaluator per kind of task.

An evaluator is built by its task (`task.evaluator(setup, writer, workdir)`) and offers:
  evaluate(state, step) -> dict of scalars (written to the writers once per step, cached),
  write_samples(state, step): pictures or text for a human (grids, continuations),
  metric_name, headline(scalars) and description: what the console prints at the start and
    end of a run ("held-out PSNR at step 0: 10.35 dB (16 crops, EMA params)").
"""
import abc
import os

import jax
import numpy as np

from unimm_jax.data import pipeline
from unimm_jax.data import text_corpus
from unimm_jax.evals import image_metrics
from unimm_jax.inference import image_io
from unimm_jax.inference import sampling
from unimm_jax.train import metric_logging


class _CachedEvaluator(abc.ABC):
  """Runs `_compute(state)` at most once per step and writes its scalars."""

  def __init__(self, writer):
    self.writer, self._step, self._scalars = writer, None, None

  def evaluate(self, state, step: int) -> dict[str, float]:
    if self._step != step:
      self._scalars = self._compute(state)
      self.writer.write_scalars(step, self._scalars)
      self._step = step
    return self._scalars

  @abc.abstractmethod
  def _compute(self, state) -> dict[str, float]:
    """The evaluation's scalars for `state`, e.g. {'eval/psnr': 19.5}."""


class ReconstructionEvaluator(_CachedEvaluator):
  """PSNR of held-out crops reconstructed with the EMA params; grids to TensorBoard + PNG."""
  metric_name = "PSNR"

  def __init__(self, setup, writer, workdir: str):
    super().__init__(writer)
    self.setup, self.workdir = setup, workdir
    config = setup.config
    shards = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    # Rounded up to a multiple of the batch shards so the crops split evenly.
    n = -(-config.train.eval_num_images // shards) * shards
    self.images = pipeline.build_eval_images(config.data, n)
    self.batch = {"image": setup.global_images(self.images, host_local=False)}
    # Replicated out: every process gets all reconstructions, whichever devices made them.
    self.eval_step = jax.jit(setup.task.eval_step,
                             in_shardings=(setup.state_shardings, {"image": setup.image_sharding}),
                             out_shardings=setup.replicated)
    self.recons = None

  def _compute(self, state) -> dict[str, float]:
    with self.setup.activate():
      self.recons = np.asarray(jax.device_get(self.eval_step(state, self.batch)))
    return {"eval/psnr": float(np.mean(image_metrics.psnr(self.images, self.recons,
                                                          data_range=2.0)))}

  def write_samples(self, state, step: int) -> None:
    self.evaluate(state, step)
    n = self.setup.config.train.grid_images
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


class LanguageModelEvaluator(_CachedEvaluator):
  """Held-out loss, perplexity and next-token accuracy (EMA params) over the eval split;
  samples: a greedy continuation of the start of the first eval document, as text."""
  metric_name = "loss"

  def __init__(self, setup, writer, workdir: str):
    super().__init__(writer)
    self.setup, self.workdir = setup, workdir
    config, task = setup.config, setup.task
    shards = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    batch_size = -(-config.eval.batch_size // shards) * shards
    host_batches = list(text_corpus.build_text_eval_batches(
        config.data, task.tokenizer, batch_size=batch_size, max_batches=config.eval.num_batches))
    self.batches = [setup.global_batch(b, host_local=False) for b in host_batches]
    self.num_tokens = int(sum(b["loss_mask"].sum() for b in host_batches))
    self.eval_step = jax.jit(task.eval_step,
                             in_shardings=(setup.state_shardings, setup.batch_shardings),
                             out_shardings=setup.replicated)
    first = host_batches[0]
    prompt_len = min(config.eval.prompt_tokens, int((first["segment_ids"][0] == 1).sum()))
    self.prompt = first["tokens"][:1, :prompt_len]

  def _compute(self, state) -> dict[str, float]:
    totals = {}
    with self.setup.activate():
      for batch in self.batches:
        for name, value in jax.device_get(self.eval_step(state, batch)).items():
          totals[name] = totals.get(name, 0.0) + float(value)
    loss = totals["ce_sum"] / max(totals["tokens"], 1.0)
    return {"eval/loss": loss, "eval/perplexity": float(np.exp(loss)),
            "eval/accuracy": totals["correct_sum"] / max(totals["tokens"], 1.0)}

  def write_samples(self, state, step: int) -> None:
    self.evaluate(state, step)
    task = self.setup.task
    params = jax.device_get(self.setup.gather(state.eval_params))
    new = sampling.generate(task.model, params, self.prompt,
                            self.setup.config.eval.sample_tokens,
                            eos_ids=task.tokenizer.eos_ids)
    text = (task.tokenizer.decode(self.prompt[0].tolist()) + " ⟶ "
            + task.tokenizer.decode(np.asarray(new)[0].tolist()))
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
