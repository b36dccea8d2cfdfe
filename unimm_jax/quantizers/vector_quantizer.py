"""Plain vector quantization against a learned codebook (taming's VectorQuantizer2).

Facts from the code that Chameleon's tokenizer was trained and released with (taming-
transformers' `VectorQuantizer2`, as copied into the authors' chameleon vqgan.py, and
transformers' `ChameleonVQVAEVectorQuantizer`, which computes the same thing):
- distances are squared L2 written out as |z|^2 + |e|^2 - 2 z.e over the flattened
  (b * h * w, d) latents, and the code is their argmin; on ties torch's argmin returns the
  first index, and so does `jnp.argmin`;
- the quantized vector is the codebook row of the code, passed straight through:
  zq = z + sg(e[code] - z), so the gradient w.r.t. z is the identity;
- the embedding loss, with beta = 0.25:
    legacy=True  (the default there, and what Chameleon's tokenizer and transformers use):
        mean((sg(zq) - z)^2) + beta * mean((zq - sg(z))^2)
    legacy=False (taming's fix of the misplaced beta):
        beta * mean((sg(zq) - z)^2) + mean((zq - sg(z))^2)
  Both have the value (1 + beta) * mean((zq - z)^2); they differ only in how strongly the
  encoder (first term, the commitment) and the codebook (second term) are pulled;
- the codebook starts uniform in [-1/K, 1/K] for K codes.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _uniform_codebook_init(key, shape, dtype=jnp.float32):
  """U(-1/K, 1/K) for a (K, d) codebook, as taming initialises it."""
  bound = 1.0 / shape[0]
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """(n, d) latents, (K, d) codebook -> (n, K) float32 |z|^2 + |e|^2 - 2 z.e."""
  z, codebook = z.astype(jnp.float32), codebook.astype(jnp.float32)
  cross = jnp.einsum('nd,kd->nk', z, codebook, precision=_HIGHEST)
  return (jnp.sum(jnp.square(z), axis=1, keepdims=True)
          + jnp.sum(jnp.square(codebook), axis=1)[None, :] - 2.0 * cross)


def embedding_loss(z: jax.Array, zq: jax.Array, beta: float, legacy: bool) -> jax.Array:
  """taming's VQ loss of latents z and their codebook rows zq (any equal shapes)."""
  sg = jax.lax.stop_gradient
  commitment = jnp.mean(jnp.square(sg(zq) - z))  # pulls the encoder
  codebook = jnp.mean(jnp.square(zq - sg(z)))  # pulls the codebook
  if legacy:
    return commitment + beta * codebook
  return beta * commitment + codebook


def code_statistics(codes: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
  """Scalars `code_usage` (fraction of the codebook used by `codes`) and `code_perplexity`
  (exp entropy of their histogram, 1 for one code, K at best) of integer codes (...)."""
  histogram = jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  frequency = histogram / codes.size
  safe = jnp.where(frequency > 0, frequency, 1.0)  # 0 log 0 = 0
  return {'code_usage': jnp.mean(histogram > 0, dtype=jnp.float32),
          'code_perplexity': jnp.exp(-jnp.sum(frequency * jnp.log(safe)))}


class VectorQuantizer(nn.Module):
  """Nearest-codebook-row quantizer; param `embedding` (K, d), logical axes (codebook, -).

  Attributes:
    codebook_size: K, the number of codes.
    embed_dim: d, the width of a code vector and of the latents.
    beta: weight inside the embedding loss (see the module docstring).
    legacy: which term beta weights (see the module docstring).
  """
  codebook_size: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(_uniform_codebook_init, ('codebook', None)),
        (self.codebook_size, self.embed_dim), jnp.float32)

  def __call__(self, z: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """Quantizes z with a straight-through gradient.

    Training and evaluation compute the same function (no EMA codebook, no dead-code
    restarts); `train` is part of the shared quantizer interface.

    Args:
      z: (b, ..., d) latents (any float dtype; the math runs in float32).
      train: unused; see above.
    Returns:
      quantized: (b, ..., d) float32 codebook rows, gradient w.r.t. z the identity.
      codes: (b, ..., 1) int32 indices in [0, K) (one code per latent cell).
      losses: `embedding`, the float32 scalar VQ loss (weighted by config.loss.embedding).
      stats: scalars `code_usage`, `code_perplexity` of the batch and `quantization_mse`,
        mean((zq - z)^2).
    """
    del train
    chex.assert_axis_dimension(z, -1, self.embed_dim)
    z = z.astype(jnp.float32)
    flat = z.reshape(-1, self.embed_dim)
    codes = jnp.argmin(squared_distances(flat, self.embedding), axis=1).astype(jnp.int32)
    zq = jnp.take(self.embedding, codes, axis=0).reshape(z.shape)
    losses = {'embedding': embedding_loss(z, zq, self.beta, self.legacy)}
    stats = jax.lax.stop_gradient({**code_statistics(codes, self.codebook_size),
                                   'quantization_mse': jnp.mean(jnp.square(zq - z))})
    quantized = z + jax.lax.stop_gradient(zq - z)
    return quantized, codes.reshape(*z.shape[:-1], 1), losses, stats

  def codes_to_quantized(self, codes: jax.Array) -> jax.Array:
    """Codes (b, ..., 1) integers in [0, K) -> (b, ..., d) float32 codebook rows."""
    chex.assert_axis_dimension(codes, -1, 1)
    return jnp.take(self.embedding, codes[..., 0].astype(jnp.int32), axis=0)
