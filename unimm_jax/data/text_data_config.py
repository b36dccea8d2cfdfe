"""The `data` block of a text (LM) run config: its fields, their defaults, and their checks.

    source              'builtin'  'builtin' | 'jsonl' | 'text_folder' (text_corpus.py)
    path                ''         jsonl: a glob, comma-separated globs, or a list of them;
                                   text_folder: a directory (files with TEXT_EXTENSIONS)
    text_key            'text'     jsonl: the field of each JSON object that holds its text
    eval_path           ''         eval documents, in the format of `path`; '' holds out every
                                   50th document (text_corpus.HOLDOUT_STRIDE) of the source
    tokenizer           'byte'     'byte' (built-in byte-level) or an HF tokenizer directory
    seq_len             256        tokens per packed row
    shuffle_seed        0          seeds the document order of the train stream, < 2**32
    num_workers         0          grain worker processes; 0 reads in the main process
    worker_buffer_size  2          batches each worker prepares ahead

`validate_text_data_config` fails before anything is built or compiled, naming the field.
"""

from __future__ import annotations

import os

import ml_collections

TEXT_SOURCES = ('builtin', 'jsonl', 'text_folder')


def default_text_data_config() -> ml_collections.ConfigDict:
  """A fresh text `data` ConfigDict with every field at its default (module docstring)."""
  return ml_collections.ConfigDict({
      'source': 'builtin',
      'path': '',
      'text_key': 'text',
      'eval_path': '',
      'tokenizer': 'byte',
      'seq_len': 256,
      'shuffle_seed': 0,
      'num_workers': 0,
      'worker_buffer_size': 2,
  })


def validate_text_data_config(data_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first missing or invalid field of `data_config`."""
  missing = sorted(set(default_text_data_config()) - set(data_config))
  if missing:
    raise ValueError(f'data_config is missing field(s) {missing}')
  if data_config.source not in TEXT_SOURCES:
    raise ValueError(f'data_config.source must be one of {TEXT_SOURCES}, got '
                     f'{data_config.source!r}')
  for field, minimum in (('seq_len', 2), ('shuffle_seed', 0), ('num_workers', 0),
                         ('worker_buffer_size', 1)):
    value = data_config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      raise ValueError(f'data_config.{field} must be an int >= {minimum}, got {value!r}')
  if data_config.shuffle_seed >= 2**32:  # grain's shuffle takes a uint32 seed
    raise ValueError(f'data_config.shuffle_seed must be < 2**32, got {data_config.shuffle_seed}')
  if data_config.source == 'builtin':
    for field in ('path', 'eval_path'):
      if data_config[field]:
        raise ValueError(f"data_config.{field} must be empty for source 'builtin', got "
                         f'{data_config[field]!r}')
  elif not data_config.path:
    raise ValueError(f'data_config.path is empty; source {data_config.source!r} needs it')
  if not isinstance(data_config.text_key, str) or not data_config.text_key:
    raise ValueError(f'data_config.text_key must be a non-empty string, got '
                     f'{data_config.text_key!r}')
  spec = data_config.tokenizer
  if spec != 'byte' and not (isinstance(spec, str) and os.path.isdir(spec)):
    raise ValueError(f"data_config.tokenizer must be 'byte' or a directory holding an HF "
                     f'tokenizer.json, got {spec!r}')
