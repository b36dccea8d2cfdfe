"""Group-wise lookup-free binary quantization (GQ, WeTok / UniWeTok; LFQ when groups == 1).

Facts from the authors' code (WeTok src/WeTok/modules/vqvae/lookup_free_quantize.py and
BitDance imagenet_gen/src/gfq.py, `GFQ` and `entropy_loss`):
- channels are grouped group-major: channel c = group * d' + i, i.e. (..., g * d') ->
  (..., g, d');
- q = +1 where u > 0, else -1 (exactly 0 -> -1); straight-through q = u + sg(q - u);
- code of a group = sum_i [q_i > 0] * 2^i: channel i of the group is bit i, little-endian
  (the group's first channel is the least significant bit); codebook row k has entry i equal
  to +1 if bit i of k is set, else -1;
- logits = 2 * <u, code> over the 2^d' codes of a group, p = softmax(logits / 0.01);
- token entropy = mean over (batch, positions, groups) of -sum_k p log p;
- codebook entropy: p averaged over batch, positions and groups into one 2^d' vector pbar,
  then -sum pbar log(pbar + 1e-5), not normalised; entropy loss = token entropy -
  codebook_entropy_ratio * codebook entropy (ratio 1 in their code);
- commitment = mean((u - sg(q))^2).
The 2^(g*d') joint codebook is never built: a token's index is its g group codes.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

CODEBOOK_ENTROPY_EPS = 1e-5


def binary_sign(u: jax.Array) -> jax.Array:
  """+1 where u > 0, else -1 (so sign(0) = -1), in u's dtype."""
  return jnp.where(u > 0, 1, -1).astype(u.dtype)


def code_matrix(bits: int) -> jax.Array:
  """(2^bits, bits) float32 matrix of all sign vectors; entry (k, i) = +1 iff bit i of k is set."""
  k = jnp.arange(2 ** bits, dtype=jnp.int32)[:, None]
  set_bits = (k >> jnp.arange(bits, dtype=jnp.int32)) & 1
  return (2 * set_bits - 1).astype(jnp.float32)


def _entropy_terms(u: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Token and codebook entropy of grouped latents u (n, g, d'), in float32."""
  # HIGHEST: TPUs otherwise multiply float32 in one bf16 pass, and an error of 1e-3 in u
  # becomes ~1 nat in logits / 0.01.
  logits = 2.0 * jnp.einsum('ngd,kd->ngk', u.astype(jnp.float32), code_matrix(u.shape[-1]),
                            precision=jax.lax.Precision.HIGHEST)
  log_p = jax.nn.log_softmax(logits / temperature, axis=-1)
  p = jnp.exp(log_p)
  token_entropy = jnp.mean(-jnp.sum(p * log_p, axis=-1))
  p_bar = jnp.mean(p, axis=(0, 1))
  codebook_entropy = -jnp.sum(p_bar * jnp.log(p_bar + CODEBOOK_ENTROPY_EPS))
  return token_entropy, codebook_entropy


def _code_statistics(codes: jax.Array, signs: jax.Array, bits: int) -> dict[str, jax.Array]:
  """Per-group usage statistics of codes (n, g) and signs (n, g, d'); not losses."""
  n, g = codes.shape
  histogram = jnp.zeros((g, 2 ** bits), jnp.float32).at[jnp.arange(g)[None, :], codes].add(1.0)
  frequency = histogram / n
  safe = jnp.where(frequency > 0, frequency, 1.0)  # unused codes: 0 * log(1), so 0 log 0 = 0
  plogp = frequency * jnp.log(safe)
  return {
      'code_usage': jnp.mean(histogram > 0, axis=-1, dtype=jnp.float32),
      'code_perplexity': jnp.exp(-jnp.sum(plogp, axis=-1)),
      'bit_mean': jnp.mean(signs.astype(jnp.float32), axis=0),
  }


class BinaryQuantizer(nn.Module):
  """Group-wise binary quantizer with entropy and commitment terms; no parameters.

  Attributes:
    groups: g, the number of groups per token.
    group_bits: d', bits per group; each group has 2^d' codes.
    entropy_temperature: softmax temperature of the entropy terms (0.01 in the authors' code).
    codebook_entropy_ratio: weight of the codebook entropy inside the entropy loss.
  """
  groups: int
  group_bits: int
  entropy_temperature: float = 0.01
  codebook_entropy_ratio: float = 1.0

  @property
  def codebook_size(self) -> int:
    """Codes per group, 2^d'."""
    return 2 ** self.group_bits

  def __call__(self, u: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """Quantizes u with a straight-through gradient.

    The quantizer behaves identically in training and evaluation (its output is deterministic
    and its loss terms are computed in both, so eval logs the same keys); `train` is part of
    the shared quantizer interface. Under jit, terms the caller ignores are never computed.
    The entropy logits are a (n, g, 2^d') array, so d' should stay small (8 in UniWeTok).

    Args:
      u: (b, ..., g * d') latents (any dtype; the loss math runs in float32).
      train: unused; see above.
    Returns:
      quantized: (b, ..., g * d') float32 +-1 values whose gradient w.r.t. u is the identity.
      codes: (b, ..., g) int32 group codes in [0, 2^d').
      losses: float32 scalars `entropy` (token entropy - codebook_entropy_ratio * codebook
        entropy) and `commitment`.
      stats: scalars `token_entropy`, `codebook_entropy`; `code_usage` (g,) fraction of codes
        used in the batch, `code_perplexity` (g,) exp entropy of the batch's code histogram,
        `bit_mean` (g, d') mean sign of each bit.
    """
    del train
    chex.assert_axis_dimension(u, -1, self.groups * self.group_bits)
    u = u.astype(jnp.float32)
    lead = u.shape[:-1]
    grouped = u.reshape(-1, self.groups, self.group_bits)
    signs = binary_sign(grouped)
    quantized = grouped + jax.lax.stop_gradient(signs - grouped)
    codes = self._signs_to_codes(signs)

    token_entropy, codebook_entropy = _entropy_terms(grouped, self.entropy_temperature)
    losses = {
        'entropy': token_entropy - self.codebook_entropy_ratio * codebook_entropy,
        'commitment': jnp.mean(jnp.square(grouped - jax.lax.stop_gradient(signs))),
    }
    stats = jax.lax.stop_gradient({'token_entropy': token_entropy,
                                   'codebook_entropy': codebook_entropy,
                                   **_code_statistics(codes, signs, self.group_bits)})
    return quantized.reshape(u.shape), codes.reshape(*lead, self.groups), losses, stats

  def _signs_to_codes(self, signs: jax.Array) -> jax.Array:
    """(..., d') +-1 -> (...,) int32, bit i of the code = [sign_i > 0]."""
    weights = 2 ** jnp.arange(self.group_bits, dtype=jnp.int32)
    return jnp.sum((signs > 0).astype(jnp.int32) * weights, axis=-1)

  def codes_to_quantized(self, codes: jax.Array) -> jax.Array:
    """Inverse of the code assignment.

    Args:
      codes: (b, ..., g) integer group codes in [0, 2^d').
    Returns:
      (b, ..., g * d') float32 +-1 latents.
    """
    chex.assert_axis_dimension(codes, -1, self.groups)
    shifts = jnp.arange(self.group_bits, dtype=jnp.int32)
    set_bits = (codes.astype(jnp.int32)[..., None] >> shifts) & 1
    signs = (2 * set_bits - 1).astype(jnp.float32)
    return signs.reshape(*codes.shape[:-1], self.groups * self.group_bits)
