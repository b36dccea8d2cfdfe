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

from unimm_jax.convert import pretrained
from unimm_jax.data.mllm_sequence import ImageSlots, SpecialIds
from unimm_jax.models import llm
from unimm_jax.nn import masks


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

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

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
    """(step_fn, initial state, outputs per image) for image generation; with a CFG scale
    other than 1 the step reads two streams (conditional, unconditional)."""

  @abc.abstractmethod
  def render(self, params: dict, frozen: dict, outputs: jax.Array, state: Any) -> jax.Array:
    """Generated outputs (b, n) and the final step state -> images (b, H, W, 3) in [-1, 1]."""
