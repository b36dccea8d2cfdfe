"""A frozen pretrained ViT as a feature teacher for distillation: the `Teacher` and its
preprocessing.

A config block (`config_defaults.teacher_config()`, e.g. `config.teacher`) points at a
downloaded transformers checkpoint directory; `unimm_jax.convert.teacher.load_teacher`
imports it and returns a `Teacher` (static: the model, the chosen feature, the
preprocessing) and its variables, which a train step receives as a frozen (never
differentiated) argument.

Preprocessing maps our images, float32 in [-1, 1] NHWC, to what the family's image
processor would give: resize (antialiased; bilinear for SigLIP/SigLIP2, bicubic for CLIP
and DINOv2, or the `resample` of the checkpoint's preprocessor_config.json) to the model's
input size, then (x01 - mean) / std with the checkpoint's `image_mean` / `image_std`
(family defaults when the file is absent). SigLIP2 keeps each image's aspect ratio: it is
resized to the largest patch grid of at most `max_num_patches` patches (transformers'
`get_image_size_for_max_num_patches`) and patchified. The processors resize uint8 images
with PIL; resizing the float image here differs from that by about one grey level.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from unimm_jax.models.vit import VisionTransformer

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# family -> (mean, std), resize method: the transformers image processors' defaults.
FAMILY_DEFAULTS = {'siglip': (_HALF, 'linear'), 'siglip2': (_HALF, 'linear'),
                   'clip': (_OPENAI_CLIP, 'cubic'), 'dinov2': (_IMAGENET, 'cubic')}


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int,
                eps: float = 1e-5) -> tuple[int, int]:
  """SigLIP2's target size: the largest scale whose patch-rounded size fits the budget.

  Same bisection as transformers' get_image_size_for_max_num_patches (so the same grid).
  """
  def scaled(scale: float, size: int) -> int:
    return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

  low, high = eps / 10, 100.0
  while high - low >= eps:
    mid = (low + high) / 2
    if (scaled(mid, height) / patch_size) * (scaled(mid, width) / patch_size) <= max_num_patches:
      low = mid
    else:
      high = mid
  return scaled(low, height), scaled(low, width)


def parse_feature(feature: str, num_layers: int) -> str | int:
  """'pooled' / 'last' as given; 'hidden:K' -> K as an index into the num_layers + 1 states."""
  if feature in ('pooled', 'last'):
    return feature
  name, _, index = feature.partition(':')
  try:
    k = int(index)
  except ValueError:
    k = None
  if name != 'hidden' or k is None or not -(num_layers + 1) <= k <= num_layers:
    raise ValueError(f"config.teacher.feature={feature!r}: use 'pooled', 'last' or "
                     f"'hidden:K' with -{num_layers + 1} <= K <= {num_layers}")
  return k


@dataclasses.dataclass(frozen=True)
class Teacher:
  """Static description of a teacher; call with its variables: `teacher(variables, images)`."""
  model: VisionTransformer
  feature: str | int  # see parse_feature
  mean: tuple[float, ...]
  std: tuple[float, ...]
  method: str  # jax.image.resize method
  image_size: int  # fixed-grid families: square input side
  max_num_patches: int  # SigLIP2
  drop_class_token: bool = False

  def model_inputs(self, images: jax.Array) -> tuple:
    """images (b, h, w, 3) in [-1, 1] -> the model's inputs (see VisionTransformer)."""
    c = self.model.config
    b, h, w, ch = images.shape
    if c.family == 'siglip2':
      out_h, out_w = naflex_size(h, w, c.patch_size, self.max_num_patches)
    else:
      out_h = out_w = self.image_size
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if (out_h, out_w) != (h, w):
      x = jax.image.resize(x, (b, out_h, out_w, ch), self.method, antialias=True)
    x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    if c.family != 'siglip2':
      return (x,)
    p, gh, gw = c.patch_size, out_h // c.patch_size, out_w // c.patch_size
    patches = x.reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5)
    shapes = jnp.broadcast_to(jnp.array([gh, gw], jnp.int32), (b, 2))
    return (patches.reshape(b, gh * gw, p * p * ch), jnp.ones((b, gh * gw), jnp.int32), shapes)

  def __call__(self, variables: Any, images: jax.Array) -> jax.Array:
    """Features of images (b, h, w, 3) in [-1, 1]: (b, d) pooled, else (b, tokens, d)."""
    inputs = self.model_inputs(images)
    # A fixed-grid family at another image_size resizes its positions (bicubic, as HF does).
    kwargs = {} if self.model.config.family == 'siglip2' else {'interpolate_pos_encoding': True}
    outputs = self.model.apply(variables, *inputs, **kwargs)
    if self.feature == 'pooled':
      if outputs['pooler_output'] is None:
        raise ValueError('config.teacher.feature=pooled, but this checkpoint has no pooling '
                         'head (vision_use_head=False)')
      features = outputs['pooler_output']
    else:
      features = (outputs['last_hidden_state'] if self.feature == 'last'
                  else outputs['hidden_states'][self.feature])
      if self.drop_class_token and self.model.config.class_token:
        features = features[:, 1:]
    return jax.lax.stop_gradient(features)
