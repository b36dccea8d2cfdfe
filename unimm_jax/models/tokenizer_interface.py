"""What every image tokenizer gives the tokenizer task, and what plugs in beside it.

A tokenizer module (built by its spec in `unimm_jax.systems.tokenizers`) offers:
  variables {'params', plus state collections that gradients do not train, e.g. EMA
    codebooks, which `__call__(..., train=True)` updates when they are mutable};
  `__call__(images, *, train) -> TokenizerOutput` with the reconstruction;
  `encode(images, *, train=False) -> TokenizerOutput` without it (recon None);
  `decode(latents, *, train=False) -> (b, h, w, 3)`;
  `codes_to_quantized(codes) -> latents` (discrete tokenizers).
Images are float32 in [-1, 1], NHWC.

The task weights every entry of `losses` by `config.loss[name]`, logs `stats`, and hands
`features` to the training-only modules (`TrainingModule`): networks trained by the
tokenizer's loss beside it but not part of it, neither exported nor run at inference
(UniWeTok's distillation heads and generative prior; EvoTok's teacher alignment, which has
no params of its own: its semantic decoder is part of the tokenizer).
"""
import abc
import dataclasses
from typing import Any

import flax.struct
import jax

# The random streams a tokenizer may draw from when it is applied in training, by name:
# `noise` (a generative decoder's input noise), `dropout`, `codebook_restart` (dead codes of
# an EMA codebook replaced by vectors of the batch), `masking` (MingTok's token masks). The
# tokenizer task supplies them all; a stream added later folds a new index, so the earlier
# streams' keys, and the runs that drew from them, stay as they were.
TRAIN_RNG_STREAMS = ('noise', 'dropout', 'codebook_restart', 'masking')


def train_rngs(rng: jax.Array) -> dict[str, jax.Array]:
  """One key per stream of `TRAIN_RNG_STREAMS` from `rng` (`noise` is `rng` itself)."""
  return {name: rng if i == 0 else jax.random.fold_in(rng, i)
          for i, name in enumerate(TRAIN_RNG_STREAMS)}


@flax.struct.dataclass
class TokenizerOutput:
  """Output of a tokenizer's forward pass.

  Attributes:
    recon: (b, h, w, 3) reconstruction in [-1, 1] (approximately; not clipped); None from
      `encode`.
    codes: integer codes (b, h', w', codes_per_token), or None for a continuous tokenizer.
    latents: (b, h', w', d) what the decoder reads (the quantized latents).
    losses: unweighted float32 scalar loss terms by name (e.g. `entropy`, `commitment`),
      each weighted by config.loss[name].
    stats: statistics by name, logged and never weighted (scalars, and (g,) vectors such as
      `code_usage`, logged per entry and as a mean).
    features: arrays the training-only modules read, by name (UniWeTok: `pre_quant`, the
      encoder output U_G before quantization).
  """
  recon: Any
  codes: Any
  latents: jax.Array
  losses: dict[str, jax.Array]
  stats: dict[str, jax.Array]
  features: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class CodeLayout:
  """How a discrete tokenizer's codes are laid out: `codes_per_token` integers per latent
  cell (binary groups, residual levels; 1 for a plain VQ), each in [0, codebook_size)."""
  codes_per_token: int
  codebook_size: int


class TrainingModule(abc.ABC):
  """A network trained by the tokenizer's loss but not part of the tokenizer.

  Its params live in `TrainState.module_params[name]`, updated by the tokenizer's optimiser
  (param-group paths `modules/<name>/...`), without EMA, and are not exported. It reads a
  forward pass's `TokenizerOutput` (for its `features`), the images and the frozen networks
  it asked for, and returns loss terms (weighted by config.loss[term] like the tokenizer's
  own) and statistics.

  A module that aligns a feature of the tokenizer with a frozen network's names it in
  `aligned_feature` and gives the target with `target(frozen, images)`; `--mode=eval` then
  reports their per-token cosine (at every depth of a residual tokenizer).
  """
  name: str
  aligned_feature: str | None = None

  @abc.abstractmethod
  def init(self, rng: jax.Array, out: TokenizerOutput, images: jax.Array) -> Any:
    """Params for a forward pass like `out` on `images` (shapes only are read)."""

  @abc.abstractmethod
  def __call__(self, params: Any, out: TokenizerOutput, images: jax.Array, frozen: dict,
               rng: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(loss terms, statistics) of one training step."""

  def frozen_shapes(self, images: jax.ShapeDtypeStruct) -> dict:
    """The frozen networks it reads (e.g. a teacher), by name, as boxed ShapeDtypeStructs."""
    del images
    return {}

  def load_frozen(self) -> dict:
    """Those networks' weights, by the same names (read once per run)."""
    return {}

  def target(self, frozen: dict, images: jax.Array) -> jax.Array:
    """What `features[aligned_feature]` is compared with, for `images` (b, h, w, 3)."""
    raise NotImplementedError(f'{type(self).__name__} aligns no feature')
