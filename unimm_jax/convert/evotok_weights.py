"""The EvoTok authors' weights: their `EvoTok.state_dict()` (VisionXLab/EvoTok,
evotok/tokenizer/vq_model/evotok.py) as a safetensors file -> `models.evotok.EvoTok`
variables {'params', 'quantizer_state': {'quantizer': ...}}.

Their key -> ours:
  encoder_vqkd.[vision_model.]embeddings / encoder.layers.{i}   encoder (transformers SigLIP
      layout, `convert.hf_vit`; `vision_model.` is there with transformers 4, which their
      requirements pin). Only layers 0 .. num_layers - 2 are read: the last layer,
      post_layernorm and head do not reach hidden_states[-2]; they must be present (so a
      checkpoint with fewer layers than config.model.encoder.num_layers is refused) and
      are skipped.
  encode_task_layer.{0,2} / decode_task_layer.{0,2}   encode_task / semantic_decoder/task
      {hidden, out} (Linear weight (out, in) -> kernel (in, out)).
  quantize.codebooks.{i}.{weight, cluster_size_ema, embed_ema, step}   quantizer_state
      codebooks[i] (their weight has a zero padding row K, dropped), cluster_size[i],
      embed_sum[i], step (one counter: every level's must agree).
  post_quant_conv, decoder.*   post_quant_conv, pixel_decoder (LlamaGen's names:
      conv_blocks.{j} is our level n - 1 - j, .res.{k} its ResBlock k, .attn.{k} its
      attention, mid.{0,1,2} the middle ResBlock / attention / ResBlock).
  decoder_vqkd.*   semantic_decoder: patch_embed.proj (1x1 conv) -> patch_embedding, cls_token,
      pos_embed, blocks.{i} (qkv.weight rows [q | k | v], q_bias and v_bias; k has no bias:
      ours is set to 0), fc_norm.
  quantize.codebook_used (a log of recent codes), scaling_layer.* (constants 0.5)   skipped.

Their MLLM's generation head, `RQTransformer.state_dict()` (mllm/.../rqtransformer; keys
may carry the `model.vision_tower.rqtransformer.` prefix of their saved files) ->
`models.depth_transformer.DepthTransformer` params (`load_depth_transformer`):
  in_mlp_2 / in_mlp_1 (LLM hidden / code sums) -> in_hidden / in_codes; pos_emb_d (1, L, W)
  -> depth_positions; head_transformer.blocks.{j}.{ln1, ln2, attn.{query, key, value, proj},
  mlp.{0, 2}} -> blocks_{j}/{norm1, norm2, attention, fc1, fc2}; classifiers.{i}.{0, 1} ->
  classifiers_{i}_{norm, out} for i < L. They build one classifier per entry of the last
  code depth (16 for EvoTok, of which only the first L_pix = 4 are called): the rest are
  skipped.
"""
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm_jax.convert import hf_checkpoint
from unimm_jax.convert import hf_vit
from unimm_jax.convert.chameleon_vqgan import taming_key, taming_transform
from unimm_jax.convert.hf_checkpoint import LazyArray, Reader, layer_norm, linear
from unimm_jax.models import evotok
from unimm_jax.models.depth_transformer import DepthTransformer
from unimm_jax.quantizers.residual_quantizer import STATE_COLLECTION

_SKIPPED = ('quantize.codebook_used', 'scaling_layer.')



def _task_layers(read: Reader, key: str) -> dict:
  return {'hidden': linear(read, f'{key}.0'), 'out': linear(read, f'{key}.2')}



def _encoder(read: Reader, cfg: ml_collections.ConfigDict) -> dict:
  c = evotok.encoder_config(cfg)
  last = f'encoder.layers.{c.num_layers}.layer_norm1.weight'
  if not read.has(last) or read.has(f'encoder.layers.{c.num_layers + 1}.layer_norm1.weight'):
    raise ValueError(f'the encoder does not have config.model.encoder.num_layers='
                     f'{cfg.encoder.num_layers} layers (looked for {read.prefix}{last})')
  sources = hf_vit._embeddings(c, read)  # pylint: disable=protected-access
  for i in range(c.num_layers):
    sources[f'layers_{i}'] = hf_vit._clip_style_layer(c, read, i)  # pylint: disable=protected-access
  return sources


def _semantic_decoder(read: Reader, cfg: ml_collections.ConfigDict) -> dict:
  c = evotok.semantic_block_config(cfg)
  width, heads, head_dim = c.hidden_size, c.num_heads, c.head_dim
  inner = heads * head_dim
  sources = {
      'patch_embedding': {'kernel': read('patch_embed.proj.weight', lambda w: w[:, :, 0, 0].T),
                          'bias': read('patch_embed.proj.bias')},
      'class_embedding': read('cls_token', lambda w: w.reshape(-1)),
      'position_embedding': read('pos_embed', lambda w: w[0]),
      'fc_norm': layer_norm(read, 'fc_norm'),
  }
  for i in range(c.num_layers):
    p = f'blocks.{i}.'
    qkv = read(p + 'attn.qkv.weight')

    def heads_in(w, part):  # rows [q | k | v] of (3 * inner, width) -> (width, heads, head_dim)
      return w[part * inner:(part + 1) * inner].T.reshape(width, heads, head_dim)

    attention = {
        name: LazyArray((width, heads, head_dim), f'{qkv.source}[{name}]',
                        view=lambda part=part, qkv=qkv: heads_in(qkv.view(), part))
        for part, name in enumerate(('query', 'key', 'value'))}
    attention['query_bias'] = read(p + 'attn.q_bias', lambda w: w.reshape(heads, head_dim))
    attention['value_bias'] = read(p + 'attn.v_bias', lambda w: w.reshape(heads, head_dim))
    attention['key_bias'] = LazyArray((heads, head_dim), f'{p}attn (no k bias: zeros)',
                                      view=lambda: np.zeros((heads, head_dim), np.float32))
    attention['out'] = read(p + 'attn.proj.weight', lambda w: w.T.reshape(heads, head_dim, width))
    attention['out_bias'] = read(p + 'attn.proj.bias')
    sources[f'layers_{i}'] = {
        'norm1': layer_norm(read, p + 'norm1'), 'norm2': layer_norm(read, p + 'norm2'),
        'attention': attention,
        'mlp': {'fc1': linear(read, p + 'mlp.fc1'), 'fc2': linear(read, p + 'mlp.fc2')}}
  return sources


def _llamagen_key(path: tuple[str, ...], num_levels: int) -> tuple[str, str]:
  """(their `decoder.` key, transform kind) of our pixel_decoder parameter path."""
  key, kind = taming_key(path)  # taming's names for the same stack, then LlamaGen's
  key = re.sub(r'^up\.(\d+)\.block\.', lambda m: f'conv_blocks.{num_levels - 1 - int(m[1])}.res.',
               key)
  key = re.sub(r'^up\.(\d+)\.(attn|upsample)',
               lambda m: f'conv_blocks.{num_levels - 1 - int(m[1])}.{m[2]}', key)
  key = re.sub(r'^mid\.(block_1|attn_1|block_2)',
               lambda m: 'mid.' + {'block_1': '0', 'attn_1': '1', 'block_2': '2'}[m[1]], key)
  return 'decoder.' + key, kind


def _quantizer_state(read: Reader, cfg: ml_collections.ConfigDict) -> dict:
  """quantizer_state arrays (numpy) from the per-level VQEmbedding tensors."""
  levels, k, d = cfg.num_levels, cfg.codebook_size, cfg.code_dim
  rows, sizes, sums, steps = [], [], [], []
  for i in range(levels):
    p = f'quantize.codebooks.{i}.'
    if not read.has(p + 'weight'):
      raise ValueError(f'no {p}weight: the checkpoint has fewer than config.model.num_levels='
                       f'{levels} levels')
    weight = read(p + 'weight')
    if weight.shape != (k + 1, d):
      raise ValueError(f'tensor {weight.source} has shape {weight.shape}, config.model '
                       f'(codebook_size={k}, code_dim={d}) wants ({k + 1}, {d}) with the '
                       'padding row')
    rows.append(weight[:k])
    sizes.append(read(p + 'cluster_size_ema')[()])
    sums.append(read(p + 'embed_ema')[()])
    steps.append(int(read(p + 'step')[()]) if read.has(p + 'step') else 0)
  if len(set(steps)) != 1:
    raise ValueError(f'the levels\' EMA step counters differ: {steps}')
  as_float = lambda arrays: np.stack(arrays).astype(np.float32)  # stored bf16 / f16 / f32
  return {'codebooks': as_float(rows), 'cluster_size': as_float(sizes),
          'embed_sum': as_float(sums), 'step': np.asarray(steps[0], np.int32)}


def convert_state_dict_file(path: str, model_config: ml_collections.ConfigDict) -> dict:
  """Their state dict file -> our variables {'params', 'quantizer_state'} (jax arrays,
  float32). Raises ValueError naming a missing, unused or wrongly shaped tensor."""
  if model_config.decoupling != 'evolution':
    raise ValueError(f'config.model.decoupling={model_config.decoupling!r}: the authors\' '
                     "weights are of the 'evolution' model")
  checkpoint = hf_checkpoint.state_dict_file(path)
  read = Reader(checkpoint)
  encoder_prefix = ('encoder_vqkd.vision_model.' if any(
      t.startswith('encoder_vqkd.vision_model.') for t in checkpoint.tensors)
                    else 'encoder_vqkd.')
  encoder_read, semantic_read = Reader(checkpoint, encoder_prefix), Reader(checkpoint,
                                                                           'decoder_vqkd.')
  encoder_read.used = semantic_read.used = read.used  # one record of the tensors read
  model = evotok.EvoTok(model_config)
  size = model_config.encoder.image_size
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, size, size, 3), jnp.float32)))
  params = {
      'encoder': _encoder(encoder_read, model_config),
      'encode_task': _task_layers(read, 'encode_task_layer'),
      'post_quant_conv': {'kernel': read('post_quant_conv.weight', taming_transform('conv')),
                          'bias': read('post_quant_conv.bias')},
      'semantic_decoder': {**_semantic_decoder(semantic_read, model_config),
                           'task': _task_layers(read, 'decode_task_layer')},
  }
  num_levels = len(model_config.decoder.ch_mult)
  decoder = {}
  for name in flax.traverse_util.flatten_dict(flax.linen.unbox(abstract['params'])):
    if name[0] == 'pixel_decoder':
      key, kind = _llamagen_key(name[1:], num_levels)
      decoder[name[1:]] = read(key, taming_transform(kind))
  params['pixel_decoder'] = flax.traverse_util.unflatten_dict(decoder)
  state = _quantizer_state(read, model_config)
  # The encoder's last layer, post_layernorm and head do not reach hidden_states[-2].
  unused_encoder = (f'{encoder_prefix}encoder.layers.{model_config.encoder.num_layers - 1}.',
                    f'{encoder_prefix}post_layernorm.', f'{encoder_prefix}head.')
  read.check_all_used(lambda key: key.startswith(_SKIPPED + unused_encoder), 'EvoTok')
  # The model's quantizer_state lives under its submodule `quantizer`.
  expected_state = flax.linen.unbox(abstract[STATE_COLLECTION])['quantizer']
  for name, value in state.items():
    if value.shape != expected_state[name].shape:
      raise ValueError(f'{path}: quantizer_state/{name} from their tensors has shape '
                       f'{value.shape}, the model expects {expected_state[name].shape}')
  return {'params': hf_checkpoint.place(params, abstract['params']),
          STATE_COLLECTION: {'quantizer': jax.tree.map(jnp.asarray, state)}}


def load_evotok_state_dict(path: str, model_config: ml_collections.ConfigDict) -> dict:
  """`convert_state_dict_file`, with `path` in every error."""
  try:
    return convert_state_dict_file(path, model_config)
  except ValueError as error:
    raise ValueError(f'{path}: {error}') from error


def _heads(read: Reader, key: str, heads: int) -> LazyArray:
  """A (W, W) Linear weight whose output rows are heads x head_dim -> (W, heads, hd)."""
  return read(key, lambda w: w.T.reshape(w.shape[1], heads, w.shape[0] // heads))


def depth_transformer_sources(read: Reader, head: DepthTransformer) -> dict:
  """Their RQTransformer tensors (under read.prefix) as our head's params (module docstring)."""
  h = head.num_heads
  sources = {'in_hidden': linear(read, 'in_mlp_2'), 'in_codes': linear(read, 'in_mlp_1'),
             'depth_positions': read('pos_emb_d', lambda w: w[0])}
  for j in range(head.num_layers):
    p = f'head_transformer.blocks.{j}.'
    attention = {name: _heads(read, f'{p}attn.{name}.weight', h)
                 for name in ('query', 'key', 'value')}
    attention.update({f'{name}_bias': read(f'{p}attn.{name}.bias', lambda w: w.reshape(h, -1))
                      for name in ('query', 'key', 'value')})
    attention['out'] = read(f'{p}attn.proj.weight',
                            lambda w: w.T.reshape(h, w.shape[1] // h, w.shape[0]))
    attention['out_bias'] = read(f'{p}attn.proj.bias')
    sources[f'blocks_{j}'] = {'norm1': layer_norm(read, p + 'ln1'), 'norm2': layer_norm(read, p + 'ln2'),
                              'attention': attention, 'fc1': linear(read, p + 'mlp.0'),
                              'fc2': linear(read, p + 'mlp.2')}
  for i in range(head.depth):
    sources[f'classifiers_{i}_norm'] = layer_norm(read, f'classifiers.{i}.0')
    sources[f'classifiers_{i}_out'] = linear(read, f'classifiers.{i}.1')
  return sources


def load_depth_transformer(path: str, head: DepthTransformer) -> dict:
  """Their RQTransformer state dict (safetensors) -> `head`'s params (float32 jax arrays).
  Raises ValueError naming a missing, unused or wrongly shaped tensor."""
  checkpoint = hf_checkpoint.state_dict_file(path)
  marker = 'rqtransformer.'
  prefixes = {k[:k.index(marker) + len(marker)] for k in checkpoint.tensors if marker in k}
  if len(prefixes) > 1:
    raise ValueError(f'{path}: tensors under several prefixes {sorted(prefixes)}')
  read = Reader(checkpoint, prefixes.pop() if prefixes else '')
  sources = depth_transformer_sources(read, head)
  spare = tuple(f'{read.prefix}classifiers.{i}.' for i in range(head.depth, 1024))
  read.check_all_used(lambda key: key.startswith(spare), 'depth transformer')
  abstract = jax.eval_shape(lambda: head.init(
      jax.random.key(0), jnp.zeros((1, sources['in_hidden']['kernel'].shape[0])),
      jnp.zeros((1, head.depth, sources['in_codes']['kernel'].shape[0]))))
  try:
    return hf_checkpoint.place(sources, abstract['params'])
  except ValueError as error:
    raise ValueError(f'{path}: {error}') from error
