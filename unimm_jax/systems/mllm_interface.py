"""What a unified system gives the MLLM task and the generation loop.

A unified system is one LLM plus the modules that bring images into its sequence and turn
its outputs back into images. The MLLM task (`unimm_jax.train.tasks.mllm`), its evaluator
and `unimm_jax.inference.generation_loop` reach a system only through this interface, so
adding one (EvoTok, Ming-UniVision, BitDance) is a system file, its models and a config,
with no branch on its name in the task or the loop.

Params: one tree `{'llm': ..., <the system's own modules>: ...}`, trained under
`config.optim.groups` (paths such as `llm/layers_0/mlp/up_proj/kernel`, `vit/...`).
Frozen networks (a pretrained tokenizer) are a separate tree from `load_frozen()`, placed
on the mesh by the trainer and never updated.

Batches follow the packed layout of `unimm_jax.data.mllm_sequence` (tokens with image
slots, `discrete_index`, `continuous_index`, `images`, `vit_tiles`, ...).
"""
import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm_jax.convert import pretrained
from unimm_jax.data.mllm_sequence import ImageSlots, SpecialIds
from unimm_jax.inference import tokenizer_run
from unimm_jax.models import llm
from unimm_jax.nn import masks
from unimm_jax.systems import tokenizers


@dataclasses.dataclass(frozen=True)
class Embedded:
  """A sequence ready for the LLM.

  embeds: (b, L, d) input embeddings, image slots filled.
  tokens: (b, L) int32 ids with discrete image codes filled in (what the LM head is trained
    to predict one position earlier); slots without an id (continuous, or codes that are not
    vocabulary ids) keep the pad id.
  image_targets: what a generation head is trained to predict at each slot (EvoTok: the
    (b, L, L_pix) codes of each code slot), for the system's `generation_losses`; None when
    the LM head predicts the images.
  """
  embeds: jax.Array
  tokens: jax.Array
  image_targets: jax.Array | None = None


class FrozenTokenizer:
  """Mixin for a system whose tokenizer is frozen (a unified MLLM, a class-to-image
  generator): `self.vq` (built from config.vq) read from config.system.tokenizer_path (a
  tokenizer workdir, the authors' state dict .safetensors, or '' = random variables for
  plumbing tests, with a warning) as the frozen network 'vq'. `tokenizer_name` names it in
  that warning; `tokenizer_image_size()` is the image side it is built for."""
  tokenizer_name = 'tokenizer'

  def tokenizer_image_size(self) -> int:
    return self.image_slots.image_size

  def _init_vq(self, rng: jax.Array) -> dict:
    """A random tokenizer's variables (unboxed)."""
    return tokenizers.random_variables(self.vq, self.config.vq, self.tokenizer_image_size(),
                                       rng)

  def frozen_shapes(self) -> dict:
    return {'vq': jax.eval_shape(self._init_vq, jax.random.key(0))}

  def load_frozen(self) -> dict:
    path, vq_config = self.config.system.tokenizer_path, self.config.vq
    if not path:
      variables = tokenizers.random_frozen(self._init_vq, self.config.seed, self.tokenizer_name)
    elif path.endswith('.safetensors'):
      variables = tokenizers.spec(vq_config).import_weights(path, vq_config)
    else:
      variables = tokenizer_run.load_matching_run(path, vq_config)
    expected = jax.tree.map(lambda x: x.shape, self.frozen_shapes()['vq'])
    if jax.tree.map(lambda x: x.shape, dict(variables)) != expected:
      raise ValueError(f'{path}: the tokenizer\'s variables do not have the shapes config.vq '
                       'gives')
    return {'vq': jax.tree.map(np.asarray, dict(variables))}


def shift_left(x: jax.Array) -> jax.Array:
  """(b, L, ...) -> (b, L, ...): row t holds row t + 1 (the last row repeats)."""
  return jnp.concatenate([x[:, 1:], x[:, -1:]], axis=1)


def slot_predictors(batch: dict, most: int, lead: int = 1) -> tuple[jax.Array, jax.Array]:
  """The positions whose token `lead` places on is a generation slot, where a generation
  head reads the hidden state (lead 1: the next token; BitDance's blocks: P): (order
  (b, most) int, those positions first and in order (a stable sort), valid (b, most)
  float32, 1 on them). `most` bounds them per row (the row's images times the slots per
  image), so a head runs on those positions only. A slot is a target only where the data
  supervises it (the loss mask one position before it)."""
  targets = (batch['discrete_index'] >= 0) & (shift_right(batch['loss_mask']) > 0)
  predicts = jnp.concatenate([targets[:, lead:], jnp.zeros_like(targets[:, :lead])], axis=1)
  order = jnp.argsort((~predicts).astype(jnp.int32), axis=1, stable=True)[:, :most]
  return order, jnp.take_along_axis(predicts, order, axis=1).astype(jnp.float32)


def shift_right(x: jax.Array) -> jax.Array:
  """(b, L, ...) -> (b, L, ...): row t holds row t - 1 (row 0 is zeros)."""
  return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def take_slots(values: jax.Array, index: jax.Array) -> jax.Array:
  """values (b, n, ...) gathered at a batch's slot index (b, L) -> (b, L, ...); negative
  indices (no slot) read row 0, which the caller masks out."""
  return jax.vmap(lambda v, i: v[i])(values, jnp.maximum(index, 0))


class UnifiedSystem(abc.ABC):
  """Built from the whole config; `self.llm` is the shared `unimm_jax.models.llm.LLM`.

  codes_in_vocabulary: True when image codes are vocabulary ids that the LM head predicts
  (UniToken); False when a generation head predicts them (EvoTok's depth transformer): the
  task's text cross entropy then leaves out the positions whose next token is a code slot.
  """
  llm: llm.LLM
  ids: SpecialIds
  image_slots: ImageSlots
  codes_in_vocabulary: bool = True
  # Outputs an image step writes at once (`generation_loop.run`'s block): BitDance's P.
  generation_block: int = 1

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def _build_llm_with_markers(self) -> None:
    """self.ids from config.tokens (pad, bos, eos, and the image markers boi, eoi that the
    LM head writes) and self.llm from config.model, every special id inside its vocabulary
    (systems whose image tokens are not vocabulary ids: EvoTok, Ming-UniVision)."""
    t = self.config.tokens
    self.ids = SpecialIds(pad=t.pad, bos=t.bos, eos=t.eos, boi=t.boi, eoi=t.eoi)
    self.llm = llm.LLM(llm.config_from_fields(self.config.model))
    top = max(t.pad, t.bos, t.eos, t.boi, t.eoi)
    if top >= self.llm.config.vocab_size:
      raise ValueError(f'config.model.vocab_size={self.llm.config.vocab_size} cannot hold '
                       f'the special ids (largest {top}, config.tokens)')

  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> dict:
    """Trainable params (boxed with logical names): {'llm': ..., ...}."""

  def load_frozen(self) -> dict:
    """Frozen networks' params (e.g. a pretrained tokenizer), read from their files."""
    return {}

  def initial_weights(self) -> dict | None:
    """Pretrained sources a fresh run starts some trainable params from
    (`unimm_jax.train.initial_weights`): here the LLM, from config.model.init_path (a
    transformers checkpoint of config.model's architecture: Chameleon, Qwen2.5); systems
    add their own networks. None when nothing starts from weights."""
    path = self.config.model.get('init_path', '')
    if not path:
      return None
    return {'llm': pretrained.starting_sources(path, self.llm.config,
                                               where='config.model.init_path',
                                               scan_layers=self.llm.config.scan_layers)}

  def frozen_shapes(self) -> dict:
    """`load_frozen()`'s tree as ShapeDtypeStructs, without reading weights."""
    return {}

  @abc.abstractmethod
  def embed(self, params: dict, frozen: dict, batch: dict, *, train: bool,
            rng: jax.Array | None) -> Embedded:
    """Fills the image slots of `batch` (packed or left-padded prompt layout)."""

  def attention(self, batch: dict) -> masks.MaskSpec | None:
    """Which tokens see which; None is causal (within segments when packed)."""
    del batch
    return None

  def generation_losses(self, params: dict, hidden: jax.Array, batch: dict,
                        embedded: Embedded, rng: jax.Array | None, *,
                        train: bool) -> dict[str, jax.Array]:
    """Loss terms of a generation head on the LLM's hidden states (b, L, d), by name.

    Systems that generate image tokens with the LM head (UniToken) return {}: the task's
    next-token CE already covers them. The task weights each term by config.loss[name].
    `train` switches the head's dropout on (with `rng`).
    """
    del params, hidden, batch, embedded, rng, train
    return {}

  @abc.abstractmethod
  def answer_step(self, params: dict) -> tuple[Any, Any]:
    """(step_fn, initial state) for greedy text answers (`generation_loop.run`)."""

  @abc.abstractmethod
  def image_step(self, params: dict, frozen: dict, *, cfg_scale: float, temperature: float,
                 top_k: int | None, top_p: float | None,
                 batch_size: int) -> tuple[Any, Any, int]:
    """(step_fn, initial state, loop steps per image) for image generation (each step
    writes `generation_block` tokens); with a CFG scale other than 1 the step reads two
    streams (conditional, unconditional), three when editing (+ the stream that keeps the
    images and drops the round's instruction, before the unconditional one)."""

  @abc.abstractmethod
  def render(self, params: dict, frozen: dict, outputs: jax.Array, state: Any) -> jax.Array:
    """Generated outputs (b, n) and the final step state -> images (b, H, W, 3) in [-1, 1]."""

  # In-context editing (`inference.mllm_inference.MLLMRunner.edit`): a system whose images
  # live in its context as latents sets `edits_in_context` and gives the two methods below;
  # `embed` then reads batch['image_latents'] (b, P, n, d) in place of batch['images'], so
  # a generated image goes back into the context without a pixel round trip.
  edits_in_context: bool = False

  def image_latents(self, frozen: dict, images: jax.Array) -> jax.Array:
    """images (b, P, H, W, 3) -> the latents their slots are built from (b, P, n, d)."""
    raise NotImplementedError(f'{type(self).__name__} does not edit in context')

  def generated_latents(self, state: Any) -> jax.Array:
    """The final `image_step` state -> the generated image's latents (b, n, d)."""
    raise NotImplementedError(f'{type(self).__name__} does not edit in context')
