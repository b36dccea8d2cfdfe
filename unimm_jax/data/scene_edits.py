"""Multi-round image editing on the procedural scenes: instructions and edited scenes.

`SceneEdits(split, num_examples, image_size, seed, max_edits)` is a random-access source of
conversation records of kind 'editing': example `i` starts from the understanding scene of
seed `scenes.scene_seed(split, i)` (`scenes.sample_scene`) and applies a chain of 1 to
`max_edits` edits (the count drawn from `seed` and the scene seed, uniform), each an
instruction and the scene it makes. Edit kinds (`EDIT_KINDS`, drawn with `KIND_WEIGHTS`;
one that the scene does not allow is replaced by another), with the templates of
`scene_conversations.EDIT_TEMPLATES`:

    recolour  'Make {ref} {colour}.'           'Make the circle blue.', 'Make the red square
                                               green.'  The object keeps shape, size, place.
    move      'Move {ref} to the {region}.'    'Move the square to the left.'  The object,
                                               whose centre lies outside the region (a half
                                               of `scenes.REGIONS`), moves inside it, keeping
                                               its other coordinate when there is room;
                                               its new box does not meet its old one.
    remove    'Remove {ref}.'                  'Remove the small triangle.' (2+ objects)
    add       'Add {article} {colour} {shape} {where}.'   'Add a blue cross on the right.'
                                               A new object inside the half (under 4).

`{ref}` is one of `scene_conversations.referring_expressions` of the object in the scene
before the edit (unique in it). Every other object stays as it is, and every scene of a
chain is valid (`scene_problem`): 1-4 objects inside the image by the margin, none
overlapping, no repeated colour-shape pair, none of `scenes.HELD_OUT_COMBOS` in the train
split (eval may hold them, as the other scene sources do); seed, background and texture are
those of the start scene, so the background renders the same in every round.

Record (`__getitem__`), the MLLM data contract with images `uint8 (s, s, 3)`:

    user [image of scene 0, instruction 1]   assistant [image of scene 1]
    user [instruction 2]                     assistant [image of scene 2]   ...

meta: scene_seed, split, question_type 'editing', answer None, num_edits, scenes (each
scene's `to_dict`, the start first), instructions, edit_kinds, checks (one per round) and
check (the last round's), held_out (a held-out pair in any scene of the chain).

A round's check (what `evals.scene_checks.check_edited_image` verifies) extends the
generation check (`check_generated_image` reads its 'targets' and 'min_fraction'):

    targets       the edited object: its new colour in its box (recolour), its colour in
                  the named half (move, add); none for remove. The colour must have the
                  most palette pixels of the region and cover min_fraction of it.
    min_fraction  PRESENT_FRACTION of the target's area over the region's (0 for remove)
    kept          every unchanged object, as a target with its own min_fraction, in its box
    absent        {'colour', 'region', 'max_fraction'}: what must be gone: the old colour
                  from the recoloured object's box, the moved or removed object's colour
                  from its old box (under ABSENT_FRACTION of the object's area)

A box is the square around an object's extent circle (`object_box`). Edits are chosen so
that the rendered edited scene passes its check and the scene before it fails: a moved or
added object has `DOMINANCE` times the area of any other colour in its half, and an added
object's colour is in no object that reaches into its half before the edit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from unimm_jax.data import scenes
from unimm_jax.data.scene_conversations import EDIT_TEMPLATES, REGION_PHRASES, article
from unimm_jax.data.scene_conversations import check_split_size, referring_expressions
from unimm_jax.data.scenes import COLOURS, EXTENT, REGIONS, SIZES, Scene, SceneObject

EDIT_KINDS = ('recolour', 'move', 'remove', 'add')
KIND_WEIGHTS = (0.3, 0.4, 0.15, 0.15)
PRESENT_FRACTION = 0.35  # of an object's area that must show in its region
ABSENT_FRACTION = 0.25  # of an object's area that may stay where it was
DOMINANCE = 2.0  # a moved or added object's area over any other colour's in its half
_MARGIN = scenes._MARGIN  # pylint: disable=protected-access
_AREA_GRID = 64  # points per side when measuring a shape's area in a box
_PLACE_TRIES = 40
# Scenes round centres to 4 decimals after placing them: validity allows that much.
_ROUNDING = 1e-4


@dataclasses.dataclass(frozen=True)
class Edit:
  """One round: its kind, instruction, the scene it makes and its check (module docstring)."""

  kind: str
  instruction: str
  scene: Scene
  check: dict[str, Any]


def object_box(obj: SceneObject) -> tuple[float, float, float, float]:
  """(x0, y0, x1, y1): the square around the object's extent circle, in [0, 1]."""
  e = EXTENT * obj.radius
  return tuple(round(v, 4) for v in (obj.cx - e, obj.cy - e, obj.cx + e, obj.cy + e))


@functools.cache
def _shape_grid(shape: str, size: str) -> tuple[np.ndarray, np.ndarray]:
  """(offsets (g,), inside (g, g) bool): a grid over a shape's extent box, and its mask."""
  r = SIZES[size]
  offsets = ((np.arange(_AREA_GRID) + 0.5) / _AREA_GRID * 2.0 - 1.0) * EXTENT * r
  return offsets, scenes.shape_mask(shape, offsets[None, :], offsets[:, None], r)


def area_in(obj: SceneObject, box=(0.0, 0.0, 1.0, 1.0)) -> float:
  """Area (fraction of the image) of the object's shape inside `box`, on a fine grid."""
  offsets, inside = _shape_grid(obj.shape, obj.size)
  xs, ys = obj.cx + offsets, obj.cy + offsets
  x0, y0, x1, y1 = box
  inside = inside & ((xs >= x0) & (xs < x1))[None, :] & ((ys >= y0) & (ys < y1))[:, None]
  return float(np.count_nonzero(inside) / inside.size * (2.0 * EXTENT * obj.radius) ** 2)


def _box_area(box) -> float:
  return (box[2] - box[0]) * (box[3] - box[1])


def _target(obj: SceneObject, region) -> dict[str, Any]:
  """A generation-check target for `obj` in `region`, with its own min_fraction."""
  return {'colour': obj.colour, 'shape': obj.shape, 'rgb': list(COLOURS[obj.colour]),
          'region': list(region),
          'min_fraction': round(PRESENT_FRACTION * area_in(obj) / _box_area(region), 4)}


def _absent(obj: SceneObject) -> dict[str, Any]:
  """`obj`'s colour must cover under ABSENT_FRACTION of its area in its box."""
  box = object_box(obj)
  return {'colour': obj.colour, 'region': list(box),
          'max_fraction': round(ABSENT_FRACTION * area_in(obj) / _box_area(box), 4)}


def edit_check(before: Scene, after: Scene, target: SceneObject | None, region,
               gone: SceneObject | None) -> dict[str, Any]:
  """The check of one round (module docstring).

  Args:
    before, after: the scenes before and after the edit.
    target: the edited object in `after` (None for remove), to be found in `region`.
    gone: the object of `before` whose colour must leave its box (None for add).
  """
  targets = [] if target is None else [_target(target, region)]
  kept = [o for o in after.objects if o in before.objects]
  return {'targets': [{k: v for k, v in t.items() if k != 'min_fraction'} for t in targets],
          'min_fraction': targets[0]['min_fraction'] if targets else 0.0,
          'kept': [_target(o, object_box(o)) for o in kept],
          'absent': [] if gone is None else [_absent(gone)]}


def scene_problem(scene: Scene, split: str) -> str | None:
  """What makes `scene` invalid for `split` (module docstring), or None."""
  if not 1 <= len(scene.objects) <= scenes.MAX_OBJECTS:
    return f'{len(scene.objects)} objects'
  combos = [o.combo for o in scene.objects]
  if len(set(combos)) != len(combos):
    return f'a repeated colour-shape pair in {combos}'
  allowed = set(scenes.allowed_combos(split))
  for i, obj in enumerate(scene.objects):
    if obj.combo not in allowed:
      return f'{obj.combo} is not allowed in split {split!r}'
    e = EXTENT * obj.radius + _MARGIN - _ROUNDING
    if not (e <= obj.cx <= 1 - e and e <= obj.cy <= 1 - e):
      return f'{obj} is not inside the image by the margin'
    for other in scene.objects[i + 1:]:
      if np.hypot(obj.cx - other.cx, obj.cy - other.cy) < e + EXTENT * other.radius + _MARGIN:
        return f'{obj} and {other} overlap'
  return None


def _spot(rng: np.random.Generator, radius: float, region, others, keep=(None, None)):
  """A centre for a shape of `radius` inside `region` (by the margin) that keeps the margin
  from every one of `others`, keeping a coordinate given in `keep` = (cx, cy): the first
  of _PLACE_TRIES random tries that fits, or None."""
  e = EXTENT * radius + _MARGIN
  x0, y0, x1, y1 = region
  tries = []
  for kept, low, high in ((keep[0], x0 + e, x1 - e), (keep[1], y0 + e, y1 - e)):
    drawn = np.round(rng.uniform(low, high, _PLACE_TRIES), 4)
    tries.append(np.full(_PLACE_TRIES, kept) if kept is not None else drawn)
  cx, cy = tries
  fits = (x0 + e <= cx) & (cx <= x1 - e) & (y0 + e <= cy) & (cy <= y1 - e)
  for o in others:
    fits &= np.hypot(cx - o.cx, cy - o.cy) >= EXTENT * (radius + o.radius) + 2 * _MARGIN
  first = np.flatnonzero(fits)
  return None if not len(first) else (float(cx[first[0]]), float(cy[first[0]]))


def _dominates(obj: SceneObject, region, others) -> bool:
  """Whether `obj` has DOMINANCE times the area in `region` of every other colour there."""
  by_colour: dict[str, float] = {}
  for other in others:
    if other.colour != obj.colour:
      by_colour[other.colour] = by_colour.get(other.colour, 0.0) + area_in(other, region)
  return area_in(obj, region) >= DOMINANCE * max(by_colour.values(), default=0.0)


def _replace(scene: Scene, objects) -> Scene:
  return dataclasses.replace(scene, objects=tuple(objects))


def _recolour(scene: Scene, rng: np.random.Generator, split: str) -> Edit | None:
  index = int(rng.integers(len(scene.objects)))
  obj = scene.objects[index]
  present = {o.combo for o in scene.objects}
  colours = [c for c, s in scenes.allowed_combos(split)
             if s == obj.shape and c != obj.colour and (c, s) not in present]
  if not colours:
    return None
  colour = colours[int(rng.integers(len(colours)))]
  new = dataclasses.replace(obj, colour=colour)
  after = _replace(scene, scene.objects[:index] + (new,) + scene.objects[index + 1:])
  refs = referring_expressions(scene, obj)
  instruction = EDIT_TEMPLATES['recolour'].format(ref=refs[int(rng.integers(len(refs)))],
                                                  colour=colour)
  return Edit('recolour', instruction, after,
              edit_check(scene, after, new, object_box(new), obj))


def _centre_in(obj: SceneObject, region) -> bool:
  x0, y0, x1, y1 = region
  return x0 <= obj.cx < x1 and y0 <= obj.cy < y1


def _moved(rng: np.random.Generator, obj: SceneObject, region: str, others):
  """`obj` moved inside `region` (keeping its other coordinate when there is room), clear
  of `others` and of its own old box, dominating the region; or None."""
  box, gap = REGIONS[region], 2 * EXTENT * obj.radius + _MARGIN
  keep = (None, obj.cy) if region in ('left', 'right') else (obj.cx, None)
  for hold in (keep, (None, None)):
    spot = _spot(rng, obj.radius, box, others, hold)
    if spot is None or max(abs(spot[0] - obj.cx), abs(spot[1] - obj.cy)) < gap:
      continue
    new = dataclasses.replace(obj, cx=spot[0], cy=spot[1])
    if _dominates(new, box, others):
      return new
  return None


def _move(scene: Scene, rng: np.random.Generator, split: str) -> Edit | None:
  del split  # a move keeps every colour-shape pair
  options = [(i, r) for i, o in enumerate(scene.objects) for r in REGIONS
             if not _centre_in(o, REGIONS[r])]
  for k in rng.permutation(len(options)):
    index, region = options[k]
    obj = scene.objects[index]
    others = scene.objects[:index] + scene.objects[index + 1:]
    new = _moved(rng, obj, region, others)
    if new is None:
      continue
    after = _replace(scene, scene.objects[:index] + (new,) + scene.objects[index + 1:])
    refs = referring_expressions(scene, obj)
    instruction = EDIT_TEMPLATES['move'].format(ref=refs[int(rng.integers(len(refs)))],
                                                region=region)
    return Edit('move', instruction, after,
                edit_check(scene, after, new, REGIONS[region], obj))
  return None


def _remove(scene: Scene, rng: np.random.Generator, split: str) -> Edit | None:
  del split
  if len(scene.objects) < 2:
    return None
  index = int(rng.integers(len(scene.objects)))
  obj = scene.objects[index]
  after = _replace(scene, scene.objects[:index] + scene.objects[index + 1:])
  refs = referring_expressions(scene, obj)
  instruction = EDIT_TEMPLATES['remove'].format(ref=refs[int(rng.integers(len(refs)))])
  return Edit('remove', instruction, after, edit_check(scene, after, None, None, obj))


def _add(scene: Scene, rng: np.random.Generator, split: str) -> Edit | None:
  if len(scene.objects) >= scenes.MAX_OBJECTS:
    return None
  present = {o.combo for o in scene.objects}
  combos = [c for c in scenes.allowed_combos(split) if c not in present]
  options = [(c, r) for c in combos for r in REGIONS]
  for k in rng.permutation(len(options))[:_PLACE_TRIES]:
    (colour, shape), region = options[k]
    box = REGIONS[region]
    if any(o.colour == colour and area_in(o, box) > 0 for o in scene.objects):
      continue  # the scene before must not pass the check already
    size = str(rng.choice(tuple(SIZES)))
    spot = _spot(rng, SIZES[size], box, scene.objects)
    if spot is None:
      continue
    new = SceneObject(shape=shape, colour=colour, size=size, cx=spot[0], cy=spot[1])
    if not _dominates(new, box, scene.objects):
      continue
    after = _replace(scene, scene.objects + (new,))
    instruction = EDIT_TEMPLATES['add'].format(article=article(colour), colour=colour,
                                               shape=shape, where=REGION_PHRASES[region])
    return Edit('add', instruction, after, edit_check(scene, after, new, box, None))
  return None


_EDITS = {'recolour': _recolour, 'move': _move, 'remove': _remove, 'add': _add}


def sample_edit(scene: Scene, rng: np.random.Generator, split: str) -> Edit:
  """One edit of `scene` (module docstring): the kind drawn with KIND_WEIGHTS, then the
  other kinds in a random order until one fits (a recolour always does)."""
  first = int(rng.choice(len(EDIT_KINDS), p=KIND_WEIGHTS))
  order = [first] + [int(k) for k in rng.permutation(len(EDIT_KINDS)) if k != first]
  for k in order:
    edit = _EDITS[EDIT_KINDS[k]](scene, rng, split)
    if edit is not None:
      problem = scene_problem(edit.scene, split)
      if problem:
        raise RuntimeError(f'{edit.kind} made an invalid scene: {problem}')
      return edit
  raise ValueError(f'no edit fits scene {scene.to_dict()}')


def edit_chain(scene: Scene, rng: np.random.Generator, split: str, count: int) -> list[Edit]:
  """`count` edits, each of the scene the one before made."""
  chain = []
  for _ in range(count):
    chain.append(sample_edit(chain[-1].scene if chain else scene, rng, split))
  return chain


class SceneEdits:
  """`num_examples` editing records about scenes of `split` (module docstring).

  Args:
    split: a name in `scenes.SPLITS` ('train' or 'eval').
    num_examples: example i starts from the scene of seed split start + i.
    image_size: side in pixels of the rendered images (uint8 (s, s, 3)).
    seed: picks the edits of each scene (not the scenes).
    max_edits: rounds of an example are 1 to max_edits.
  """

  kind = 'editing'

  def __init__(self, split: str, num_examples: int, image_size: int = 64, seed: int = 0,
               max_edits: int = 3):
    check_split_size(split, num_examples)
    if max_edits < 1:
      raise ValueError(f'max_edits must be >= 1, got {max_edits}')
    self.split, self.num_examples, self.image_size = split, num_examples, image_size
    self.seed, self.max_edits = seed, max_edits

  def __len__(self) -> int:
    return self.num_examples

  def example(self, index: int) -> tuple[list[Scene], list[dict], dict]:
    """(scenes of the chain, messages with the images left out, meta) of example `index`.

    Image content entries are `{'type': 'image'}` here, image k showing scene k;
    `__getitem__` adds the pixels.
    """
    if not 0 <= index < self.num_examples:
      raise IndexError(f'example {index} of {self.num_examples}')
    seed = scenes.scene_seed(self.split, index)
    rng = np.random.default_rng([self.seed, seed, 3])
    start = scenes.sample_scene(seed)
    chain = edit_chain(start, rng, self.split, 1 + int(rng.integers(self.max_edits)))
    messages = []
    for turn, edit in enumerate(chain):
      image = [{'type': 'image'}] if turn == 0 else []
      messages += [{'role': 'user', 'content': image + [{'type': 'text',
                                                         'text': edit.instruction}]},
                   {'role': 'assistant', 'content': [{'type': 'image'}]}]
    chain_scenes = [start] + [edit.scene for edit in chain]
    held = scenes.HELD_OUT_COMBOS
    meta = {'scene_seed': seed, 'split': self.split, 'question_type': 'editing',
            'answer': None, 'num_edits': len(chain),
            'scenes': [s.to_dict() for s in chain_scenes],
            'instructions': [edit.instruction for edit in chain],
            'edit_kinds': [edit.kind for edit in chain],
            'checks': [edit.check for edit in chain], 'check': chain[-1].check,
            'held_out': any(o.combo in held for s in chain_scenes for o in s.objects)}
    return chain_scenes, messages, meta

  def __getitem__(self, index: int) -> dict[str, Any]:
    """The editing record of example `index` (contract format, images inline)."""
    chain_scenes, messages, meta = self.example(index)
    images = iter(chain_scenes)
    for message in messages:
      for part in message['content']:
        if part['type'] == 'image':
          part['image'] = scenes.render(next(images), self.image_size)
    return {'kind': self.kind, 'messages': messages, 'meta': meta}

  def __repr__(self) -> str:
    return (f'SceneEdits({self.split!r}, {self.num_examples}, {self.image_size} px, '
            f'seed={self.seed}, max_edits={self.max_edits})')


def _export(argv=None) -> None:
  """`python -m unimm_jax.data.scene_edits --output=DIR [--split=eval --edits=2 --size=64]`:
  the first example of the split with exactly `--edits` rounds: writes DIR/start.png, the
  expected DIR/target_K.png of each round K and DIR/instructions.txt (one per line)."""
  import argparse  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=_export.__doc__)
  parser.add_argument('--output', required=True)
  parser.add_argument('--split', default='eval', choices=sorted(scenes.SPLITS))
  parser.add_argument('--edits', type=int, default=2)
  parser.add_argument('--size', type=int, default=64)
  args = parser.parse_args(argv)
  source = SceneEdits(args.split, 1000, args.size, max_edits=args.edits)
  index = next(i for i in range(len(source))
               if len(source.example(i)[2]['instructions']) == args.edits)
  chain, _, meta = source.example(index)
  os.makedirs(args.output, exist_ok=True)
  for k, scene in enumerate(chain):
    name = 'start.png' if k == 0 else f'target_{k}.png'
    Image.fromarray(scenes.render(scene, args.size)).save(os.path.join(args.output, name))
  with open(os.path.join(args.output, 'instructions.txt'), 'w') as f:
    f.write('\n'.join(meta['instructions']) + '\n')
  print(f'{args.output}: example {index} of {args.split}: ' + ' / '.join(meta['instructions']))


if __name__ == '__main__':
  _export()
