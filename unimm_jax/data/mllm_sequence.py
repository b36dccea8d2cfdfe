"""Conversation records -> token sequences with image slots, for unified MLLMs (model-free).

A record (the MLLM data contract): `{'kind': 'understanding' | 'generation' | 'editing',
'messages': [{'role': 'system' | 'user' | 'assistant', 'content': [{'type': 'text', 'text':
str} | {'type': 'image', 'image': uint8 (H, W, 3)} | {'type': 'image', 'path': str}, ...]},
...], 'meta': {...}}`. The kind sorts records into the mixture; every kind is encoded the
same way: an editing conversation (a user turn with the image and an instruction, then
assistant images and further instructions) reads its first image and writes the others.

Turn templates (`encode_conversation`, config.data.chat_template):

    plain   [BOS] { tokenizer.encode('<' + role + '>') content [EOS] } per message
    chatml  { encode('<|im_start|>' + role + '\n') content [EOS] encode('\n') } per message,
            after a system turn holding CHATML_SYSTEM_PROMPT when the conversation has
            none; [EOS] must be the tokenizer's `<|im_end|>` (Qwen's format, as the EvoTok
            authors' `conv_qwen` renders it)

where content is its text items (`tokenizer.encode(text)`) and image spans in order and
[EOS] is `ids.eos`, the end of a turn. The role marker is encoded on its own, so a BPE
never merges it with the content; tokenizers that have `<user>` / `<assistant>` as special
tokens (the scenes' word tokenizer) give it one id, others spell it.

An image span has one of two layouts (`ImageSlots.layout`). 'rows' (UniToken's):

    [BOI] [size] [size] { D rows of: D code slots, [EOR] } [SEP] {continuous} [EOI]

size = `ids.size_base + image_size // size_unit` (square: height and width); the D x D code
slots hold the pad id (the step fills them with `image_offset + code`); the discrete part
only with `slots.discrete_side` = D, [SEP] and the continuous part (`anyres.continuous_slots`:
ViT feature slots holding pad, and [EOR] text tokens) only with `slots.anyres`.

'plain' (LLaVA's, as EvoTok's MLLM lays images out): an image the model reads (a user or
system turn) is F = D^2 continuous slots and nothing else; an image it writes (an assistant
turn) is [BOI] {D^2 code slots, row-major} [EOI], whose codes a generation head predicts
rather than the LM head (the system says so: `UnifiedSystem.codes_in_vocabulary`).

'blocks' (BitDance's MLLM, which writes an image P tokens at a time): an image it reads is
[BOI] [size] [size] {D^2 continuous slots} [EOI]; an image it writes is
[BOI] [size] [size] {P - 1 query tokens} {D^2 code slots} [EOI]. size = size_base + D (the
image's tokens per side: their <res_k> token, k units of `size_unit` pixels); query i has id
`ids.query_base` + i - 1 (P - 1 = `slots.queries`). The slots hold the image's codes in the
order the system generates them (their patch order). The sizes and queries are never
targets: a generation prompt supplies them (`image_opening`).

Supervision (`supervised[t]`: token t is a target): user and system turns never; an
assistant turn's text, image span and [EOS] are; inside an image span [BOI], size, code,
[EOR] and [EOI] only in an assistant turn (generation), [SEP] always, the continuous
slots and their [EOR]s never (the authors' labels); in 'blocks' [BOI], the code slots and
[EOI] of a written image. The role prefixes are not.

Pixels. The discrete branch sees the image scaled (bicubic) so its short side is
`image_size`, then its central square: the authors' center_crop at the centre instead of
a random offset, so a sequence is a function of its record. The ViT sees `anyres.vit_tiles`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from unimm_jax.data.anyres import EOR_SLOT, AnyRes, continuous_slots, vit_tiles
from unimm_jax.data.transforms import Unreadable, as_rgb_uint8, crop_or_resize, decode_rgb
from unimm_jax.data.transforms import normalize
from unimm_jax.data.text_tokenizer import IM_END

KINDS = ('understanding', 'generation', 'editing')
ROLES = ('system', 'user', 'assistant')
GENERATION_PROMPTS = ('answer', 'image')


TEMPLATES = ('plain', 'chatml')
# Qwen's ChatML as the EvoTok authors' `conv_qwen` renders it: its system turn when a
# conversation has none.
CHATML_SYSTEM_PROMPT = 'You are a helpful assistant.'


def role_prefix(role: str, template: str = 'plain') -> str:
  """The text that opens a turn of `role` (module docstring)."""
  return f'<|im_start|>{role}\n' if template == 'chatml' else f'<{role}>'


LAYOUTS = ('rows', 'plain', 'blocks')
# Layouts whose images are D^2 slots of one kind (no ViT tiles, no rows).
FLAT_LAYOUTS = ('plain', 'blocks')


@dataclasses.dataclass(frozen=True)
class ImageSlots:
  """How an image occupies a sequence.

  image_size: square side in pixels given to the discrete tokenizer.
  discrete_side: D, codes per side (image_size // downsample); None: no discrete branch.
  size_unit: pixels per size-token unit (Chameleon: 32; 'blocks': the tokenizer's
    downsampling, so the size token counts tokens; 'plain' has no size tokens).
  anyres: the continuous branch's tiling; None: no continuous branch.
  layout: 'rows', 'plain' or 'blocks' (module docstring); 'plain' and 'blocks' need
    discrete_side and no anyres (their continuous slots are the D^2 tokens of the image).
  queries: P - 1 query tokens before a written image's codes ('blocks' only).
  """

  image_size: int
  discrete_side: int | None
  size_unit: int
  anyres: AnyRes | None
  layout: str = 'rows'
  queries: int = 0

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f'ImageSlots: layout {self.layout!r} is not one of {LAYOUTS}')
    if self.layout in FLAT_LAYOUTS and (self.discrete_side is None or self.anyres is not None):
      raise ValueError(f'ImageSlots: the {self.layout} layout needs a discrete_side and no '
                       'anyres')
    if self.queries and self.layout != 'blocks' or self.queries < 0:
      raise ValueError(f'ImageSlots: queries={self.queries} needs the blocks layout and >= 0')
    if self.image_size <= 0 or self.size_unit <= 0 or self.image_size % self.size_unit:
      raise ValueError(f'ImageSlots: image_size {self.image_size} must be a positive multiple '
                       f'of size_unit {self.size_unit}')
    if self.discrete_side is not None and self.discrete_side <= 0:
      raise ValueError(f'ImageSlots: discrete_side must be > 0 or None, got '
                       f'{self.discrete_side}')
    if self.discrete_side is None and self.anyres is None:
      raise ValueError('ImageSlots: an image needs a discrete_side, an anyres, or both')

  @property
  def codes_per_image(self) -> int:
    """D^2 discrete slots per image (0 without a discrete branch)."""
    return (self.discrete_side or 0)**2

  @property
  def features_per_image(self) -> int:
    """F continuous feature rows per image (plain: D^2; 0 without anyres)."""
    if self.layout in FLAT_LAYOUTS:
      return self.codes_per_image
    return 0 if self.anyres is None else self.anyres.features_per_image

  @property
  def size_units(self) -> int:
    """n of the size token size_base + n."""
    return self.image_size // self.size_unit


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The ids of the image layout and of turns (Chameleon's at paper size: pad 0, bos 0,
  eos 8710, boi 8197, eoi 8196, sep 8198, eor 8803, size_base 8804, image_offset 4,
  num_image_codes 8192). Code c has id image_offset + c; size n has id size_base + n;
  query i (1-based, 'blocks') has id query_base + i - 1.
  The 'plain' layout uses none of sep, eor, size_base and image codes (None, 0): its codes
  are not vocabulary ids; 'blocks' uses size_base and query_base."""

  pad: int
  bos: int
  eos: int
  boi: int
  eoi: int
  sep: int | None = None
  eor: int | None = None
  size_base: int | None = None
  image_offset: int | None = None
  num_image_codes: int = 0
  query_base: int | None = None

  def size_token(self, units: int) -> int:
    return self.size_base + units

  def image_ids(self, slots: ImageSlots | None = None) -> dict[str, range]:
    """Name -> ids of everything that belongs to images (size tokens only with `slots`)."""
    named = {name: range(getattr(self, name), getattr(self, name) + 1)
             for name in ('boi', 'eoi', 'sep', 'eor') if getattr(self, name) is not None}
    if self.num_image_codes:
      named['image codes'] = range(self.image_offset, self.image_offset + self.num_image_codes)
    if slots is not None and slots.layout != 'plain' and self.size_base is not None:
      size = self.size_token(slots.size_units)
      named['size token'] = range(size, size + 1)
    if slots is not None and slots.queries and self.query_base is not None:
      named['query tokens'] = range(self.query_base, self.query_base + slots.queries)
    return named

  def missing_for(self, slots: ImageSlots) -> list[str]:
    """The fields `slots`' layout needs that are None (or 0 image codes)."""
    if slots.layout == 'blocks':
      needed = ['size_base'] + (['query_base'] if slots.queries else [])
      return [name for name in needed if getattr(self, name) is None]
    if slots.layout != 'rows':
      return []
    needed = ['size_base'] + (['eor'] if slots.discrete_side else []) + (
        ['sep', 'eor'] if slots.anyres is not None else [])
    missing = sorted({name for name in needed if getattr(self, name) is None})
    if slots.discrete_side and (self.image_offset is None or not self.num_image_codes):
      missing.append('image_offset / num_image_codes')
    return missing

  def check(self, tokenizer, slots: ImageSlots | None = None) -> None:
    """Raises ValueError naming the ids that collide.

    Within: the image ids (`image_ids`; the size token only when `slots` is given), bos and
    eos must be pairwise distinct, and pad must not be an image id. With `tokenizer` (a
    `text_tokenizer.TextTokenizer`): no image id may be its bos, eos or pad, and no image,
    bos or eos id may be a regular token of its vocabulary (one that
    `decode([id], skip_special_tokens=True)` spells), which text could encode to. A
    vocabulary that holds the image tokens itself must mark them special.
    """
    if min(v for v in dataclasses.astuple(self) if v is not None) < 0:
      raise ValueError(f'SpecialIds must be >= 0: {self}')
    if slots is not None and self.missing_for(slots):
      raise ValueError(f'SpecialIds: the {slots.layout!r} image layout needs '
                       f'{self.missing_for(slots)}')
    named = dict(self.image_ids(slots))
    named.update(bos=range(self.bos, self.bos + 1), eos=range(self.eos, self.eos + 1))
    items = list(named.items())
    for i, (name, ids) in enumerate(items):
      for other, other_ids in items[i + 1:]:
        if ids.start < other_ids.stop and other_ids.start < ids.stop:
          raise ValueError(f'SpecialIds: {name} {_show(ids)} and {other} {_show(other_ids)} '
                           'overlap')
    for name, ids in self.image_ids(slots).items():
      if self.pad in ids:
        raise ValueError(f'SpecialIds: pad {self.pad} is one of the {name} {_show(ids)}')
    if tokenizer is None:
      return
    own = {'bos': tokenizer.bos_id, 'eos': tokenizer.eos_id, 'pad': tokenizer.pad_id,
           **{f'eos_ids[{i}]': e for i, e in enumerate(tokenizer.eos_ids)}}
    for name, ids in self.image_ids(slots).items():
      for what, value in own.items():
        if value is not None and value in ids:
          raise ValueError(f'SpecialIds: {name} {_show(ids)} include {value}, the text '
                           f'tokenizer {tokenizer!r} {what} id')
    for name, ids in named.items():
      for token in range(ids.start, min(ids.stop, tokenizer.vocab_size)):
        text = tokenizer.decode([token], skip_special_tokens=True)
        if text:
          raise ValueError(f'SpecialIds: {name} {_show(ids)} include {token}, a regular '
                           f'token {text!r} of the text tokenizer {tokenizer!r}, which text '
                           'can encode to')


def _show(ids: range) -> str:
  return f'{ids.start}' if len(ids) == 1 else f'{ids.start}..{ids.stop - 1}'


@dataclasses.dataclass
class EncodedSequence:
  """One encoded record, n tokens with m images.

  tokens: int32 (n,) ids; image slots hold the pad id.
  supervised: bool (n,) token t is a training target (module docstring).
  discrete_slot: int32 (n,) -1, or j * D^2 + k for code k (row-major) of image j.
  continuous_slot: int32 (n,) -1, or j * F + f for feature row f of image j.
  images: float32 (m, image_size, image_size, 3) in [-1, 1] (discrete branch pixels).
  vit_tiles: float32 (m, 1 + max_tiles, S, S, 3) in [-1, 1], or None without anyres.
  meta: the record's meta plus 'kind' and 'image_wh' (original (W, H) of each image).
  """

  tokens: np.ndarray
  supervised: np.ndarray
  discrete_slot: np.ndarray
  continuous_slot: np.ndarray
  images: np.ndarray
  vit_tiles: np.ndarray | None
  meta: dict[str, Any]

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def num_images(self) -> int:
    return len(self.images)


def record_problem(record: Any) -> str | None:
  """What is malformed in `record` (module docstring format), or None."""
  if not isinstance(record, dict) or record.get('kind') not in KINDS:
    return f'a record must be a dict with a "kind" in {KINDS}'
  messages = record.get('messages')
  if not isinstance(messages, list) or not messages:
    return 'a record needs a non-empty "messages" list'
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or message.get('role') not in ROLES:
      return f'messages[{i}] must be a dict with a "role" in {ROLES}'
    content = message.get('content')
    if not isinstance(content, list):
      return f'messages[{i}]["content"] must be a list'
    for k, item in enumerate(content):
      kind = item.get('type') if isinstance(item, dict) else None
      if kind == 'text' and isinstance(item.get('text'), str):
        continue
      if kind == 'image' and (isinstance(item.get('image'), np.ndarray)
                              or isinstance(item.get('path'), str)):
        continue
      return (f'messages[{i}]["content"][{k}] must be {{"type": "text", "text": str}} or '
              '{"type": "image", "image": array | "path": str}')
  if not isinstance(record.get('meta', {}), dict):
    return '"meta" must be a dict'
  return None


def load_image(item: dict, image_root: str = '') -> np.ndarray | Unreadable:
  """uint8 (H, W, 3) of an image content item: inline, or read from `image_root`/path."""
  where = 'inline image'
  try:
    if 'image' in item:
      image = as_rgb_uint8(item['image'])
    else:
      where = os.path.join(image_root, item['path'])
      with open(where, 'rb') as f:
        image = decode_rgb(f.read())
    if min(image.shape[:2]) == 0:
      raise ValueError(f'empty image of shape {image.shape}')
    return image
  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ... by codec; any of
  # them makes this record unreadable, never stops the run.
  except Exception as err:  # pylint: disable=broad-exception-caught
    return Unreadable(f'{where}: {type(err).__name__}: {err}')


class _Builder:
  """Accumulates the per-token lists of one sequence."""

  def __init__(self):
    self.tokens, self.supervised, self.discrete, self.continuous = [], [], [], []

  def add(self, tokens: Sequence[int], supervised: bool, discrete=None, continuous=None):
    n = len(tokens)
    self.tokens += list(tokens)
    self.supervised += [supervised] * n
    self.discrete += [-1] * n if discrete is None else list(discrete)
    self.continuous += [-1] * n if continuous is None else list(continuous)


def _add_plain_image(out: _Builder, j: int, ids: SpecialIds, slots: ImageSlots,
                     in_answer: bool) -> None:
  """Appends image j in the plain layout (module docstring)."""
  n = slots.codes_per_image
  if in_answer:
    out.add([ids.boi], True)
    out.add([ids.pad] * n, True, discrete=range(j * n, (j + 1) * n))
    out.add([ids.eoi], True)
  else:
    out.add([ids.pad] * n, False, continuous=range(j * n, (j + 1) * n))


def image_opening(ids: SpecialIds, slots: ImageSlots) -> list[int]:
  """The ids that open an image the model writes, up to its first code (what a generation
  prompt ends with): [BOI]; in 'blocks' also the size twice and the P - 1 queries."""
  if slots.layout != 'blocks':
    return [ids.boi]
  size = ids.size_token(slots.size_units)
  queries = range(ids.query_base, ids.query_base + slots.queries) if slots.queries else []
  return [ids.boi, size, size] + list(queries)


def _add_blocks_image(out: _Builder, j: int, ids: SpecialIds, slots: ImageSlots,
                      in_answer: bool) -> None:
  """Appends image j in the blocks layout (module docstring)."""
  n, opening = slots.codes_per_image, image_opening(ids, slots)
  if in_answer:
    out.add(opening[:1], True)
    out.add(opening[1:], False)
    out.add([ids.pad] * n, True, discrete=range(j * n, (j + 1) * n))
    out.add([ids.eoi], True)
  else:
    out.add(opening[:3], False)
    out.add([ids.pad] * n, False, continuous=range(j * n, (j + 1) * n))
    out.add([ids.eoi], False)


def _add_image(out: _Builder, image: np.ndarray, j: int, ids: SpecialIds, slots: ImageSlots,
               in_answer: bool) -> None:
  """Appends the span of image j (module docstring)."""
  if slots.layout == 'plain':
    _add_plain_image(out, j, ids, slots, in_answer)
    return
  if slots.layout == 'blocks':
    _add_blocks_image(out, j, ids, slots, in_answer)
    return
  out.add([ids.boi] + [ids.size_token(slots.size_units)] * 2, in_answer)
  side = slots.discrete_side
  for row in range(side or 0):
    first = j * side * side + row * side
    out.add([ids.pad] * side + [ids.eor], in_answer,
            discrete=list(range(first, first + side)) + [-1])
  if slots.anyres is not None:
    out.add([ids.sep], True)
    entries = continuous_slots((image.shape[1], image.shape[0]), slots.anyres)
    features = slots.features_per_image
    out.add([ids.eor if e == EOR_SLOT else ids.pad for e in entries], False,
            continuous=[-1 if e == EOR_SLOT else j * features + e for e in entries])
  out.add([ids.eoi], in_answer)


def _empty_images(slots: ImageSlots | None) -> tuple[np.ndarray, np.ndarray | None]:
  side = 0 if slots is None else slots.image_size
  images = np.zeros((0, side, side, 3), np.float32)
  if slots is None or slots.anyres is None:
    return images, None
  s = slots.anyres.tile_size
  return images, np.zeros((0, 1 + slots.anyres.max_tiles, s, s, 3), np.float32)


def _finish(out: _Builder, images: list, tiles: list, slots: ImageSlots | None,
            meta: dict) -> EncodedSequence:
  empty_images, empty_tiles = _empty_images(slots)
  return EncodedSequence(
      tokens=np.asarray(out.tokens, np.int32),
      supervised=np.asarray(out.supervised, bool),
      discrete_slot=np.asarray(out.discrete, np.int32),
      continuous_slot=np.asarray(out.continuous, np.int32),
      images=np.stack(images) if images else empty_images,
      vit_tiles=None if empty_tiles is None else np.stack(tiles) if tiles else empty_tiles,
      meta=meta)


def encode_conversation(record: dict, tokenizer, ids: SpecialIds, slots: ImageSlots, *,
                        generation_prompt: str | None = None, image_root: str = '',
                        template: str = 'plain') -> EncodedSequence | Unreadable:
  """The sequence of `record` (module docstring), or `Unreadable` when an image fails.

  Args:
    record: a conversation record; a malformed one raises ValueError (`record_problem`).
    tokenizer: a `text_tokenizer.TextTokenizer` (only `encode` is used).
    ids, slots: the special ids and the image layout.
    generation_prompt: None encodes the whole conversation (training); 'answer' encodes
      the messages up to the last user turn (a trailing assistant turn, the reference, is
      left out) and ends after the assistant prefix, so the model writes the answer;
      'image' does the same and appends [BOI], the start of a generated image.
    image_root: the directory relative image paths are read from.
    template: 'plain' or 'chatml', the turn template (module docstring).
  """
  problem = record_problem(record)
  if problem:
    raise ValueError(f'encode_conversation: {problem}')
  if generation_prompt not in (None,) + GENERATION_PROMPTS:
    raise ValueError(f'generation_prompt must be None or one of {GENERATION_PROMPTS}, got '
                     f'{generation_prompt!r}')
  messages = record['messages']
  if generation_prompt is not None:
    users = [i for i, m in enumerate(messages) if m['role'] == 'user']
    if not users:
      raise ValueError('a generation prompt needs a user turn')
    messages = messages[:users[-1] + 1]
  if template not in TEMPLATES:
    raise ValueError(f'chat template {template!r} is not one of {TEMPLATES}')
  out, images, tiles, sizes = _Builder(), [], [], []
  if template == 'chatml':
    if tokenizer.encode(IM_END) != [ids.eos]:
      raise ValueError(f'the chatml template ends a turn with {IM_END}, which the tokenizer '
                       f'encodes as {tokenizer.encode(IM_END)}, not the end-of-turn id '
                       f'{ids.eos} (config.tokens.eos)')
    if messages[0]['role'] != 'system':
      messages = [{'role': 'system', 'content': [{'type': 'text', 'text': CHATML_SYSTEM_PROMPT}]}
                  ] + list(messages)
  else:
    out.add([ids.bos], False)
  for message in messages:
    in_answer = message['role'] == 'assistant'
    out.add(tokenizer.encode(role_prefix(message['role'], template)), False)
    for item in message['content']:
      if item['type'] == 'text':
        out.add(tokenizer.encode(item['text']), in_answer)
        continue
      image = load_image(item, image_root)
      if isinstance(image, Unreadable):
        return image
      _add_image(out, image, len(images), ids, slots, in_answer)
      sizes.append([int(image.shape[1]), int(image.shape[0])])
      square = crop_or_resize(image, slots.image_size, 'center_crop', None)
      images.append(normalize(square))
      if slots.anyres is not None:
        tiles.append(vit_tiles(image, slots.anyres))
    out.add([ids.eos], in_answer)
    if template == 'chatml':
      out.add(tokenizer.encode('\n'), False)
  if generation_prompt is not None:
    out.add(tokenizer.encode(role_prefix('assistant', template)), False)
    if generation_prompt == 'image':
      out.add(image_opening(ids, slots), False)
  meta = {**record.get('meta', {}), 'kind': record['kind'], 'image_wh': sizes}
  return _finish(out, images, tiles, slots, meta)


def unconditional_image_prompt(ids: SpecialIds, slots: ImageSlots | None = None
                               ) -> EncodedSequence:
  """[BOI] alone ('blocks': the whole `image_opening`): what the classifier-free-guidance
  stream sees (only tokens from BOI on).

  With `slots` its empty image arrays have the config's trailing shapes, so it collates
  with the conditional prompts' layout.
  """
  out = _Builder()
  out.add([ids.boi] if slots is None else image_opening(ids, slots), False)
  return _finish(out, [], [], slots, {'kind': 'generation', 'image_wh': []})


def unconditional_sequence(seq: EncodedSequence, ids: SpecialIds) -> EncodedSequence | None:
  """A text-to-image sequence as the unconditional guidance stream sees it: its image from
  [BOI] on (the prompt dropped, [BOI] unsupervised, as `unconditional_image_prompt`), for
  classifier-free-guidance training. None when `seq` is not one image generated from text
  alone (an image before the generated one, or none)."""
  boi = np.flatnonzero((seq.tokens == ids.boi) & seq.supervised)
  if len(boi) == 0 or seq.num_images != 1:
    return None
  start = int(boi[0])
  if (seq.continuous_slot[:start] >= 0).any() or (seq.discrete_slot[:start] >= 0).any():
    return None
  supervised = seq.supervised[start:].copy()
  supervised[0] = False
  return dataclasses.replace(seq, tokens=seq.tokens[start:], supervised=supervised,
                             discrete_slot=seq.discrete_slot[start:],
                             continuous_slot=seq.continuous_slot[start:],
                             meta={**seq.meta, 'unconditional': True})


def collate_prompts(seqs: Sequence[EncodedSequence], images_per_row: int, *,
                    pad_id: int = 0) -> dict[str, np.ndarray]:
  """Prompts as one LEFT-padded batch (one segment per row), for generation.

  Returns, with b = len(seqs), n = the longest prompt, P = images_per_row:
    tokens            int32 (b, n)   pad_id on the left padding
    attention_mask    bool (b, n)    True on prompt tokens
    segment_ids       int32 (b, n)   1 on prompt tokens, 0 on padding
    positions         int32 (b, n)   0, 1, ... from each prompt's first token; 0 on padding
    discrete_index    int32 (b, n)   the sequences' discrete_slot, -1 on padding
    continuous_index  int32 (b, n)   the sequences' continuous_slot, -1 on padding
    images            float32 (b, P, image_size, image_size, 3), unused images 0
    vit_tiles         float32 (b, P, 1 + max_tiles, S, S, 3) (when the sequences have them)
  """
  if not seqs:
    raise ValueError('collate_prompts needs at least one sequence')
  for i, seq in enumerate(seqs):
    if seq.num_images > images_per_row:
      raise ValueError(f'prompt {i} has {seq.num_images} images, more than images_per_row '
                       f'{images_per_row}')
    for field in ('images', 'vit_tiles'):
      got, want = getattr(seq, field), getattr(seqs[0], field)
      if (got is None) != (want is None) or (got is not None and
                                             got.shape[1:] != want.shape[1:]):
        raise ValueError(f'prompt {i} has {field} of another layout than prompt 0')
  b, n = len(seqs), max(len(seq) for seq in seqs)
  batch = {'tokens': np.full((b, n), pad_id, np.int32),
           'attention_mask': np.zeros((b, n), bool),
           'segment_ids': np.zeros((b, n), np.int32),
           'positions': np.zeros((b, n), np.int32),
           'discrete_index': np.full((b, n), -1, np.int32),
           'continuous_index': np.full((b, n), -1, np.int32),
           'images': np.zeros((b, images_per_row) + seqs[0].images.shape[1:], np.float32)}
  if seqs[0].vit_tiles is not None:
    batch['vit_tiles'] = np.zeros((b, images_per_row) + seqs[0].vit_tiles.shape[1:],
                                  np.float32)
  for i, seq in enumerate(seqs):
    start = n - len(seq)
    batch['tokens'][i, start:] = seq.tokens
    batch['attention_mask'][i, start:] = True
    batch['segment_ids'][i, start:] = 1
    batch['positions'][i, start:] = np.arange(len(seq))
    batch['discrete_index'][i, start:] = seq.discrete_slot
    batch['continuous_index'][i, start:] = seq.continuous_slot
    batch['images'][i, :seq.num_images] = seq.images
    if seq.vit_tiles is not None:
      batch['vit_tiles'][i, :seq.num_images] = seq.vit_tiles
  return batch
