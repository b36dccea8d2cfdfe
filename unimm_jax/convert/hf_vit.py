"""transformers checkpoints of SigLIP, SigLIP2, DINOv2 and CLIP -> `VisionTransformer` params.

Accepted directories: the vision model alone (`SiglipVisionModel`, `Siglip2VisionModel`,
`CLIPVisionModel[WithProjection]`, `Dinov2Model`) or the full two-tower model (`SiglipModel`,
`Siglip2Model`, `CLIPModel`), whose vision tower is read from `vision_config` and the
`vision_model.` tensors. Tensor names are the Hub layout that `save_pretrained` writes.

Mapping, CLIP-style names (SigLIP, SigLIP2, CLIP; optional `vision_model.` prefix), for
layer i, with d = hidden size, H heads of K = d / H:
  embeddings.patch_embedding.weight  conv (d, c, p, p) -> patch_embedding (p, p, c, d)
                                     SigLIP2 linear (d, p*p*c) -> .T.reshape(p, p, c, d)
  embeddings.patch_embedding.bias    -> patch_bias (CLIP has none)
  embeddings.position_embedding.weight (N, d), embeddings.class_embedding (d,) (CLIP)
  pre_layrnorm (CLIP)                -> pre_norm
  encoder.layers.i.layer_norm{1,2}   -> layers_i/norm{1,2}
  encoder.layers.i.self_attn.{q,k,v}_proj.weight (d, d) -> attention/{query,key,value}
                                     = w.T.reshape(d, H, K); bias -> (H, K)
  encoder.layers.i.self_attn.out_proj.weight -> attention/out = w.T.reshape(H, K, d)
  encoder.layers.i.mlp.fc{1,2}       -> mlp/fc{1,2} (kernel = w.T)
  post_layernorm                     -> final_norm
  head.probe (1, 1, d); head.attention.in_proj_{weight,bias} (q, k, v row blocks);
  head.attention.out_proj; head.layernorm; head.mlp.fc{1,2}  -> head/...
DINOv2: embeddings.cls_token, embeddings.position_embeddings (1, N + 1, d),
  embeddings.patch_embeddings.projection, encoder.layer.i.norm{1,2},
  encoder.layer.i.attention.attention.{query,key,value}, encoder.layer.i.attention.output.dense,
  encoder.layer.i.layer_scale{1,2}.lambda1, encoder.layer.i.mlp.fc{1,2} or (SwiGLU)
  mlp.weights_in (2m, d: gate rows first) and mlp.weights_out, layernorm.
Skipped on purpose: the text tower and the projections / logit scale of two-tower models,
DINOv2's mask_token (masked-image-modelling pretraining only), legacy `position_ids` buffers.
Any other tensor is an error naming it.
"""
import math
from typing import Any

import numpy as np

from unimm_jax.convert import hf_checkpoint
from unimm_jax.convert.hf_checkpoint import HFCheckpoint, LazyArray, Reader, layer_norm, linear
from unimm_jax.models.vit import ViTConfig, VisionTransformer

MODEL_TYPES = ('siglip', 'siglip_vision_model', 'siglip2', 'siglip2_vision_model', 'clip',
               'clip_vision_model', 'dinov2')
_TWO_TOWER = ('siglip', 'siglip2', 'clip')
_SKIPPED_PREFIXES = ('text_model.', 'visual_projection.', 'text_projection.', 'logit_scale',
                     'logit_bias')
_SKIPPED_SUFFIXES = ('embeddings.position_ids', 'embeddings.mask_token')

# transformers' config defaults, for keys a config.json leaves out.
_DEFAULTS = {
    'siglip': dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                   hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, vision_use_head=True),
    'siglip2': dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, num_channels=3, num_patches=256, patch_size=16,
                    hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, vision_use_head=True),
    'clip': dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                 hidden_act='quick_gelu', layer_norm_eps=1e-5),
    'dinov2': dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                   image_size=224, patch_size=14, hidden_act='gelu', layer_norm_eps=1e-6,
                   mlp_ratio=4, qkv_bias=True, use_swiglu_ffn=False),
}


def vit_config(hf_config: dict[str, Any], **overrides) -> ViTConfig:
  """ViTConfig from a config.json dict (two-tower configs: their `vision_config`)."""
  model_type = hf_config.get('model_type')
  family = model_type.removesuffix('_vision_model')
  if model_type in _TWO_TOWER:
    hf_config = hf_config.get('vision_config') or {}
  cfg = {**_DEFAULTS[family], **hf_config}
  d = cfg['hidden_size']
  if family == 'dinov2':
    mlp_dim = int(d * cfg['mlp_ratio'])
    if cfg['use_swiglu_ffn']:  # two thirds of the MLP width, rounded up to a multiple of 8
      mlp_dim = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
  else:
    mlp_dim = cfg['intermediate_size']
  if family == 'siglip2':
    side = math.isqrt(cfg['num_patches'])
    if side * side != cfg['num_patches']:
      raise ValueError(f'siglip2 num_patches={cfg["num_patches"]} is not a square')
    image_size = side * cfg['patch_size']
  else:
    image_size = cfg['image_size']
  fields = dict(
      family=family, hidden_size=d, num_layers=cfg['num_hidden_layers'],
      num_heads=cfg['num_attention_heads'], mlp_dim=mlp_dim, patch_size=cfg['patch_size'],
      image_size=image_size, num_channels=cfg['num_channels'],
      layer_norm_eps=cfg['layer_norm_eps'], activation=cfg['hidden_act'],
      swiglu=bool(cfg.get('use_swiglu_ffn', False)),
      use_head=bool(cfg.get('vision_use_head', True)))
  return ViTConfig(**{**fields, **overrides})




def _zeros(shape: tuple[int, ...], source: str) -> LazyArray:
  return LazyArray(shape=shape, source=source, view=lambda: np.zeros(shape, np.float32))


def _attention(c: ViTConfig, q, k, v, out, out_bias, q_bias, k_bias, v_bias) -> dict:
  """Our attention params from LazyArrays of torch (d, d) weights and (d,) biases."""
  heads, head_dim, d = c.num_heads, c.hidden_size // c.num_heads, c.hidden_size
  params = {}
  for name, w, b in (('query', q, q_bias), ('key', k, k_bias), ('value', v, v_bias)):
    params[name] = _view(w, lambda a: a.T.reshape(d, heads, head_dim), (d, heads, head_dim))
    params[f'{name}_bias'] = _view(b, lambda a: a.reshape(heads, head_dim), (heads, head_dim))
  params['out'] = _view(out, lambda a: a.T.reshape(heads, head_dim, d), (heads, head_dim, d))
  params['out_bias'] = out_bias
  return params


def _view(src: LazyArray, transform, shape: tuple[int, ...]) -> LazyArray:
  """A further view of a LazyArray; a source whose size does not fit keeps its own shape so
  that the shape check names it instead of numpy failing on the reshape."""
  if int(np.prod(src.shape)) != int(np.prod(shape)):
    return src
  return LazyArray(shape=shape, source=src.source, view=lambda: transform(src.view()))


def _split_rows(src: LazyArray, parts: int) -> list[LazyArray]:
  """A fused (parts * n, ...) tensor as `parts` row blocks (torch's chunk(parts, dim=0))."""
  n = src.shape[0] // parts
  return [LazyArray(shape=(n,) + src.shape[1:], source=f'{src.source}[{i * n}:{(i + 1) * n}]',
                    view=lambda i=i: src.view()[i * n:(i + 1) * n]) for i in range(parts)]


def _clip_style_layer(c: ViTConfig, read: Reader, i: int) -> dict:
  p = f'encoder.layers.{i}.'
  a = p + 'self_attn.'
  return {
      'norm1': layer_norm(read, p + 'layer_norm1'), 'norm2': layer_norm(read, p + 'layer_norm2'),
      'attention': _attention(
          c, read(a + 'q_proj.weight'), read(a + 'k_proj.weight'), read(a + 'v_proj.weight'),
          read(a + 'out_proj.weight'), read(a + 'out_proj.bias'), read(a + 'q_proj.bias'),
          read(a + 'k_proj.bias'), read(a + 'v_proj.bias')),
      'mlp': {'fc1': linear(read, p + 'mlp.fc1'), 'fc2': linear(read, p + 'mlp.fc2')},
  }


def fused_qkv_layer(c: ViTConfig, read: Reader, p: str) -> dict:
  """One pre-LN block in the layout of DINOv2's original (timm-style) code, under key prefix
  `p`: norm1, attn.qkv (fused (3 d, d) rows [q | k | v] and its bias), attn.proj, norm2 and
  mlp.fc1 / mlp.fc2, or for a SwiGLU block (c.swiglu) mlp.w12 ((2 m, d), gate rows first)
  and mlp.w3 (MingTok's blocks)."""
  q, k, v = _split_rows(read(p + 'attn.qkv.weight'), 3)
  q_bias, k_bias, v_bias = _split_rows(read(p + 'attn.qkv.bias'), 3)
  layer = {
      'norm1': layer_norm(read, p + 'norm1'), 'norm2': layer_norm(read, p + 'norm2'),
      'attention': _attention(c, q, k, v, read(p + 'attn.proj.weight'),
                              read(p + 'attn.proj.bias'), q_bias, k_bias, v_bias),
  }
  layer['mlp'] = _mlp(c, read, p + 'mlp.', ('w12', 'w3'))
  return layer


def _mlp(c: ViTConfig, read: Reader, p: str, swiglu_names: tuple[str, str]) -> dict:
  """The block MLP under key prefix `p`: fc1 / fc2, or for c.swiglu the fused gated input
  ((2 m, d), gate rows first) and the output projection named `swiglu_names`."""
  if not c.swiglu:
    return {'fc1': linear(read, p + 'fc1'), 'fc2': linear(read, p + 'fc2')}
  m, d = c.mlp_dim, c.hidden_size
  w_in, b_in = read(f'{p}{swiglu_names[0]}.weight'), read(f'{p}{swiglu_names[0]}.bias')
  return {'fc1': _view(w_in, lambda w: w.reshape(2, m, d).transpose(2, 0, 1), (d, 2, m)),
          'fc1_bias': _view(b_in, lambda w: w.reshape(2, m), (2, m)),
          'fc2': linear(read, p + swiglu_names[1])}


def _dinov2_layer(c: ViTConfig, read: Reader, i: int) -> dict:
  p = f'encoder.layer.{i}.'
  a = p + 'attention.attention.'

  def bias(name: str) -> LazyArray:
    key = f'{a}{name}.bias'
    return read(key) if read.has(key) else _zeros((c.hidden_size,), f'{key} (qkv_bias=False)')

  layer = {
      'norm1': layer_norm(read, p + 'norm1'), 'norm2': layer_norm(read, p + 'norm2'),
      'layer_scale1': read(p + 'layer_scale1.lambda1'),
      'layer_scale2': read(p + 'layer_scale2.lambda1'),
      'attention': _attention(
          c, read(a + 'query.weight'), read(a + 'key.weight'), read(a + 'value.weight'),
          read(p + 'attention.output.dense.weight'), read(p + 'attention.output.dense.bias'),
          bias('query'), bias('key'), bias('value')),
  }
  layer['mlp'] = _mlp(c, read, p + 'mlp.', ('weights_in', 'weights_out'))
  return layer


def _embeddings(c: ViTConfig, read: Reader) -> dict:
  p, ch, d = c.patch_size, c.num_channels, c.hidden_size
  if c.family == 'dinov2':
    return {
        'patch_embedding': read('embeddings.patch_embeddings.projection.weight',
                                lambda w: w.transpose(2, 3, 1, 0)),
        'patch_bias': read('embeddings.patch_embeddings.projection.bias'),
        'position_embedding': read('embeddings.position_embeddings', lambda w: w[0]),
        'class_embedding': read('embeddings.cls_token', lambda w: w.reshape(-1)),
    }
  if c.family == 'siglip2':
    patch = _view(read('embeddings.patch_embedding.weight'),
                  lambda w: w.T.reshape(p, p, ch, d), (p, p, ch, d))
  else:
    patch = read('embeddings.patch_embedding.weight', lambda w: w.transpose(2, 3, 1, 0))
  params = {'patch_embedding': patch,
            'position_embedding': read('embeddings.position_embedding.weight')}
  if c.family == 'clip':
    params['class_embedding'] = read('embeddings.class_embedding')
    params['pre_norm'] = layer_norm(read, 'pre_layrnorm')
  else:
    params['patch_bias'] = read('embeddings.patch_embedding.bias')
  return params


def _head(c: ViTConfig, read: Reader) -> dict:
  q, k, v = _split_rows(read('head.attention.in_proj_weight'), 3)
  qb, kb, vb = _split_rows(read('head.attention.in_proj_bias'), 3)
  return {
      'probe': read('head.probe', lambda w: w.reshape(-1, w.shape[-1])),
      'attention': _attention(c, q, k, v, read('head.attention.out_proj.weight'),
                              read('head.attention.out_proj.bias'), qb, kb, vb),
      'layernorm': layer_norm(read, 'head.layernorm'),
      'mlp': {'fc1': linear(read, 'head.mlp.fc1'), 'fc2': linear(read, 'head.mlp.fc2')},
  }


def _skipped(key: str) -> bool:
  bare = key.removeprefix('vision_model.')
  return key.startswith(_SKIPPED_PREFIXES) or bare.endswith(_SKIPPED_SUFFIXES)


def convert(checkpoint: HFCheckpoint, **overrides) -> hf_checkpoint.Converted:
  """Family converter for `unimm_jax.convert.load_pretrained`."""
  c = vit_config(checkpoint.config, **overrides)
  prefix = ('vision_model.' if any(k.startswith('vision_model.') for k in checkpoint.tensors)
            else '')
  read = Reader(checkpoint, prefix)
  sources = _embeddings(c, read)
  layer_fn = _dinov2_layer if c.family == 'dinov2' else _clip_style_layer
  layers = [layer_fn(c, read, i) for i in range(c.num_layers)]
  if c.scan_layers:
    sources['layers'] = hf_checkpoint.stack_layer_trees(layers)
  else:
    sources.update({f'layers_{i}': layer for i, layer in enumerate(layers)})
  sources['final_norm'] = layer_norm(read, 'layernorm' if c.family == 'dinov2' else 'post_layernorm')
  if c.family in ('siglip', 'siglip2') and c.use_head:
    sources['head'] = _head(c, read)
  read.check_all_used(_skipped, c.family)
  return hf_checkpoint.Converted(model=VisionTransformer(c), sources=sources,
                   example_inputs=example_inputs(c))


def example_inputs(c: ViTConfig) -> tuple:
  """Smallest inputs that `VisionTransformer(c).init` accepts (for eval_shape)."""
  if c.family == 'siglip2':
    n = c.grid_size ** 2
    return (np.zeros((1, n, c.patch_size ** 2 * c.num_channels), np.float32),
            np.ones((1, n), np.int32), np.array([[c.grid_size, c.grid_size]], np.int32))
  return (np.zeros((1, c.image_size, c.image_size, c.num_channels), np.float32),)
