"""Frechet distance between Gaussian fits of features (FID), host side in float64.

The distance is the one pytorch-fid computes (`calculate_frechet_distance` in
src/pytorch_fid/fid_score.py, itself from TTUR's fid.py):

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 sigma2))

with scipy.linalg.sqrtm; when that square root is not finite (a singular product), it is
retried on (sigma1 + eps I)(sigma2 + eps I) with eps = 1e-6; a complex root keeps its real
part, unless the imaginary part of its diagonal exceeds 1e-3, which is an error.
Statistics are the mean and the unbiased covariance (np.cov with rowvar=False) of (n, d)
features; `FeatureStatistics` gives the same from features that arrive in batches.
"""
import warnings

import numpy as np
from scipy import linalg

_EPS = 1e-6


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1, mu2: (d,) means.
    sigma1, sigma2: (d, d) covariances.
  Returns:
    The squared distance d^2 above, as a Python float (FID when the inputs are pool3
    statistics of InceptionV3).
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"frechet_distance: means differ in shape, {mu1.shape} vs {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"frechet_distance: covariances {sigma1.shape} and {sigma2.shape} do not "
                     f"match means of shape {mu1.shape}")

  # A rank-deficient product (fewer samples than dimensions) is the common case; scipy warns
  # about it, but only a non-finite root needs the retry below.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"frechet_distance: singular product of covariances; adding {_EPS} to "
                  "their diagonals", RuntimeWarning, stacklevel=2)
    offset = np.eye(sigma1.shape[0]) * _EPS
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError("frechet_distance: sqrtm has an imaginary component of "
                       f"{np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance of features.

  Args:
    features: (n, d) with n >= 2.
  Returns:
    mu (d,) and sigma (d, d), float64.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"statistics: expected (n, d) features with n >= 2, got {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


class FeatureStatistics:
  """Running mean and covariance of (b, d) feature batches, equal to `statistics` of them all.

  Batches are merged with Chan et al.'s pairwise update (count, mean, and the centred
  sum of outer products M2), all in float64; unlike a raw sum of x x^T this loses no
  precision when the mean is large next to the spread.
  """

  def __init__(self):
    self.count = 0
    self._mean = None
    self._m2 = None

  def update(self, features: np.ndarray) -> None:
    """Adds a (b, d) batch; b may be 1."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise ValueError(f"FeatureStatistics.update: expected (b, d), got {features.shape}")
    if self._mean is not None and features.shape[1] != self._mean.shape[0]:
      raise ValueError(f"FeatureStatistics.update: feature size {features.shape[1]}, "
                       f"earlier batches had {self._mean.shape[0]}")
    b = features.shape[0]
    if b == 0:
      return
    batch_mean = features.mean(axis=0)
    centred = features - batch_mean
    batch_m2 = centred.T @ centred
    if self._mean is None:
      self.count, self._mean, self._m2 = b, batch_mean, batch_m2
      return
    total = self.count + b
    delta = batch_mean - self._mean
    self._mean = self._mean + delta * (b / total)
    self._m2 = self._m2 + batch_m2 + np.outer(delta, delta) * (self.count * b / total)
    self.count = total

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """mu (d,) and unbiased sigma (d, d) of every feature seen so far (needs >= 2)."""
    if self.count < 2:
      raise ValueError(f"FeatureStatistics: need at least 2 features, have {self.count}")
    return self._mean.copy(), self._m2 / (self.count - 1)
