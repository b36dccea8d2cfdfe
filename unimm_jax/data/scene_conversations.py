"""Captions, questions and generation prompts about procedural scenes, as conversations.

`SceneConversations(split, kind, num_examples, image_size, seed, questions_per_image)` is a
random-access source of the conversation records of the MLLM data contract: example `i` is
built from scene seed `scenes.scene_seed(split, i)` and `seed`, and from nothing else.

kind 'understanding': the user turn is the rendered image `uint8 (s, s, 3)` and a question,
the assistant turn a one-word answer (or, for 'caption', the scene's caption):

    caption     'Describe the image.'                          -> the caption (below)
    colour      'What colour is the circle?'                   -> 'red'
    shape       'What shape is the red object?'                -> 'circle'
    count       'How many objects are there?' | 'How many red objects are there?'
                | 'How many circles are there?'                -> '2' (digits)
    left_right  'Is the red circle left or right of the blue square?'  -> 'left' | 'right'
    yes_no      'Is there a red circle?'                       -> 'yes' | 'no' (half each)

A referring expression ('the circle', 'the small circle', 'the red object', 'the large red
object', 'the red circle') is only used when exactly one object of the scene fits it, and
left_right only asks about two objects whose centres are >= `LEFT_RIGHT_MIN_GAP` apart in x.
The question type of example i is `QUESTION_TYPES[(i + seed) % 6]`; when the scene cannot
support it (no unique referent, one object for left_right) another supported type is drawn
(in 2000 train examples: left_right 12 %, the other types 17-18 % each; yes_no half 'yes').
With `questions_per_image` K > 1 an understanding example is a multi-turn conversation about
one image (as LLaVA's instruction data): turn j asks type `QUESTION_TYPES[(i + seed + j) % 6]`
(distinct wanted types; the fallback may repeat one), the image in the first user turn
only. A model then reads each image's tokens once for K supervised answers.
Captions list the objects from left to right: 'There are two objects: a small red circle
on the left and a large blue square at the top right.'

kind 'generation': the user turn is a prompt, 'Draw a red circle on the left.' or 'Draw a
red circle on the left and an orange square on the right.' (regions 'on the left', 'on
the right', 'at the top', 'at the bottom'), the assistant turn the rendered
image; `meta['check']` is what `evals.scene_checks.check_generated_image` verifies:
`{'targets': [{'colour', 'shape', 'rgb': [r, g, b], 'region': [x0, y0, x1, y1]}, ...],
'min_fraction': float}` (region in [0, 1] image coordinates, one target per named object).

meta (JSON-able): question_type ('generation' for generation), answer (None for
generation) and held_out of the last turn (the one `generation_prompt='answer'` asks),
every turn's in question_types, answers and held_outs (understanding only), scene_seed,
split, scene (`Scene.to_dict()`), check (generation only). held_out: a pair of
`scenes.HELD_OUT_COMBOS` is the object a question refers to, one of the two compared, the
pair a yes_no question asks about, or, for caption, count and generation, any object of
the scene.

Vocabulary. Every text here comes from the templates and word lists of this module and of
scenes.py; `vocabulary()` derives the complete word list from them (for the word-level
tokenizer `scene_tokenizer.SceneWordTokenizer`), so it cannot drift from the templates.
The editing instructions of `scene_edits` (`EDIT_TEMPLATES`) add a few words;
`vocabulary(edits=True)` appends them, sorted, after the words above, so that every word
keeps its id and the plain vocabulary (the demos' tokenizer) is unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from unimm_jax.data import scenes
from unimm_jax.data.scenes import COLOURS, SHAPE_PLURALS, SHAPES, SIZES, Scene, SceneObject

QUESTION_TYPES = ('caption', 'colour', 'shape', 'count', 'left_right', 'yes_no')
KINDS = ('understanding', 'generation')
CAPTION_REQUEST = 'Describe the image.'
LEFT_RIGHT_MIN_GAP = 0.15
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')

TEMPLATES = {
    'colour': 'What colour is {ref}?',
    'shape': 'What shape is {ref}?',
    'count_all': 'How many objects are there?',
    'count_colour': 'How many {colour} objects are there?',
    'count_shape': 'How many {shapes} are there?',
    'left_right': 'Is the {colour} {shape} left or right of the {colour2} {shape2}?',
    'yes_no': 'Is there {article} {colour} {shape}?',
    'caption_one': 'There is one object: {objects}.',
    'caption_many': 'There are {number} objects: {objects}.',
    'object': 'a {size} {colour} {shape} {position}',
    'ref_shape': 'the {shape}',
    'ref_size_shape': 'the {size} {shape}',
    'ref_colour': 'the {colour} object',
    'ref_size_colour': 'the {size} {colour} object',
    'prompt': 'Draw {article} {colour} {shape} {where}{more}.',
    'prompt_more': ' and {article} {colour} {shape} {where}',
}
# Editing instructions (`scene_edits`): edit kind -> template; 'ref_colour_shape' is the
# referring expression every object of a scene has (colour-shape pairs are unique).
EDIT_TEMPLATES = {
    'recolour': 'Make {ref} {colour}.',
    'move': 'Move {ref} to the {region}.',
    'remove': 'Remove {ref}.',
    'add': 'Add {article} {colour} {shape} {where}.',
    'ref_colour_shape': 'the {colour} {shape}',
}
LIST_JOINERS = (', ', ' and ')
ARTICLES = ('a', 'an')
# generation region -> the phrase a prompt uses for it.
REGION_PHRASES = {'left': 'on the left', 'right': 'on the right', 'top': 'at the top',
                  'bottom': 'at the bottom'}
ANSWER_WORDS = ('yes', 'no', 'left', 'right') + tuple(str(d) for d in range(10))
# (vertical third, horizontal third) of a centre -> position phrase.
_ROWS, _COLUMNS = ('top', 'middle', 'bottom'), ('left', 'centre', 'right')

# One piece per word, digit or punctuation mark; tokenizers split text the same way.
WORD_PATTERN = re.compile(r'[A-Za-z]+|\d|[^\sA-Za-z\d]')


def _smallest_shape_area() -> float:
  """Area (fraction of the image) of the smallest shape, a small triangle."""
  r = min(SIZES.values())
  grid = (np.arange(400) + 0.5) / 400 * 4 * r - 2 * r
  return float(scenes.shape_mask('triangle', grid[None, :], grid[:, None], r).mean()
               * (4 * r) ** 2)


# A generated target must cover at least this fraction of its region (a half image): half
# the area of the smallest shape, so a drawn object passes even when partly cut or blurred.
MIN_TARGET_FRACTION = round(0.5 * _smallest_shape_area() / 0.5, 4)


def position_phrase(obj: SceneObject) -> str:
  """'at the top left', 'on the left', 'at the bottom', 'in the centre', ... (thirds)."""
  row = _ROWS[min(int(obj.cy * 3), 2)]
  column = _COLUMNS[min(int(obj.cx * 3), 2)]
  return _phrase(row, column)


def _phrase(row: str, column: str) -> str:
  if row == 'middle':
    return 'in the centre' if column == 'centre' else f'on the {column}'
  return f'at the {row}' if column == 'centre' else f'at the {row} {column}'


def article(word: str) -> str:
  """'an' before a vowel ('an orange circle'), else 'a'."""
  return ARTICLES[1] if word[0] in 'aeiou' else ARTICLES[0]


def _join(items: list[str]) -> str:
  """'a', 'a and b', 'a, b and c'."""
  if len(items) == 1:
    return items[0]
  return LIST_JOINERS[0].join(items[:-1]) + LIST_JOINERS[1] + items[-1]


def caption(scene: Scene) -> str:
  """The template caption of `scene`: its objects from left to right, with positions."""
  objects = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
  described = [TEMPLATES['object'].format(size=o.size, colour=o.colour, shape=o.shape,
                                          position=position_phrase(o)) for o in objects]
  if len(objects) == 1:
    return TEMPLATES['caption_one'].format(objects=described[0])
  return TEMPLATES['caption_many'].format(number=NUMBER_WORDS[len(objects)],
                                          objects=_join(described))


def _unique(scene: Scene, **fields: str) -> list[SceneObject]:
  """The objects of `scene` whose attributes equal `fields`."""
  return [o for o in scene.objects if all(getattr(o, k) == v for k, v in fields.items())]


def _references(scene: Scene, obj: SceneObject, by: str) -> list[str]:
  """Referring expressions for `obj` that fit no other object; by 'shape' or 'colour'."""
  refs = []
  if len(_unique(scene, **{by: getattr(obj, by)})) == 1:
    refs.append(TEMPLATES[f'ref_{by}'].format(**{by: getattr(obj, by)}))
  elif len(_unique(scene, size=obj.size, **{by: getattr(obj, by)})) == 1:
    refs.append(TEMPLATES[f'ref_size_{by}'].format(size=obj.size, **{by: getattr(obj, by)}))
  return refs


def referring_expressions(scene: Scene, obj: SceneObject) -> list[str]:
  """Every expression for `obj` that fits no other object of `scene`: by shape ('the
  circle', 'the small circle'), by colour ('the red object', 'the large red object') when
  unique, and always 'the red circle'."""
  return (_references(scene, obj, 'shape') + _references(scene, obj, 'colour')
          + [EDIT_TEMPLATES['ref_colour_shape'].format(colour=obj.colour, shape=obj.shape)])


def _candidates(scene: Scene, qtype: str, rng: np.random.Generator
                ) -> list[tuple[str, str, bool]]:
  """Every (question, answer, held_out) of `qtype` that `scene` supports; may be empty."""
  held = scenes.HELD_OUT_COMBOS
  any_held = any(o.combo in held for o in scene.objects)
  out = []
  if qtype == 'caption':
    out.append((CAPTION_REQUEST, caption(scene), any_held))
  elif qtype in ('colour', 'shape'):
    by = 'shape' if qtype == 'colour' else 'colour'
    for obj in scene.objects:
      for ref in _references(scene, obj, by):
        out.append((TEMPLATES[qtype].format(ref=ref), getattr(obj, qtype), obj.combo in held))
  elif qtype == 'count':
    pick = int(rng.integers(3))
    if pick == 0:
      out.append((TEMPLATES['count_all'], str(len(scene.objects)), any_held))
    elif pick == 1:
      # Half the time a colour of the scene, so that not most answers are 0.
      colours = [o.colour for o in scene.objects] if rng.random() < 0.5 else list(COLOURS)
      colour = str(rng.choice(colours))
      out.append((TEMPLATES['count_colour'].format(colour=colour),
                  str(len(_unique(scene, colour=colour))), any_held))
    else:
      shape = str(rng.choice(SHAPES))
      out.append((TEMPLATES['count_shape'].format(shapes=SHAPE_PLURALS[shape]),
                  str(len(_unique(scene, shape=shape))), any_held))
  elif qtype == 'left_right':
    for a in scene.objects:
      for b in scene.objects:
        if a is not b and abs(a.cx - b.cx) >= LEFT_RIGHT_MIN_GAP:
          question = TEMPLATES['left_right'].format(colour=a.colour, shape=a.shape,
                                                    colour2=b.colour, shape2=b.shape)
          out.append((question, 'left' if a.cx < b.cx else 'right',
                      a.combo in held or b.combo in held))
  elif qtype == 'yes_no':
    present = {o.combo for o in scene.objects}
    if rng.random() < 0.5:
      combos, answer = sorted(present), 'yes'
    else:
      split = scenes.split_of_seed(scene.seed)
      combos, answer = [c for c in scenes.allowed_combos(split) if c not in present], 'no'
    for colour, shape in combos:
      out.append((TEMPLATES['yes_no'].format(article=article(colour), colour=colour,
                                             shape=shape), answer,
                  (colour, shape) in held))
  else:
    raise ValueError(f'question type must be one of {QUESTION_TYPES}, got {qtype!r}')
  return out


def scene_question(scene: Scene, qtype: str, rng: np.random.Generator
                   ) -> tuple[str, str, str, bool]:
  """(question_type, question, answer, held_out) for `scene`, preferring type `qtype`.

  Falls back to another type (drawn with `rng`) when `scene` supports no question of
  `qtype`; caption, count and yes_no are always supported.
  """
  options = _candidates(scene, qtype, rng)
  while not options:
    qtype = str(rng.choice(QUESTION_TYPES))
    options = _candidates(scene, qtype, rng)
  question, answer, held_out = options[int(rng.integers(len(options)))]
  return qtype, question, answer, held_out


def generation_prompt(scene: Scene, regions: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
  """(prompt, check) for a layout of `scenes.sample_generation_layout`.

  `check['min_fraction']` is `MIN_TARGET_FRACTION`.
  """
  first, *rest = scene.objects
  more = ''.join(TEMPLATES['prompt_more'].format(
      article=article(o.colour), colour=o.colour, shape=o.shape, where=REGION_PHRASES[r])
                 for o, r in zip(rest, regions[1:]))
  prompt = TEMPLATES['prompt'].format(article=article(first.colour), colour=first.colour,
                                      shape=first.shape, where=REGION_PHRASES[regions[0]],
                                      more=more)
  targets = [{'colour': o.colour, 'shape': o.shape, 'rgb': list(COLOURS[o.colour]),
              'region': list(scenes.REGIONS[r])} for o, r in zip(scene.objects, regions)]
  return prompt, {'targets': targets, 'min_fraction': MIN_TARGET_FRACTION}


def check_split_size(split: str, num_examples: int) -> None:
  """Raises ValueError unless `split` is a scenes split holding `num_examples` scenes."""
  if split not in scenes.SPLITS:
    raise ValueError(f'split must be one of {tuple(scenes.SPLITS)}, got {split!r}')
  start, stop = scenes.SPLITS[split]
  if not 1 <= num_examples <= stop - start:
    raise ValueError(f'num_examples must be in [1, {stop - start}] for split {split!r}, '
                     f'got {num_examples}')


def _user(*content: dict) -> dict:
  return {'role': 'user', 'content': list(content)}


def _assistant(*content: dict) -> dict:
  return {'role': 'assistant', 'content': list(content)}


class SceneConversations:
  """`num_examples` conversation records about scenes of `split` (module docstring).

  Args:
    split: a name in `scenes.SPLITS` ('train' or 'eval').
    kind: 'understanding' or 'generation'.
    num_examples: examples 0 .. num_examples - 1 use scene seeds split start + i.
    image_size: side in pixels of the rendered images (uint8 (s, s, 3)).
    seed: picks the question type and question of each scene (not the scenes).
    questions_per_image: question turns of an understanding example, 1 to 6.
  """

  def __init__(self, split: str, kind: str, num_examples: int, image_size: int = 64,
               seed: int = 0, questions_per_image: int = 1):
    if kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    check_split_size(split, num_examples)
    if not 1 <= questions_per_image <= len(QUESTION_TYPES):
      raise ValueError(f'questions_per_image must be in [1, {len(QUESTION_TYPES)}], got '
                       f'{questions_per_image}')
    self.split, self.kind, self.num_examples = split, kind, num_examples
    self.image_size, self.seed, self.questions_per_image = image_size, seed, questions_per_image

  def __len__(self) -> int:
    return self.num_examples

  def example(self, index: int) -> tuple[Scene, list[dict], dict]:
    """(scene, messages with the image left out, meta) of example `index`.

    The image content entry is `{'type': 'image'}` here; `__getitem__` adds the pixels.
    """
    if not 0 <= index < self.num_examples:
      raise IndexError(f'example {index} of {self.num_examples}')
    seed = scenes.scene_seed(self.split, index)
    meta = {'scene_seed': seed, 'split': self.split}
    if self.kind == 'generation':
      scene, regions = scenes.sample_generation_layout(seed)
      prompt, check = generation_prompt(scene, regions)
      messages = [_user({'type': 'text', 'text': prompt}), _assistant({'type': 'image'})]
      meta.update(question_type='generation', answer=None, check=check,
                  held_out=any(o.combo in scenes.HELD_OUT_COMBOS for o in scene.objects))
    else:
      scene = scenes.sample_scene(seed)
      rng = np.random.default_rng([self.seed, seed])
      messages, turns = [], []
      for turn in range(self.questions_per_image):
        wanted = QUESTION_TYPES[(index + self.seed + turn) % len(QUESTION_TYPES)]
        turns.append(scene_question(scene, wanted, rng))
        _, question, answer, _ = turns[-1]
        image = [{'type': 'image'}] if turn == 0 else []
        messages += [_user(*image, {'type': 'text', 'text': question}),
                     _assistant({'type': 'text', 'text': answer})]
      qtypes, _, answers, held_outs = (list(v) for v in zip(*turns))
      meta.update(question_type=qtypes[-1], answer=answers[-1], held_out=held_outs[-1],
                  question_types=qtypes, answers=answers, held_outs=held_outs)
    meta['scene'] = scene.to_dict()
    return scene, messages, meta

  def __getitem__(self, index: int) -> dict[str, Any]:
    """The conversation record of example `index` (contract format, image inline)."""
    scene, messages, meta = self.example(index)
    image = scenes.render(scene, self.image_size)
    for message in messages:
      for part in message['content']:
        if part['type'] == 'image':
          part['image'] = image
    return {'kind': self.kind, 'messages': messages, 'meta': meta}

  def __repr__(self) -> str:
    return (f'SceneConversations({self.split!r}, {self.kind!r}, {self.num_examples}, '
            f'{self.image_size} px, seed={self.seed}, '
            f'questions_per_image={self.questions_per_image})')


def _words(templates) -> set[str]:
  """The words of `templates` with their `{field}` slots removed."""
  return {w for t in templates for w in WORD_PATTERN.findall(re.sub(r'\{\w+\}', ' ', t))}


def vocabulary(edits: bool = False) -> tuple[str, ...]:
  """Every word, digit and punctuation mark that the texts of this module can contain.

  Derived from the templates (their `{field}` slots removed), the joiners, the position
  phrases and every word list that fills a slot; sorted. With `edits`, the words of the
  editing instructions (`EDIT_TEMPLATES`; their slots take words of the lists above) that
  are not among them follow, sorted: every word keeps its index.
  """
  texts = [re.sub(r'\{\w+\}', ' ', t) for t in TEMPLATES.values()]
  texts += [CAPTION_REQUEST, *LIST_JOINERS, *ARTICLES, *NUMBER_WORDS, *ANSWER_WORDS]
  texts += list(REGION_PHRASES.values())
  texts += [_phrase(r, c) for r in _ROWS for c in _COLUMNS]
  texts += [*COLOURS, *SHAPES, *SHAPE_PLURALS.values(), *SIZES]
  words = tuple(sorted({w for text in texts for w in WORD_PATTERN.findall(text)}))
  if not edits:
    return words
  return words + tuple(sorted(_words(EDIT_TEMPLATES.values()) - set(words)))
