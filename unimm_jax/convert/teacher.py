"""Teachers from checkpoint directories: `build_teacher` (config.json and
preprocessor_config.json only) and `load_teacher` (with the weights).

See `unimm_jax.models.teacher` for what a teacher computes and how it preprocesses images.
"""
import json
import os
from typing import Sequence

import ml_collections
from jax.sharding import Mesh

from unimm_jax.convert import hf_vit
from unimm_jax.convert.pretrained import load_pretrained
from unimm_jax.models import teacher
from unimm_jax.models.vit import VisionTransformer
from unimm_jax.nn.dtypes import compute_dtype

_PIL_RESAMPLE = {2: 'linear', 3: 'cubic'}  # PIL.Image.BILINEAR, PIL.Image.BICUBIC


def _preprocessor_settings(path: str, family: str) -> dict:
  (mean, std), method = teacher.FAMILY_DEFAULTS[family]
  settings = dict(mean=mean, std=std, method=method, max_num_patches=256)
  file = os.path.join(path, 'preprocessor_config.json')
  if os.path.isfile(file):
    with open(file) as f:
      pre = json.load(f)
    settings['mean'] = tuple(pre.get('image_mean', mean))
    settings['std'] = tuple(pre.get('image_std', std))
    if 'resample' in pre:
      if pre['resample'] not in _PIL_RESAMPLE:
        raise ValueError(f'{file}: resample={pre["resample"]} is not bilinear (2) or '
                         'bicubic (3)')
      settings['method'] = _PIL_RESAMPLE[pre['resample']]
    settings['max_num_patches'] = pre.get('max_num_patches', 256)
  return settings


def build_teacher(config: ml_collections.ConfigDict) -> teacher.Teacher:
  """The static teacher of `config` (see config_defaults.teacher_config) from the checkpoint's
  config.json and preprocessor_config.json alone; its weights come from `load_teacher`."""
  if not config.path:
    raise ValueError('config.teacher.path is empty: set it to a downloaded checkpoint '
                     'directory (README: teachers)')
  dtype = compute_dtype(config.dtype, 'config.teacher.dtype')
  with open(os.path.join(config.path, 'config.json')) as f:
    hf_config = json.load(f)
  if hf_config.get('model_type') not in hf_vit.MODEL_TYPES:
    raise ValueError(f'config.teacher.path={config.path!r} holds a '
                     f'{hf_config.get("model_type")!r} model, not one of {hf_vit.MODEL_TYPES}')
  c = hf_vit.vit_config(hf_config, dtype=dtype)
  settings = _preprocessor_settings(config.path, c.family)
  image_size = config.image_size or c.image_size
  if c.family != 'siglip2' and image_size % c.patch_size:
    raise ValueError(f'config.teacher.image_size={image_size} is not a multiple of the '
                     f'patch size {c.patch_size}')
  return teacher.Teacher(model=VisionTransformer(c),
                         feature=teacher.parse_feature(config.feature, c.num_layers),
                         mean=settings['mean'], std=settings['std'],
                         method=settings['method'], image_size=image_size,
                         max_num_patches=config.max_num_patches or settings['max_num_patches'],
                         drop_class_token=config.drop_class_token)


def load_teacher(config: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
                 rules: Sequence | None = None) -> tuple[teacher.Teacher, dict]:
  """`build_teacher(config)` and its weights -> (teacher, variables).

  With a mesh, the variables are placed sharded by `rules` (a host reads only its slices).
  """
  built = build_teacher(config)
  dtype = built.model.config.dtype
  _, variables = load_pretrained(config.path, param_dtype=dtype, mesh=mesh, rules=rules,
                                 dtype=dtype)
  return built, variables
