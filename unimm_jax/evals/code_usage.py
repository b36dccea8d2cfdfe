"""Codebook usage and perplexity over a whole evaluation set (host side, numpy).

One histogram per codebook: a group of a binary GQ / LFQ quantizer (codes (..., g) in
[0, 2^d')) or a level of a residual VQ (codes (..., L) in [0, K)). For codebook j with
counts c_jk over N tokens:
  usage_j      = #{k : c_jk > 0} / K                 (fraction of the codebook ever used)
  perplexity_j = exp(-sum_k p_jk ln p_jk), p = c / N  (1 for a collapsed codebook, K at best)
The quantizers report the same two numbers per batch; these are over every batch seen, which
is what usage means for a tokenizer (a code unused in one batch may well be used in the next).
"""
import numpy as np


class CodeUsage:
  """Accumulates code histograms of (..., n) codes, n groups or levels, batch after batch.

  Args:
    codebook_size: K codes per group or level: 2 ** d' for GQ groups of d' bits, the
      codebook size for RVQ levels. The histogram is dense, (n, K) int64.
  """

  def __init__(self, codebook_size: int):
    if codebook_size < 1:
      raise ValueError(f"CodeUsage: codebook_size must be positive, got {codebook_size}")
    self.codebook_size = codebook_size
    self.counts = None  # (n, K) int64 once the first batch arrives

  def update(self, codes) -> None:
    """Adds a batch of integer codes (..., n); the last axis indexes groups or levels."""
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f"CodeUsage.update: codes must be integers, got {codes.dtype}")
    if codes.ndim < 1:
      raise ValueError("CodeUsage.update: codes need a last axis of groups or levels")
    n = codes.shape[-1]
    if self.counts is not None and n != self.counts.shape[0]:
      raise ValueError(f"CodeUsage.update: {n} groups/levels, earlier batches had "
                       f"{self.counts.shape[0]}")
    if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
      raise ValueError(f"CodeUsage.update: codes span [{codes.min()}, {codes.max()}], "
                       f"outside [0, {self.codebook_size})")
    # One bincount for all codebooks: codebook j's codes are shifted into [j K, (j + 1) K).
    flat = codes.reshape(-1, n).astype(np.int64) + np.arange(n) * self.codebook_size
    counts = np.bincount(flat.ravel(), minlength=n * self.codebook_size)
    counts = counts.reshape(n, self.codebook_size)
    self.counts = counts if self.counts is None else self.counts + counts

  def _probabilities(self) -> np.ndarray:
    if self.counts is None or self.counts[0].sum() == 0:
      raise ValueError("CodeUsage: no codes seen yet")
    return self.counts / self.counts.sum(axis=1, keepdims=True)

  def usage(self) -> np.ndarray:
    """(n,) fraction of each codebook used at least once."""
    return np.mean(self._probabilities() > 0, axis=1)

  def perplexity(self) -> np.ndarray:
    """(n,) exp of the entropy (nats) of each codebook's code histogram, in [1, K]."""
    p = self._probabilities()
    plogp = p * np.log(np.where(p > 0, p, 1.0))  # unused codes give 0 log 1: 0 log 0 = 0
    return np.exp(-plogp.sum(axis=1))

  def result(self) -> dict[str, np.ndarray]:
    """{'code_usage': (n,), 'code_perplexity': (n,)}, the names the quantizers log per batch."""
    return {"code_usage": self.usage(), "code_perplexity": self.perplexity()}
