"""Procedural scenes: a few coloured shapes on a grey background, rendered with numpy.

A `Scene` is a structured description (its `to_dict` is JSON-able and `Scene.from_dict`
reads it back): 1-4 `SceneObject`s, each a shape from `SHAPES`, a colour from `COLOURS`
(well-separated RGB values), a size from `SIZES` and a centre `(cx, cy)` in [0, 1]
(x to the right, y downwards), on a background of one dark grey RGB that is `plain`, has
light pixel `noise`, or a light linear `gradient`. No two objects of a scene share a
(colour, shape) pair and no two overlap, so "the red circle" always names one object.

`render(scene, size) -> uint8 (size, size, 3)`: every object is drawn with 4 x 4
supersampled (anti-aliased) edges; inside an object the pixels are exactly its palette
colour, so colours stay identifiable at any size (64 px is the intended one).

Splits and held-out combinations. A scene is a function of its seed alone. Seeds are split
into disjoint ranges (`SPLITS`: name -> [start, stop)); `scene_seed(split, index)` is
`start + index`. Train scenes (seeds in the train range) never contain a colour-shape pair
of `HELD_OUT_COMBOS`; half the eval scenes contain one object with such a pair, so eval
measures generalisation to combinations never seen in training.

`sample_scene(seed)` draws a scene for understanding (captions, questions);
`sample_generation_layout(seed)` draws a one- or two-object scene whose objects lie inside
the regions `REGIONS` (`left`, `right`, `top`, `bottom` halves) that a prompt names.

Scene classes (class-conditional generation). `CLASS_NAMES` lists every colour-shape pair
('red circle', 'red square', ..., 'white cross': colours in `COLOURS` order, shapes in
`SHAPES` order), 28 classes; class k is `CLASS_NAMES[k]`. `sample_class_scene(seed, k)` is
one large object of class k (radius `CLASS_RADIUS` of the side, a float `size`) on the
background of `seed`; `SceneClassSource` serves them with their class index. Held-out
combinations do not apply: every class appears in both splits.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# name -> RGB. Any two are >= 83 apart (Euclidean), and every one is >= 100 from every
# background colour (`_background`: grey levels 35-76, tint +-8).
COLOURS: dict[str, tuple[int, int, int]] = {
    'red': (220, 40, 40),
    'green': (40, 180, 60),
    'blue': (40, 80, 220),
    'yellow': (240, 220, 40),
    'purple': (150, 60, 190),
    'orange': (250, 140, 20),
    'white': (245, 245, 245),
}
SHAPES = ('circle', 'square', 'triangle', 'cross')
SHAPE_PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles',
                 'cross': 'crosses'}
# size name -> the shape's radius as a fraction of the image side.
SIZES: dict[str, float] = {'small': 0.08, 'large': 0.13}
TEXTURES = ('plain', 'noise', 'gradient')
# The class scenes' single object: radius range, as a fraction of the side (uniform). At
# 32 px the smallest (6.4 px radius) is still 11-15 px across, whatever its shape.
CLASS_RADIUS = (0.2, 0.3)
MAX_OBJECTS = 4

# Colour-shape pairs that no train example shows or names; each colour and shape once.
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (
    ('red', 'triangle'), ('blue', 'circle'), ('yellow', 'cross'), ('purple', 'square'))

# Scene class k (`sample_class_scene`) is the pair CLASS_NAMES[k], 'colour shape'.
CLASS_NAMES: tuple[str, ...] = tuple(f'{c} {s}' for c in COLOURS for s in SHAPES)

# split name -> [first seed, end seed): disjoint ranges.
SPLITS: dict[str, tuple[int, int]] = {'train': (0, 1_000_000), 'eval': (1_000_000, 1_010_000)}

# region name -> (x0, y0, x1, y1) box in [0, 1]; `OPPOSITE` pairs the regions.
REGIONS: dict[str, tuple[float, float, float, float]] = {
    'left': (0.0, 0.0, 0.5, 1.0), 'right': (0.5, 0.0, 1.0, 1.0),
    'top': (0.0, 0.0, 1.0, 0.5), 'bottom': (0.0, 0.5, 1.0, 1.0)}
OPPOSITE = {'left': 'right', 'right': 'left', 'top': 'bottom', 'bottom': 'top'}

# An object lies inside the circle of radius EXTENT * radius around its centre.
EXTENT = 1.25
_MARGIN = 0.02  # between objects, and between an object and the image or region border
_SUPERSAMPLE = 4
_TRIANGLE_HALF_HEIGHT = 1.05  # x radius; the triangles' area then is close to the circle's
_CROSS_ARM = (1.05, 0.4)  # half length, half width of the cross's arms, x radius


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One shape: `shape` in SHAPES, `colour` in COLOURS, centre in [0, 1].

  `size` is a name in SIZES or, for the class scenes' free sizes, the radius itself as a
  fraction of the image side (a float).
  """

  shape: str
  colour: str
  size: str | float
  cx: float
  cy: float

  @property
  def combo(self) -> tuple[str, str]:
    """(colour, shape)."""
    return self.colour, self.shape

  @property
  def radius(self) -> float:
    return SIZES[self.size] if isinstance(self.size, str) else float(self.size)


@dataclasses.dataclass(frozen=True)
class Scene:
  """A scene: its seed, objects, background RGB (ints) and texture (one of TEXTURES)."""

  seed: int
  objects: tuple[SceneObject, ...]
  background: tuple[int, int, int]
  texture: str

  def to_dict(self) -> dict:
    """JSON-able description: {'seed', 'background', 'texture', 'objects': [{...}]}."""
    return {'seed': self.seed, 'background': list(self.background), 'texture': self.texture,
            'objects': [dataclasses.asdict(o) for o in self.objects]}

  @classmethod
  def from_dict(cls, description: dict) -> 'Scene':
    """The inverse of `to_dict`."""
    return cls(seed=int(description['seed']),
               objects=tuple(SceneObject(**o) for o in description['objects']),
               background=tuple(int(v) for v in description['background']),
               texture=description['texture'])


def split_of_seed(seed: int) -> str:
  """The name of the split whose seed range holds `seed`; ValueError when none does."""
  for name, (start, stop) in SPLITS.items():
    if start <= seed < stop:
      return name
  raise ValueError(f'scene seed {seed} lies in no split range {SPLITS}')


def scene_seed(split: str, index: int) -> int:
  """Seed of scene `index` of `split`: the split's first seed + index."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {tuple(SPLITS)}, got {split!r}')
  start, stop = SPLITS[split]
  if not 0 <= index < stop - start:
    raise ValueError(f'scene index {index} is outside split {split!r} of {stop - start} scenes')
  return start + index


def allowed_combos(split: str) -> list[tuple[str, str]]:
  """The colour-shape pairs that scenes and texts of `split` may use (train: no held-out)."""
  combos = [(c, s) for c in COLOURS for s in SHAPES]
  if split == 'train':
    combos = [c for c in combos if c not in HELD_OUT_COMBOS]
  return combos


def _background(rng: np.random.Generator) -> tuple[tuple[int, int, int], str]:
  """A dark grey with a slight tint, and a texture name."""
  level = int(rng.integers(35, 77))
  rgb = tuple(int(v) for v in np.clip(level + rng.integers(-8, 9, size=3), 0, 255))
  return rgb, str(rng.choice(TEXTURES))


def _pick_combos(rng: np.random.Generator, split: str, count: int,
                 distinct_colours: bool = False) -> list[tuple[str, str]]:
  """`count` distinct colour-shape pairs (of distinct colours if asked) allowed in `split`.

  Eval: with probability 1/2 the first pair is one of `HELD_OUT_COMBOS`.
  """
  combos = allowed_combos(split)
  picked = []
  if split != 'train' and rng.random() < 0.5:
    picked.append(HELD_OUT_COMBOS[int(rng.integers(len(HELD_OUT_COMBOS)))])
  for i in rng.permutation(len(combos)):
    if len(picked) == count:
      break
    if combos[i] not in picked and not (
        distinct_colours and combos[i][0] in {c for c, _ in picked}):
      picked.append(combos[i])
  return picked


def _place(rng: np.random.Generator, radii: Sequence[float],
           box: Sequence[tuple[float, float, float, float]] | None = None
           ) -> list[tuple[float, float]]:
  """Centres for shapes of `radii` that do not overlap, each inside its box (default: all).

  Rejection sampling: restarts the whole placement when one shape finds no room.
  """
  boxes = box or [(0.0, 0.0, 1.0, 1.0)] * len(radii)
  while True:
    centres = []
    for r, (x0, y0, x1, y1) in zip(radii, boxes):
      e = EXTENT * r + _MARGIN
      for _ in range(100):
        cx, cy = rng.uniform(x0 + e, x1 - e), rng.uniform(y0 + e, y1 - e)
        if all(np.hypot(cx - px, cy - py) >= e + EXTENT * radii[j] + _MARGIN
               for j, (px, py) in enumerate(centres)):
          centres.append((round(float(cx), 4), round(float(cy), 4)))
          break
      else:
        break
    if len(centres) == len(radii):
      return centres


def sample_scene(seed: int, num_objects: int | None = None) -> Scene:
  """The understanding scene of `seed` (which fixes its split): 1-4 objects, or `num_objects`.

  Deterministic: the same seed (and `num_objects`) always gives the same scene.
  """
  split = split_of_seed(seed)
  rng = np.random.default_rng([seed, 0])
  count = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
  if not 1 <= count <= MAX_OBJECTS:
    raise ValueError(f'num_objects must be in [1, {MAX_OBJECTS}], got {num_objects}')
  background, texture = _background(rng)
  combos = _pick_combos(rng, split, count)
  rng.shuffle(combos)
  sizes = [str(rng.choice(tuple(SIZES))) for _ in combos]
  centres = _place(rng, [SIZES[s] for s in sizes])
  objects = tuple(SceneObject(shape=s, colour=c, size=z, cx=x, cy=y)
                  for (c, s), z, (x, y) in zip(combos, sizes, centres))
  return Scene(seed=seed, objects=objects, background=background, texture=texture)


def sample_generation_layout(seed: int) -> tuple[Scene, tuple[str, ...]]:
  """A generation target of `seed`: (scene, the region name of each object).

  The first object lies inside a random region of `REGIONS`; with probability 1/2 a
  second (distractor) object of another colour lies inside the opposite region. Eval: with
  probability 1/2 the first object is a held-out colour-shape pair.
  """
  split = split_of_seed(seed)
  rng = np.random.default_rng([seed, 1])
  background, texture = _background(rng)
  count = 1 + int(rng.random() < 0.5)
  combos = _pick_combos(rng, split, count, distinct_colours=True)
  first = str(rng.choice(tuple(REGIONS)))
  regions = (first, OPPOSITE[first])[:count]
  sizes = [str(rng.choice(tuple(SIZES))) for _ in combos]
  centres = _place(rng, [SIZES[s] for s in sizes], [REGIONS[r] for r in regions])
  objects = tuple(SceneObject(shape=s, colour=c, size=z, cx=x, cy=y)
                  for (c, s), z, (x, y) in zip(combos, sizes, centres))
  return Scene(seed=seed, objects=objects, background=background, texture=texture), regions


def sample_class_scene(seed: int, class_index: int) -> Scene:
  """The class scene of `seed`: one object of class `class_index` (see `CLASS_NAMES`).

  Its radius is uniform in `CLASS_RADIUS` and its centre random, the whole object inside
  the image (`EXTENT * radius` from every border, plus a margin); the background as in
  `sample_scene`. Deterministic in (seed, class_index).
  """
  split_of_seed(seed)  # refuses seeds outside every split
  if not 0 <= class_index < len(CLASS_NAMES):
    raise ValueError(f'class_index must be in [0, {len(CLASS_NAMES)}), got {class_index}')
  colour, shape = CLASS_NAMES[class_index].split(' ')
  rng = np.random.default_rng([seed, 3])
  background, texture = _background(rng)
  radius = round(float(rng.uniform(*CLASS_RADIUS)), 4)
  e = EXTENT * radius + _MARGIN
  cx, cy = (round(float(v), 4) for v in rng.uniform(e, 1.0 - e, size=2))
  obj = SceneObject(shape=shape, colour=colour, size=radius, cx=cx, cy=cy)
  return Scene(seed=seed, objects=(obj,), background=background, texture=texture)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Whether the points at offsets (dx, dy) from a shape's centre lie inside it (bool)."""
  if shape == 'circle':
    return dx * dx + dy * dy <= r * r
  if shape == 'square':
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
  if shape == 'triangle':  # pointing up, its bounding box centred on the centre
    h = _TRIANGLE_HALF_HEIGHT * r
    return (np.abs(dy) <= h) & (np.abs(dx) <= (dy + h) / np.sqrt(3.0))
  if shape == 'cross':
    long, wide = _CROSS_ARM[0] * r, _CROSS_ARM[1] * r
    ax, ay = np.abs(dx), np.abs(dy)
    return ((ax <= long) & (ay <= wide)) | ((ay <= long) & (ax <= wide))
  raise ValueError(f'shape must be one of {SHAPES}, got {shape!r}')


def _background_pixels(scene: Scene, size: int) -> np.ndarray:
  """float32 (size, size, 3): the background colour with its texture."""
  canvas = np.empty((size, size, 3), np.float32)
  canvas[:] = scene.background
  rng = np.random.default_rng([scene.seed, size, 2])
  if scene.texture == 'noise':
    canvas += rng.normal(0.0, 4.0, (size, size, 1)).astype(np.float32)
  elif scene.texture == 'gradient':
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    canvas += 12.0 * (np.cos(angle) * ramp[None, :, None] + np.sin(angle) * ramp[:, None, None])
  return canvas


def render(scene: Scene, size: int = 64) -> np.ndarray:
  """The scene as `uint8 (size, size, 3)`, objects anti-aliased by supersampling."""
  if size < 8:
    raise ValueError(f'render size must be >= 8 px, got {size}')
  canvas = _background_pixels(scene, size)
  offsets = (np.arange(_SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
  for obj in scene.objects:
    r = obj.radius
    x0, x1 = (max(0, int(np.floor((obj.cx - EXTENT * r) * size))),
              min(size, int(np.ceil((obj.cx + EXTENT * r) * size)) + 1))
    y0, y1 = (max(0, int(np.floor((obj.cy - EXTENT * r) * size))),
              min(size, int(np.ceil((obj.cy + EXTENT * r) * size)) + 1))
    xs = ((np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1) / size) - obj.cx
    ys = ((np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1) / size) - obj.cy
    inside = shape_mask(obj.shape, xs[None, :], ys[:, None], r)
    alpha = inside.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3))
    alpha = alpha[:, :, None].astype(np.float32)
    patch = canvas[y0:y1, x0:x1]
    canvas[y0:y1, x0:x1] = patch * (1.0 - alpha) + np.float32(COLOURS[obj.colour]) * alpha
  return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


class SceneImageSource:
  """Images of `num_images` scenes of `split` (scene seeds `scene_seed(split, i)`).

  A random-access image source (`sources.ImageSource`): `source[i]` is
  `render(sample_scene(scene_seed(split, i)), image_size)`, `uint8 (s, s, 3)`.
  """

  def __init__(self, split: str, num_images: int, image_size: int):
    start, stop = SPLITS[split]
    if not 1 <= num_images <= stop - start:
      raise ValueError(f'num_images must be in [1, {stop - start}] for split {split!r}, got '
                       f'{num_images}')
    self.split, self.num_images, self.image_size = split, num_images, image_size

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < self.num_images:
      raise IndexError(f'scene image {index} of {self.num_images}')
    return render(sample_scene(scene_seed(self.split, index)), self.image_size)

  def __repr__(self) -> str:
    return f'SceneImageSource({self.split!r}, {self.num_images} at {self.image_size} px)'


class SceneClassSource(SceneImageSource):
  """Class scenes of `split` with their class indices: a labelled image source.

  Record i is `render(sample_class_scene(scene_seed(split, i), i % 28), image_size)`,
  `uint8 (s, s, 3)`, of class `i % len(CLASS_NAMES)`: every class equally often.
  """

  def __getitem__(self, index: int) -> np.ndarray:
    return self.labelled(index)[0]

  def labelled(self, index: int) -> tuple[np.ndarray, int]:
    """(record `index`, its class index into `CLASS_NAMES`)."""
    if not 0 <= index < self.num_images:
      raise IndexError(f'class scene image {index} of {self.num_images}')
    label = index % len(CLASS_NAMES)
    scene = sample_class_scene(scene_seed(self.split, index), label)
    return render(scene, self.image_size), label

  def check_labels(self) -> None:
    """Every record has a label; nothing to check (`sources.LabelledSource`)."""

  @property
  def class_names(self) -> tuple[str, ...]:
    return CLASS_NAMES

  def __repr__(self) -> str:
    return f'SceneClassSource({self.split!r}, {self.num_images} at {self.image_size} px)'


def _export(argv=None) -> None:
  """`python -m unimm_jax.data.scenes --output=scene.png [--split=eval --index=0
  --size=64]`: writes one scene's image (and prints its description)."""
  import argparse  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=_export.__doc__)
  parser.add_argument('--output', required=True)
  parser.add_argument('--split', default='eval', choices=sorted(SPLITS))
  parser.add_argument('--index', type=int, default=0)
  parser.add_argument('--size', type=int, default=64)
  args = parser.parse_args(argv)
  scene = sample_scene(scene_seed(args.split, args.index))
  Image.fromarray(render(scene, args.size)).save(args.output)
  print(f'{args.output}: {scene.to_dict()}')


if __name__ == '__main__':
  _export()
