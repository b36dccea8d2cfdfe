"""Per-image transforms: decode, colour conversion, crop / resize, flip, normalise.

Every function here works on one image on the host, in numpy; nothing imports jax, so the
grain worker processes that run these stay light.

Resize modes (`data_config.resize_mode`, output always `(image_size, image_size, 3)`):

- `random_crop`: keep the native scale. If the short side is smaller than `image_size` the
  image is first upscaled (aspect kept) so the short side equals `image_size`; then a square
  of side `image_size` is cut at a random position (train) or at the centre (eval).
- `center_crop`: resize (down or up, aspect kept) so the short side equals `image_size`, then
  cut the central square. Only the flip is random in training.
- `resize`: resize the whole image to `image_size x image_size`; the aspect ratio is not kept.

A record that cannot be decoded becomes an `Unreadable` marker instead of raising, so the
pipeline can skip it and count it.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Callable, Union

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ('random_crop', 'center_crop', 'resize')

# Modes whose output does not depend on full-resolution pixels: for JPEG input these may
# decode at a reduced DCT scale (1/2, 1/4, 1/8), which is several times faster on large
# photos. `random_crop` works at native scale, so it always decodes in full.
_DRAFT_MODES = ('center_crop', 'resize')


@dataclasses.dataclass(frozen=True)
class Unreadable:
  """Marker for a record that could not be read or decoded; `reason` says why."""

  reason: str


# What a source yields per index: encoded image bytes, a decoded array, or a marker.
SourceRecord = Union[bytes, np.ndarray, Unreadable]


def as_rgb_uint8(array: np.ndarray) -> np.ndarray:
  """Converts a decoded image to `uint8 (h, w, 3)`.

  Accepts `(h, w)` grey, `(h, w, 1)`, `(h, w, 3)` and `(h, w, 4)` (alpha composited over
  white, so transparent logos do not turn black); dtypes bool, uint8, uint16 and float in
  [0, 1].
  """
  array = np.asarray(array)
  if array.dtype == np.bool_:
    array = array.astype(np.uint8) * 255
  elif array.dtype == np.uint16:
    array = (array >> 8).astype(np.uint8)
  elif np.issubdtype(array.dtype, np.floating):
    array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
  elif array.dtype != np.uint8:
    raise ValueError(f'unsupported image dtype {array.dtype}')
  if array.ndim == 2:
    array = array[:, :, None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f'expected (h, w), (h, w, 1|3|4) image, got shape {array.shape}')
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  if array.shape[-1] == 4:
    alpha = array[:, :, 3:].astype(np.float32) / 255.0
    rgb = array[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.round(rgb).astype(np.uint8)
  return np.ascontiguousarray(array)


def decode_rgb(data: bytes,
               draft_size_for: Callable[[int, int], tuple[int, int]] | None = None
               ) -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, ... anything PIL reads) to `uint8 (h, w, 3)`.

  Args:
    data: the encoded file contents.
    draft_size_for: maps the stored `(width, height)` to the smallest `(width, height)` the
      caller needs; when given and the file is a JPEG, decoding may happen at a reduced
      scale whose size is still at least that in both dimensions.

  Raises:
    Any exception PIL raises for unreadable, truncated or unknown data (the caller turns it
    into an `Unreadable`).
  """
  with Image.open(io.BytesIO(data)) as img:
    if draft_size_for is not None and img.format == 'JPEG':
      img.draft('RGB', draft_size_for(*img.size))
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
      return as_rgb_uint8(np.asarray(img.convert('RGBA')))
    return as_rgb_uint8(np.asarray(img.convert('RGB')))


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize of `uint8 (h, w, 3)` to `(height, width, 3)`; antialiased when shrinking."""
  if image.shape[:2] == (height, width):
    return image
  resized = Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
  return np.asarray(resized)


def _scale_short_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes so that min(h, w) == size, keeping the aspect ratio."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  return _resize(image, max(size, round(h * scale)), max(size, round(w * scale)))


def _crop(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
  """Cuts a `(size, size, 3)` square at a random (rng) or central (rng None) position."""
  h, w = image.shape[:2]
  if rng is None:
    top, left = (h - size) // 2, (w - size) // 2
  else:
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
  return image[top:top + size, left:left + size]


def crop_or_resize(image: np.ndarray, image_size: int, resize_mode: str,
                   rng: np.random.Generator | None) -> np.ndarray:
  """Maps `uint8 (h, w, 3)` to `uint8 (image_size, image_size, 3)` (see module docstring).

  `rng` picks the crop position in `random_crop` mode; None means the central crop.
  """
  if resize_mode == 'resize':
    return _resize(image, image_size, image_size)
  if resize_mode == 'center_crop':
    return _crop(_scale_short_side(image, image_size), image_size, None)
  if resize_mode == 'random_crop':
    if min(image.shape[:2]) < image_size:
      image = _scale_short_side(image, image_size)
    return _crop(image, image_size, rng)
  raise ValueError(f'resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}')


def normalize(image: np.ndarray) -> np.ndarray:
  """`uint8 (..., 3)` in [0, 255] -> `float32` in [-1, 1] (0 -> -1, 255 -> 1 exactly)."""
  return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Record -> crop of side `image_size`; picklable so grain workers can run it.

  Call it as `transform(record, rng)`, the signature of grain's `random_map`. `rng` drives
  the crop position (random_crop mode) and, when `flip` is set, the horizontal flip; with
  `rng=None` the view is deterministic (central crop, no flip), which is the eval view.

  Returns `{'image': float32 (image_size, image_size, 3) in [-1, 1]}`, or `Unreadable` for
  a record that could not be read or decoded. Pixels stay uint8 until the final crop, so
  normalisation touches only `image_size**2` pixels.
  """

  image_size: int
  resize_mode: str
  flip: bool

  def _draft_size(self, width: int, height: int) -> tuple[int, int]:
    """Smallest decode size this resize mode can use without losing output resolution."""
    if self.resize_mode == 'resize':
      return (self.image_size, self.image_size)
    scale = self.image_size / min(width, height)
    return (math.ceil(width * scale), math.ceil(height * scale))

  def __call__(self, record: SourceRecord, rng: np.random.Generator | None):
    if isinstance(record, Unreadable):
      return record
    try:
      if isinstance(record, bytes):
        draft = self._draft_size if self.resize_mode in _DRAFT_MODES else None
        image = decode_rgb(record, draft)
      else:
        image = as_rgb_uint8(record)
      if min(image.shape[:2]) == 0:
        raise ValueError(f'empty image of shape {image.shape}')
      crop = crop_or_resize(image, self.image_size, self.resize_mode, rng)
    # Any failure to turn this one record into pixels (PIL raises OSError, ValueError,
    # SyntaxError, DecompressionBombError, ... depending on the codec) must skip the record,
    # never stop the run.
    except Exception as err:  # pylint: disable=broad-exception-caught
      return Unreadable(f'{type(err).__name__}: {err}')
    if self.flip and rng is not None and rng.random() < 0.5:
      crop = crop[:, ::-1]
    return {'image': normalize(crop)}
