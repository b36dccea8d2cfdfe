"""Image conversions at the boundary between models ([-1, 1] floats) and files."""
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float images, any shape ending in channels -> uint8 [0, 255]."""
  return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def centre_crop(image: np.ndarray, h: int, w: int) -> np.ndarray:
  """The central (h, w) window of a (H, W, ...) image (the extra row/column goes right/down)."""
  top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
  return image[top:top + h, left:left + w]


def save_png(path: str, image: np.ndarray):
  """Writes a (h, w, 3) uint8 image, creating parent directories."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path)
