"""Frechet distance against scipy written out here, closed forms, and streaming statistics."""
import warnings

import numpy as np
import pytest
import scipy.linalg

from unimm_jax.evals.fid import FeatureStatistics, frechet_distance, statistics

RNG = np.random.default_rng(0)


def _scipy_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """The usual formula, step by step: sqrtm of the product, eps retry, real part."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _features(n, d, scale=1.0, shift=0.0):
  mixing = RNG.standard_normal((d, d)) * scale / np.sqrt(d)
  return RNG.standard_normal((n, d)) @ mixing + shift


@pytest.mark.parametrize("n1, n2, d", [(200, 300, 16), (10, 7, 32)])  # full rank; rank-deficient
def test_frechet_distance_matches_scipy(n1, n2, d):
  mu1, s1 = statistics(_features(n1, d))
  mu2, s2 = statistics(_features(n2, d, scale=1.5, shift=0.3))
  got = frechet_distance(mu1, s1, mu2, s2)
  assert isinstance(got, float)
  np.testing.assert_allclose(got, _scipy_frechet(mu1, s1, mu2, s2), rtol=1e-9, atol=1e-6)


def test_frechet_distance_closed_form_for_diagonal_covariances():
  a, b = RNG.uniform(0.1, 2.0, 8), RNG.uniform(0.1, 2.0, 8)
  mu1, mu2 = RNG.standard_normal(8), RNG.standard_normal(8)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want,
                             rtol=1e-12)
  mu, sigma = statistics(_features(100, 12))
  np.testing.assert_allclose(frechet_distance(mu, sigma, mu, sigma), 0.0, atol=1e-9)


def test_singular_product_retries_with_eps():
  # sqrtm of the nilpotent [[0, 1], [0, 0]] is infinite; the eps-shifted product has a root.
  mu = np.zeros(2)
  s1, s2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
  with pytest.warns(RuntimeWarning, match="singular product"):
    got = frechet_distance(mu, s1, mu, s2)
  np.testing.assert_allclose(got, _scipy_frechet(mu, s1, mu, s2), rtol=1e-9, atol=1e-6)


def test_large_imaginary_part_is_an_error_and_shapes_are_checked():
  with pytest.raises(ValueError, match="imaginary component"):
    frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="means differ"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="do not match"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_statistics_is_mean_and_unbiased_covariance():
  feats = _features(50, 6).astype(np.float32)
  mu, sigma = statistics(feats)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, feats.astype(np.float64).mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
  with pytest.raises(ValueError, match="n >= 2"):
    statistics(feats[:1])


def test_streaming_statistics_equal_one_shot():
  # A large mean next to a small spread: raw sums of x x^T would lose most digits here.
  feats = _features(103, 24, scale=0.01, shift=1e4).astype(np.float32)
  stream = FeatureStatistics()
  for start, stop in ((0, 1), (1, 1), (1, 33), (33, 34), (34, 103)):
    stream.update(feats[start:stop])
  assert stream.count == 103
  mu, sigma = stream.statistics()
  mu_ref, sigma_ref = statistics(feats)
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-13)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-10 * np.abs(sigma_ref).max())
  np.testing.assert_allclose(frechet_distance(mu, sigma, mu_ref, sigma_ref), 0.0, atol=1e-10)


def test_streaming_statistics_reject_bad_batches():
  stream = FeatureStatistics()
  stream.update(np.zeros((1, 4)))
  with pytest.raises(ValueError, match="need at least 2"):
    stream.statistics()
  with pytest.raises(ValueError, match="feature size 5"):
    stream.update(np.zeros((2, 5)))
  with pytest.raises(ValueError, match=r"expected \(b, d\)"):
    stream.update(np.zeros(4))
