"""transformers checkpoints of Qwen2, Qwen3, Llama and Chameleon -> `LLM` params.

Accepted directories: `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `LlamaForCausalLM` and
`ChameleonForConditionalGeneration` (its text decoder), in the layout `save_pretrained`
writes (transformers 5: `model.` prefix, same names on the Hub). With d = hidden size,
H / G query / kv heads of K channels, for layer i:
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
from unimm_jax.models.llm import LLM, LLMConfig, RopeScaling

MODEL_TYPES = ('qwen2', 'qwen3', 'llama', 'chameleon')
_SKIPPED_PREFIXES = ('model.vqmodel.',)
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


def llm_config(hf: dict[str, Any], **overrides) -> LLMConfig:
  """LLMConfig from a config.json dict; `overrides` replace LLMConfig fields."""
  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type={model_type!r} is not one of {MODEL_TYPES}')
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
  mlp = {name: _linear(read, f'{p}mlp.{name}', (d,), (c.intermediate_size,), c.mlp_bias)
         for name in ('gate_proj', 'up_proj')}
  mlp['down_proj'] = _linear(read, p + 'mlp.down_proj', (c.intermediate_size,), (d,), c.mlp_bias)
  return {
      'input_layernorm': {'scale': read(p + 'input_layernorm.weight')},
      'post_attention_layernorm': {'scale': read(p + 'post_attention_layernorm.weight')},
      'self_attn': attention,
      'mlp': mlp,
  }


def _skipped(key: str, c: LLMConfig) -> bool:
  return (key.startswith(_SKIPPED_PREFIXES) or key.endswith(_SKIPPED_SUFFIXES)
          or (c.tie_word_embeddings and key == 'lm_head.weight'))


def convert(checkpoint: HFCheckpoint, **overrides) -> hf_checkpoint.Converted:
  """Family converter for `unimm_jax.convert.load_pretrained`."""
  c = llm_config(checkpoint.config, **overrides)
  read = Reader(checkpoint)
  sources: dict[str, Any] = {
      'embed_tokens': {'embedding': read('model.embed_tokens.weight')},
      'norm': {'scale': read('model.norm.weight')},
  }
  if not c.tie_word_embeddings:
    sources['lm_head'] = read('lm_head.weight', lambda w: w.T)
  layers = [_layer(c, read, i) for i in range(c.num_layers)]
  if c.scan_layers:
    sources['layers'] = hf_checkpoint.stack_layer_trees(layers)
  else:
    sources.update({f'layers_{i}': layer for i, layer in enumerate(layers)})
  read.check_all_used(lambda key: _skipped(key, c), checkpoint.config['model_type'])
  return hf_checkpoint.Converted(model=LLM(c), sources=sources,
                                 example_inputs=(np.zeros((1, 1), np.int32),))
