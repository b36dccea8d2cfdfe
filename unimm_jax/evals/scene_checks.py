"""Checks on the procedural scenes: answer accuracy and generated-image verification.

Answers (`answer_accuracy`). A prediction is right when it equals the reference after
`normalise_answer`: lower-cased, punctuation removed, whitespace collapsed, a leading article
('a', 'an', 'the') dropped, and number words written as digits ('two' == '2'). Accuracy
is reported per question type (`accuracy/<type>`, also `accuracy/caption`: exact match of
the whole caption) and over the one-word types (`accuracy/all`, captions excluded), with
two baselines per type so a report can say how far above chance a model is:

    chance/<type>    1 / number of possible answers (uniform guessing): colour 1/7,
                     shape 1/4, count 1/5 (0-4), left_right 1/2, yes_no 1/2
    majority/<type>  accuracy of always giving the type's most common reference answer

plus `count/<type>` (examples scored). Given held-out flags, the same four numbers for
the one-word questions about a held-out colour-shape pair (`*/held_out`: a compositional
test, since no train example shows the pair) and for the rest (`*/seen`).

Generated images (`check_generated_image`). Each pixel is assigned the nearest colour of
`scenes.COLOURS` when it is within `max_distance` (RGB, Euclidean) of it, else none (the
dark backgrounds, blurred edges). A target of `check` passes when, inside its region, its
colour has the most pixels among the palette colours and covers at least
`check['min_fraction']` of the region. An image passes when every target passes.

Edited images (`check_edited_image`, a round's check of `data.scene_edits`). The
generation check of its 'targets' (the edited object: its new colour in its box, or its
colour in the named half; none for a removal), and every 'kept' entry (an unchanged object:
its colour the most common in its own box and covering the entry's 'min_fraction'), and
every 'absent' entry (a colour that must be gone from a box: a recoloured object's old
colour, a moved or removed object's colour from its old place) under its 'max_fraction'.
So the unedited image fails (the old colour or object is still there, or an added one is
missing) and so does one that redraws the target but loses or moves the rest. As for
generation, colours and places are verified, shapes are not.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

from unimm_jax.data import scenes
from unimm_jax.data.scene_conversations import NUMBER_WORDS, QUESTION_TYPES

# The one-word question types that `accuracy/all` averages over.
ANSWER_TYPES = tuple(t for t in QUESTION_TYPES if t != 'caption')
# question type -> every answer the scene data can give to it.
ANSWERS: dict[str, tuple[str, ...]] = {
    'colour': tuple(scenes.COLOURS),
    'shape': scenes.SHAPES,
    'count': tuple(str(n) for n in range(scenes.MAX_OBJECTS + 1)),
    'left_right': ('left', 'right'),
    'yes_no': ('yes', 'no'),
}
DEFAULT_MAX_DISTANCE = 80.0
_ARTICLES = ('a', 'an', 'the')
_DIGIT_OF = {word: str(i) for i, word in enumerate(NUMBER_WORDS)}
_PUNCTUATION = re.compile(f'[{re.escape(string.punctuation)}]')


def normalise_answer(text: str) -> str:
  """'The Red.' -> 'red', ' Two ' -> '2', 'a circle' -> 'circle' (module docstring)."""
  words = _PUNCTUATION.sub(' ', str(text).lower()).split()
  if len(words) > 1 and words[0] in _ARTICLES:
    words = words[1:]
  return ' '.join(_DIGIT_OF.get(w, w) for w in words)


def answer_accuracy(predictions: Sequence[str], references: Sequence[str],
                    question_types: Sequence[str],
                    held_out: Sequence[bool] | None = None) -> dict[str, float]:
  """Accuracy per question type and over all one-word types, with chance baselines.

  Args:
    predictions: the model's answers, one per example.
    references: the reference answers (`meta['answer']` of the scene records).
    question_types: `meta['question_type']` of each example (a `QUESTION_TYPES` name).
    held_out: optional `meta['held_out']` flags; adds `{accuracy,chance,majority,count}/`
      `held_out` and `.../seen` over the one-word types.

  Returns:
    {'accuracy/<g>', 'chance/<g>', 'majority/<g>', 'count/<g>'} for every group g: each
    question type present, 'all' (the one-word types) and, with held_out, 'held_out' and
    'seen' (floats; chance and majority are not given for captions); a type or group with
    no examples is left out.
  """
  n = len(references)
  if len(predictions) != n or len(question_types) != n or (
      held_out is not None and len(held_out) != n):
    raise ValueError(f'predictions ({len(predictions)}), references ({n}), question_types '
                     f'({len(question_types)}) and held_out must have one entry per example')
  unknown = sorted(set(question_types) - set(QUESTION_TYPES))
  if unknown:
    raise ValueError(f'unknown question type(s) {unknown}; expected {QUESTION_TYPES}')
  right = [normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)]
  references = [normalise_answer(r) for r in references]
  by_type = collections.defaultdict(list)
  for i, qtype in enumerate(question_types):
    by_type[qtype].append(i)
  groups = {qtype: by_type[qtype] for qtype in QUESTION_TYPES if by_type.get(qtype)}
  groups['all'] = [i for i, t in enumerate(question_types) if t in ANSWER_TYPES]
  if held_out is not None:
    for name, flag in (('held_out', True), ('seen', False)):
      groups[name] = [i for i in groups['all'] if bool(held_out[i]) == flag]
  out: dict[str, float] = {}
  for name, rows in groups.items():
    if not rows:
      continue
    out[f'accuracy/{name}'] = float(np.mean([right[i] for i in rows]))
    out[f'count/{name}'] = float(len(rows))
    if name != 'caption':
      out[f'chance/{name}'] = float(np.mean([1.0 / len(ANSWERS[question_types[i]])
                                             for i in rows]))
      out[f'majority/{name}'] = _majority_rate(rows, references, question_types)
  return out


def _majority_rate(rows: Sequence[int], references: Sequence[str],
                   question_types: Sequence[str]) -> float:
  """Accuracy over `rows` of always giving each question type's most common reference."""
  counts = collections.defaultdict(collections.Counter)
  for i in rows:
    counts[question_types[i]][references[i]] += 1
  return sum(c.most_common(1)[0][1] for c in counts.values()) / len(rows)


def _as_uint8(image: np.ndarray) -> np.ndarray:
  """`uint8 (h, w, 3)` of a uint8 image or a float image in [-1, 1]."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an (h, w, 3) image, got shape {image.shape}')
  if image.dtype == np.uint8:
    return image
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f'expected a uint8 image or a float image in [-1, 1], got {image.dtype}')
  return np.round((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def palette_labels(image: np.ndarray, max_distance: float = DEFAULT_MAX_DISTANCE
                   ) -> np.ndarray:
  """int (h, w): index into `scenes.COLOURS` of each pixel's nearest colour, -1 if none is
  within `max_distance`. `image` is uint8 (h, w, 3) or float (h, w, 3) in [-1, 1]."""
  pixels = _as_uint8(image).astype(np.float32)
  palette = np.asarray(list(scenes.COLOURS.values()), np.float32)
  distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
  labels = distance.argmin(-1)
  return np.where(distance.min(-1) <= max_distance, labels, -1)


def _region_counts(labels: np.ndarray, region: Sequence[float]) -> tuple[np.ndarray, int]:
  """(pixels of each palette colour, pixels in all) of `region` [x0, y0, x1, y1] in [0, 1]."""
  h, w = labels.shape
  x0, y0, x1, y1 = region
  box = labels[int(round(y0 * h)):int(round(y1 * h)), int(round(x0 * w)):int(round(x1 * w))]
  return np.bincount(box[box >= 0].ravel(), minlength=len(scenes.COLOURS)), box.size


def target_passes(labels: np.ndarray, target: dict, min_fraction: float) -> bool:
  """Whether `target` ({'colour', 'region': [x0, y0, x1, y1]}) holds in `palette_labels`."""
  counts, size = _region_counts(labels, target['region'])
  if size == 0:
    return False
  wanted = counts[list(scenes.COLOURS).index(target['colour'])]
  return bool(wanted >= min_fraction * size and wanted == counts.max())


def check_generated_image(image: np.ndarray, check: dict,
                          max_distance: float = DEFAULT_MAX_DISTANCE) -> bool:
  """Whether a generated image shows what the prompt of `check` (`meta['check']`) asked.

  Args:
    image: uint8 (h, w, 3), or float (h, w, 3) in [-1, 1].
    check: {'targets': [{'colour', 'region', ...}, ...], 'min_fraction': float}.
    max_distance: how far (RGB) a pixel may be from a palette colour to count as it.
  """
  labels = palette_labels(image, max_distance)
  return all(target_passes(labels, t, check['min_fraction']) for t in check['targets'])


def generation_pass_rate(images: Sequence[np.ndarray], checks: Sequence[dict],
                         max_distance: float = DEFAULT_MAX_DISTANCE) -> float:
  """Fraction of `images` (each as in `check_generated_image`) that pass their check."""
  return _pass_rate(check_generated_image, images, checks, max_distance)


def _pass_rate(check_image, images: Sequence[np.ndarray], checks: Sequence[dict],
               max_distance: float) -> float:
  """Fraction of `images` for which `check_image(image, check, max_distance)` holds."""
  if len(images) != len(checks) or not checks:
    raise ValueError(f'need one check per image and at least one image, got {len(images)} '
                     f'images and {len(checks)} checks')
  return float(np.mean([check_image(im, c, max_distance) for im, c in zip(images, checks)]))


def check_edited_image(image: np.ndarray, check: dict,
                       max_distance: float = DEFAULT_MAX_DISTANCE) -> bool:
  """Whether an edited image shows what a round's instruction asked (module docstring).

  Args:
    image: uint8 (h, w, 3), or float (h, w, 3) in [-1, 1].
    check: a round's check (`meta['checks'][k]` of `data.scene_edits.SceneEdits`):
      {'targets', 'min_fraction', 'kept': [{'colour', 'region', 'min_fraction'}, ...],
      'absent': [{'colour', 'region', 'max_fraction'}, ...]}.
    max_distance: how far (RGB) a pixel may be from a palette colour to count as it.
  """
  labels = palette_labels(image, max_distance)
  if not all(target_passes(labels, t, check['min_fraction']) for t in check['targets']):
    return False
  if not all(target_passes(labels, t, t['min_fraction']) for t in check['kept']):
    return False
  for gone in check['absent']:
    counts, size = _region_counts(labels, gone['region'])
    if counts[list(scenes.COLOURS).index(gone['colour'])] >= gone['max_fraction'] * size:
      return False
  return True


def edit_pass_rate(images: Sequence[np.ndarray], checks: Sequence[dict],
                   max_distance: float = DEFAULT_MAX_DISTANCE) -> float:
  """Fraction of edited `images` (each as in `check_edited_image`) that pass their check."""
  return _pass_rate(check_edited_image, images, checks, max_distance)
