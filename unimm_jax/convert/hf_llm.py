"""transformers checkpoints of Qwen2, Qwen3, Llama, Chameleon and Bailing MoE -> `LLM` params.

Accepted directories: `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `LlamaForCausalLM` and
`ChameleonForConditionalGeneration` (its text decoder), in the layout `save_pretrained`
writes (transformers 5: `model.` prefix, same names on the Hub), and `bailing_moe`
(`BailingMoeForCausalLM` of the authors' remote code: Ling-lite, Ming-UniVision's LLM; its
layout below). With d = hidden size, H / G query / kv heads of K channels, for layer i:
  model.embed_tokens.weight (vocab, d)             -> embed_tokens/embedding
  model.layers.i.input_layernorm.weight            -> layers_i/input_layernorm/scale
  model.layers.i.post_attention_layernorm.weight   -> layers_i/post_attention_layernorm/scale
  model.layers.i.self_attn.q_proj.weight (H*K, d)  -> .../q_proj/kernel = w.T.reshape(d, H, K)
  model.layers.i.self_attn.{k,v}_proj.weight       -> .../{k,v}_proj/kernel (d, G, K)
  model.layers.i.self_attn.{q,k,v}_proj.bias       -> .../bias (H or G, K) (Qwen2; others
                                                      when attention_bias)
  model.layers.i.self_attn.o_proj.weight (d, H*K)  -> .../o_proj/kernel = w.T.reshape(H, K, d)
  model.layers.i.self_attn.o_proj.bias             -> .../o_proj/bias (attention_bias)
  model.layers.i.self_attn.{q,k}_norm.weight       -> .../{q,k}_norm/scale: (K,) Qwen3,
                                                      (H or G, K) Chameleon (+ .bias)
  model.layers.i.mlp.{gate,up,down}_proj.weight    -> .../mlp/{...}/kernel = w.T (+ bias when
                                                      mlp_bias)
  model.norm.weight                                -> norm/scale
  lm_head.weight (vocab, d)                        -> lm_head = w.T (absent when tied)
With scan_layers the per-layer views are stacked on a leading axis (params `layers/...`).

Bailing MoE (config.json keys and defaults as their BailingMoeConfig; E experts of width I):
  model.word_embeddings.weight (vocab, d)          -> embed_tokens/embedding
  model.layers.i.attention.query_key_value.weight  -> self_attn/{q,k,v}_proj/kernel: rows
    ((H + 2 G) K, d), [q | k | v] blocks              [q | k | v], each as above (+ bias when
                                                      use_qkv_bias)
  model.layers.i.attention.dense.weight (d, H K)   -> self_attn/o_proj (+ bias when use_bias)
  model.layers.i.mlp.{gate,up,down}_proj.weight    -> mlp/... for the dense layers
                                                      (i < first_k_dense_replace)
  model.layers.i.mlp.gate.weight (E, d)            -> mlp/gate/kernel = w.T; `image_gate` and
                                                      `audio_gate` too when multi_gate
  model.layers.i.mlp.experts.j.{gate,up}_proj.weight (I, d)
                                                   -> mlp/experts/{gate,up}_proj[j] = w.T
  model.layers.i.mlp.experts.j.down_proj.weight (d, I)
                                                   -> mlp/experts/down_proj[j] = w.T
  model.layers.i.mlp.shared_experts.{gate,up,down}_proj.weight
                                                   -> mlp/shared_experts/... (num_shared > 0)
  norms, model.norm and lm_head as above; `attention.rotary_emb.inv_freq` skipped.
Their rope_scaling type '3D' (Ming-UniVision's) rotates sections of each head by three
position rows; their code only ever builds equal rows (text positions broadcast), for which
it is the 1D RoPE this LLM applies, so it imports as plain RoPE. 'linear' is supported,
'dynamic' and 'yarn' are refused. `norm_head` becomes LLMConfig.norm_head; multi_gate
num_routers=3 (tokens pick their router by `gate_ids`).

Skipped on purpose: Chameleon's VQ image tokenizer `model.vqmodel.*` (imported by the
VQGAN converter, not the LM), `lm_head.weight` when tie_word_embeddings (transformers
ignores it and uses the embedding), and the legacy `*.rotary_emb.inv_freq` buffers of old
checkpoints (recomputed from the config). Chameleon's `vocabulary_map` (config.json) is only
read for its image tokens (`IMGIMG*`), whose logits its text head suppresses; pass
`suppressed_token_ids=()` to generate image tokens. Any other tensor is an error naming it.
"""
from typing import Any

import numpy as np

from unimm_jax.convert import hf_checkpoint
from unimm_jax.convert.hf_checkpoint import HFCheckpoint, Reader
from unimm_jax.models import llm
from unimm_jax.models.llm import LLM, LLMConfig, RopeScaling
from unimm_jax.nn import moe

MODEL_TYPES = ('qwen2', 'qwen3', 'llama', 'chameleon', 'bailing_moe')
_SKIPPED_PREFIXES = ('model.vqmodel.',)
# Their BailingMoeConfig's defaults for keys a config.json may leave out.
_BAILING_DEFAULTS = dict(
    use_qkv_bias=False, use_bias=True, rms_norm_eps=1e-5, norm_head=False,
    tie_word_embeddings=False, initializer_range=0.02, rope_theta=10000.0, rope_scaling=None,
    num_experts=16, num_shared_experts=0, num_experts_per_tok=2, norm_topk_prob=True,
    moe_intermediate_size=None, first_k_dense_replace=0, head_dim=None, intermediate_size=None,
    multi_gate=False)
_SKIPPED_SUFFIXES = ('.rotary_emb.inv_freq',)
_REQUIRED = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
             'num_attention_heads')
# transformers' config defaults for keys a config.json may leave out.
_DEFAULTS = {
    'qwen2': dict(rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=None),
    'qwen3': dict(rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=128),
    'llama': dict(rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=None),
    'chameleon': dict(rms_norm_eps=1e-5, tie_word_embeddings=False, head_dim=None),
}


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from transformers 5's `rope_parameters` or the older
  `rope_theta` + `rope_scaling` keys."""
  params = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  if params and all(isinstance(v, dict) for v in params.values()):
    raise ValueError(f'config.json rope_parameters per layer type {sorted(params)} is not '
                     'supported (one RoPE for all layers only)')
  theta = float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))
  partial = params.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if partial != 1.0:
    raise ValueError(f'config.json partial_rotary_factor={partial} is not supported')
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type == 'default':
    return theta, None
  if rope_type not in ('linear', 'llama3'):
    raise ValueError(f'config.json rope type {rope_type!r} is not supported; supported: '
                     "'default', 'linear', 'llama3'")
  if rope_type == 'linear':
    return theta, RopeScaling('linear', float(params['factor']))
  return theta, RopeScaling(
      'llama3', float(params['factor']), float(params['low_freq_factor']),
      float(params['high_freq_factor']),
      int(params.get('original_max_position_embeddings', hf.get('max_position_embeddings'))))


def _check_supported(hf: dict[str, Any], model_type: str) -> None:
  """Raises ValueError naming a config.json setting this model cannot reproduce."""
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'config.json hidden_act={hf["hidden_act"]!r} is not supported (silu only)')
  if hf.get('use_sliding_window'):
    raise ValueError('config.json use_sliding_window=true (sliding-window attention) is not '
                     'supported')
  other_layers = sorted(set(hf.get('layer_types') or ()) - {'full_attention'})
  if other_layers:
    raise ValueError(f'config.json layer_types {other_layers} are not supported '
                     "(only 'full_attention')")
  if model_type == 'chameleon' and hf.get('vocabulary_map') is None:
    raise ValueError('config.json of a chameleon model has no vocabulary_map')


def _bailing_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """LLMConfig fields of a `bailing_moe` config.json (their defaults for absent keys)."""
  get = lambda key: hf[key] if hf.get(key) is not None else _BAILING_DEFAULTS[key]
  missing = [k for k in ('vocab_size', 'hidden_size', 'num_hidden_layers',
                         'num_attention_heads') if k not in hf]
  if missing:
    raise ValueError(f'config.json lacks {missing}')
  _check_supported(hf, 'bailing_moe')
  # rope_scaling as they save it; rope_parameters as transformers 5 re-saves it.
  scaling = dict(hf.get('rope_scaling') or hf.get('rope_parameters') or {})
  kind = scaling.get('type', scaling.get('rope_type'))
  if kind not in (None, 'default', '3D', 'linear'):
    raise ValueError(f'config.json rope_scaling type {kind!r} is not supported; supported: '
                     "none, '3D' (equal position rows), 'linear'")
  rope_scaling = RopeScaling('linear', float(scaling['factor'])) if kind == 'linear' else None
  heads, layers = hf['num_attention_heads'], hf['num_hidden_layers']
  num_experts = hf.get('num_experts', _BAILING_DEFAULTS['num_experts']) or 0
  first_dense = get('first_k_dense_replace') if num_experts else layers
  intermediate = get('intermediate_size')
  if intermediate is None and min(first_dense, layers) > 0:
    raise ValueError(f'config.json lacks intermediate_size, which its {min(first_dense, layers)}'
                     ' dense layer(s) need')
  moe_fields = {}
  if num_experts:
    if get('moe_intermediate_size') is None:
      raise ValueError('config.json lacks moe_intermediate_size (num_experts > 0)')
    moe_fields = dict(
        num_experts=num_experts, num_experts_per_tok=get('num_experts_per_tok'),
        moe_intermediate_size=get('moe_intermediate_size'),
        num_shared_experts=get('num_shared_experts'), first_k_dense_replace=first_dense,
        norm_topk_prob=bool(get('norm_topk_prob')),
        num_routers=3 if get('multi_gate') else 1)
  return dict(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      intermediate_size=intermediate or 0, num_layers=layers, num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=get('head_dim') or hf['hidden_size'] // heads,
      rope_theta=float(scaling.get('rope_theta', get('rope_theta'))), rope_scaling=rope_scaling,
      rms_norm_eps=get('rms_norm_eps'), tie_word_embeddings=bool(get('tie_word_embeddings')),
      qkv_bias=bool(get('use_qkv_bias')), out_bias=bool(get('use_bias')),
      norm_head=bool(get('norm_head')), initializer_range=get('initializer_range'),
      **moe_fields)


def llm_config(hf: dict[str, Any], **overrides) -> LLMConfig:
  """LLMConfig from a config.json dict; `overrides` replace LLMConfig fields."""
  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type={model_type!r} is not one of {MODEL_TYPES}')
  if model_type == 'bailing_moe':
    return _with_overrides(_bailing_fields(hf), overrides)
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    raise ValueError(f'config.json lacks {missing}')
  _check_supported(hf, model_type)
  get = lambda key: hf.get(key, _DEFAULTS[model_type][key])
  rope_theta, rope_scaling = _rope(hf)
  attention_bias = bool(hf.get('attention_bias', False))
  fields = dict(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      intermediate_size=hf['intermediate_size'], num_layers=hf['num_hidden_layers'],
      num_heads=hf['num_attention_heads'],
      num_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
      head_dim=get('head_dim'), rope_theta=rope_theta, rope_scaling=rope_scaling,
      rms_norm_eps=get('rms_norm_eps'), tie_word_embeddings=get('tie_word_embeddings'),
      # Qwen2 always has q/k/v biases and no o_proj bias; the others follow attention_bias.
      qkv_bias=model_type == 'qwen2' or attention_bias, out_bias=attention_bias,
      mlp_bias=bool(hf.get('mlp_bias', False)),
      qk_norm={'qwen3': 'rms', 'chameleon': 'chameleon'}.get(model_type),
      swin_norm=bool(hf.get('swin_norm', False)),
      suppressed_token_ids=tuple(sorted(
          v for name, v in (hf.get('vocabulary_map') or {}).items() if name.startswith('IMGIMG'))),
  )
  if model_type == 'chameleon':
    # transformers' Chameleon derives head_dim from the widths, whatever config.json says.
    fields['head_dim'] = hf['hidden_size'] // hf['num_attention_heads']
  return _with_overrides(fields, overrides)


def _with_overrides(fields: dict[str, Any], overrides: dict[str, Any]) -> LLMConfig:
  unknown = sorted(set(overrides) - set(LLMConfig.__dataclass_fields__))
  if unknown:
    raise ValueError(f'unknown LLMConfig override(s) {unknown}')
  fields.update(overrides)
  return LLMConfig(**fields)


def _linear(read: Reader, key: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
            bias: bool) -> dict:
  """torch Linear (out, in) -> kernel (*in_shape, *out_shape) [+ bias out_shape]."""
  out = {'kernel': read(f'{key}.weight', lambda w: w.T.reshape(in_shape + out_shape))}
  if bias:
    out['bias'] = read(f'{key}.bias', lambda b: b.reshape(out_shape))
  return out


def _layer(c: LLMConfig, read: Reader, i: int) -> dict:
  p = f'model.layers.{i}.'
  d, k = c.hidden_size, c.head_dim
  attention = {
      'q_proj': _linear(read, p + 'self_attn.q_proj', (d,), (c.num_heads, k), c.qkv_bias),
      'k_proj': _linear(read, p + 'self_attn.k_proj', (d,), (c.num_kv_heads, k), c.qkv_bias),
      'v_proj': _linear(read, p + 'self_attn.v_proj', (d,), (c.num_kv_heads, k), c.qkv_bias),
      'o_proj': _linear(read, p + 'self_attn.o_proj', (c.num_heads, k), (d,), c.out_bias),
  }
  for name in ('q_norm', 'k_norm') if c.qk_norm else ():
    attention[name] = {'scale': read(f'{p}self_attn.{name}.weight')}
    if c.qk_norm == 'chameleon':
      attention[name]['bias'] = read(f'{p}self_attn.{name}.bias')
  return _decoder_layer(read, p, attention,
                        _swiglu(read, p + 'mlp.', d, c.intermediate_size, c.mlp_bias))


def _swiglu(read: Reader, p: str, d: int, width: int, bias: bool) -> dict:
  """`nn.mlp.SwiGLU` ('hf' layout) from {gate,up,down}_proj under key prefix `p`."""
  mlp = {name: _linear(read, p + name, (d,), (width,), bias) for name in ('gate_proj', 'up_proj')}
  mlp['down_proj'] = _linear(read, p + 'down_proj', (width,), (d,), bias)
  return mlp


def _decoder_layer(read: Reader, p: str, attention: dict, mlp: dict) -> dict:
  return {
      'input_layernorm': {'scale': read(p + 'input_layernorm.weight')},
      'post_attention_layernorm': {'scale': read(p + 'post_attention_layernorm.weight')},
      'self_attn': attention,
      'mlp': mlp,
  }


def _fused_qkv(c: LLMConfig, read: Reader, key: str) -> dict:
  """Bailing's query_key_value: rows [q (H K) | k (G K) | v (G K)] -> q/k/v_proj."""
  d, k = c.hidden_size, c.head_dim
  heads = {'q_proj': c.num_heads, 'k_proj': c.num_kv_heads, 'v_proj': c.num_kv_heads}
  rows = sum(heads.values()) * k
  for suffix in ('.weight', '.bias') if c.qkv_bias else ('.weight',):
    got = read.checkpoint.get(read.prefix + key + suffix).shape
    if got[0] != rows:
      raise ValueError(f'{read.checkpoint.path}: tensor {read.prefix + key + suffix!r} of shape '
                       f'{tuple(got)} does not fit the model from config.json: (num_heads + 2 '
                       f'num_key_value_heads) head_dim = {rows} rows')
  out, start = {}, 0
  for name, n in heads.items():
    part = slice(start * k, (start + n) * k)
    start += n
    out[name] = {'kernel': read(key + '.weight',
                                lambda w, part=part, n=n: w[part].T.reshape(d, n, k))}
    if c.qkv_bias:
      out[name]['bias'] = read(key + '.bias', lambda b, part=part, n=n: b[part].reshape(n, k))
  return out


def _bailing_moe(c: LLMConfig, read: Reader, p: str) -> dict:
  """`nn.moe.MoEFeedForward` params from a BailingMoeSparseMoeBlock under prefix `p`."""
  mlp = {name: {'kernel': read(f'{p}{name}.weight', lambda w: w.T)}
         for name in moe.ROUTER_NAMES[:c.num_routers]}
  mlp['experts'] = {
      name: hf_checkpoint.stack([read(f'{p}experts.{j}.{name}.weight', lambda w: w.T)
                                 for j in range(c.num_experts)], 'experts')
      for name in ('gate_proj', 'up_proj', 'down_proj')}
  if c.num_shared_experts:
    mlp['shared_experts'] = _swiglu(read, p + 'shared_experts.', c.hidden_size,
                                    c.num_shared_experts * c.moe_intermediate_size, False)
  return mlp


def _bailing_layer(c: LLMConfig, read: Reader, i: int) -> dict:
  p = f'model.layers.{i}.'
  attention = _fused_qkv(c, read, p + 'attention.query_key_value')
  attention['o_proj'] = _linear(read, p + 'attention.dense', (c.num_heads, c.head_dim),
                                (c.hidden_size,), c.out_bias)
  mlp = (_bailing_moe(c, read, p + 'mlp.') if c.is_moe_layer(i) else
         _swiglu(read, p + 'mlp.', c.hidden_size, c.intermediate_size, False))
  return _decoder_layer(read, p, attention, mlp)


def _skipped(key: str, c: LLMConfig, checkpoint: HFCheckpoint) -> bool:
  # Their MoE block builds shared experts whenever num_shared_experts is not None: with 0,
  # zero-width tensors that hold nothing.
  empty_shared = ('.mlp.shared_experts.' in key and not c.num_shared_experts
                  and checkpoint.get(key).size == 0)
  return (key.startswith(_SKIPPED_PREFIXES) or key.endswith(_SKIPPED_SUFFIXES)
          or (c.tie_word_embeddings and key == 'lm_head.weight') or empty_shared)


def convert(checkpoint: HFCheckpoint, **overrides) -> hf_checkpoint.Converted:
  """Family converter for `unimm_jax.convert.load_pretrained`."""
  c = llm_config(checkpoint.config, **overrides)
  bailing = checkpoint.config['model_type'] == 'bailing_moe'
  read = Reader(checkpoint)
  sources: dict[str, Any] = {
      'embed_tokens': {'embedding': read('model.word_embeddings.weight' if bailing
                                         else 'model.embed_tokens.weight')},
      'norm': {'scale': read('model.norm.weight')},
  }
  if not c.tie_word_embeddings:
    sources['lm_head'] = read('lm_head.weight', lambda w: w.T)
  layers = [(_bailing_layer if bailing else _layer)(c, read, i) for i in range(c.num_layers)]
  if c.scan_layers:
    first = llm.num_dense_prefix(c)  # an MoE model's dense prefix is a scan of its own
    if first:
      sources['dense_layers'] = hf_checkpoint.stack_layer_trees(layers[:first])
    sources['layers'] = hf_checkpoint.stack_layer_trees(layers[first:])
  else:
    sources.update({f'layers_{i}': layer for i, layer in enumerate(layers)})
  read.check_all_used(lambda key: _skipped(key, c, checkpoint),
                      checkpoint.config['model_type'])
  return hf_checkpoint.Converted(model=LLM(c), sources=sources,
                                 example_inputs=(np.zeros((1, 1), np.int32),))
