"""Residual vector quantization with EMA codebooks (RQ-VAE style, as EvoTok trains it).

Facts from the authors' code (EvoTok evotok/tokenizer/quantizer/shared_rq_quantizer.py,
`VQEmbedding` and `SharedResidualQuantizer`; settings from evotok/scripts/
train_evotok_siglip256.sh and evotok/tokenizer/vq_model/evotok.py):
- one codebook per level (16 levels of 32768 x 32), initialised N(0, 1) (torch's Embedding);
  the EMA embedding sums start as a copy of it, the EMA cluster sizes at 0;
- greedy residual selection on detached features: level i takes the code nearest (squared
  L2, |r|^2 + |e|^2 - 2 r.e, no normalisation) to x minus the rows chosen at levels < i;
- the codebooks are not trained by gradients. Per level and training step, in this order:
  counts and per-code sums of that level's residual inputs over the whole global batch
  (all-reduced); cluster_size = decay * cluster_size + (1 - decay) * counts (decay 0.99),
  every step; embed_sum = decay * embed_sum + (1 - decay) * sums only once the step counter
  (the number of earlier updates) has reached vq_warmup = 2000; then dead codes
  (cluster_size < 1, after this step's EMA) get embed_sum = a random residual input of the
  level from the global batch (the same on every host) and cluster_size = 1; finally
  codebook = embed_sum / max(1, N (cluster_size + eps) / (N + K eps)), N = sum of
  cluster_size, eps = 1e-5 (Laplace smoothing);
- restart vectors: K rows drawn without replacement from the batch's residual inputs; when
  the batch has fewer than K vectors, from ceil(K / n) copies of it, every copy shifted by
  uniform noise in [0, 0.01 / sqrt(d)) per channel;
- the step's lookup and its outputs use the codebook from before the step's update;
- straight-through separately on each partial sum: q_d = x + sg(sum_{i<d} e_i - x) for
  d = L_pix = 4 and L_sem = 16;
- commitment = mean over all L levels of mean((x - sg(cumsum_i))^2), weight 1.
Deviations: the authors' code never updates the embedding EMA when vq_warmup = 0 (its
guard is `vq_warmup > 0 and step >= vq_warmup`); here 0 means "no warm-up". Their training
runs the lookup under bf16 autocast; here it is float32 with precision HIGHEST.
"""
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.quantizers.vector_quantizer import code_statistics

_HIGHEST = jax.lax.Precision.HIGHEST
STATE_COLLECTION = 'quantizer_state'  # codebooks, cluster_size, embed_sum, step
RESTART_RNG = 'codebook_restart'  # rng stream of the dead-code replacement vectors
LAPLACE_EPS = 1e-5
DEAD_CODE_THRESHOLD = 1.0
RESTART_NOISE = 0.01  # scale of the noise on tiled restart vectors, divided by sqrt(d)
# The lookup's search: codes per sub-block (the gathered rows of its second pass are
# (n, SUB_BLOCK, d)) and the default chunk, codes per distance block of its scan. One
# sub-block per chunk was fastest on XLA:CPU at K = 32768, d = 32: 64 beat 32 and 128, and
# chunks of 4096 (64 sub-blocks) were ~3x slower there; accelerators may prefer larger chunks.
SUB_BLOCK = 64
LOOKUP_CHUNK = SUB_BLOCK


def _nearest_in_codebook(codebook: jax.Array, r: jax.Array, chunk_size: int) -> jax.Array:
  """(K, d) codebook, (n, d) residuals -> (n,) int32 nearest code, lowest index on ties.

  No (n, K) distance matrix ever exists (at K = 32768 it would be 128 KiB a token). Codes
  form sub-blocks of at most SUB_BLOCK; a scan over chunks of about `chunk_size` codes (whole
  sub-blocks) keeps a running minimum and the sub-block it came from, (n,) each; then each
  token searches its winning sub-block alone, from its gathered rows (n, SUB_BLOCK, d).
  Memory: an (n, chunk) distance block plus those rows. When chunk = sub-block, the chunk's
  matmul and its min fuse into one kernel on XLA:CPU, the fastest path there (an argmin over
  distances is a scalar loop many times slower). The first sub-block holding the minimum
  wins, then the first code in it.
  """
  num_codes, dim = codebook.shape
  sub = min(SUB_BLOCK, chunk_size, num_codes)
  chunk = -(-min(chunk_size, num_codes) // sub) * sub
  per_chunk, num_chunks = chunk // sub, -(-num_codes // chunk)
  pad = num_chunks * chunk - num_codes
  norms = jnp.sum(jnp.square(codebook), axis=1)
  # Padded rows get an infinite distance, so they never win.
  norms = jnp.pad(norms, (0, pad), constant_values=jnp.inf).reshape(num_chunks, chunk)
  blocks = jnp.pad(codebook, ((0, pad), (0, 0))).reshape(num_chunks, chunk, dim)
  n = r.shape[0]

  # |r|^2 is the same for every code of a token, so both passes leave it out.
  def running_minimum(carry, block):
    best, best_sub = carry
    rows, row_norms, index = block
    distances = row_norms[None, :] - 2.0 * jnp.einsum('nd,kd->nk', r, rows, precision=_HIGHEST)
    sub_minima = jnp.min(distances.reshape(n, per_chunk, sub), axis=2)
    local = jnp.argmin(sub_minima, axis=1).astype(jnp.int32)  # first of tied sub-blocks
    minimum = jnp.take_along_axis(sub_minima, local[:, None], axis=1)[:, 0]
    better = minimum < best  # strict: an earlier chunk keeps its ties
    return (jnp.where(better, minimum, best),
            jnp.where(better, index * per_chunk + local, best_sub)), None

  start = (jnp.full((n,), jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32))
  (_, winner), _ = jax.lax.scan(
      running_minimum, start, (blocks, norms, jnp.arange(num_chunks, dtype=jnp.int32)))
  rows = blocks.reshape(-1, sub, dim)[winner]
  cross = jnp.einsum('nd,nkd->nk', r, rows, precision=_HIGHEST)
  within = jnp.argmin(norms.reshape(-1, sub)[winner] - 2.0 * cross, axis=1).astype(jnp.int32)
  return winner * sub + within


def _residual_search(codebooks: jax.Array, x: jax.Array, chunk_size: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Greedy residual lookup of flat x (n, d) in codebooks (L, K, d).

  Returns codes (n, L) int32, the residual inputs of each level (L, n, d) (x minus the rows
  of the levels before) and the partial sums (L, n, d), entry i = sum of levels <= i.
  """
  def level(carry, codebook):
    residual, total = carry
    index = _nearest_in_codebook(codebook, residual, chunk_size)
    row = jnp.take(codebook, index, axis=0)
    return (residual - row, total + row), (index, residual, total + row)

  x = x.astype(jnp.float32)
  _, (codes, residuals, partials) = jax.lax.scan(
      level, (x, jnp.zeros_like(x)), codebooks.astype(jnp.float32))
  return codes.T, residuals, partials


def nearest_codes(codebooks: jax.Array, x: jax.Array, *, chunk_size: int = LOOKUP_CHUNK
                  ) -> tuple[jax.Array, jax.Array]:
  """Greedy residual quantization: codebooks (L, K, d), x (..., d) -> indices (..., L) int32
  and quantized (..., d) float32, the sum over levels of the chosen rows. Level i quantizes
  x minus the rows of levels < i; ties go to the lowest index (as torch's argmin).
  Memory is O(n * (chunk_size + 64 d)), not O(n K): see `_nearest_in_codebook`.
  """
  chex.assert_rank(codebooks, 3)
  chex.assert_axis_dimension(x, -1, codebooks.shape[-1])
  codes, _, partials = _residual_search(codebooks, x.reshape(-1, x.shape[-1]), chunk_size)
  return codes.reshape(*x.shape[:-1], -1), partials[-1].reshape(x.shape)


def restart_candidates(key: jax.Array, vectors: jax.Array, num_codes: int) -> jax.Array:
  """(num_codes, d) rows drawn without replacement from vectors (n, d); when n < num_codes,
  from ceil(num_codes / n) copies of them, each row plus uniform [0, 0.01 / sqrt(d)) noise."""
  n, dim = vectors.shape
  copies = -(-num_codes // n)
  perm_key, noise_key = jax.random.split(key)
  picks = jax.random.permutation(perm_key, n * copies)[:num_codes]
  chosen = jnp.take(vectors, picks % n, axis=0)
  if copies > 1:
    noise = jax.random.uniform(noise_key, chosen.shape, jnp.float32)
    chosen = chosen + noise * (RESTART_NOISE / math.sqrt(dim))
  return chosen


def ema_update(cluster_size, embed_sum, step, residuals, codes, candidates, *, decay: float,
               eps: float, vq_warmup: int, dead_threshold: float):
  """One EMA step of all levels (see the module docstring for the order).

  Args:
    cluster_size: (L, K) EMA counts. embed_sum: (L, K, d) EMA sums. step: () int32 updates
      done so far. residuals: (L, n, d) residual inputs of each level. codes: (n, L) chosen
      codes. candidates: (L, K, d) replacement vectors for dead codes.
  Returns:
    codebooks (L, K, d), cluster_size, embed_sum, and the number of codes restarted (float).
  """
  num_levels, num_codes = cluster_size.shape
  level = jnp.arange(num_levels)[:, None]
  # On global (sharded) arrays under jit these scatter-adds cover the whole global batch:
  # XLA adds the all-reduce that the authors' code does with dist.all_reduce.
  counts = jnp.zeros((num_levels, num_codes), jnp.float32).at[level, codes.T].add(1.0)
  sums = jnp.zeros(embed_sum.shape, jnp.float32).at[level, codes.T].add(residuals)
  cluster_size = decay * cluster_size + (1 - decay) * counts
  embed_sum = jnp.where(step >= vq_warmup, decay * embed_sum + (1 - decay) * sums, embed_sum)
  dead = cluster_size < dead_threshold
  embed_sum = jnp.where(dead[..., None], candidates, embed_sum)
  cluster_size = jnp.where(dead, 1.0, cluster_size)
  total = jnp.sum(cluster_size, axis=1, keepdims=True)
  # Laplace smoothing, clamped at 1 so rarely used codes are not blown up.
  smoothed = jnp.maximum(total * (cluster_size + eps) / (total + num_codes * eps), 1.0)
  return (embed_sum / smoothed[..., None], cluster_size, embed_sum,
          jnp.sum(dead, dtype=jnp.float32))


class ResidualQuantizer(nn.Module):
  """L-level residual VQ whose codebooks are EMA state, not params.

  Collection `quantizer_state` (STATE_COLLECTION; carried by the train state and
  checkpointed, updated only by `__call__(train=True)` when it is mutable):
    codebooks (L, K, d) float32, logical axes (None, codebook, None), init N(0, 1);
    cluster_size (L, K) float32 EMA code counts, axes (None, codebook), init 0;
    embed_sum (L, K, d) float32 EMA sums of the residuals per code, init = codebooks;
    step () int32 number of updates so far.
  Training needs the rng stream `codebook_restart` (RESTART_RNG) for dead-code restarts;
  pass the same key on every host so the replacement vectors agree.

  Attributes:
    num_levels: L. codebook_size: K. code_dim: d.
    partial_depths: the partial sums returned straight-through, in this order.
    decay: EMA decay. eps: Laplace smoothing of the cluster sizes.
    vq_warmup: updates before the embedding sums start to follow the batch.
    dead_code_threshold: codes whose EMA cluster size is below it are restarted (0: never).
    chunk_size: codes per distance block of the lookup (see `_nearest_in_codebook`).
  """
  num_levels: int = 16
  codebook_size: int = 32768
  code_dim: int = 32
  partial_depths: tuple[int, ...] = (4, 16)
  decay: float = 0.99
  eps: float = LAPLACE_EPS
  vq_warmup: int = 2000
  dead_code_threshold: float = DEAD_CODE_THRESHOLD
  chunk_size: int = LOOKUP_CHUNK

  def setup(self):
    if not all(0 < depth <= self.num_levels for depth in self.partial_depths):
      raise ValueError(f'partial_depths {self.partial_depths} must lie in [1, {self.num_levels}]')
    shape = (self.num_levels, self.codebook_size, self.code_dim)
    rows, sizes = (None, 'codebook', None), (None, 'codebook')
    init_codebooks = nn.with_logical_partitioning(nn.initializers.normal(1.0), rows)
    self.codebooks = self.variable(
        STATE_COLLECTION, 'codebooks', lambda: init_codebooks(self.make_rng('params'), shape))
    self.cluster_size = self.variable(
        STATE_COLLECTION, 'cluster_size',
        nn.with_logical_partitioning(jnp.zeros, sizes), shape[:2], jnp.float32)
    self.embed_sum = self.variable(
        STATE_COLLECTION, 'embed_sum',
        nn.with_logical_partitioning(lambda: jnp.copy(self.codebooks.value), rows))
    self.step = self.variable(STATE_COLLECTION, 'step', jnp.zeros, (), jnp.int32)

  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[tuple[jax.Array, ...], jax.Array, dict[str, jax.Array],
                          dict[str, jax.Array]]:
    """Quantizes x; in training with a mutable `quantizer_state`, also updates the codebooks.

    Args:
      x: (b, ..., d) latents (any float dtype; the math runs in float32).
      train: update the EMA state (needs the collection mutable and the `codebook_restart`
        rng); outputs always use the codebooks from before the update.
    Returns:
      quantized: tuple, one (b, ..., d) float32 array per entry of partial_depths (in that
        order): the sum of the first `depth` levels' rows, gradient w.r.t. x the identity.
      codes: (b, ..., L) int32 in [0, K), level-major in the last axis.
      losses: `commitment`, mean over the L levels of mean((x - sg(partial sum))^2).
      stats: `code_usage` and `code_perplexity` (L,) per level over the batch;
        `quantization_mse` () at full depth; `dead_codes_restarted` () summed over levels
        (0 when the state is not updated).
    """
    chex.assert_axis_dimension(x, -1, self.code_dim)
    x = x.astype(jnp.float32)
    flat = x.reshape(-1, self.code_dim)
    sg = jax.lax.stop_gradient
    codes, residuals, partials = _residual_search(
        self.codebooks.value, sg(flat), self.chunk_size)
    # Every level averages over the same n * d entries, so the mean of the per-level means is
    # the mean over all of them.
    losses = {'commitment': jnp.mean(jnp.square(flat[None] - sg(partials)))}
    quantized = tuple(x + sg(partials[depth - 1].reshape(x.shape) - x)
                      for depth in self.partial_depths)
    restarted = jnp.zeros((), jnp.float32)
    if train and self.is_mutable_collection(STATE_COLLECTION) and not self.is_initializing():
      restarted = self._update_state(residuals, codes)
    usage = jax.vmap(functools.partial(code_statistics, codebook_size=self.codebook_size),
                     in_axes=1)(codes)
    stats = sg({**usage, 'quantization_mse': jnp.mean(jnp.square(partials[-1] - flat)),
                'dead_codes_restarted': restarted})
    return quantized, codes.reshape(*x.shape[:-1], self.num_levels), losses, stats

  def _update_state(self, residuals: jax.Array, codes: jax.Array) -> jax.Array:
    """Applies one EMA step to the state; returns the number of codes restarted."""
    keys = jax.random.split(self.make_rng(RESTART_RNG), self.num_levels)
    candidates = jax.vmap(restart_candidates, in_axes=(0, 0, None))(
        keys, residuals, self.codebook_size)
    codebooks, cluster_size, embed_sum, restarted = ema_update(
        self.cluster_size.value, self.embed_sum.value, self.step.value, residuals, codes,
        candidates, decay=self.decay, eps=self.eps, vq_warmup=self.vq_warmup,
        dead_threshold=self.dead_code_threshold)
    self.codebooks.value = codebooks
    self.cluster_size.value = cluster_size
    self.embed_sum.value = embed_sum
    self.step.value = self.step.value + 1
    return restarted

  def codes_to_quantized(self, codes: jax.Array, depth: int | None = None) -> jax.Array:
    """Codes (..., m) of the first m <= L levels -> (..., d) float32, the sum of the rows of
    the first `depth` levels (default m), added in level order as the forward pass does."""
    m = codes.shape[-1]
    depth = m if depth is None else depth
    if not 0 < depth <= m <= self.num_levels:
      raise ValueError(f'need 0 < depth ({depth}) <= codes per token ({m}) <= {self.num_levels}')
    codebooks = self.codebooks.value
    total = jnp.take(codebooks[0], codes[..., 0].astype(jnp.int32), axis=0)
    for level in range(1, depth):
      total = total + jnp.take(codebooks[level], codes[..., level].astype(jnp.int32), axis=0)
    return total
