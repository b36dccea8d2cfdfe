"""Image quality metrics in numpy (host side, float64)."""
import numpy as np


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
