"""Language-model training on packed text: next-token cross entropy under a loss mask.

A batch holds packed rows (`unimm_jax.data.text_packing`): tokens, targets (the next token
of the same segment), positions (restarting per document), segment_ids (attention stays
inside a document) and loss_mask (0 on each segment's last token and on padding). The loss
is sum(mask * CE(logits, targets)) / sum(mask) over the global batch.

Modes besides training: `--mode=eval` (held-out loss, perplexity and accuracy of the latest
checkpoint) and `--mode=generate` (continue a prompt), both restoring only the params.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unimm_jax.convert import pretrained
from unimm_jax.data import text_corpus
from unimm_jax.data import text_tokenizer
from unimm_jax.inference import text_generation
from unimm_jax.models import llm
from unimm_jax.train import evaluators
from unimm_jax.train import metric_logging
from unimm_jax.train import optimizers
from unimm_jax.train.train_state import TrainState, keep_if_finite

BATCH_FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def token_statistics(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
  """Masked sums over a batch: CE, correct next-token guesses, and counted tokens.

  Shapes: logits (b, s, vocab) float32; batch fields (b, s) -> float32 scalars.
  """
  mask = batch["loss_mask"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return {"ce_sum": jnp.sum(ce * mask), "correct_sum": jnp.sum(correct * mask),
          "tokens": jnp.sum(mask)}


class LMTask:
  """Trains `unimm_jax.models.llm.LLM` on packed text from `config.data` (text fields)."""
  throughput_unit = "tokens"
  kind = "a language model"
  modes = ("train", "eval", "generate", "plan")
  generate_flags = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "chat")
  generate_required = ("prompt",)

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.tokenizer = text_tokenizer.load_tokenizer(config.data.tokenizer)
    self.model = llm.LLM(llm.config_from_fields(config.model, self.tokenizer.vocab_size))
    if self.model.config.vocab_size < self.tokenizer.vocab_size:
      raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than "
                       f"the tokenizer's {self.tokenizer.vocab_size} ids")
    self.optimizer = optimizers.Optimizer(config.optim, config.train.steps)

  def batch_ndims(self) -> dict[str, int]:
    return {name: 2 for name in BATCH_FIELDS}

  def global_batch_sizes(self) -> list[int]:
    return [self.config.train.batch_size]

  def count_items(self, host_batch: dict) -> int:
    return host_batch["tokens"].size

  def train_iterator(self, seed: int):
    """This host's packed rows, checkpointable; document order from data.shuffle_seed."""
    del seed  # the text pipeline is seeded by config.data.shuffle_seed
    return text_corpus.build_text_train_iterator(
        self.config.data, self.tokenizer, global_batch_size=self.config.train.batch_size)

  def evaluator(self, context, writer, workdir: str) -> evaluators.LanguageModelEvaluator:
    return evaluators.LanguageModelEvaluator(context, self.config, self.statistics,
                                             BATCH_FIELDS, self.model, self.tokenizer, writer,
                                             workdir)

  def init_params(self, rng: jax.Array):
    """The LLM's params (boxed), as inference restores them."""
    return self.model.init(rng, jnp.zeros((1, self.config.data.seq_len), jnp.int32))["params"]

  def initial_weights(self) -> dict | None:
    """A fresh run's LLM from config.model.init_path (a transformers checkpoint of
    config.model's architecture), or None when it is empty."""
    path = self.config.model.init_path
    if not path:
      return None
    return pretrained.starting_sources(path, self.model.config, where="config.model.init_path",
                                       scan_layers=self.model.config.scan_layers)

  def init(self, rng: jax.Array) -> TrainState:
    return TrainState.create(self.init_params(rng), self.optimizer.tx,
                             ema=self.config.ema_decay > 0)

  def check(self, abstract_state: TrainState) -> None:
    """Start-up checks from shapes only: the param groups match parameters."""
    self.optimizer.check((abstract_state.params, None))

  def load_frozen(self) -> dict:
    return {}

  def frozen_shapes(self) -> dict:
    return {}

  def batch_shapes(self) -> list[dict]:
    """The global train batch as ShapeDtypeStructs (for --mode=plan)."""
    shape = (self.config.train.batch_size, self.config.data.seq_len)
    return [{name: jax.ShapeDtypeStruct(shape, jnp.float32 if name == "loss_mask" else jnp.int32)
             for name in BATCH_FIELDS}]

  def statistics(self, params, batch: dict) -> dict[str, jax.Array]:
    logits = self.model.apply({"params": params}, batch["tokens"],
                              positions=batch["positions"], segment_ids=batch["segment_ids"])
    return token_statistics(logits, batch)

  def train_step(self, state: TrainState, frozen: dict, batch: dict, rng: jax.Array):
    """One update on the masked mean next-token CE. Returns (state, metrics)."""
    del frozen, rng  # no frozen networks; no dropout

    def loss_fn(params):
      params, _ = self.optimizer.stop_frozen((params, None))
      stats = self.statistics(params, batch)
      return stats["ce_sum"] / jnp.maximum(stats["tokens"], 1.0), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = keep_if_finite(state.apply_gradients(grads, self.config.ema_decay), state, ok)
    metrics = {"loss": loss, "perplexity": jnp.exp(loss),
               "accuracy": stats["correct_sum"] / jnp.maximum(stats["tokens"], 1.0),
               "target_tokens": stats["tokens"], "grad_norm": grad_norm,
               "lr": self.optimizer.schedule(state.step),
               "nonfinite": (~ok).astype(jnp.int32)}
    return new_state, metrics

  def _restore_eval_params(self, context, workdir: str):
    return evaluators.restore_task_params(self, context, workdir)

  def evaluate_checkpoint(self, context, workdir: str) -> dict:
    """`--mode=eval`: held-out loss, perplexity and next-token accuracy of the latest
    checkpoint's params over config.eval's batches of the eval split; written to
    WORKDIR/eval_STEP.json and TensorBoard (process 0)."""
    step, params = self._restore_eval_params(context, workdir)
    writer = metric_logging.create_writer(workdir)
    evaluator = self.evaluator(context, writer, workdir)
    scalars = evaluator.evaluate({"params": params}, step)
    writer.close()
    results = {"step": step, "num_tokens": evaluator.num_tokens,
               **{k.removeprefix("eval/"): v for k, v in scalars.items()}}
    if jax.process_index() == 0:
      with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"eval of step {step} on {evaluator.num_tokens} target tokens: loss "
          f"{results['loss']:.4f}, perplexity {results['perplexity']:.2f}, accuracy "
          f"{results['accuracy']:.4f}")
    return results

  def generate(self, context, workdir: str, prompt: str, **sampling_args) -> str:
    """`--mode=generate`: the continuation of `prompt` by the latest checkpoint's params
    (see `text_generation.generate_text` for the sampling arguments)."""
    _, params = self._restore_eval_params(context, workdir)
    if sampling_args.get("temperature") is None:
      sampling_args["temperature"] = 0.0  # greedy unless asked
    return text_generation.generate_text(self.model, params, self.tokenizer, prompt,
                                         seed=self.config.seed, **sampling_args)
