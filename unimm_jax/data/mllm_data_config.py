"""The `data` block of an MLLM (unified model) run config: fields, defaults, checks.

    source                'scenes'  'scenes' (built-in procedural scenes,
                                    scene_conversations.SceneConversations) | 'jsonl'
    path                  ''        jsonl: a glob, comma-separated globs, or a list of
                                    conversation files (one record per line, mllm_data.py)
    image_root            ''        jsonl: directory of relative image paths; '' = each
                                    JSONL file's own directory
    eval_path             ''        jsonl eval files, as `path`; '' holds out every
                                    `mllm_data.HOLDOUT_STRIDE`-th record of each kind
    tokenizer             'byte'    'byte', 'scene_words', 'scene_edit_words' (with the
                                    editing instructions' words) or an HF tokenizer directory
    chat_template         'plain'   the turn template: 'plain' or 'chatml' (Qwen's;
                                    mllm_sequence.py)
    seq_len               1024      tokens per packed row (L)
    images_per_row        4         images a packed row holds (P)
    image_size            64        scenes: side in px of the rendered images
    shuffle_seed          0         seeds the record order and the kind mixture, < 2**32
    understanding_weight  1.0       the understanding : generation : editing mixture of
    generation_weight     1.0       the train stream (0 leaves a kind out; Tables 5-6 vary
    editing_weight        0.0       it); editing records are multi-round image edits
    num_train_examples    100000    scenes: examples per kind in the train split
    num_eval_examples     256       scenes: examples per kind in the eval split
    scene_seed            0         scenes: seeds the questions asked about each scene
    questions_per_image   1         scenes: question turns of a train understanding example
                                    (1-6, distinct types; the eval split asks one each)
    max_edits             3         scenes: rounds of an editing example, 1 to max_edits
                                    (scene_edits.SceneEdits; images_per_row must hold
                                    max_edits + 1 images when editing_weight > 0)
    cfg_dropout           0.0       classifier-free guidance training: the probability that
                                    a text-to-image record trains as the unconditional
                                    stream ([BOI] and its image) and that an editing
                                    instruction is emptied (mllm_data._EncodeDroppingConditions)
    num_workers           0         grain worker processes; 0 reads in the main process
    worker_buffer_size    2         batches each worker prepares ahead

`validate_mllm_data_config` fails before anything is built or compiled, naming the field.
"""

from __future__ import annotations

import os

import ml_collections

MLLM_SOURCES = ('scenes', 'jsonl')
BUILTIN_TOKENIZERS = ('byte', 'scene_words', 'scene_edit_words')
CHAT_TEMPLATES = ('plain', 'chatml')  # mllm_sequence.TEMPLATES (no import: model-free checks)
# kind -> the field of its weight in the train mixture (mllm_sequence.KINDS, in order).
KIND_WEIGHT_FIELDS = {'understanding': 'understanding_weight',
                      'generation': 'generation_weight', 'editing': 'editing_weight'}
WEIGHT_FIELDS = tuple(KIND_WEIGHT_FIELDS.values())
_MAX_QUESTIONS_PER_IMAGE = 6  # len(scene_conversations.QUESTION_TYPES)
# SceneConversations' split sizes (scenes.SPLITS), checked here without importing scenes.
_SCENE_SPLIT_SIZES = {'num_train_examples': 1_000_000, 'num_eval_examples': 10_000}


# Fields newer than some saved run configs: absent means their default.
_ADDED_LATER = {'cfg_dropout'}


def default_mllm_data_config() -> ml_collections.ConfigDict:
  """A fresh MLLM `data` ConfigDict with every field at its default (module docstring)."""
  return ml_collections.ConfigDict({
      'source': 'scenes',
      'path': '',
      'image_root': '',
      'eval_path': '',
      'tokenizer': 'byte',
      'chat_template': 'plain',
      'seq_len': 1024,
      'images_per_row': 4,
      'image_size': 64,
      'shuffle_seed': 0,
      'understanding_weight': 1.0,
      'generation_weight': 1.0,
      'editing_weight': 0.0,
      'num_train_examples': 100_000,
      'num_eval_examples': 256,
      'scene_seed': 0,
      'questions_per_image': 1,
      'max_edits': 3,
      'cfg_dropout': 0.0,
      'num_workers': 0,
      'worker_buffer_size': 2,
  })


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate_mllm_data_config(data_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first missing or invalid field of `data_config`."""
  missing = sorted(set(default_mllm_data_config()) - set(data_config) - _ADDED_LATER)
  if missing:
    raise ValueError(f'data_config is missing field(s) {missing}')
  if data_config.source not in MLLM_SOURCES:
    raise ValueError(f'data_config.source must be one of {MLLM_SOURCES}, got '
                     f'{data_config.source!r}')
  for field, minimum in (('seq_len', 8), ('images_per_row', 1), ('image_size', 1),
                         ('shuffle_seed', 0), ('num_train_examples', 1),
                         ('num_eval_examples', 1), ('scene_seed', 0),
                         ('questions_per_image', 1), ('max_edits', 1), ('num_workers', 0),
                         ('worker_buffer_size', 1)):
    value = data_config[field]
    if not _is_int(value) or value < minimum:
      raise ValueError(f'data_config.{field} must be an int >= {minimum}, got {value!r}')
  dropout = data_config.get('cfg_dropout', 0.0)
  if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
    raise ValueError(f'data_config.cfg_dropout must be a probability in [0, 1), got {dropout!r}')
  if data_config.chat_template not in CHAT_TEMPLATES:
    raise ValueError(f'data_config.chat_template must be one of {CHAT_TEMPLATES}, got '
                     f'{data_config.chat_template!r}')
  if data_config.shuffle_seed >= 2**32:  # grain's shuffle takes a uint32 seed
    raise ValueError(f'data_config.shuffle_seed must be < 2**32, got {data_config.shuffle_seed}')
  for field in WEIGHT_FIELDS:
    value = data_config[field]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
      raise ValueError(f'data_config.{field} must be a number >= 0, got {value!r}')
  if not sum(data_config[field] for field in WEIGHT_FIELDS) > 0:
    raise ValueError('data_config.understanding_weight and data_config.generation_weight '
                     'are both 0, and so is data_config.editing_weight: the train stream '
                     'would be empty')
  if data_config.source == 'scenes':
    for field in ('path', 'image_root', 'eval_path'):
      if data_config[field]:
        raise ValueError(f"data_config.{field} must be empty for source 'scenes', got "
                         f'{data_config[field]!r}')
    if data_config.questions_per_image > _MAX_QUESTIONS_PER_IMAGE:
      raise ValueError(f'data_config.questions_per_image must be <= {_MAX_QUESTIONS_PER_IMAGE} '
                       f'(the question types), got {data_config.questions_per_image}')
    if data_config.editing_weight and data_config.images_per_row <= data_config.max_edits:
      raise ValueError(f'data_config.images_per_row={data_config.images_per_row} cannot hold '
                       f'an editing example of data_config.max_edits={data_config.max_edits} '
                       f'rounds ({data_config.max_edits + 1} images)')
    for field, size in _SCENE_SPLIT_SIZES.items():
      if data_config[field] > size:
        raise ValueError(f'data_config.{field} must be <= {size} (the scenes split size), '
                         f'got {data_config[field]}')
  else:
    # An empty path passes here, so that a config for real data (configs/unitoken.py:paper)
    # can be planned before the data exists; reading the data refuses it.
    if data_config.image_root and not os.path.isdir(data_config.image_root):
      raise ValueError(f'data_config.image_root {data_config.image_root!r} is not a directory')
  spec = data_config.tokenizer
  # '' is "not chosen yet" (the checkpoint's tokenizer of a paper config); loading refuses it.
  if spec and spec not in BUILTIN_TOKENIZERS and not (isinstance(spec, str) and os.path.isdir(spec)):
    raise ValueError(f'data_config.tokenizer must be one of {BUILTIN_TOKENIZERS} or a '
                     f'directory holding an HF tokenizer.json, got {spec!r}')
