"""Chameleon's VQGAN weights -> `unimm_jax.models.chameleon_vqgan.ChameleonVQGAN` params.

Three sources, all under taming's state-dict names (transformers kept them):
  a transformers `chameleon_vqgan` directory (`ChameleonVQVAE.save_pretrained`: config.json
    with model_type 'chameleon_vqgan' + safetensors): encoder, quant_conv, quantize and
    post_quant_conv. transformers' ChameleonVQVAE has no decoder, so the decoder is
    initialised (seed 0, PyTorch-default init) and `load_pretrained(...).initialised` says
    `('decoder',)`; pass `decoder_path=` a safetensors file holding `decoder.*` (the authors'
    state dict, below) to import it too: `load_pretrained(dir, decoder_path=file)`.
  a full transformers `chameleon` directory: the same tensors under `model.vqmodel.`, beside
    the LLM (`load_pretrained(dir)` is the LLM; `.parts['vqgan']` is this tokenizer).
  the authors' VQModel state dict as one safetensors file (their `vqgan.ckpt`'s
    `state_dict`, saved once with `safetensors.torch.save_file`): every part, the decoder
    included (`load_state_dict(path, model_config)`, used by `--mode=import`). Taming's
    training-only `loss.*` tensors (discriminator, LPIPS), if present, are skipped.

Name mapping (our path under 'params' <- their key), from our parameter tree:
  <part>/down_i_block_j/...      <- <part>.down.i.block.j....     (up_i_...: <part>.up.i....)
  <part>/down_i_attn_j/...       <- <part>.down.i.attn.j....
  <part>/down_i_downsample/conv  <- <part>.down.i.downsample.conv (up_i_upsample: .upsample.)
  <part>/mid_block_1, mid_attn_1 <- <part>.mid.block_1, <part>.mid.attn_1 (and block_2)
  .../normN/norm/{scale,bias}    <- .../normN.{weight,bias}      (GroupNorm)
  .../kernel (kh, kw, in, out)   <- .weight (out, in, kh, kw) transposed; .../bias <- .bias
  attention/{query,key,value}    <- {q,k,v}.weight[:, :, 0, 0].T as (c, 1, c); *_bias (1, c)
  attention/out, out_bias        <- proj_out.weight[:, :, 0, 0].T as (1, c, c); proj_out.bias
                                    (c,)
  quantizer/embedding (K, d)     <- quantize.embedding.weight
A tensor that is missing, left over or of the wrong shape is an error naming it.
"""
import dataclasses
import logging
import os
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm_jax.convert import hf_checkpoint
from unimm_jax.convert import hf_llm
from unimm_jax.convert.hf_checkpoint import Converted, HFCheckpoint, LazyArray, Reader
from unimm_jax.models import chameleon_vqgan

VQ_PREFIX = 'model.vqmodel.'  # a full Chameleon's image tokenizer
# taming's training checkpoints keep the discriminator and LPIPS under `loss.`.
_TRAINING_ONLY = 'loss.'
# transformers ChameleonVQVAEConfig defaults, for keys a config.json leaves out.
_HF_DEFAULTS = dict(embed_dim=256, num_embeddings=8192, double_latent=False, latent_channels=256,
                    resolution=512, in_channels=3, base_channels=128,
                    channel_multiplier=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=None,
                    dropout=0.0, attn_type='vanilla', beta=0.25)
_ARCHITECTURE = ('ch', 'ch_mult', 'num_res_blocks', 'attn_levels', 'mid_attention',
                 'z_channels', 'embed_dim', 'n_embed')
_ATTENTION = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'proj_out'}


def model_config_from_hf(vq: dict, **overrides) -> ml_collections.ConfigDict:
  """config.model for a transformers ChameleonVQVAEConfig dict (config.json or vq_config).

  Level i of taming's encoder works at resolution `resolution / 2^i`, so attn_resolutions
  become the levels whose resolution they list. `overrides` replace model fields (dtype,
  remat, attention_impl). Settings the model cannot reproduce are errors naming the key.
  """
  def get(key):
    value = vq.get(key)
    return _HF_DEFAULTS[key] if value is None else value

  if get('double_latent'):
    raise ValueError('config.json double_latent=true is not supported (Chameleon: false)')
  if get('in_channels') != 3:
    raise ValueError(f'config.json in_channels={get("in_channels")} is not supported (RGB: 3)')
  if get('dropout'):
    raise ValueError(f'config.json dropout={get("dropout")} is not supported (Chameleon: 0)')
  vanilla = get('attn_type') == 'vanilla'
  levels = len(get('channel_multiplier'))
  resolutions = set(get('attn_resolutions') or ())
  config = chameleon_vqgan.paper_model_config()
  config.update(dict(
      ch=get('base_channels'), ch_mult=tuple(get('channel_multiplier')),
      num_res_blocks=get('num_res_blocks'), z_channels=get('latent_channels'),
      embed_dim=get('embed_dim'), n_embed=get('num_embeddings'), beta=float(get('beta')),
      mid_attention=vanilla,
      attn_levels=tuple(i for i in range(levels)
                        if vanilla and get('resolution') // 2 ** i in resolutions)))
  unknown = sorted(set(overrides) - set(config))
  if unknown:
    raise ValueError(f'unknown chameleon_vqgan model field override(s) {unknown}')
  config.update(overrides)
  return config


def taming_key(path: tuple[str, ...]) -> tuple[str, str]:
  """(their key, transform kind) of our parameter path (see the module docstring)."""
  parts = []
  for name in path[:-1]:
    name = re.sub(r'^(down|up)_(\d+)_(block|attn)_(\d+)$', r'\1.\2.\3.\4', name)
    name = re.sub(r'^(down|up)_(\d+)_(downsample|upsample)$', r'\1.\2.\3', name)
    name = re.sub(r'^mid_(block|attn)_(\d+)$', r'mid.\1_\2', name)
    parts.append(name)
  leaf = path[-1]
  if parts[-1] == 'norm':  # our GroupNorm wraps flax's under the name 'norm'
    parts.pop()
    return '.'.join(parts + ['weight' if leaf == 'scale' else 'bias']), 'plain'
  if parts == ['quantizer']:
    return 'quantize.embedding.weight', 'plain'
  if parts[-1] == 'attention':
    parts.pop()
    kind, bias = leaf.removesuffix('_bias'), leaf.endswith('_bias')
    key = '.'.join(parts + [_ATTENTION[kind], 'bias' if bias else 'weight'])
    if bias:  # q/k/v biases are per (head, channel); the output bias per channel
      return key, 'plain' if kind == 'out' else 'attn_bias'
    return key, 'attn_out' if kind == 'out' else 'attn_in'
  return '.'.join(parts + ['weight' if leaf == 'kernel' else 'bias']), (
      'conv' if leaf == 'kernel' else 'plain')


def taming_transform(kind: str):
  """A view-making numpy transform from their tensor to our parameter."""
  if kind == 'conv':
    return lambda w: w.transpose(2, 3, 1, 0)
  if kind == 'attn_in':
    return lambda w: w[:, :, 0, 0].T[:, None, :]
  if kind == 'attn_out':
    return lambda w: w[:, :, 0, 0].T[None, :, :]
  if kind == 'attn_bias':
    return lambda b: b[None, :]
  return lambda w: w


def _abstract_params(model: chameleon_vqgan.ChameleonVQGAN, example: np.ndarray) -> dict:
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), example)['params'])
  return flax.traverse_util.flatten_dict(nn.unbox(boxed))


def _initialised_decoder(model: chameleon_vqgan.ChameleonVQGAN) -> dict:
  """{path: numpy} of a freshly initialised decoder (seed 0), keyed like our params."""
  latents = jnp.zeros((1, 1, 1, model.config.embed_dim), jnp.float32)
  params = jax.jit(lambda key: model.init(key, latents, method='decode')['params'])(
      jax.random.key(0))
  flat = flax.traverse_util.flatten_dict(nn.unbox(params))
  return {path: np.asarray(value) for path, value in flat.items() if path[0] == 'decoder'}


def _converted(model: chameleon_vqgan.ChameleonVQGAN, read: Reader, where: str,
               decoder_read: Reader | None = None) -> Converted:
  """Sources for every parameter of `model`: from `read`, the decoder from `decoder_read`
  when given, else from `read` when it holds one, else initialised."""
  factor = chameleon_vqgan.downsample_factor(model.config)
  example = np.zeros((1, factor, factor, 3), np.float32)
  decoder_read = decoder_read or (read if any(
      k.startswith(read.prefix + 'decoder.') for k in read.checkpoint.tensors) else None)
  initial = _initialised_decoder(model) if decoder_read is None else {}
  flat = {}
  for path in _abstract_params(model, example):
    key, kind = taming_key(path)
    if path in initial:
      value = initial[path]
      flat[path] = LazyArray(shape=value.shape, source=f'initialised {"/".join(path)}',
                             view=lambda value=value: value)
    else:
      reader = decoder_read if path[0] == 'decoder' else read
      flat[path] = reader(key, taming_transform(kind))
  if initial:
    logging.warning('%s holds no decoder: decoder initialised (seed 0); pass decoder_path= '
                    'to import one', where)
  return Converted(model=model, sources=flax.traverse_util.unflatten_dict(flat),
                   example_inputs=(example,), initialised=('decoder',) if initial else ())


def _decoder_reader(decoder_path: str | None) -> Reader | None:
  """A Reader of `decoder.*` in decoder_path (which wins over a decoder in the directory);
  its other tensors must be a VQModel's, and are not read."""
  if decoder_path is None:
    return None
  read = Reader(hf_checkpoint.state_dict_file(decoder_path))
  allowed = ('decoder.', 'encoder.', 'quant_conv.', 'post_quant_conv.', 'quantize.',
             _TRAINING_ONLY)
  stray = sorted(k for k in read.checkpoint.tensors if not k.startswith(allowed))
  if stray:
    raise ValueError(f'{decoder_path}: tensor(s) not of a VQGAN state dict: {stray[:10]}')
  return read


def convert(checkpoint: HFCheckpoint, *, decoder_path: str | None = None,
            **overrides) -> Converted:
  """Family converter of a transformers `chameleon_vqgan` directory (module docstring)."""
  model = chameleon_vqgan.ChameleonVQGAN(model_config_from_hf(checkpoint.config, **overrides))
  read, decoder_read = Reader(checkpoint), _decoder_reader(decoder_path)
  converted = _converted(model, read, checkpoint.path, decoder_read)
  read.check_all_used(lambda key: key.startswith(_TRAINING_ONLY) or (
      decoder_read is not None and key.startswith('decoder.')), 'chameleon_vqgan')
  if decoder_read is not None:  # its other parts are the dir's to give
    decoder_read.check_all_used(lambda key: not key.startswith('decoder.'), 'decoder')
  return converted


def convert_chameleon(checkpoint: HFCheckpoint, **overrides) -> Converted:
  """Family converter of a full transformers `chameleon` directory: the LLM (hf_llm, with
  `overrides`), plus part 'vqgan' when it holds `model.vqmodel.*` tensors."""
  llm = hf_llm.convert(checkpoint, **overrides)
  if not any(key.startswith(VQ_PREFIX) for key in checkpoint.tensors):
    return llm
  return dataclasses.replace(llm, parts={'vqgan': _chameleon_vqgan_part(checkpoint)})


def _chameleon_vqgan_part(checkpoint: HFCheckpoint, **overrides) -> Converted:
  """The `model.vqmodel.*` tokenizer of a full Chameleon (`overrides`: model fields)."""
  vq_config = model_config_from_hf(checkpoint.config.get('vq_config') or {}, **overrides)
  read = Reader(checkpoint, prefix=VQ_PREFIX)
  converted = _converted(chameleon_vqgan.ChameleonVQGAN(vq_config), read,
                         f'{checkpoint.path} ({VQ_PREFIX}*)')
  read.check_all_used(lambda key: not key.startswith(VQ_PREFIX), 'chameleon_vqgan')
  return converted


def check_same_architecture(got: ml_collections.ConfigDict, want: ml_collections.ConfigDict,
                            where: str) -> None:
  """Raises ValueError naming the first architecture field in which `got` (the weights')
  differs from `want` (config.model)."""
  for field in _ARCHITECTURE:
    a, b = got[field], want[field]
    if (tuple(a) if isinstance(a, (list, tuple)) else a) != (
        tuple(b) if isinstance(b, (list, tuple)) else b):
      raise ValueError(f'{where} has {field}={a!r}, config.model.{field}={b!r}')


def _placed(converted: Converted) -> tuple[chameleon_vqgan.ChameleonVQGAN, dict]:
  abstract = jax.eval_shape(lambda: converted.model.init(
      jax.random.key(0), *converted.example_inputs)['params'])
  return converted.model, {'params': hf_checkpoint.place(converted.sources, abstract)}


def load_state_dict(path: str, model_config: ml_collections.ConfigDict) -> dict:
  """The authors' VQModel state dict (one safetensors file, taming names, decoder included)
  -> params (unboxed) of `ChameleonVQGAN(model_config)`; `loss.*` tensors are skipped."""
  read = Reader(hf_checkpoint.state_dict_file(path))
  if not any(k.startswith('decoder.') for k in read.checkpoint.tensors):
    raise ValueError(f'{path}: no decoder.* tensors (a transformers ChameleonVQVAE has none: '
                     'import its directory with unimm_jax.convert.load_pretrained)')
  converted = _converted(chameleon_vqgan.ChameleonVQGAN(model_config), read, path)
  read.check_all_used(lambda key: key.startswith(_TRAINING_ONLY), 'chameleon_vqgan')
  return _placed(converted)[1]['params']


def load_vqgan(path: str, model_config: ml_collections.ConfigDict | None = None, *,
               decoder_path: str | None = None
               ) -> tuple[chameleon_vqgan.ChameleonVQGAN, dict]:
  """(model, {'params': ...}) of the VQGAN alone from any of the three sources.

  A directory (transformers `chameleon_vqgan`, or a full `chameleon` whose LLM is left
  unread) fixes the architecture by its config.json; `model_config`, when given, must agree
  (the first differing field is named) and sets dtype, remat and attention_impl. A
  .safetensors file is the authors' state dict for `model_config` (required then).
  """
  if not os.path.isdir(path):
    if model_config is None:
      raise ValueError(f'{path}: a state dict file needs the model config')
    return chameleon_vqgan.ChameleonVQGAN(model_config), {
        'params': load_state_dict(path, model_config)}
  checkpoint = HFCheckpoint(path)
  model_type = checkpoint.config.get('model_type')
  keep = {} if model_config is None else {
      k: model_config[k] for k in ('dtype', 'remat', 'attention_impl')}
  if model_type == 'chameleon_vqgan':
    converted = convert(checkpoint, decoder_path=decoder_path, **keep)
  elif model_type == 'chameleon':
    if decoder_path is not None:
      raise ValueError('decoder_path is read with a chameleon_vqgan directory only')
    converted = _chameleon_vqgan_part(checkpoint, **keep)
  else:
    raise ValueError(f'{path}: config.json has model_type={model_type!r}, not '
                     "'chameleon_vqgan' or 'chameleon'")
  if model_config is not None:
    check_same_architecture(converted.model.config, model_config, path)
  return _placed(converted)
