"""Image quality metrics in numpy (host side, float64).

SSIM follows scikit-image 0.26 (`skimage/metrics/_structural_similarity.py`), channel by
channel with `channel_axis=-1`, vectorised here over the batch and the channels:
- local statistics come from a separable filter over h and w only, with scipy.ndimage's
  'reflect' boundary (half-sample symmetric: d c b a | a b c d);
- gaussian_weights=True is Wang et al. (2004) as skimage gives it for `gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False`: a Gaussian of sigma 1.5 truncated at 3.5 sigma
  (radius int(3.5 * 1.5 + 0.5) = 5, an 11-tap window) and population covariances;
- gaussian_weights=False is skimage's default: a 7x7 uniform window and sample covariances
  (scaled by n / (n - 1), n = 49);
- K1 = 0.01, K2 = 0.03, C1 = (K1 R)^2, C2 = (K2 R)^2 with R = data_range;
- the SSIM map is cropped by (win_size - 1) // 2 on every spatial border before the mean,
  so the window never reaches past the image; the result is the mean over channels.
"""
import numpy as np
from scipy import ndimage

_K1, _K2 = 0.01, 0.03
_SIGMA = 1.5
_TRUNCATE = 3.5
_UNIFORM_WIN = 7


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
  """Peak signal-to-noise ratio per image, in dB.

  Args:
    x, y: (b, h, w, c) or (h, w, c) images with values spanning `data_range`
      (1.0 for [0, 1], 2.0 for [-1, 1]).
  Returns:
    (b,) PSNR values, or a scalar for single images; inf where x == y.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.shape != y.shape:
    raise ValueError(f"psnr: shapes differ, {x.shape} vs {y.shape}")
  mse = np.mean(np.square(x - y), axis=(-3, -2, -1))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range ** 2 / mse)


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0,
         gaussian_weights: bool = True) -> np.ndarray:
  """Mean structural similarity per image, as scikit-image computes it (see module doc).

  Args:
    x, y: (b, h, w, c) or (h, w, c) images with values spanning `data_range`
      (1.0 for [0, 1], 2.0 for [-1, 1]); h and w at least the window size (11 or 7).
    gaussian_weights: True for Wang et al.'s 11-tap Gaussian window with population
      covariances; False for a 7x7 uniform window with sample covariances.
  Returns:
    (b,) SSIM values, or a scalar for single images.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.shape != y.shape:
    raise ValueError(f"ssim: shapes differ, {x.shape} vs {y.shape}")
  if x.ndim not in (3, 4):
    raise ValueError(f"ssim: expected (b, h, w, c) or (h, w, c), got shape {x.shape}")
  spatial = (x.ndim - 3, x.ndim - 2)
  if gaussian_weights:
    win_size = 2 * int(_TRUNCATE * _SIGMA + 0.5) + 1
    cov_norm = 1.0

    def local_mean(a):
      return ndimage.gaussian_filter(a, _SIGMA, mode="reflect", truncate=_TRUNCATE,
                                     axes=spatial)
  else:
    win_size = _UNIFORM_WIN
    n = win_size ** 2
    cov_norm = n / (n - 1)

    def local_mean(a):
      return ndimage.uniform_filter(a, win_size, mode="reflect", axes=spatial)
  h, w = x.shape[spatial[0]], x.shape[spatial[1]]
  if min(h, w) < win_size:
    raise ValueError(f"ssim: image {h}x{w} is smaller than the {win_size}x{win_size} window")

  ux, uy = local_mean(x), local_mean(y)
  vx = cov_norm * (local_mean(x * x) - ux * ux)
  vy = cov_norm * (local_mean(y * y) - uy * uy)
  vxy = cov_norm * (local_mean(x * y) - ux * uy)
  c1 = (_K1 * data_range) ** 2
  c2 = (_K2 * data_range) ** 2
  ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)
              / ((ux * ux + uy * uy + c1) * (vx + vy + c2)))
  pad = (win_size - 1) // 2
  cropped = ssim_map[..., pad:h - pad, pad:w - pad, :]
  # Equal-sized channels, so the mean of per-channel means is the mean over (h, w, c).
  return cropped.mean(axis=(-3, -2, -1))
