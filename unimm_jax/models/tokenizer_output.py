"""The value every tokenizer model returns, so one tokenizer task can train them all."""
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TokenizerOutput:
  """Output of a tokenizer's forward pass.

  Attributes:
    recon: (b, h, w, 3) reconstruction in [-1, 1] (approximately; not clipped).
    codes: integer codes, model-specific shape, e.g. (b, h', w', g) for UniWeTok.
    latents: (b, h', w', d) the quantized latents fed to the decoder.
    aux: dict of scalars and statistics. Loss terms are scalars under their own names
      (e.g. `token_entropy`, `codebook_entropy`, `commitment`); statistics such as
      `code_usage` (g,) are logged but never weighted into the loss.
    pre_quant: (b, h', w', d) the encoder output before quantization (UniWeTok's U_G, which
      pre-distillation reads), or None for tokenizers without one.
  """
  recon: jax.Array
  codes: jax.Array
  latents: jax.Array
  aux: dict[str, Any]
  pre_quant: Any = None
