"""PSNR and SSIM against scikit-image's own implementations."""
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from unimm_jax.evals.image_metrics import psnr, ssim

RNG = np.random.default_rng(0)


def _pair(shape, data_range):
  """A smooth image and a noisy copy, both in [0, data_range] (not clipped: skimage isn't)."""
  base = RNG.uniform(0.0, data_range, shape)
  noisy = base + RNG.normal(0.0, 0.1 * data_range, shape)
  return base, noisy


def _skimage_ssim(x, y, data_range, gaussian_weights):
  if gaussian_weights:  # Wang et al.'s setting, as skimage's docstring spells it out
    return structural_similarity(x, y, channel_axis=-1, data_range=data_range,
                                 gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
  return structural_similarity(x, y, channel_axis=-1, data_range=data_range)


SHAPES = [(2, 16, 16, 3), (3, 24, 37, 3), (1, 11, 40, 1), (2, 50, 13, 4)]


@pytest.mark.parametrize("gaussian_weights", [True, False])
@pytest.mark.parametrize("data_range", [1.0, 2.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_ssim_matches_skimage(shape, data_range, gaussian_weights):
  x, y = _pair(shape, data_range)
  got = ssim(x, y, data_range=data_range, gaussian_weights=gaussian_weights)
  want = [_skimage_ssim(a, b, data_range, gaussian_weights) for a, b in zip(x, y)]
  assert got.shape == (shape[0],)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_ssim_single_image_and_identity():
  x, y = _pair((20, 30, 3), 1.0)
  got = ssim(x, y)
  assert np.ndim(got) == 0
  np.testing.assert_allclose(got, _skimage_ssim(x, y, 1.0, True), rtol=0, atol=1e-6)
  np.testing.assert_allclose(ssim(x, x, gaussian_weights=False), 1.0, rtol=0, atol=1e-12)


def test_ssim_float32_input_is_computed_in_float64():
  x, y = _pair((2, 16, 16, 3), 2.0)
  got = ssim(x.astype(np.float32), y.astype(np.float32), data_range=2.0)
  want = [_skimage_ssim(a, b, 2.0, True)
          for a, b in zip(x.astype(np.float32).astype(np.float64),
                          y.astype(np.float32).astype(np.float64))]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_ssim_rejects_bad_shapes():
  with pytest.raises(ValueError, match="shapes differ"):
    ssim(np.zeros((16, 16, 3)), np.zeros((16, 17, 3)))
  with pytest.raises(ValueError, match="smaller than the 11x11 window"):
    ssim(np.zeros((10, 16, 3)), np.zeros((10, 16, 3)))
  with pytest.raises(ValueError, match="smaller than the 7x7 window"):
    ssim(np.zeros((16, 6, 3)), np.zeros((16, 6, 3)), gaussian_weights=False)


@pytest.mark.parametrize("data_range", [1.0, 2.0])
@pytest.mark.parametrize("shape", [(3, 16, 16, 3), (2, 9, 21, 1)])
def test_psnr_matches_skimage(shape, data_range):
  x, y = _pair(shape, data_range)
  got = psnr(x, y, data_range=data_range)
  want = [peak_signal_noise_ratio(a, b, data_range=data_range) for a, b in zip(x, y)]
  assert got.shape == (shape[0],)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  single = psnr(x[0], y[0], data_range=data_range)
  assert np.ndim(single) == 0
  np.testing.assert_allclose(single, want[0], rtol=1e-12)
  assert psnr(x[0], x[0]) == np.inf
