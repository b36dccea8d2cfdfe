"""A closed-form classifier of class-scene images (`scenes.CLASS_NAMES`), for generated ones.

A class-conditional generator asked for class k should draw one object of colour and shape
`CLASS_NAMES[k]` (`scenes.sample_class_scene`). `classify_class_scene` reads both back
without a learned model:

- colour: each pixel takes its nearest palette colour within `max_distance`
  (`scene_checks.palette_labels`); the object's colour is the one with the most pixels.
- shape: the largest 8-connected component of that colour is compared with each shape of
  `scenes.SHAPES` drawn (`scenes.shape_mask`) into the component's bounding box: the shape
  with the highest intersection over union wins. Shapes differ a lot in how they fill
  their box (circle 0.79, square 1.0, triangle 0.5 and bottom-heavy, cross 0.62 with empty
  corners), so the right template overlaps far better than any other.

No object (-1): the component covers less than `min_fraction` of the image (blank
background, noise, where palette-coloured pixels are scattered) or more than
`max_fraction` (a palette-coloured background: the largest class object covers about 0.3),
or no template reaches `min_iou` (a blob of no recognisable shape).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from unimm_jax.data import scenes
from unimm_jax.evals.scene_checks import DEFAULT_MAX_DISTANCE, palette_labels

# The smallest class object (radius 0.2) fills about 0.1 of the image, a little less once
# its anti-aliased rim falls outside `max_distance`.
DEFAULT_MIN_FRACTION = 0.03
DEFAULT_MAX_FRACTION = 0.5
DEFAULT_MIN_IOU = 0.6
# Each shape's half-width and half-height in units of its radius (`scenes.shape_mask`), to
# fit a template's radius to a bounding box.
_HALF_EXTENT = {'circle': (1.0, 1.0), 'square': (0.85, 0.85),
                'triangle': (2.0 * 1.05 / np.sqrt(3.0), 1.05), 'cross': (1.05, 1.05)}
_EIGHT_CONNECTED = np.ones((3, 3), bool)


def _largest_component(mask: np.ndarray) -> np.ndarray:
  """bool (h, w): the largest 8-connected component of `mask` (all False when empty)."""
  components, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
  if count == 0:
    return mask
  sizes = np.bincount(components.ravel())[1:]
  return components == 1 + int(sizes.argmax())


def _shape_ious(component: np.ndarray) -> np.ndarray:
  """float (len(SHAPES),): IoU of `component` (bool (h, w), non-empty) with each shape
  fitted to its bounding box."""
  ys, xs = np.nonzero(component)
  x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
  cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
  # Pixel centres relative to the box centre, in pixels.
  dx = np.arange(component.shape[1])[None, :] + 0.5 - cx
  dy = np.arange(component.shape[0])[:, None] + 0.5 - cy
  ious = []
  for shape in scenes.SHAPES:
    half_w, half_h = _HALF_EXTENT[shape]
    radius = ((x1 - x0) / half_w + (y1 - y0) / half_h) / 4.0
    template = scenes.shape_mask(shape, dx, dy, radius)
    union = np.count_nonzero(template | component)
    ious.append(np.count_nonzero(template & component) / union)
  return np.asarray(ious)


def classify_class_scene(image: np.ndarray, max_distance: float = DEFAULT_MAX_DISTANCE,
                         min_fraction: float = DEFAULT_MIN_FRACTION,
                         max_fraction: float = DEFAULT_MAX_FRACTION,
                         min_iou: float = DEFAULT_MIN_IOU) -> int:
  """The class index (into `scenes.CLASS_NAMES`) of the object in `image`, -1 if none.

  Args:
    image: uint8 (s, s, 3), or float (s, s, 3) in [-1, 1].
    max_distance: how far (RGB) a pixel may be from a palette colour to count as it.
    min_fraction: the smallest object, as a fraction of the image's pixels.
    max_fraction: the largest object, as a fraction of the image's pixels.
    min_iou: the lowest overlap with the best shape template that still counts as a shape.
  """
  labels = palette_labels(image, max_distance)
  counts = np.bincount(labels[labels >= 0], minlength=len(scenes.COLOURS))
  colour = int(counts.argmax())
  component = _largest_component(labels == colour)
  if not min_fraction * labels.size <= np.count_nonzero(component) <= (
      max_fraction * labels.size):
    return -1
  ious = _shape_ious(component)
  if ious.max() < min_iou:
    return -1
  return colour * len(scenes.SHAPES) + int(ious.argmax())


def confusion(images: Sequence[np.ndarray], class_indices: Sequence[int],
              **kwargs) -> np.ndarray:
  """int64 (28, 29): row = wanted class, column = `classify_class_scene` (last: -1).

  `kwargs` go to `classify_class_scene`.
  """
  if len(images) != len(class_indices) or not len(images):
    raise ValueError(f'need one class index per image and at least one image, got '
                     f'{len(images)} images and {len(class_indices)} class indices')
  n = len(scenes.CLASS_NAMES)
  matrix = np.zeros((n, n + 1), np.int64)
  for image, wanted in zip(images, class_indices):
    if not 0 <= wanted < n:
      raise ValueError(f'class index {wanted} is outside [0, {n})')
    matrix[wanted, classify_class_scene(image, **kwargs)] += 1  # -1 is the last column
  return matrix


def class_check_rate(images: Sequence[np.ndarray], class_indices: Sequence[int],
                     **kwargs) -> float:
  """Fraction of `images` classified as their class (`kwargs` as `classify_class_scene`)."""
  matrix = confusion(images, class_indices, **kwargs)
  return float(np.trace(matrix) / matrix.sum())
