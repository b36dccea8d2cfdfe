"""The `data` block of a run config: its fields, their defaults, and their checks.

    source                'builtin'   'builtin' | 'synthetic' | 'scenes' | 'scene_classes' |
                                      'folder' | 'array_record' | 'tfds'; 'scene_classes'
                                      are one-object scenes of 28 colour-shape classes
                                      (scenes.CLASS_NAMES), with class labels
    path                  ''          folder root, or ArrayRecord glob(s) (comma-separated or a
                                      list); each ArrayRecord record is one encoded image's bytes
    tfds_name             ''          TFDS dataset name (source 'tfds')
    tfds_data_dir         ''          TFDS data_dir; '' means the TFDS default
    split                 'train'     TFDS split string of the train data (source 'tfds' only)
    eval_split            ''          eval data: a TFDS split, or a path like `path`; '' holds
                                      out every 100th record (see sources.py)
    image_size            64          side of the square crops, pixels
    resize_mode           'random_crop'  'random_crop' | 'center_crop' | 'resize' (transforms.py)
    flip                  True        random horizontal flip in training
    num_workers           0           grain worker processes; 0 reads in the main process
    worker_buffer_size    2           batches each worker prepares ahead
    builtin_names         'photos'    builtin train photos: names and named sets
                                      ('photos', 'faces_text'), comma-separated or a tuple
    synthetic_num_images  1024        size of the synthetic train set
    scenes_num_images     4096        size of the procedural-scene train set (sources
                                      'scenes' and 'scene_classes'; eval is the eval
                                      scene seeds)
    resolution_buckets    ''          several train resolutions at once (UniWeTok stage 2):
                                      'SIDE:GLOBAL_BATCH,...', e.g. '256:128,512:32'; batches
                                      alternate between the buckets, each batch at one side;
                                      '' trains at image_size with train.batch_size

`validate_data_config` fails before anything is built or compiled, naming the field.
"""

from __future__ import annotations

import ml_collections

from unimm_jax.data import builtin_images
from unimm_jax.data import scenes
from unimm_jax.data.sources import SOURCES
from unimm_jax.data.transforms import RESIZE_MODES


def default_data_config() -> ml_collections.ConfigDict:
  """A fresh `data` ConfigDict with every field at its default (see module docstring)."""
  return ml_collections.ConfigDict({
      'source': 'builtin',
      'path': '',
      'tfds_name': '',
      'tfds_data_dir': '',
      'split': 'train',
      'eval_split': '',
      'image_size': 64,
      'resize_mode': 'random_crop',
      'flip': True,
      'num_workers': 0,
      'worker_buffer_size': 2,
      'builtin_names': 'photos',
      'synthetic_num_images': 1024,
      'scenes_num_images': 4096,
      'resolution_buckets': '',
  })


def parse_resolution_buckets(spec: str) -> tuple[tuple[int, int], ...]:
  """'256:128,512:32' -> ((256, 128), (512, 32)): (square side, global batch) per bucket."""
  buckets = []
  for item in [part.strip() for part in spec.split(',') if part.strip()]:
    side, sep, batch = item.partition(':')
    if not (sep and side.isdigit() and batch.isdigit() and int(side) > 0 and int(batch) > 0):
      raise ValueError(f"data_config.resolution_buckets={spec!r}: {item!r} is not "
                       "'SIDE:GLOBAL_BATCH' with positive integers")
    buckets.append((int(side), int(batch)))
  return tuple(buckets)


def validate_data_config(data_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first missing or invalid field of `data_config`."""
  missing = sorted(set(default_data_config()) - set(data_config))
  if missing:
    raise ValueError(f'data_config is missing field(s) {missing}')
  if data_config.source not in SOURCES:
    raise ValueError(f'data_config.source must be one of {SOURCES}, got '
                     f'{data_config.source!r}')
  if data_config.resize_mode not in RESIZE_MODES:
    raise ValueError(f'data_config.resize_mode must be one of {RESIZE_MODES}, got '
                     f'{data_config.resize_mode!r}')
  for field, minimum in (('image_size', 1), ('num_workers', 0), ('worker_buffer_size', 1),
                         ('synthetic_num_images', 1), ('scenes_num_images', 1)):
    value = data_config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      raise ValueError(f'data_config.{field} must be an int >= {minimum}, got {value!r}')
  parse_resolution_buckets(data_config.resolution_buckets)
  if data_config.source in ('folder', 'array_record') and not data_config.path:
    raise ValueError(f'data_config.path is empty; source {data_config.source!r} needs it')
  if data_config.source == 'tfds' and not data_config.tfds_name:
    raise ValueError("data_config.tfds_name is empty; source 'tfds' needs it")
  if data_config.source in ('scenes', 'scene_classes'):
    start, stop = scenes.SPLITS['train']
    if data_config.scenes_num_images > stop - start:
      raise ValueError(f'data_config.scenes_num_images must be <= {stop - start} (the train '
                       f'scene seeds), got {data_config.scenes_num_images}')
  if data_config.source == 'builtin':
    builtin_images.expand_builtin_names(data_config.builtin_names)
