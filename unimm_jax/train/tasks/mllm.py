"""The MLLM task: one unified system (config.system.name) trained on image-text conversations.

A step embeds the packed batch's text, lets the system fill its image slots
(`UnifiedSystem.embed`), runs the LLM with the mask the system asks for (causal within each
packed example by default), and adds, each weighted by config.loss[name]:
  ce       next-token cross entropy over supervised positions (answers and end-of-turn ids,
           and for generation examples the image's BOI, size, code, EOR and EOI tokens; the
           data's loss_mask), weight config.loss.ce (1 when absent; BitDance's MLLM
           weights text 0.01 against its image term's 1);
  z_loss   logsumexp(logits)^2 over the same positions (Chameleon's z-loss);
  <the system's generation terms>  e.g. a flow or bit-diffusion head on hidden states.
Metrics split the CE into text targets and image-code targets.

Stages (the paper's stage I / II) are config variants: param groups freeze the LLM or the
ViT's embeddings and scale learning rates (`config.optim.groups`, paths like 'llm/...').

Modes: train, eval (held-out loss; on built-in scenes also answer accuracy per question type
and the generation check rate), chat (answer about an image), generate (images from text),
plan. See `unimm_jax.train.tasks.mllm_eval` and `unimm_jax.inference.mllm_inference`.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unimm_jax.data import mllm_data
from unimm_jax.data import text_tokenizer
from unimm_jax.models import llm
from unimm_jax.systems import unified_systems
from unimm_jax.train import optimizers
from unimm_jax.train.tasks import mllm_eval
from unimm_jax.train.train_state import TrainState, keep_if_finite

_TOKEN_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask", "discrete_index",
                 "continuous_index")


def shifted_targets(tokens: jax.Array) -> jax.Array:
  """(b, L) ids -> (b, L): target[t] = tokens[t + 1]; the last position gets its own id
  (its loss_mask is 0)."""
  return jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)


class MLLMTask:
  """Trains `unified_systems.build(config)` on `config.data` (unimm_jax/data/mllm_data.py)."""
  throughput_unit = "tokens"
  kind = "a unified multimodal model"
  modes = ("train", "eval", "chat", "generate", "edit", "plan")
  generate_flags = ("prompt", "output", "num_images", "cfg_scale", "temperature", "top_k",
                    "top_p")
  generate_required = ("prompt",)

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.system = unified_systems.build(config)
    self.optimizer = optimizers.Optimizer(config.optim, config.train.steps)

  @functools.cached_property
  def tokenizer(self) -> text_tokenizer.TextTokenizer:
    """The text tokenizer, read when data or inference first needs it (`--mode=plan`
    needs none), checked against the system's image and special ids."""
    if not self.config.data.tokenizer:
      raise ValueError("config.data.tokenizer is empty: set it to the LLM checkpoint's "
                       "tokenizer directory (or 'byte' / 'scene_words')")
    tokenizer = text_tokenizer.load_tokenizer(self.config.data.tokenizer)
    self.system.ids.check(tokenizer, self.system.image_slots)
    return tokenizer

  # ---- what the trainer asks ------------------------------------------------------------

  def batch_ndims(self) -> dict[str, int]:
    ndims = {name: 2 for name in _TOKEN_FIELDS}
    ndims["images"] = 5
    if self.system.image_slots.anyres is not None:
      ndims["vit_tiles"] = 6
    return ndims

  def global_batch_sizes(self) -> list[int]:
    return [self.config.train.batch_size]

  def count_items(self, host_batch: dict) -> int:
    return int((host_batch["segment_ids"] > 0).sum())

  def train_iterator(self, seed: int):
    del seed  # the data order comes from config.data.shuffle_seed
    return mllm_data.build_mllm_train_iterator(
        self.config.data, self.tokenizer, self.system.ids, self.system.image_slots,
        global_batch_size=self.config.train.batch_size)

  def init_params(self, rng: jax.Array) -> dict:
    return self.system.init_params(rng)

  def initial_weights(self) -> dict | None:
    return self.system.initial_weights()

  def init(self, rng: jax.Array) -> TrainState:
    return TrainState.create(self.init_params(rng), self.optimizer.tx,
                             ema=self.config.ema_decay > 0)

  @functools.cache
  def load_frozen(self) -> dict:
    """The system's frozen networks, read once: the trainer's step and the evaluator (and
    chat / generate) share them."""
    return self.system.load_frozen()

  def frozen_shapes(self) -> dict:
    return self.system.frozen_shapes()

  def batch_shapes(self) -> list[dict]:
    """The global train batch as ShapeDtypeStructs (for --mode=plan)."""
    b, length = self.config.train.batch_size, self.config.data.seq_len
    p, slots = self.config.data.images_per_row, self.system.image_slots
    shapes = {name: jax.ShapeDtypeStruct((b, length), jnp.int32) for name in _TOKEN_FIELDS}
    shapes["loss_mask"] = jax.ShapeDtypeStruct((b, length), jnp.float32)
    shapes["images"] = jax.ShapeDtypeStruct((b, p, slots.image_size, slots.image_size, 3),
                                            jnp.float32)
    if slots.anyres is not None:
      s = slots.anyres.tile_size
      shapes["vit_tiles"] = jax.ShapeDtypeStruct((b, p, 1 + slots.anyres.max_tiles, s, s, 3),
                                                 jnp.float32)
    return [shapes]

  def check(self, abstract_state: TrainState) -> None:
    """Start-up checks from shapes: param groups match, and every loss term has a weight
    in config.loss and every weight a term (named)."""
    self.optimizer.check((abstract_state.params, None))
    batch = self.batch_shapes()[0]
    terms = jax.eval_shape(
        lambda p, f, b: self._terms(p, f, b, jax.random.key(0), train=True)[0],
        abstract_state.params, self.frozen_shapes(), batch)
    weighted = set(self.config.loss.keys())
    for name in sorted(set(terms) - {"ce"} - weighted):
      raise ValueError(f"loss term {name!r} has no weight: set config.loss.{name}")
    for name in sorted(weighted - set(terms)):
      if self.config.loss[name]:
        raise ValueError(f"config.loss.{name}={self.config.loss[name]} weights a term that "
                         f"nothing produces (terms: {sorted(terms)})")

  # ---- the step -------------------------------------------------------------------------

  def _terms(self, params, frozen, batch, rng, *, train: bool):
    """(unweighted loss terms, statistics) of one batch."""
    system = self.system
    embed_rng, dropout_rng, head_rng = jax.random.split(rng, 3)
    embedded = system.embed(params, frozen, batch, train=train, rng=embed_rng)
    rngs = {"dropout": dropout_rng} if train and system.llm.config.dropout_rate else {}
    moe = system.llm.config.num_experts > 0
    # An MoE with several routers (Bailing's multi_gate) routes image slots through the
    # image router (gate id 1), text through the text router (0).
    image_slot = (batch["discrete_index"] >= 0) | (batch["continuous_index"] >= 0)
    gate_ids = image_slot.astype(jnp.int32) if system.llm.config.num_routers > 1 else None
    hidden = system.llm.apply({"params": params["llm"]}, inputs_embeds=embedded.embeds,
                              positions=batch["positions"], segment_ids=batch["segment_ids"],
                              mask=system.attention(batch), rngs=rngs, gate_ids=gate_ids,
                              mutable=["intermediates"] if moe else False,
                              method=system.llm.hidden_states)
    moe_stats = {}
    if moe:
      hidden, sown = hidden
      moe_stats = llm.moe_stats(sown)
    logits = system.llm.apply({"params": params["llm"]}, hidden, method=system.llm.logits)
    targets = shifted_targets(embedded.tokens)
    mask = batch["loss_mask"].astype(jnp.float32)
    next_is_code = (shifted_targets(batch["discrete_index"]) >= 0).astype(jnp.float32)
    if not system.codes_in_vocabulary:  # a generation head predicts those
      mask = mask * (1.0 - next_is_code)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    image = next_is_code * mask
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    terms = {"ce": jnp.sum(ce * mask) / count,
             "z_loss": jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * mask) / count}
    generation = system.generation_losses(params, hidden, batch, embedded, head_rng,
                                          train=train)
    terms.update(generation)
    if moe:  # the load-balance term of the experts (unimm_jax/nn/moe.py)
      terms["router_aux"] = moe_stats["router_aux_loss"]
    stats = {"ce_sum": jnp.sum(ce * mask), "correct_sum": jnp.sum(correct * mask),
             "tokens": jnp.sum(mask), "image_ce_sum": jnp.sum(ce * image),
             "image_tokens": jnp.sum(image),
             **{mllm_eval.GENERATION_PREFIX + k: v for k, v in generation.items()}}
    return terms, stats

  def statistics(self, params, frozen, batch) -> dict:
    """Masked sums over a batch (eval): ce, correct, tokens, image ce and image tokens, and
    the system's generation terms (means, under mllm_eval.GENERATION_PREFIX)."""
    return self._terms(params, frozen, batch, jax.random.key(0), train=False)[1]

  def train_step(self, state: TrainState, frozen: dict, batch: dict, rng: jax.Array):
    """One update on ce + sum of weighted terms. Returns (state, metrics)."""
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      params, _ = self.optimizer.stop_frozen((params, None))
      terms, stats = self._terms(params, frozen, batch, rng, train=True)
      loss = self.config.loss.get("ce", 1.0) * terms["ce"] + sum(
          self.config.loss[name] * value for name, value in terms.items() if name != "ce")
      return loss, (terms, stats)

    (loss, (terms, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = keep_if_finite(state.apply_gradients(grads, self.config.ema_decay), state, ok)
    text_tokens = jnp.maximum(stats["tokens"] - stats["image_tokens"], 1.0)
    metrics = {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()},
               "ce_text": (stats["ce_sum"] - stats["image_ce_sum"]) / text_tokens,
               "ce_image": stats["image_ce_sum"] / jnp.maximum(stats["image_tokens"], 1.0),
               "accuracy": stats["correct_sum"] / jnp.maximum(stats["tokens"], 1.0),
               "target_tokens": stats["tokens"], "grad_norm": grad_norm,
               "lr": self.optimizer.schedule(state.step),
               "nonfinite": (~ok).astype(jnp.int32)}
    return new_state, metrics

  # ---- evaluation and inference ----------------------------------------------------------

  def evaluator(self, context, writer, workdir: str) -> mllm_eval.MLLMEvaluator:
    return mllm_eval.MLLMEvaluator(self, context, writer, workdir)

  def evaluate_checkpoint(self, context, workdir: str) -> dict:
    return mllm_eval.evaluate_checkpoint(self, context, workdir)

  def chat(self, context, workdir: str, image_path: str, prompt: str) -> str:
    return mllm_eval.chat(self, context, workdir, image_path, prompt)

  def generate(self, context, workdir: str, prompt: str, *, output: str | None,
               **options) -> str:
    if not output:
      raise ValueError("--mode=generate of an MLLM writes PNGs: pass --output=FOLDER")
    return mllm_eval.generate_to_folder(self, context, workdir, prompt, output=output,
                                        seed=self.config.seed, **options)

  def edit(self, context, workdir: str, image_path: str, instructions: list[str], *,
           output: str | None, **options) -> str:
    if not output:
      raise ValueError("--mode=edit writes every round's image: pass --output=FOLDER")
    return mllm_eval.edit_to_folder(self, context, workdir, image_path, instructions,
                                    output=output, seed=self.config.seed, **options)
