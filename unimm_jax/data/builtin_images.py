"""Images that need no download: scikit-image's sample photos and procedural synthetics.

Builtin photos. Every name in `BUILTIN_NAMES` loads offline from files shipped inside the
scikit-image wheel (checked for scikit-image 0.26: `eagle`, `lily`, `skin`, `brain`,
`kidney` and friends need pooch and a download, so they are not offered). Grey
photos become RGB and the RGBA logo is composited over white.

Splits. `EVAL_NAMES` (`coffee`, `rocket`) are held out: they are the eval set of the builtin
source and asking to train on them is an error, so eval numbers on the builtin source are
always on photos the model never saw. The default train set, `DEFAULT_TRAIN_NAMES`, is the
remaining colour photos, also available as the named set `photos`. A name in
`builtin_names` may be a named set from `NAMED_SETS`; `faces_text` (faces and printed text:
the astronaut's face, the cat's face, `text`, `page`) is the mixture used for annealing.

Synthetic images. `synthetic_image(index, min_size)` draws one of four procedural families
(colour gradient, shapes on a gradient, checkerboard, text-like dashes) from a generator
seeded by the index alone, so image `i` is the same in every process and every run.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from skimage import data as skdata

from unimm_jax.data.transforms import as_rgb_uint8


def _face_of_astronaut() -> np.ndarray:
  """The 192x192 region of `astronaut` around the face (rows 8:200, cols 128:320)."""
  return skdata.astronaut()[8:200, 128:320]


def _face_of_chelsea() -> np.ndarray:
  """The central 300x300 square of `chelsea` (the cat's face fills the photo)."""
  return skdata.chelsea()[:, 75:375]


# name -> loader of the raw array (any layout `as_rgb_uint8` accepts).
_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    'astronaut': skdata.astronaut,
    'astronaut_face': _face_of_astronaut,
    'brick': skdata.brick,
    'camera': skdata.camera,
    'cell': skdata.cell,
    'chelsea': skdata.chelsea,
    'chelsea_face': _face_of_chelsea,
    'clock': skdata.clock,
    'coffee': skdata.coffee,
    'coins': skdata.coins,
    'colorwheel': skdata.colorwheel,
    'grass': skdata.grass,
    'gravel': skdata.gravel,
    'horse': skdata.horse,
    'hubble_deep_field': skdata.hubble_deep_field,
    'immunohistochemistry': skdata.immunohistochemistry,
    'logo': skdata.logo,
    'microaneurysms': skdata.microaneurysms,
    'moon': skdata.moon,
    'motorcycle_left': lambda: skdata.stereo_motorcycle()[0],
    'motorcycle_right': lambda: skdata.stereo_motorcycle()[1],
    'page': skdata.page,
    'retina': skdata.retina,
    'rocket': skdata.rocket,
    'text': skdata.text,
}

BUILTIN_NAMES = tuple(sorted(_LOADERS))

EVAL_NAMES = ('coffee', 'rocket')

DEFAULT_TRAIN_NAMES = (
    'astronaut',
    'chelsea',
    'hubble_deep_field',
    'immunohistochemistry',
    'motorcycle_left',
    'motorcycle_right',
    'retina',
)

NAMED_SETS: dict[str, tuple[str, ...]] = {
    'photos': DEFAULT_TRAIN_NAMES,
    'faces_text': ('astronaut_face', 'chelsea_face', 'text', 'page'),
}


def expand_builtin_names(names) -> tuple[str, ...]:
  """Expands named sets, checks every name, and refuses the held-out eval photos.

  Args:
    names: photo names and/or `NAMED_SETS` keys, as a sequence or as one comma-separated
      string (`'photos'`, `'faces_text,camera'`), the form a command-line override takes.

  Returns:
    The photo names in order, duplicates kept (listing a photo twice doubles its weight).
  """
  if isinstance(names, str):
    names = names.split(',')
  expanded = []
  for name in (n.strip() for n in names):
    expanded.extend(NAMED_SETS.get(name, (name,)))
  unknown = [n for n in expanded if n not in _LOADERS]
  if unknown:
    raise ValueError(
        f'data_config.builtin_names: unknown builtin image(s) {unknown}; available: '
        f'{list(BUILTIN_NAMES)} and named sets {list(NAMED_SETS)}')
  held_out = [n for n in expanded if n in EVAL_NAMES]
  if held_out:
    raise ValueError(
        f'data_config.builtin_names: {held_out} are held out as the builtin eval set '
        f'{list(EVAL_NAMES)} and cannot be trained on')
  if not expanded:
    raise ValueError('data_config.builtin_names is empty')
  return tuple(expanded)


@functools.lru_cache(maxsize=None)
def load_builtin(name: str) -> np.ndarray:
  """One builtin photo as read-only `uint8 (h, w, 3)`; decoded once per process, then cached."""
  image = as_rgb_uint8(_LOADERS[name]())
  image.setflags(write=False)
  return image


_SYNTHETIC_SEED = 0x5EED


def _gradient(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """Linear blend between two random colours along a random direction; float (h, w, 3)."""
  angle = rng.uniform(0, 2 * np.pi)
  t = np.cos(angle) * xx + np.sin(angle) * yy
  t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
  c0, c1 = rng.uniform(0, 255, size=(2, 3))
  return c0 + (c1 - c0) * t[..., None]


def _shapes(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """Random filled discs and rectangles over a gradient."""
  image = _gradient(rng, yy, xx)
  for _ in range(int(rng.integers(3, 9))):
    cy, cx = rng.uniform(0, 1, size=2)
    r = rng.uniform(0.05, 0.3)
    if rng.random() < 0.5:
      mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    else:
      mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r * rng.uniform(0.3, 2.0))
    image[mask] = rng.uniform(0, 255, size=3)
  return image


def _checkerboard(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """Two-colour checkerboard with a random cell size (in pixels)."""
  h, w = yy.shape
  cell = int(rng.integers(4, 17))
  rows = np.arange(h)[:, None] // cell
  cols = np.arange(w)[None, :] // cell
  c0, c1 = rng.uniform(0, 255, size=(2, 3))
  return np.where(((rows + cols) % 2 == 0)[..., None], c0, c1)


def _dashes(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """Text-like page: lines of dark dashes ("words") of random length on a light ground."""
  h, w = yy.shape
  image = np.empty((h, w, 3))
  image[:] = rng.uniform(200, 255, size=3)
  ink = rng.uniform(0, 60, size=3)
  line_height = int(rng.integers(6, 13))
  glyph_height = max(2, line_height * 2 // 3)
  for top in range(2, h - glyph_height, line_height):
    left = int(rng.integers(2, 8))
    while left < w - 4:
      width = int(rng.integers(3, 20))
      image[top:top + glyph_height, left:min(left + width, w - 2)] = ink
      left += width + int(rng.integers(2, 6))
  return image


_SYNTHETIC_FAMILIES = (_gradient, _shapes, _checkerboard, _dashes)


def synthetic_image(index: int, min_size: int) -> np.ndarray:
  """Procedural image number `index`: `uint8 (h, w, 3)` with h, w in [min_size, 1.5*min_size].

  The family cycles with `index % 4` (gradient, shapes, checkerboard, text-like dashes);
  colours, geometry and size come from a generator seeded by `index` only.
  """
  rng = np.random.default_rng([_SYNTHETIC_SEED, index])
  h, w = (int(v) for v in rng.integers(min_size, min_size + min_size // 2 + 1, size=2))
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing='ij')
  image = _SYNTHETIC_FAMILIES[index % len(_SYNTHETIC_FAMILIES)](rng, yy, xx)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)
