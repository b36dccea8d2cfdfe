"""Code usage and perplexity against closed forms."""
import numpy as np
import pytest

from unimm_jax.evals.code_usage import CodeUsage


def test_closed_forms_per_group():
  # GQ with d' = 3 (K = 8), g = 3 groups over 16 tokens:
  # group 0 cycles through all 8 codes (uniform), group 1 always emits code 5,
  # group 2 emits code 0 twelve times and code 7 four times.
  tokens = 16
  codes = np.stack([np.arange(tokens) % 8, np.full(tokens, 5),
                    np.where(np.arange(tokens) < 12, 0, 7)], axis=-1).reshape(2, 2, 4, 3)
  usage = CodeUsage(2 ** 3)
  usage.update(codes)
  result = usage.result()
  np.testing.assert_allclose(result["code_usage"], [1.0, 1 / 8, 2 / 8])
  p, q = 12 / 16, 4 / 16
  np.testing.assert_allclose(result["code_perplexity"],
                             [8.0, 1.0, np.exp(-(p * np.log(p) + q * np.log(q)))], rtol=1e-12)


def test_accumulates_across_batches_like_one_histogram():
  # RVQ codes (b, h, w, L), K = 5, L = 4: batches of uneven sizes, including an empty one.
  rng = np.random.default_rng(0)
  k, levels = 5, 4
  probs = rng.dirichlet(np.ones(k), size=levels)
  codes = np.stack([rng.choice(k, size=(9, 3, 2), p=probs[j]) for j in range(levels)], axis=-1)
  streamed = CodeUsage(k)
  for chunk in (codes[:1], codes[1:1], codes[1:5], codes[5:]):
    streamed.update(chunk.astype(np.int32))
  counts = np.stack([np.bincount(codes[..., j].ravel(), minlength=k) for j in range(levels)])
  np.testing.assert_array_equal(streamed.counts, counts)
  p = counts / counts.sum(axis=1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    entropy = -np.nansum(p * np.log(p), axis=1)
  np.testing.assert_allclose(streamed.perplexity(), np.exp(entropy), rtol=1e-12)
  np.testing.assert_allclose(streamed.usage(), (counts > 0).mean(axis=1))


def test_single_code_per_level_and_full_codebook_bounds():
  usage = CodeUsage(4)
  usage.update(np.array([[0, 3], [0, 2], [0, 1], [0, 0]]))
  np.testing.assert_allclose(usage.usage(), [0.25, 1.0])
  np.testing.assert_allclose(usage.perplexity(), [1.0, 4.0])


def test_rejects_bad_codes():
  usage = CodeUsage(4)
  with pytest.raises(ValueError, match="no codes seen"):
    usage.usage()
  with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
    usage.update(np.array([[0, 4]]))
  with pytest.raises(ValueError, match=r"codes span \[-1"):
    usage.update(np.array([[-1, 0]]))
  with pytest.raises(ValueError, match="must be integers"):
    usage.update(np.array([[0.0, 1.0]]))
  usage.update(np.zeros((2, 3), np.int64))
  with pytest.raises(ValueError, match="2 groups/levels, earlier batches had 3"):
    usage.update(np.zeros((2, 2), np.int64))
  with pytest.raises(ValueError, match="codebook_size must be positive"):
    CodeUsage(0)
